"""The server's side of the history: before each write reaches the replica, what it overwrites is appended and
made durable; a checkpoint at each durability point of the source; a gap before any rewrite without history;
retention by size and age, oldest segment first.

Crash rule: an UNDO record is durable before the replica write it belongs to is issued (one fdatasync per
applied batch, or per piece of one that the reader process keeps: see preserve_while_writing), and a CHECKPOINT
is written only once the replica is durable at its sequence number.  After a power cut the replica's writes
past its durable point may be on disk or not; the client sends them again and their new before-images are
logged after the old ones, so undoing newest first still ends on the true before-image of every block.
"""

from __future__ import annotations

import bisect
import dataclasses
import errno
import fcntl
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from ..seq import NO_SEQ
from ..status.schema import HistoryStatus
from .format import (
    CHUNK,
    FLAG_RESYNC,
    HEAD_SIZE,
    LOCK,
    HistoryFormatError,
    Kind,
    Meta,
    NotAHistory,
    encode,
    payload_intact,
    read_meta,
    write_meta,
)
from .index import History, fmt_time
from .reader import AFTER, Reader, ReaderGone
from .reader import EXTENTS_MAX as READER_EXTENTS
from .segments import SEGMENT_MAX, SEGMENTS_MIN, Segment, SegmentFiles
from .undo import SMALL, fill_undo, payload_room, undo_head

log = logging.getLogger("bdr.server")

BATCH_MAX = 8 << 20  # before-images read into memory at a time
LARGE = 1 << 30
EXTENTS_MAX = 8192  # extents of one UNDO record (a large range of zeros takes no data, only its extents)
# a batch of writes is preserved a piece at a time by the reader process, ahead of the server's writes (see
# preserve_while_writing)
PIECE = 1 << 20
AHEAD = 8  # pieces the reader may be ahead of the writes (a batch of long runs is at most 8 MiB)


def _pieces(runs: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """The (start, length, offset) runs cut into pieces of at most PIECE bytes and READER_EXTENTS runs."""
    lengths = [n for _, n, _ in runs]
    if lengths and max(lengths) <= PIECE:
        # scattered small writes (a run per write): whole runs per piece, cut where the next would not fit,
        # found by bisection rather than a step per run
        ends = list(itertools.accumulate(lengths))
        out, i, count, base = [], 0, len(runs), 0
        while i < count:
            j = min(i + READER_EXTENTS, bisect.bisect_right(ends, base + PIECE, i))
            out.append(runs[i:j])
            base, i = ends[j - 1], j
        return out
    pieces: list[list[tuple[int, int, int]]] = [[]]
    room = PIECE
    for start, n, off in runs:
        while n:
            if len(pieces[-1]) == READER_EXTENTS:
                pieces.append([])
                room = PIECE
            k = min(n, room)
            pieces[-1].append((start, k, off))
            start, n, off, room = start + k, n - k, off + k, room - k
            if not room:
                pieces.append([])
                room = PIECE
    if not pieces[-1]:
        pieces.pop()
    return pieces


def _disjoint(runs: list[tuple[int, int, int]]) -> bool:
    """No two of the (start, length, offset) runs overlap on the replica: while the reader process keeps a
    piece, the server writes only pieces before it, and elsewhere (reader.STEADY).  False also when it does not
    matter (no run is larger than what the reader copies anyway)."""
    if len(runs) == 1:
        return True
    if max(n for _, n, _ in runs) <= SMALL:
        return False
    spans = sorted((off, off + n) for _, n, off in runs)
    return all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))


class HistoryError(Exception):
    """The history cannot be opened or used."""


def lock_history(directory: Path, who: str) -> int:
    """Take the history's lock (an exclusive flock on DIR/lock); HistoryError if another process holds it."""
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise HistoryError(
                f"history {directory} is in use by another process (a running bdr_server or bdr rollback); "
                f"{who} needs it to itself"
            ) from None
        raise
    return fd


