"""The record area of the server journal, at work: stage a resync as records, commit it, apply it to the
replica, and at start replay a committed one or discard an uncommitted one (the format is ``format``'s, the
ordering rules are drawn there).

A journal scan (the default resync) must not turn the replica into a mix of old and new blocks.  The server
stages everything the resync brings -- the corrected scan blocks, then the ring writes captured meanwhile --
as records after the header area of the ``--journal`` path, writes a commit record, and only then applies the
records to the replica.  At every instant the replica, after replay, is the old or the new consistent state.
"""

from __future__ import annotations

import errno
import functools
import heapq
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from typing import ParamSpec, Protocol, TypeVar

import xxhash

from .copies import BothCopiesCorrupt, TwoCopies
from .errors import JournalCorrupt, JournalError, JournalFull, JournalIOError, StorageError
from .faults import RECEIVE_POINT_AFTER, FaultPlan
from .format import (
    REC,
    REC_HEADER,
    RECORDS_AT,
    STATE_AT,
    STATE_MAGIC,
    AreaState,
    Record,
    RecType,
    StateBlock,
    aligned,
    parse_record_header,
    record_checksum,
)
from .header import HEADER_BLOCK

log = logging.getLogger("bdr.journal")

BUCKET_SHIFT = (
    20  # staged extents are indexed by the 1 MiB buckets they touch (overlay cost ~ what it overlays)
)
# a full file system or quota under a journal file: a journal condition (the resync does not fit), not a failure
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class ReplicaTarget(Protocol):
    def write_runs(self, runs: list[tuple[memoryview, int]]) -> None: ...
    def write_zeroes(self, offset: int, length: int) -> None: ...
    def sync(self) -> None: ...


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _journal_io(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """A RecordArea method whose OSErrors are the journal's (JournalIOError); the replica's pass as they are."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except StorageError:
            raise
        except OSError as exc:
            area = args[0]
            assert isinstance(area, RecordArea)
            raise area._io_error(exc) from exc

    return wrapper


class RecordArea:
    """Stage, commit and apply resync records on an open journal file descriptor.

    ``limit``: the end of the record area in bytes from the start of the journal (a block device: its size; a
    file: ``--journal-size``, or None to let the file grow).  ``faults``: where to stop on purpose (the crash
    tests: ``faults.FaultPlan``), at the points "receive", "commit" and "apply".
    """

    def __init__(self, fd: int, path: str, limit: int | None, faults: FaultPlan | None = None) -> None:
        self.fd = fd
        self.path = path
        self.limit = limit
        self.faults = faults if faults is not None else FaultPlan()  # crash points (tests): none by default
        if stat.S_ISREG(os.fstat(fd).st_mode):
            # both state copies allocated now: ending a resync on a full file system must not need new blocks
            try:
                os.posix_fallocate(fd, STATE_AT, 2 * HEADER_BLOCK)
            except OSError as exc:
                raise JournalError(f"cannot allocate journal {path}: {exc.strerror}") from exc
        self._copies = TwoCopies(fd, STATE_AT, STATE_MAGIC, StateBlock.parse)
        self.state = self._load()
        self.pos = RECORDS_AT  # where the next record goes
        self.index = 0
        self.checksums = xxhash.xxh3_64()
        # staged writes in order, for reads through the journal: (offset, length, data position or -1 for zeros)
        self.extents: list[tuple[int, int, int]] = []
        self.buckets: dict[int, list[int]] = {}  # bucket -> indices into extents, ascending
        self.staged_bytes = 0
        self.peak = 0  # the most bytes of records the area held during this resync
        self.compactions = 0

    @property
    def is_open(self) -> bool:
        return self.state.state is AreaState.OPEN

    def _load(self) -> StateBlock:
        try:
            state = self._copies.load()
        except BothCopiesCorrupt:
            raise JournalCorrupt(
                f"journal {self.path}: both copies of the record area state are corrupt (bad checksum); "
                "refusing to start. Move the journal away to start over (the next client start then resyncs)."
            ) from None
        return state if state is not None else StateBlock()

    def _set_state(self, state: AreaState, **changes: int) -> None:
        old = self.state
        new = StateBlock(
            state,
            old.generation + 1,
            changes.get("epoch", old.epoch),
            changes.get("commit_off", old.commit_off),
            changes.get("records", old.records),
        )
        self._copies.store(new, new.pack())
        self.state = new

    # -- staging ---------------------------------------------------------------------------------------------

    @_journal_io
    def begin(self) -> None:
        """Start staging a new resync (a new epoch: records of older resyncs can never be taken for ours)."""
        self.pos = RECORDS_AT
        self.index = 0
        self.checksums = xxhash.xxh3_64()
        self.extents = []
        self.buckets = {}
        self.staged_bytes = 0
        self.peak = 0
        self.compactions = 0
        self._set_state(AreaState.OPEN, epoch=self.state.epoch + 1, commit_off=0, records=0)

    def _append(self, rec: Record) -> int:
        """Write a record; returns the position of its data.  When the area is full, the staged records are
        compacted first (each staged byte kept once, its newest version); JournalFull when even that fails."""
        size = rec.size
        commit = rec.type is RecType.COMMIT
        if self._fits(size, reserve=not commit):
            try:
                return self._write_record(rec)
            except OSError as exc:
                if exc.errno not in _FULL_ERRNOS:
                    raise self._io_error(exc) from exc
                log.warning(
                    "journal %s: %s while staging; compacting the staged resync", self.path, exc.strerror
                )
        if commit or not self.compact(rec.offset, rec.length) or not self._fits(size):
            raise self._full(size)
        rec = Record(rec.type, rec.epoch, self.index, rec.offset, rec.length, rec.data)  # renumbered
        try:
            return self._write_record(rec)
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise self._full(size) from exc
            raise self._io_error(exc) from exc

    def _fits(self, size: int, reserve: bool = True) -> bool:
        """Whether a record of ``size`` bytes fits, leaving room for the commit record (``reserve``: the
        commit record itself takes that room)."""
        return self.limit is None or self.pos + size + (REC_HEADER if reserve else 0) <= self.limit

    def _full(self, size: int) -> JournalFull:
        live = self.pos - RECORDS_AT + size + REC_HEADER
        cap = (self.limit if self.limit is not None else self.pos) - RECORDS_AT
        return JournalFull(
            f"journal {self.path} is too small for this resync: {live} bytes of records needed with each "
            f"staged block kept once, the record area holds {cap} bytes",
            live,
            cap,
        )

    def _io_error(self, exc: OSError) -> JournalIOError:
        return JournalIOError(
            exc.errno or errno.EIO, f"journal {self.path}: I/O error: {exc.strerror or exc}"
        )

    def _write_record(self, rec: Record) -> int:
        buf = rec.pack()
        self._pwrite_all(buf, self.pos)
        self.checksums.update(buf[REC.size : REC.size + 8])
        data_at = self.pos + REC_HEADER
        self.pos += len(buf)
        self.index += 1
        self.peak = max(self.peak, self.pos - RECORDS_AT)
        return data_at

    def _pwrite_all(self, buf: bytes, at: int) -> None:
        done = 0
        while done < len(buf):
            n = os.pwrite(self.fd, memoryview(buf)[done:], at + done)
            if n <= 0:
                raise OSError(errno.EIO, f"short write to journal {self.path}")
            done += n

    # -- compaction ------------------------------------------------------------------------------------------

    def live_pieces(self, next_offset: int = 0, next_length: int = 0) -> list[tuple[int, int, int]]:
        """The staged bytes that the apply would leave on the replica, as disjoint (offset, length, data position
        or -1 for zeros), in staging order of the records they come from: bytes a later record overwrote are
        gone, and so are those the record about to be staged (``next_offset``, ``next_length``) replaces.  A
        sweep over the extents by offset; the newest extent covering a point owns it."""
        ext = self.extents
        if next_length:
            ext = [*ext, (next_offset, next_length, -2)]  # -2: owns its bytes, keeps none
        if not ext:
            return []
        order = sorted(range(len(ext)), key=lambda i: ext[i][0])
        points = sorted({o for o, _, _ in ext} | {o + n for o, n, _ in ext})
        heap: list[tuple[int, int]] = []  # (-index, end): the newest extent on top
        pieces: list[tuple[int, int, int]] = []  # (owner, start, end)
        j = 0
        for k in range(len(points) - 1):
            x, nxt = points[k], points[k + 1]
            while j < len(order) and ext[order[j]][0] <= x:
                i = order[j]
                heapq.heappush(heap, (-i, ext[i][0] + ext[i][1]))
                j += 1
            while heap and heap[0][1] <= x:
                heapq.heappop(heap)
            if not heap:
                continue
            owner = -heap[0][0]
            if pieces and pieces[-1][0] == owner and pieces[-1][2] == x:
                pieces[-1] = (owner, pieces[-1][1], nxt)
            else:
                pieces.append((owner, x, nxt))
        pieces.sort()  # by owner (staging order, so by position in the area), then offset
        out = []
        for owner, lo, hi in pieces:
            off, _, at = ext[owner]
            if at == -2:
                continue
            out.append((lo, hi - lo, -1 if at < 0 else at + lo - off))
        return out

    def compact(self, next_offset: int = 0, next_length: int = 0) -> bool:
        """Rewrite the open staging so that every staged byte is there once, with its newest data; the state of
        the replica after the apply is the same.  Records move only towards the start of the area: a live
        piece of a data record never takes more room than the record (a piece ends where a later record
        overwrote at least a sector, which is more than a record header and its padding), so no data is
        overwritten before it is read; ZERO records, which hold no data, are written after all data.  A crash meanwhile leaves an OPEN area, discarded at the next start as always.
        Returns False when nothing would be freed."""
        assert self.is_open
        pieces = self.live_pieces(next_offset, next_length)
        live = sum(aligned(REC_HEADER + (0 if at < 0 else n)) for _, n, at in pieces)
        used = self.pos - RECORDS_AT
        if live >= used:
            return False
        # zero pieces last: they have no data to read, and a ZERO record that later writes cut into pieces takes
        # more room than it did
        plan = [x for x in pieces if x[2] >= 0] + [x for x in pieces if x[2] < 0]
        pos = RECORDS_AT
        for k, (_, n, at) in enumerate(plan):  # each write must end before the next data still to be read
            pos += aligned(REC_HEADER + (0 if at < 0 else n))
            nxt = plan[k + 1][2] if k + 1 < len(plan) else -1
            if nxt >= 0 and pos > nxt:
                log.warning("journal %s: the staged records cannot be compacted in place", self.path)
                return False
        t0 = time.monotonic()
        epoch = self.state.epoch
        self.pos = RECORDS_AT
        self.index = 0
        self.checksums = xxhash.xxh3_64()
        self.extents = []
        self.buckets = {}
        for off, n, at in plan:
            if at < 0:
                rec = Record(RecType.ZERO, epoch, self.index, off, n)
            else:
                data = os.pread(self.fd, n, at)
                if len(data) != n:
                    raise OSError(errno.EIO, f"short read from journal {self.path}")
                rec = Record(RecType.BLOCK, epoch, self.index, off, n, data)
            new_at = self._write_record(rec)
            self._index(off, n, new_at if at >= 0 else -1)
        self.compactions += 1
        log.info(
            "journal %s: compacted the staged resync from %d to %d bytes in %.1f s (the record area holds %s)",
            self.path,
            used,
            self.pos - RECORDS_AT,
            time.monotonic() - t0,
            "no limit" if self.limit is None else f"{self.limit - RECORDS_AT} bytes",
        )
        return True

    @_journal_io
    def stage_write(self, data: bytes | memoryview, offset: int) -> None:
        assert self.is_open
        at = self._append(Record(RecType.BLOCK, self.state.epoch, self.index, offset, len(data), bytes(data)))
        self._index(offset, len(data), at)
        self.staged_bytes += len(data)
        if self.staged_bytes >= RECEIVE_POINT_AFTER:
            self.faults.hit("receive")

    @_journal_io
    def stage_zeroes(self, offset: int, length: int) -> None:
        assert self.is_open
        self._append(Record(RecType.ZERO, self.state.epoch, self.index, offset, length))
        self._index(offset, length, -1)

    def _index(self, offset: int, length: int, at: int) -> None:
        i = len(self.extents)
        self.extents.append((offset, length, at))
        for b in range(offset >> BUCKET_SHIFT, ((offset + max(length, 1) - 1) >> BUCKET_SHIFT) + 1):
            self.buckets.setdefault(b, []).append(i)

    @_journal_io
    def sync(self) -> None:
        os.fdatasync(self.fd)

    @_journal_io
    def overlay(self, buf: memoryview, offset: int) -> None:
        """Replace the bytes of buf (the replica at offset) by what the staged records wrote there."""
        end = offset + len(buf)
        if not self.extents or end <= offset:
            return
        hits: set[int] = set()
        for b in range(offset >> BUCKET_SHIFT, ((end - 1) >> BUCKET_SHIFT) + 1):
            hits.update(self.buckets.get(b, ()))
        for i in sorted(hits):  # in staging order: later records win
            off, ln, at = self.extents[i]
            lo, hi = max(off, offset), min(off + ln, end)
            if lo >= hi:
                continue
            dst = buf[lo - offset : hi - offset]
            if at < 0:
                dst[:] = bytes(hi - lo)
            else:
                got = os.preadv(self.fd, [dst], at + lo - off)
                if got != hi - lo:
                    raise OSError(f"short read from journal {self.path}")

    # -- commit and apply ------------------------------------------------------------------------------------

    @_journal_io
    def commit(self) -> None:
        """Write the COMMIT record and make the resync committed (durable): from here it will be applied."""
        assert self.is_open
        commit_at = self.pos
        count = self.index
        total = self.checksums.intdigest()
        self._append(Record(RecType.COMMIT, self.state.epoch, count, total, 0))
        os.fdatasync(self.fd)
        self.faults.hit("commit")
        self._set_state(AreaState.COMMITTED, commit_off=commit_at, records=count)
        log.info(
            "journal: resync committed (%d records, %d bytes of data; at most %d bytes of records staged, %d "
            "compactions, record area %s)",
            count,
            self.staged_bytes,
            self.peak,
            self.compactions,
            "unlimited" if self.limit is None else f"{self.limit - RECORDS_AT} bytes",
        )

    def records(self) -> Iterator[tuple[Record, int]]:
        """The records of the committed resync, verified, with the position of their data (no data read)."""
        st = self.state
        pos = RECORDS_AT
        total = xxhash.xxh3_64()
        for i in range(st.records + 1):
            head = os.pread(self.fd, REC_HEADER, pos)
            parsed = parse_record_header(head)
            where = f"journal {self.path}: record {i} at byte {pos}"
            if parsed is None:
                raise JournalCorrupt(
                    f"{where} is not a valid record header; refusing to apply a corrupt journal"
                )
            rtype, epoch, index, offset, length, csum = parsed
            if epoch != st.epoch or index != i:
                raise JournalCorrupt(
                    f"{where} belongs to another resync; refusing to apply a corrupt journal"
                )
            if (i == st.records) != (rtype is RecType.COMMIT) or (
                rtype is RecType.COMMIT and pos != st.commit_off
            ):
                raise JournalCorrupt(f"{where}: the commit record is not where the state says")
            data = os.pread(self.fd, length, pos + REC_HEADER) if rtype is RecType.BLOCK else b""
            if len(data) != (length if rtype is RecType.BLOCK else 0):
                raise JournalCorrupt(f"{where} is cut short")
            if record_checksum(head, data) != csum:
                raise JournalCorrupt(f"{where} has a bad checksum; refusing to apply a corrupt journal")
            if rtype is RecType.COMMIT:
                if offset != total.intdigest():
                    raise JournalCorrupt(f"{where}: the commit record does not match the records before it")
                return
            total.update(csum.to_bytes(8, "little"))
            yield Record(rtype, epoch, index, offset, length), pos + REC_HEADER
            pos += aligned(REC_HEADER + (length if rtype is RecType.BLOCK else 0))

    def verify(self) -> list[tuple[Record, int]]:
        """Every record of the committed resync, checked before anything is applied."""
        return list(self.records())

    @_journal_io
    def apply(
        self,
        replica: ReplicaTarget,
        size_limit: int | None = None,
        before: Callable[[list[tuple[int, int]]], None] | None = None,
    ) -> int:
        """Apply the committed resync to the replica (idempotent), sync it, mark the area CLEAN.  Returns the
        number of records applied.  Raises JournalCorrupt (nothing applied) when a record fails its checksum.
        ``before``: called with every (offset, length) the resync writes, once verified and before any write
        (the server's history keeps what they overwrite)."""
        assert self.state.state is AreaState.COMMITTED
        recs = self.verify()
        if before is not None:
            before([(rec.offset, rec.length) for rec, _ in recs])
        half = len(recs) // 2
        for i, (rec, at) in enumerate(recs):
            if i == half and i:
                self.faults.hit("apply")
            if size_limit is not None and rec.offset + rec.length > size_limit:
                raise JournalCorrupt(
                    f"journal {self.path}: record {rec.index} writes past the end of the replica; refusing it"
                )
            if rec.type is RecType.ZERO:
                replica.write_zeroes(rec.offset, rec.length)
            else:
                data = os.pread(self.fd, rec.length, at)
                replica.write_runs([(memoryview(data), rec.offset)])
        replica.sync()
        self._set_state(AreaState.CLEAN)
        self.extents = []
        self.buckets = {}
        return len(recs)

    @_journal_io
    def discard(self) -> None:
        """Forget an uncommitted resync (the replica was never touched by it)."""
        self.extents = []
        self.buckets = {}
        self._set_state(AreaState.CLEAN)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @_journal_io
    def recover(
        self,
        replica: ReplicaTarget,
        size_limit: int | None = None,
        before: Callable[[list[tuple[int, int]]], None] | None = None,
    ) -> str:
        """At server start: replay a committed resync, discard an uncommitted one.  Returns what was done."""
        st = self.state.state
        if st is AreaState.COMMITTED:
            n = self.apply(replica, size_limit, before)
            return f"replayed a committed resync ({n} records)"
        if st is AreaState.OPEN:
            self.discard()
            return "discarded an uncommitted resync (the replica was not touched)"
        return ""


class StagingTarget:
    """The applier's target while a resync is staged: ring writes become journal records."""

    def __init__(self, area: RecordArea) -> None:
        self.area = area

    def write_runs(self, runs: list[tuple[memoryview, int]]) -> None:
        for data, offset in runs:
            self.area.stage_write(data, offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.area.stage_zeroes(offset, length)

    def discard(self, offset: int, length: int) -> None:
        self.area.stage_zeroes(offset, length)

    def sync(self) -> None:
        self.area.sync()
