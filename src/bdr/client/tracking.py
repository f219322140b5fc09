"""The source's persistent change tracking (the target's ``meta_device``), from the client's side.

The target marks a region on its meta device before any write to it reaches the disk; only the client clears
the marks: all of them when the replica holds every write up to the ring head, naming that ring and position;
and while writes go on, those of the regions not written in the kernel's current epoch, once the replica holds
every write before it (an epoch lasts CLEAR_EVERY seconds or more).  After a
crash or a reboot the new target loads the marks into its dirty bitmap (``State.RECOVERED``): if the replica
still stands at or after the point of the last clear, and nothing else wrote it since (WELCOME ``TRACKABLE``),
a resync of only the marked regions brings it up to date, instead of a scan of the whole device.
"""

from __future__ import annotations

import logging
import time

from .. import wire as p
from ..generations import fmt_id
from ..kernel.layout import RingError
from ..kernel.ring import RingConsumer, Tracking
from ..seq import prev_seq, seq_after
from .metadata import NO_RING, SourceMeta

log = logging.getLogger("bdr.client")

CLEAR_EVERY = 5.0  # seconds between clears: a write after a clear waits for one metadata write per region


def refusal(welcome: p.Welcome, trk: Tracking, generations: set[int]) -> str | None:
    """Why the marks of a recovered meta_device cannot bring this replica up to date (None: they can).
    ``generations``: those this source went on writing in without a break since (the current one, and the one a
    start after a crash ended)."""
    if not trk.recovered:
        return "the meta_device was new when the target was created"
    if trk.failed:
        return "a write to the meta_device failed"
    if not welcome.flags & p.WelcomeFlag.TRACKABLE:
        return (
            "the replica is not a consistent copy of this source that nothing else wrote since (the server "
            "decides this from the generations: bdr_client needs --metadata)"
        )
    if trk.clear_generation not in generations:
        return (
            f"they were last cleared in generation {fmt_id(trk.clear_generation)}, not in this source's current "
            "one or the one it continued after a crash (the device may have been written without them since)"
        )
    if trk.clear_ring != welcome.ring_id or trk.clear_ring == bytes(16):
        return "the replica's resume point is in another capture ring than the last clear of the marks"
    if trk.clear_pos and seq_after(prev_seq(trk.clear_pos), welcome.durable_seq):
        return f"the replica is durable up to seq {welcome.durable_seq}, before the last clear at {trk.clear_pos}"
    return None


def marks_refusal(marks: p.Marks, meta: SourceMeta | None, ring_id: bytes) -> str | None:
    """Why a demoted old source's ``marks`` cannot bring it up to this source's data (None: they can, with
    every write of this source's generation after them).  This source was promoted from a replica that held
    the old source's ring ``meta.base_ring`` up to ``meta.base_seq``; the marks hold every write the old source
    made after their last clear."""
    if meta is None or meta.gen_ring != ring_id:
        return "this source's capture ring was not created with its generation (bdr promote --name)"
    if not meta.generations.past or meta.generations.past[-1][0] != marks.generation:
        return (
            f"they were last cleared in generation {fmt_id(marks.generation)}, not in the one this source was "
            "promoted from"
        )
    if meta.base_ring == NO_RING or marks.clear_ring != meta.base_ring:
        return "they were last cleared in another capture ring than the one this source was promoted at"
    if marks.clear_pos and seq_after(prev_seq(marks.clear_pos), meta.base_seq):
        return (
            f"they were last cleared at seq {marks.clear_pos}, after seq {meta.base_seq} where this source's "
            "replica stood when it was promoted"
        )
    return None


class Clearer:
    """Clears the marks when the replica holds every captured write, at most every CLEAR_EVERY seconds."""

    def __init__(self, ring: RingConsumer, ring_id: bytes) -> None:
        self.ring = ring
        self.ring_id = ring_id
        self.enabled = ring.tracking() is not None
        self.cleared_at: tuple[int, int] | None = None  # ring position and generation of the last clear
        self.last = -CLEAR_EVERY
        self.rotating = self.enabled  # off with a module that cannot rotate: the marks go only when in sync

    def _due(self, force: bool = False) -> bool:
        """CLEAR_EVERY seconds since the last clear or rotation asked for (or ``force``): this one is asked."""
        now = time.monotonic()
        if not force and now - self.last < CLEAR_EVERY:
            return False
        self.last = now
        return True

    def in_sync(self, pos: int, generation: int, force: bool = False) -> None:
        """The replica durably holds every record before ring position ``pos`` and every dirty region taken;
        ``generation``: the source's current one."""
        if not self.enabled or (pos, generation) == self.cleared_at or not self._due(force):
            return
        try:
            cleared = self.ring.clear_tracking(pos, self.ring_id, generation)
        except RingError as exc:
            self.enabled = False
            log.error("%s: change tracking is off until bdr_client restarts (the next start scans more)", exc)
            return
        if cleared:
            self.cleared_at = (pos, generation)
            log.debug("change tracking cleared at ring position %d", pos)

    def acked(self, tail: int, generation: int) -> None:
        """While writes go on: the replica durably holds every record before ring position ``tail`` and every
        dirty region taken.  At most every CLEAR_EVERY seconds, the marks of the regions not written since the
        last such call go (an epoch of the kernel's), so that they cover only recent writes."""
        if not self.enabled or not self.rotating or not self._due():
            return
        try:
            rotated = self.ring.rotate_tracking(tail, self.ring_id, generation)
        except RingError as exc:
            self.rotating = False
            log.error(
                "%s: the marks are cleared only when the replica is in sync until bdr_client restarts (a crash "
                "under a steady load then resyncs more)",
                exc,
            )
            return
        if rotated:
            self.cleared_at = None
            log.debug("change tracking: marks of the regions not written since the last epoch cleared")
