"""The record area of the server journal: where a resync is staged, committed and applied.

A journal scan (the default resync) must not turn the replica into a mix of old and new blocks.  The server
stages everything the resync brings -- the corrected scan blocks, then the ring writes captured meanwhile --
as records after the header area of the ``--journal`` path, writes a commit record, and only then applies the
records to the replica.  At every instant the replica, after replay, is the old or the new consistent state.

Layout (offsets in the journal device or file)::

    0        4 KiB    8 KiB          12 KiB         16 KiB           1 MiB
    +--------+--------+--------------+--------------+--- ... --------+----------+----------+-----+--------+
    | hdr A  | hdr B  | area state A | area state B | reserved       | record 0 | record 1 | ... | COMMIT |
    +--------+--------+--------------+--------------+--- ... --------+----------+----------+-----+--------+

Area state block (4096 bytes, little-endian; two copies written alternately like the metadata header, the
valid copy with the highest generation wins)::

    0        8        12       16           24      32           40        48       4088      4096
    +--------+--------+--------+------------+-------+------------+---------+--- 0 ---+---------+
    | magic  | version| state  | generation | epoch | commit_off | records |         | xxh3_64 |
    +--------+--------+--------+------------+-------+------------+---------+---------+---------+

Record (a 64-byte header, then ``length`` bytes of data for BLOCK records; the next record starts at the next
64-byte boundary)::

    0        8      10      12         16      24      32       40       48        56         64
    +--------+------+-------+----------+-------+-------+--------+--------+---------+----------+
    | magic  | type | flags | reserved | epoch | index | offset | length | xxh3_64 | reserved |
    +--------+------+-------+----------+-------+-------+--------+--------+---------+----------+

The record checksum covers header bytes 0..48 and the data.  Types: BLOCK (write ``length`` bytes of data at
``offset``), ZERO (write ``length`` zero bytes at ``offset``, no data), COMMIT (``offset`` = xxh3_64 of the
concatenated checksums of records 0..index-1, ``length`` = 0): the last record of a committed resync.

Ordering rules (each step durable before the next):

1. records, then the COMMIT record, ``fdatasync``;
2. area state COMMITTED (epoch, commit_off, records), ``fdatasync`` -- the commit point;
3. the caller updates the metadata header (consistent, durable sequence number);
4. apply the records in order to the replica, replica ``fdatasync``;
5. area state CLEAN.

At server start: CLEAN -- nothing to do; OPEN -- an uncommitted resync, discarded (the metadata header still
says SCANNING, so the next client start rescans); COMMITTED -- every record is verified first, then all are
applied again (idempotent: records only ever set bytes to fixed values, in order).  A committed journal with a
bad checksum is refused, never partly applied.

Test hook: the environment variable ``BDR_TEST_CRASH_AT`` set to ``commit`` (after the COMMIT record is durable,
before the commit point) or ``apply`` (after half of the records are applied) makes the process SIGKILL itself
there; the crash-safety integration tests use it.  Nothing else reads it.
"""

from __future__ import annotations

import enum
import errno
import functools
import heapq
import logging
import os
import signal
import stat
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ParamSpec, Protocol, TypeVar

import xxhash

from .journal import HEADER_AREA, HEADER_BLOCK, JournalError, JournalIOError, StorageError

log = logging.getLogger("bdr.journal")

STATE_MAGIC = b"BDRJSTA\x00"
REC_MAGIC = b"BDRJREC\x00"
AREA_VERSION = 1
STATE_AT = 2 * HEADER_BLOCK  # two copies: STATE_AT and STATE_AT + HEADER_BLOCK
RECORDS_AT = HEADER_AREA
ALIGN = 64
_STATE = struct.Struct("<8sIIQQQQ")
_REC = struct.Struct("<8sHHIQQQQ")  # checksummed part (48 bytes); then the checksum and 8 reserved bytes
REC_HEADER = 64
_CSUM_AT = HEADER_BLOCK - 8
CRASH_ENV = "BDR_TEST_CRASH_AT"
CRASH_MODE_ENV = "BDR_TEST_CRASH_MODE"  # "pause": sync and stop there instead of SIGKILL (power-cut tests)
CRASH_RECEIVE_AFTER = 1 << 20  # the "receive" crash point: after this many bytes of scan blocks were staged
BUCKET_SHIFT = (
    20  # staged extents are indexed by the 1 MiB buckets they touch (overlay cost ~ what it overlays)
)


