"""Applies ring records to the replica in sequence order and makes durability points durable."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .. import replica_state
from .. import wire as p
from ..journal import Journal, RecordArea
from ..seq import prev_seq, seq_distance
from .replica import Target

if TYPE_CHECKING:
    from ..history import HistoryWriter

log = logging.getLogger("bdr.server")


class DataSource(Protocol):
    """The data section of one DATA batch, consumed in increasing order."""

    def write_runs(self, runs: list[tuple[int, int, int]]) -> None:
        """For each (start, length, offset): data bytes [start, start + length) of the batch go to the replica
        at ``offset``.  Starts increase."""

    def finish(self) -> None:
        """The batch is applied: consume whatever data is left (records skipped as replays)."""

    def prefetch(self, end: int) -> None:
        """The data bytes up to ``end`` are written next: take what can be of them off the wire now, while the
        writes wait (for their before-images to be kept)."""


class BufferSource:
    """Data already in memory (the receive buffer), written to the applier's target at the time of each write: a
    durability point inside the batch may commit a staged resync, after which the rest goes to the replica."""

    def __init__(self, applier: Applier, data: memoryview) -> None:
        self.applier = applier
        self.data = data

    def write_runs(self, runs: list[tuple[int, int, int]]) -> None:
        data = self.data
        self.applier.target.write_runs([(data[s : s + n], off) for s, n, off in runs])

    def finish(self) -> None:
        pass

    def prefetch(self, end: int) -> None:
        pass  # in memory already


@dataclass(slots=True)
class ApplyStats:
    records: int = 0
    bytes: int = 0
    writes: int = 0  # pwrite calls after coalescing
    skipped: int = 0  # replayed records older than what was applied
    syncs: int = 0
    sync_seconds: float = 0.0


class Applier:
    """Applies ring records in sequence order and keeps the durability metadata.

    ``applied`` / ``durable`` are the last applied / durable sequence numbers (``NO_SEQ``: none).  ``expect`` is
    the next sequence number to apply, or None when the next DATA record sets it (after a scan that could not
    name its resume point).
    """

    def __init__(self, target: Target, journal: Journal, area: RecordArea | None = None) -> None:
        self.target = target  # where records are written: the replica, or a staged resync's target
        self.replica_target = target
        self.journal = journal
        self.area = (
            area  # the journal's record area, where the session may stage a resync (None: no journal scans)
        )
        # asked at every durability point: True when the owner of a staged resync committed and applied it there
        # (the point is then durable: see resync_applied)
        self.at_durability_point: Callable[[], bool] = lambda: False
        resume = replica_state.resume_point(journal.header)
        self.durable = p.NO_SEQ if resume is None else resume
        self.applied = self.durable
        self.expect: int | None = None if resume is None else p.next_seq(resume)
        self.stats = ApplyStats()
        self._dirty = False  # applied but not yet synced
        # --history: what each write overwrites is kept before it reaches the replica, and every durability
        # point becomes a checkpoint (each one synced on its own, not only the last of a batch)
        self.history: HistoryWriter | None = None

    # -- sequence -------------------------------------------------------------------------------------------

    def restart_at(self, seq: int | None) -> None:
        """Streaming (re)starts at seq (None: at the first record that arrives)."""
        self.expect = seq
        if seq is not None:
            self.applied = self.durable = prev_seq(seq)

    def apply(self, msg: p.Data) -> None:
        self.apply_from(msg.fields(), BufferSource(self, memoryview(msg.data)), msg.sync)

    def apply_from(self, f: p.RecordFields, src: DataSource, sync: bool) -> None:
        """Apply a batch whose data comes from ``src`` (consumed in order, to its end)."""
        if f.seqs:
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "batch seq %d..%d: %d records via %s%s",
                    f.seqs[0],
                    f.seqs[-1],
                    len(f.seqs),
                    type(src).__name__,
                    ", sync requested" if sync else "",
                )
            self._apply_records(f, src)
        src.finish()
        if sync:
            self.sync()

    def _apply_records(self, f: p.RecordFields, src: DataSource) -> None:
        n = len(f.seqs)
        first = f.seqs[0]
        if self.expect is None:
            self.expect = first
            self.applied = prev_seq(first)
        d = seq_distance(first, self.expect)
        if d >= 1 << 63:
            raise p.RemoteProtocolError(
                p.ErrorCode.SEQ_GAP,
                f"records start at seq {first} but seq {self.expect} is next: records lost",
            )
        skip = min(d, n)
        self.stats.skipped += skip
        if skip == n:
            return
        sd = 4096
        # fast path: full 4 KiB writes to consecutive sectors without flags form a single write
        if (
            skip == 0
            and f.ops.count(p.OP_WRITE) == n
            and f.lens.count(sd) == n
            and not any(f.flags)
            and f.sectors[-1] - f.sectors[0] == (n - 1) * 8
            and (n < 3 or f.sectors == list(range(f.sectors[0], f.sectors[0] + n * 8, 8)))
        ):
            self._write_runs(src, [(0, n * sd, f.sectors[0] * p.SECTOR)])
            self._done(f.seqs[-1], n, n * sd)
            return
        self._apply_general(f, src, skip)

    def _apply_general(self, f: p.RecordFields, src: DataSource, skip: int) -> None:
        ops, lens, sectors, seqs = f.ops, f.lens, f.sectors, f.seqs
        n = len(seqs)
        # the durability points of the batch: sync once at the last (it covers the earlier ones); with a
        # history, at each, so that each is a checkpoint
        points = [
            i
            for i in range(skip, n)
            if ops[i] == p.OP_FLUSH or (ops[i] == p.OP_WRITE and f.flags[i] & p.REC_FUA)
        ]
        if self.history is None:
            points = points[-1:]
        point_set = set(points)
        write, sector = p.OP_WRITE, p.SECTOR
        runs: list[tuple[int, int, int]] = []  # coalesced writes: (data offset, length, disk offset)
        dpos = 0
        run_off = run_start = run_len = 0  # the run being extended
        nbytes = 0

        def write_runs() -> None:  # before anything that is not a write, and at durability points
            nonlocal runs, run_len
            if run_len:
                runs.append((run_start, run_len, run_off))
                run_len = 0
            if runs:
                self._write_runs(src, runs)
                runs = []

        for i in range(n):
            op, ln = ops[i], lens[i]
            if op == write:
                if i >= skip:
                    off = sectors[i] * sector
                    if run_len and run_off + run_len == off and run_start + run_len == dpos:
                        run_len += ln
                    else:
                        if run_len:
                            runs.append((run_start, run_len, run_off))
                        run_off, run_start, run_len = off, dpos, ln
                    nbytes += ln
                dpos += ln
            elif i >= skip:
                write_runs()
                if op == p.OP_DISCARD:
                    # the client checked that the source reads zeros there: so does the replica, and it may
                    # give the space back; UNZEROED: the source kept data there, the client resyncs the range
                    if not f.flags[i] & p.REC_UNZEROED:
                        self._preserve(sectors[i] * sector, ln, "discard")
                        self.target.discard(sectors[i] * sector, ln)
                elif op == p.OP_WRITE_ZEROES:
                    self._preserve(sectors[i] * sector, ln, "write-zeroes")
                    self.target.write_zeroes(sectors[i] * sector, ln)
            if i in point_set:
                write_runs()
                self._done(seqs[i], i + 1 - skip, nbytes)
                skip, nbytes = i + 1, 0
                self.sync(point=True)
        write_runs()
        if skip < n:
            self._done(seqs[-1], n - skip, nbytes)

    def _preserve(self, offset: int, length: int, what: str) -> None:
        """With a history: keep what the replica holds in the range before a discard or write-zeroes."""
        if self.history is not None and not self.staging:
            self.history.preserve_or_gap(offset, length, what)

    def _write_runs(self, src: DataSource, runs: list[tuple[int, int, int]]) -> None:
        if self.history is not None and not self.staging:
            self.history.preserve_while_writing(runs, src.write_runs, src.prefetch)
        else:
            src.write_runs(runs)
        self.stats.writes += len(runs)

    def _done(self, last_seq: int, records: int, nbytes: int) -> None:
        self.applied = last_seq
        self.expect = p.next_seq(last_seq)
        self.stats.records += records
        self.stats.bytes += nbytes
        self._dirty = True

    # -- durability ---------------------------------------------------------------------------------------------

    @property
    def staging(self) -> bool:
        """Records go to a staged resync, not to the replica."""
        return self.target is not self.replica_target

    def stage_into(self, target: Target | None) -> None:
        """Write records to ``target`` (a staged resync) from now on; None: to the replica again."""
        self.target = self.replica_target if target is None else target

    def resync_applied(self) -> None:
        """A staged resync was committed and applied at this durability point: everything applied is durable."""
        self.target = self.replica_target
        self.durable = self.applied
        self._dirty = False
        self.stats.syncs += 1

    def sync(self, point: bool = False) -> None:
        """Make everything applied durable: replica fdatasync, then the metadata header, then (caller) ACK.
        ``point``: the last record applied is a durability point of the source (a checkpoint of the history)."""
        if self.at_durability_point():
            self._checkpoint(point)
            return
        if not self._dirty and self.durable == self.applied:
            self._checkpoint(point)
            return
        t0 = time.monotonic()
        self.target.sync()
        was = self.journal.header
        now = self.journal.store(replica_state.durable_point(was, self.applied, self.expect is not None))
        if replica_state.is_consistent(now) and not replica_state.is_consistent(was):
            log.info("replica is consistent again at seq %d", self.applied)
        self.durable = self.applied
        self._dirty = False
        self.stats.syncs += 1
        took = time.monotonic() - t0
        self.stats.sync_seconds += took
        log.debug("durable up to seq %d (replica fdatasync + metadata in %.1f ms)", self.durable, took * 1000)
        self._checkpoint(point)

    def _checkpoint(self, point: bool) -> None:
        """The replica is durable at a durability point of the source: a point of the history, if the replica is
        a consistent copy there (not while a resync is staged or a direct one left it behind)."""
        if (
            point
            and self.history is not None
            and not self.staging
            and self.durable == self.applied
            and self.expect is not None
            and replica_state.is_consistent(self.journal.header)
        ):
            self.history.checkpoint(self.applied)

    def ack(self) -> p.Ack:
        return p.Ack(self.applied, self.durable)
