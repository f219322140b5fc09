"""The source's persistent change tracking (the target's ``meta_device``), from the client's side.

The target marks a region on its meta device before any write to it reaches the disk; only the client clears
the marks, when the replica holds every write up to the ring head, naming that ring and position.  After a
crash or a reboot the new target loads the marks into its dirty bitmap (``State.RECOVERED``): if the replica
still stands at or after the point of the last clear, and nothing else wrote it since (WELCOME ``TRACKABLE``),
a resync of only the marked regions brings it up to date, instead of a scan of the whole device.
"""

from __future__ import annotations

import logging
import time

from .. import wire as p
from ..kernel.ring import RingConsumer, Tracking
from ..seq import prev_seq, seq_after

log = logging.getLogger("bdr.client")

CLEAR_EVERY = 5.0  # seconds between clears: a write after a clear waits for one metadata write per region


def refusal(welcome: p.Welcome, trk: Tracking, ring_id: bytes) -> str | None:
    """Why the marks of a recovered meta_device cannot bring this replica up to date (None: they can)."""
    if not trk.recovered:
        return "the meta_device was new when the target was created"
    if trk.failed:
        return "a write to the meta_device failed"
    if not welcome.flags & p.WelcomeFlag.TRACKABLE:
        return (
            "the replica is not a consistent copy of this source that nothing else wrote since (the server "
            "decides this from the generations: bdr_client needs --metadata)"
        )
    if trk.clear_ring != welcome.ring_id or trk.clear_ring == bytes(16):
        return "the replica's resume point is in another capture ring than the last clear of the marks"
    if trk.clear_pos and seq_after(prev_seq(trk.clear_pos), welcome.durable_seq):
        return f"the replica is durable up to seq {welcome.durable_seq}, before the last clear at {trk.clear_pos}"
    return None


class Clearer:
    """Clears the marks when the replica holds every captured write, at most every CLEAR_EVERY seconds."""

    def __init__(self, ring: RingConsumer, ring_id: bytes) -> None:
        self.ring = ring
        self.ring_id = ring_id
        self.enabled = ring.tracking() is not None
        self.cleared_at: int | None = None  # ring position of the last clear
        self.last = -CLEAR_EVERY

    def in_sync(self, pos: int, force: bool = False) -> None:
        """The replica durably holds every record before ring position ``pos`` and every dirty region taken."""
        if not self.enabled or pos == self.cleared_at:
            return
        now = time.monotonic()
        if not force and now - self.last < CLEAR_EVERY:
            return
        self.last = now
        if self.ring.clear_tracking(pos, self.ring_id):
            self.cleared_at = pos
            log.debug("change tracking cleared at ring position %d", pos)