class HistoryWriter:
    """Appends to the history of one replica.  ``read`` reads the replica's current bytes (its fd)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        replica_fd: int,
        meta: Meta,
        size_limit: int | None,
        age_limit: float | None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if size_limit is None and age_limit is None:
            raise HistoryError("--history needs --history-size and/or --history-age (how much to keep)")
        self.directory = Path(directory)
        self.replica_fd = replica_fd
        self.size_limit = size_limit
        self.age_limit_ns = None if age_limit is None else int(age_limit * 1e9)
        self.clock = clock
        seg_max = SEGMENT_MAX if size_limit is None else min(SEGMENT_MAX, size_limit // SEGMENTS_MIN)
        if seg_max < 2 * CHUNK:
            raise HistoryError(
                f"--history-size {size_limit} is too small: at least {SEGMENTS_MIN * 2 * CHUNK} bytes "
                f"({SEGMENTS_MIN * 2} MiB)"
            )
        self.segment_max = seg_max
        # a discard or write-zeroes larger than this is a GAP rather than a read of all it covers
        self.large = min(LARGE, size_limit // 4) if size_limit is not None else LARGE
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HistoryError(f"cannot create history directory {self.directory}: {exc.strerror}") from exc
        self.lock_fd = lock_history(self.directory, "bdr_server")
        self.files = SegmentFiles(
            self.directory, seg_max, size_limit, self.age_limit_ns, clock, self._segment_dropped
        )
        self._view = memoryview(b"")  # UNDO payloads are read into it
        # preserve_while_writing's reader process: started by start_reader (the server does at start), or by the
        # first batch that needs it
        self.reader: Reader | None = None
        self.reader_failed = False
        self.bytes_preserved = 0  # replica bytes whose before-image was kept, since start
        self.undo_records = 0
        self.id = bytes(16)
        try:
            self._open(meta)
        except OSError as exc:
            self.close()
            raise HistoryError(f"history {self.directory}: {exc.strerror or exc}") from exc
        except BaseException:
            self.close()
            raise

    # -- opening ------------------------------------------------------------------------------------------------

    def _open(self, meta: Meta) -> None:
        try:
            old: Meta | None = read_meta(self.directory)
        except NotAHistory:
            old = None
            names = sorted(p.name for p in self.directory.iterdir() if p.name != LOCK)
            if names:
                raise HistoryError(
                    f"history directory {self.directory} holds other files ({', '.join(names[:3])}); "
                    "give an empty or new directory"
                ) from None
        except HistoryFormatError as exc:
            raise HistoryError(str(exc)) from None
        if old is not None and old.replica_bytes != meta.replica_bytes:
            raise HistoryError(
                f"history {self.directory} belongs to a replica of {old.replica_bytes} bytes ({old.replica}), "
                f"not to {meta.replica} ({meta.replica_bytes} bytes); give another --history directory"
            )
        meta = dataclasses.replace(meta, id=old.id if old is not None else os.urandom(16))
        self.id = meta.id
        if old != meta:
            write_meta(self.directory, meta)
        with History(self.directory) as h:
            self._truncate_torn(h)
            h.refresh()
            found = [
                Segment(
                    s.number,
                    s.size,
                    s.entries[0].time_ns if s.entries else 0,
                    s.entries[-1].time_ns if s.entries else 0,
                )
                for s in h.segments
            ]
            self.points: deque[tuple[int, int, int]] = deque(
                (e.segment, e.time_ns, e.seq) for e in h.points()
            )
            bars = h.barriers()
            self.last_gap: tuple[int, str] | None = (
                (bars[-1][1].time_ns, bars[-1][1].reason) if bars else None
            )
            self.gaps = len(bars) + len(h.windows())
            entries = h.entries()
            # when the replica last followed the source (a resync window opens there)
            self.followed_ns = next(
                (
                    e.time_ns
                    for e in reversed(entries)
                    if e.kind in (Kind.CHECKPOINT, Kind.RESYNC)
                    or (e.kind is Kind.UNDO and not e.flags & FLAG_RESYNC)
                ),
                self.clock(),
            )
            last = next((e for e in reversed(entries) if e.kind is not Kind.START), None)
            if last is not None and last.kind is Kind.ROLLBACK:
                log.warning(
                    "history %s: the replica was rolled back (%s); the next client start resyncs it",
                    self.directory,
                    h.reason(last),
                )
        self.files.start(found)
        self._small(Kind.START, NO_SEQ, self.clock(), b"bdr_server started")
        self.sync()
        log.info(
            "history %s: %d points offered%s, %d bytes used",
            self.directory,
            len(self.points),
            f" from {fmt_time(self.points[0][1])} to {fmt_time(self.points[-1][1])}" if self.points else "",
            self.bytes_used,
        )

    def _truncate_torn(self, h: History) -> None:
        """A power cut can leave a torn record at the end of the newest segment (a header without its whole
        payload: the only records not yet synced are there): cut it off, and what follows."""
        if not h.segments:
            return
        seg = h.segments[-1]
        for k, e in enumerate(seg.entries):
            if not payload_intact(e, os.pread(seg.fd, e.payload_len, e.pos + HEAD_SIZE)):
                seg.end, seg.torn = e.pos, True
                del seg.entries[k:]
                break
        if seg.torn:
            log.info(
                "history %s: cutting %s after its last intact record, at byte %d (a record torn when the server "
                "stopped, or what a reused segment held before)",
                self.directory,
                seg.path.name,
                seg.end,
            )
            fd = os.open(seg.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, seg.end)
                os.fdatasync(fd)
            finally:
                os.close(fd)
            seg.end = seg.size = 0
            seg.entries.clear()

    # -- writing ------------------------------------------------------------------------------------------------

    @property
    def number(self) -> int:
        """The segment being written."""
        return self.files.number

    @property
    def bytes_used(self) -> int:
        return self.files.bytes_used

    def sync(self) -> None:
        self.files.sync()

    def _segment_dropped(self, number: int) -> None:
        while self.points and self.points[0][0] <= number:
            self.points.popleft()

    def _small(self, kind: Kind, seq: int, now: int, payload: bytes = b"", offset: int = 0) -> None:
        """Append one record without data (CHECKPOINT, GAP, RESYNC, START)."""
        self.files.prepare(HEAD_SIZE + len(payload))
        self.files.append(
            [encode(self.number, kind, seq, now, offset, payload=payload), payload], HEAD_SIZE + len(payload)
        )

    def preserve_or_gap(self, offset: int, length: int, what: str) -> None:
        """Before a discard or write-zeroes: keep what the range holds, unless the range is larger than
        ``large`` (a whole-device discard by mkfs): then a GAP, as reading it all would stall the stream."""
        if length > self.large:
            self.gap(
                f"a {what} of {length} bytes at byte {offset} was applied without keeping what it overwrote (more "
                f"than {self.large} bytes)"
            )
        else:
            self.preserve([(offset, length)])

    def preserve_for_resync(self, ranges: list[tuple[int, int]]) -> None:
        """``preserve`` before a resync is applied: the replica does not follow the source there (the resync's
        window is still open)."""
        self.preserve(ranges, following=False)

    def preserve(self, ranges: list[tuple[int, int]], following: bool = True) -> None:
        """Before writing each (offset, length) of the replica: append what it holds now, then fdatasync.  One
        UNDO record per batch of at most BATCH_MAX bytes; ranges that hold zeros take no data.  ``following``:
        the writes are the source's, in order (the replica follows the source up to now)."""
        total = sum(n for _, n in ranges)
        if not total:
            return
        if not self._view:
            self._view = memoryview(bytearray(payload_room(EXTENTS_MAX, BATCH_MAX)))  # kept: warm pages
        chunks = (
            ranges
            if max(n for _, n in ranges) <= CHUNK
            else [(off + k, min(CHUNK, n - k)) for off, n in ranges for k in range(0, n, CHUNK)]
        )
        now = self.clock()
        i, count = 0, len(chunks)
        while i < count:
            j, covered = i, 0
            while j < count and j - i < EXTENTS_MAX and covered + chunks[j][1] <= BATCH_MAX:
                covered += chunks[j][1]
                j += 1
            parts, plen, digest = fill_undo(
                self.replica_fd, self._view, [o for o, _ in chunks[i:j]], [n for _, n in chunks[i:j]]
            )
            self.files.prepare(HEAD_SIZE + plen)
            head = undo_head(self.number, now, j - i, covered, plen, digest, following)
            self.files.append([head, *parts], HEAD_SIZE + plen)
            self.undo_records += j - i
            i = j
        self.sync()
        self.bytes_preserved += total
        if following:
            self.followed_ns = now

    def preserve_while_writing(
        self,
        runs: list[tuple[int, int, int]],
        write: Callable[[list[tuple[int, int, int]]], None],
        prefetch: Callable[[int], None],
    ) -> None:
        """``preserve`` the (start, length, offset) runs of a batch, then ``write`` them, overlapped: the runs are
        cut into pieces (of PIECE bytes and at most reader.EXTENTS_MAX runs), the reader process keeps up to
        AHEAD pieces ahead (reads their before-images, writes and syncs their records), and the server writes
        each piece once its record is durable, never before.  A piece read before an earlier one of the same
        batch is written may miss that write where the two overlap: undone newest first, the earlier record still
        restores the batch's before-image, and no checkpoint lies between them.  A batch of one piece goes the
        plain way (there is nothing to overlap), as does every batch when the reader process is not there.
        ``prefetch(end)``: while a piece's record is being written, the data up to ``end`` (the piece's) may be
        received."""
        pieces = _pieces(runs)
        reader = self.start_reader() if len(pieces) > 1 else None
        if reader is None:
            self.preserve([(off, n) for _, n, off in runs])
            write(runs)
            return
        now = self.clock()
        files = self.files
        steady = _disjoint(runs)
        reserved: deque[tuple[int, int]] = deque()  # the records in flight: their room, the bytes they cover
        done = ahead = 0  # pieces written; sent to the reader

        def submit(piece: list[tuple[int, int, int]]) -> bool:
            """Send a piece to the reader, its record's room reserved; False if that room would start a new
            segment while records are in flight (the segment's end is not known until they are written)."""
            lengths = [n for _, n, _ in piece]
            covered = sum(lengths)
            need = HEAD_SIZE + payload_room(len(piece), covered)
            if reserved:
                room = sum(r for r, _ in reserved) + need
                if files.may_roll_over(room):
                    return False
                files.prepare(room)
                pos = AFTER
            else:
                files.prepare(need)  # may start a new segment
                pos = files.pos
            reader.submit(self.number, files.fd, pos, now, [off for _, _, off in piece], lengths, steady)
            reserved.append((need, covered))
            return True

        try:
            for i, piece in enumerate(pieces):
                if ahead == i:
                    submit(piece)
                    ahead += 1
                prefetch(piece[-1][0] + piece[-1][1])
                plen = reader.result()  # this piece's record is durable
                _, covered = reserved.popleft()
                files.appended(HEAD_SIZE + plen)
                self.undo_records += len(piece)
                self.bytes_preserved += covered
                self.followed_ns = now
                while ahead < len(pieces) and ahead <= i + AHEAD and submit(pieces[ahead]):
                    ahead += 1
                write(piece)
                done = i + 1
        except ReaderGone as exc:
            if exc.read_failed:  # the server's own read of the range reports the error, or reads it
                log.warning(
                    "history: %s; the server keeps this batch's before-images itself, a new reader process "
                    "starts with the next batch",
                    exc,
                )
            else:
                log.warning("history: %s; the server keeps the before-images itself from now on", exc)
            self._reader_gone(again=exc.read_failed)
            rest = [run for piece in pieces[done:] for run in piece]
            self.preserve([(off, n) for _, n, off in rest])
            write(rest)
        finally:
            # after an error: the records still in flight are written (of pieces not written: harmless), and
            # the segment's end is known again
            if self.reader is not None and self.reader.waiting:
                try:
                    for plen in self.reader.drain():
                        files.appended(HEAD_SIZE + plen)
                except ReaderGone as exc:
                    log.warning("history: %s", exc)
                    self._reader_gone(again=exc.read_failed)

    def start_reader(self) -> Reader | None:
        """The reader process (reader.py), started if it is not yet; None if it cannot be (the server keeps the
        before-images itself then)."""
        if self.reader is None and not self.reader_failed:
            try:
                self.reader = Reader(self.replica_fd, PIECE, self.directory)
                log.info("history: reader process started (pid %d)", self.reader.proc.pid)
            except OSError as exc:
                log.warning(
                    "history: cannot start the reader process (%s); the server keeps the before-images itself",
                    exc,
                )
                self.reader_failed = True
        return self.reader

    def _reader_gone(self, again: bool = False) -> None:
        """The reader processes are closed; ``again``: new ones start with the next batch."""
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.reader_failed = not again

    def checkpoint(self, seq: int) -> None:
        """The replica is durable at ``seq``, a durability point of the source: a point to offer."""
        now = self.clock()
        self._small(Kind.CHECKPOINT, seq, now)
        self.sync()
        self.followed_ns = now
        self.points.append((self.number, now, seq))

    def gap(self, reason: str) -> None:
        """The replica is about to be rewritten without before-images: no point before this can be restored."""
        now = self.clock()
        self._small(Kind.GAP, NO_SEQ, now, reason.encode())
        self.sync()
        if self.points:
            log.warning(
                "history: %s; the %d points before it (from %s) can no longer be restored",
                reason,
                len(self.points),
                fmt_time(self.points[0][1]),
            )
        self.points.clear()
        self.last_gap = (now, reason)
        self.gaps += 1

    def resync(self, reason: str, seq: int) -> None:
        """A journal resync was applied (its before-images were preserved first): the moments since the replica
        last followed the source are a window no restore gives back; the points before it stay."""
        now = self.clock()
        self._small(Kind.RESYNC, seq, now, reason.encode(), offset=self.followed_ns)
        self.sync()
        log.info(
            "history: %s; no moment from %s to %s can be given back (the points before stay)",
            reason,
            fmt_time(self.followed_ns),
            fmt_time(now),
        )
        self.last_gap = (now, f"{reason} (from {fmt_time(self.followed_ns)})")
        self.gaps += 1
        self.followed_ns = now

    def summary(self) -> HistoryStatus:
        """The history part of the server's status snapshot."""
        pts = self.points
        return {
            "path": str(self.directory),
            "bytes": self.bytes_used,
            "size_limit": self.size_limit,
            "age_limit_seconds": None if self.age_limit_ns is None else self.age_limit_ns / 1e9,
            "points": len(pts),
            "oldest_time": pts[0][1] / 1e9 if pts else None,
            "oldest_seq": pts[0][2] if pts else None,
            "newest_time": pts[-1][1] / 1e9 if pts else None,
            "newest_seq": pts[-1][2] if pts else None,
            "gaps": self.gaps,
            "last_gap": None
            if self.last_gap is None
            else f"{fmt_time(self.last_gap[0])}: {self.last_gap[1]}",
        }

    def close(self) -> None:
        if self.files.fd >= 0 and self.bytes_preserved:
            log.info(
                "history %s: %d bytes appended since start, for %d replica bytes overwritten (%d writes)",
                self.directory,
                self.files.bytes_appended,
                self.bytes_preserved,
                self.undo_records,
            )
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.files.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1
