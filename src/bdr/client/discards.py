"""The check of discarded ranges before their records go: a discard is only a hint to the source device, so
each discarded range is read back, and a range that does not read as zeros is flagged for a resync."""

from __future__ import annotations

import bisect
import logging
from typing import TYPE_CHECKING

from .. import wire as p
from ..kernel.ring import Batch

if TYPE_CHECKING:
    from .session import ClientSession

log = logging.getLogger("bdr.client")


class Extents:
    """Byte extents merged for containment look-ups."""

    def __init__(self, extents: list[tuple[int, int]]) -> None:
        merged: list[list[int]] = []
        for off, n in sorted(extents):
            if merged and off <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], off + n)
            else:
                merged.append([off, off + n])
        self.starts = [a for a, _ in merged]
        self.ends = [e for _, e in merged]

    def covers(self, off: int, n: int) -> bool:
        i = bisect.bisect_right(self.starts, off) - 1
        return i >= 0 and self.ends[i] >= off + n


def check(sess: ClientSession, b: Batch) -> None:
    """A discard is a hint: the source may read zeros, its old data or anything there afterwards.  Read
    each discarded range back from the source (O_DIRECT, no network): zeros -- the DISCARD goes as is and
    the replica is zeroed; anything else -- the record goes flagged UNZEROED (the replica is left as it is)
    and the range is resynced by checksums after it, once the server has recorded that a resync is due."""
    c = sess.client
    pos = b.start
    for k, dv in enumerate(b.desc):
        ops = dv.cast("H")[10::16].tolist()
        first, pos = pos, pos + len(ops)
        if p.OP_DISCARD not in ops:
            continue
        copy: bytearray | None = None
        q, i32 = dv.cast("Q"), dv.cast("I")
        for i, op in enumerate(ops):
            if op != p.OP_DISCARD:
                continue
            off, ln = q[i * 4 + 1] * p.SECTOR, i32[i * 8 + 4]
            c.stats.discarded += ln
            nonzero = c.source.nonzero_blocks(off, ln)
            if nonzero:  # data written after the discard explains what it covers
                later = Extents(sess.ring.written(first + i + 1, sess.ring.head()))
                nonzero = [(o, n) for o, n in nonzero if not later.covers(o, n)]
            if not nonzero:
                continue
            if copy is None:
                copy = bytearray(dv)
            copy[i * p.RECORD_SIZE + 22] |= p.REC_UNZEROED
            if not sess.replication.unzeroed:
                sess.resync_pending()
            sess.replication.unzeroed.append((off, ln))
            log.info("discard of [%d, +%d) left data on the source: that range is resynced", off, ln)
        if copy is not None:
            q.release()
            i32.release()
            dv.release()
            b.desc[k] = memoryview(copy)
