"""The batches sent and not yet acknowledged durable, and what an ACK releases.

A record's ring slot is released (the ring tail advanced) only when the server acknowledged it durable, so after
a disconnect or a server crash the client resends from the server's last durable sequence number.  The server
does not acknowledge each frame: after a read of DATA / SYNC frames it sends one ACK (applied and durable sequence
numbers) when its input is idle, when its durable sequence number moved, or every few MiB applied; one ACK may
cover several batches, and a batch becomes durable only when a flush on the server covers it.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

from .. import wire as p
from ..kernel.ring import Batch, RingConsumer
from .stats import ClientStats

log = logging.getLogger("bdr.client")


@dataclass(slots=True)
class Inflight:
    end: int  # ring position after the batch
    last_seq: int
    durability_point: bool
    sent_at: float  # monotonic time the batch was handed to the socket


class InflightBatches:
    """The batches of one connection not yet durable on the server, oldest first."""

    def __init__(self, ring: RingConsumer, stats: ClientStats) -> None:
        self.ring = ring
        self.stats = stats
        self.batches: collections.deque[Inflight] = collections.deque()
        self.sync_pending: int | None = None  # seq a SYNC (or DATA+SYNC) asked to make durable
        self.acks = 0
        self.applied = p.NO_SEQ  # as the server last acknowledged
        self.durable = p.NO_SEQ

    def __bool__(self) -> bool:
        return bool(self.batches)

    @property
    def last_seq(self) -> int:
        return self.batches[-1].last_seq

    def sent(self, b: Batch, sync: bool) -> None:
        self.batches.append(Inflight(b.end, b.last_seq, b.durability_point, time.monotonic()))
        if sync:
            self.sync_pending = b.last_seq

    def acks_above(self, n: int) -> bool:
        return self.acks > n

    def on_ack(self, ack: p.Ack) -> None:
        """Release the ring up to the last batch the ACK made durable."""
        self.acks += 1
        self.applied, self.durable = ack.applied_seq, ack.durable_seq
        durable = ack.durable_seq
        if durable == p.NO_SEQ:
            return
        release_to = None
        flushed = False
        now = time.monotonic()
        while self.batches and self.batches[0].last_seq <= durable:
            it = self.batches.popleft()
            release_to = it.end
            flushed = flushed or it.durability_point
            self.stats.count_durable(now - it.sent_at)
        if release_to is not None:
            self.ring.release(release_to)
        if flushed:
            log.info("flush acknowledged: replica durable up to seq %d", durable)
        if self.sync_pending is not None and self.sync_pending <= durable:
            self.sync_pending = None
        log.debug("ack applied %d durable %d, ring tail %d", ack.applied_seq, durable, self.ring.tail)

    def durable_through(self, pos: int) -> None:
        """After a scan that began at ring position ``pos``: the batches before it are durable (applied and synced
        before SCAN_BEGIN, or covered by the scan) even when the server could not name a resume sequence number;
        release the ring up to ``pos``."""
        while self.batches and self.batches[0].end <= pos:
            self.batches.popleft()
        self.sync_pending = None
        if pos > self.ring.tail:
            self.ring.release(pos)