class AreaState(enum.IntEnum):
    CLEAN = 0  # nothing staged (or everything applied)
    OPEN = 1  # a resync is being staged; not committed
    COMMITTED = 2  # the records up to the COMMIT record must be applied


class RecType(enum.IntEnum):
    BLOCK = 1
    ZERO = 2
    COMMIT = 3


class JournalFull(JournalError):
    """The record area cannot hold this resync, even with each staged byte kept once."""

    def __init__(self, message: str, needed: int = 0, capacity: int = 0) -> None:
        super().__init__(message)
        self.needed = needed  # bytes of records the resync needs at least (its live records)
        self.capacity = capacity  # bytes the record area holds


# a full file system or quota under a journal file: a journal condition (the resync does not fit), not a failure
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class JournalCorrupt(JournalError):
    """A committed journal fails its checksums: refused, nothing applied."""


class ReplicaTarget(Protocol):
    def write_runs(self, runs: list[tuple[memoryview, int]]) -> None: ...
    def write_zeroes(self, offset: int, length: int) -> None: ...
    def sync(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Record:
    type: RecType
    epoch: int
    index: int
    offset: int
    length: int
    data: bytes = b""

    def pack(self) -> bytes:
        head = _REC.pack(REC_MAGIC, self.type, 0, 0, self.epoch, self.index, self.offset, self.length)
        h = xxhash.xxh3_64()
        h.update(head)
        h.update(self.data)
        csum = h.intdigest()
        out = head + csum.to_bytes(8, "little") + bytes(8) + self.data
        return out + bytes(-len(out) % ALIGN)

    @property
    def size(self) -> int:
        return _aligned(REC_HEADER + len(self.data))


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def record_checksum(head: bytes, data: bytes | memoryview) -> int:
    h = xxhash.xxh3_64()
    h.update(head[: _REC.size])
    h.update(data)
    return h.intdigest()


def parse_record_header(buf: bytes) -> tuple[RecType, int, int, int, int, int] | None:
    """(type, epoch, index, offset, length, checksum) of a record header, None if it is not one."""
    if len(buf) < REC_HEADER or buf[:8] != REC_MAGIC:
        return None
    _, rtype, flags, res, epoch, index, offset, length = _REC.unpack_from(buf)
    if rtype not in (1, 2, 3) or flags or res:
        return None
    csum = int.from_bytes(buf[_REC.size : _REC.size + 8], "little")
    return RecType(rtype), epoch, index, offset, length, csum


@dataclass(frozen=True, slots=True)
class StateBlock:
    state: AreaState = AreaState.CLEAN
    generation: int = 0
    epoch: int = 0
    commit_off: int = 0
    records: int = 0

    def pack(self) -> bytes:
        fixed = _STATE.pack(
            STATE_MAGIC, AREA_VERSION, self.state, self.generation, self.epoch, self.commit_off, self.records
        )
        body = fixed + bytes(_CSUM_AT - len(fixed))
        return body + xxhash.xxh3_64_intdigest(body).to_bytes(8, "little")

    @classmethod
    def parse(cls, block: bytes) -> StateBlock | None:
        if len(block) < HEADER_BLOCK or block[:8] != STATE_MAGIC:
            return None
        if xxhash.xxh3_64_intdigest(block[:_CSUM_AT]) != int.from_bytes(
            block[_CSUM_AT:HEADER_BLOCK], "little"
        ):
            return None
        _, version, state, gen, epoch, commit_off, records = _STATE.unpack_from(block)
        if version > AREA_VERSION:
            raise JournalError(
                f"journal record area from a newer BDR (version {version}, we know {AREA_VERSION})"
            )
        if state not in (0, 1, 2):
            return None
        return cls(AreaState(state), gen, epoch, commit_off, records)


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


def _crash_here(point: str) -> None:
    if os.environ.get(CRASH_ENV) != point:
        return
    if os.environ.get(CRASH_MODE_ENV) == "pause":  # for a test that cuts the power of the whole machine here
        os.sync()  # what was applied so far is on the disks
        log.error("test hook %s=%s: server paused, everything so far synced", CRASH_ENV, point)
        logging.shutdown()
        while True:
            time.sleep(3600)
    log.error("test hook %s=%s: killing the server", CRASH_ENV, point)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


class RecordArea:
    """Stage, commit and apply resync records on an open journal file descriptor.

    ``limit``: the end of the record area in bytes from the start of the journal (a block device: its size; a
    file: ``--journal-size``, or None to let the file grow).
    """

    def __init__(self, fd: int, path: str, limit: int | None) -> None:
        self.fd = fd
        self.path = path
        self.limit = limit
        if stat.S_ISREG(os.fstat(fd).st_mode):
            # both state copies allocated now: ending a resync on a full file system must not need new blocks
            try:
                os.posix_fallocate(fd, STATE_AT, 2 * HEADER_BLOCK)
            except OSError as exc:
                raise JournalError(f"cannot allocate journal {path}: {exc.strerror}") from exc
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
        a = os.pread(self.fd, HEADER_BLOCK, STATE_AT)
        b = os.pread(self.fd, HEADER_BLOCK, STATE_AT + HEADER_BLOCK)
        valid = [s for s in (StateBlock.parse(a), StateBlock.parse(b)) if s is not None]
        if valid:
            return max(valid, key=lambda s: s.generation)
        if a[:8] == STATE_MAGIC or b[:8] == STATE_MAGIC:
            raise JournalCorrupt(
                f"journal {self.path}: both copies of the record area state are corrupt (bad checksum); "
                "refusing to start. Move the journal away to start over (the next client start then resyncs)."
            )
        return StateBlock()

    def _set_state(self, state: AreaState, **changes: int) -> None:
        old = self.state
        new = StateBlock(
            state,
            old.generation + 1,
            changes.get("epoch", old.epoch),
            changes.get("commit_off", old.commit_off),
            changes.get("records", old.records),
        )
        data = new.pack()
        at = STATE_AT + (new.generation % 2) * HEADER_BLOCK
        if os.pwrite(self.fd, data, at) != len(data):
            raise OSError(f"short write to journal {self.path}")
        os.fdatasync(self.fd)
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
        if self._fits(size):
            try:
                return self._write_record(rec)
            except OSError as exc:
                if exc.errno not in _FULL_ERRNOS:
                    raise self._io_error(exc) from exc
                log.warning(
                    "journal %s: %s while staging; compacting the staged resync", self.path, exc.strerror
                )
        if rec.type is RecType.COMMIT or not self.compact(rec.offset, rec.length) or not self._fits(size):
            raise self._full(size)
        rec = Record(rec.type, rec.epoch, self.index, rec.offset, rec.length, rec.data)  # renumbered
        try:
            return self._write_record(rec)
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise self._full(size) from exc
            raise self._io_error(exc) from exc

    def _fits(self, size: int) -> bool:
        return self.limit is None or self.pos + size + REC_HEADER <= self.limit

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
        self.checksums.update(buf[_REC.size : _REC.size + 8])
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
        live = sum(_aligned(REC_HEADER + (0 if at < 0 else n)) for _, n, at in pieces)
        used = self.pos - RECORDS_AT
        if live >= used:
            return False
        # zero pieces last: they have no data to read, and a ZERO record that later writes cut into pieces takes
        # more room than it did
        plan = [x for x in pieces if x[2] >= 0] + [x for x in pieces if x[2] < 0]
        pos = RECORDS_AT
        for k, (_, n, at) in enumerate(plan):  # each write must end before the next data still to be read
            pos += _aligned(REC_HEADER + (0 if at < 0 else n))
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
        if self.staged_bytes >= CRASH_RECEIVE_AFTER:
            _crash_here("receive")

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
        _crash_here("commit")
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
            pos += _aligned(REC_HEADER + (length if rtype is RecType.BLOCK else 0))

    def verify(self) -> list[tuple[Record, int]]:
        """Every record of the committed resync, checked before anything is applied."""
        return list(self.records())

    @_journal_io
    def apply(self, replica: ReplicaTarget, size_limit: int | None = None) -> int:
        """Apply the committed resync to the replica (idempotent), sync it, mark the area CLEAN.  Returns the
        number of records applied.  Raises JournalCorrupt (nothing applied) when a record fails its checksum."""
        assert self.state.state is AreaState.COMMITTED
        recs = self.verify()
        half = len(recs) // 2
        for i, (rec, at) in enumerate(recs):
            if i == half and i:
                _crash_here("apply")
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
    def recover(self, replica: ReplicaTarget, size_limit: int | None = None) -> str:
        """At server start: replay a committed resync, discard an uncommitted one.  Returns what was done."""
        st = self.state.state
        if st is AreaState.COMMITTED:
            n = self.apply(replica, size_limit)
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
