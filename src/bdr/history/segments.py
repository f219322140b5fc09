"""The segment files of a history being written: records appended to the newest, the next segment started
when it is full (or spans too long a time), and retention by size and age -- the oldest segment dropped first,
its file reused for the next one, so a full history allocates and frees nothing."""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..journal import StorageError
from .format import fsync_dir, segment_name

log = logging.getLogger("bdr.server")

SEGMENT_MAX = 64 << 20  # a segment is rolled over at this size (or less for small histories)
SEGMENTS_MIN = 8  # a size limit holds at least this many segments, so dropping one frees a small part


class HistoryIOError(StorageError):
    """Writing or syncing the history failed (device error, file system full): the server stops before the
    replica write whose before-image it could not keep; the replica stays as durable as it was."""

    role = "history"


@dataclass
class Segment:
    number: int
    size: int
    first_time_ns: int
    last_time_ns: int


class SegmentFiles:
    """The segments of one history directory, the newest open for appending.  ``on_drop(number)``: a segment
    was dropped by retention (the points it held go with it)."""

    def __init__(
        self,
        directory: Path,
        segment_max: int,
        size_limit: int | None,
        age_limit_ns: int | None,
        clock: Callable[[], int],
        on_drop: Callable[[int], None],
    ) -> None:
        self.directory = directory
        self.segment_max = segment_max
        self.size_limit = size_limit
        self.age_limit_ns = age_limit_ns
        self.clock = clock
        self.on_drop = on_drop
        self.segments: deque[Segment] = deque()
        self.fd = -1
        self.pos = 0  # where the next record goes in the segment being written
        self.bytes_appended = 0  # history bytes written since start

    def start(self, existing: Iterable[Segment]) -> None:
        """Take the segments found at open, and start a new one after them."""
        self.segments.extend(existing)
        self._new_segment()

    def _new_segment(self, reuse: Segment | None = None) -> None:
        """Start the next segment: in the file of ``reuse`` (the oldest, dropped by retention: its pages or
        blocks are written over, nothing is allocated or freed), or in a new file."""
        number = self.segments[-1].number + 1 if self.segments else 1
        if self.fd >= 0:
            os.ftruncate(self.fd, self.pos)  # a reused file: its old content past the records goes
            os.fdatasync(self.fd)
            os.close(self.fd)
            self.segments[-1].size = self.pos
        path = self.directory / segment_name(number)
        allocated = 0
        if reuse is not None:
            self._forget(reuse)
            os.rename(self.directory / segment_name(reuse.number), path)
            self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            allocated = os.fstat(self.fd).st_size
        else:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fsync_dir(self.directory)
        self.pos = 0
        now = self.clock()
        self.segments.append(Segment(number, allocated, now, now))

    @property
    def number(self) -> int:
        """The segment being written."""
        return self.segments[-1].number

    @property
    def bytes_used(self) -> int:
        """Bytes of the segment files (a reused one counts what it holds, if more than its new records)."""
        return sum(s.size for s in self.segments)

    def prepare(self, n: int) -> None:
        """Before appending ``n`` bytes: a new segment if this one is full or spans too long a time, and the
        oldest segments dropped while the limits would be passed."""
        try:
            self._make_room(n)
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise HistoryIOError(
                exc.errno, f"history {self.directory}: {exc.strerror or exc} (segment files)"
            ) from exc

    def may_roll_over(self, n: int) -> bool:
        """Whether ``prepare(n)`` may start a new segment (it does not when this is False)."""
        cur = self.segments[-1]
        return bool(self.pos) and (
            self._full(n) or (self.size_limit is not None and self._growth(n) + cur.size > self.size_limit)
        )

    def _full(self, n: int) -> bool:
        """The segment being written cannot take ``n`` bytes more, or spans too long a time already."""
        span = self.age_limit_ns // SEGMENTS_MIN if self.age_limit_ns is not None else None
        return self.pos + n > self.segment_max or (
            span is not None and self.clock() - self.segments[-1].first_time_ns > span
        )

    def _make_room(self, n: int) -> None:
        if self.pos and self._full(n):
            oldest = self.segments[0] if len(self.segments) > 1 else None
            self._new_segment(
                oldest if oldest is not None and self._must_drop(oldest, self.segment_max) else None
            )
        while len(self.segments) > 1 and self._must_drop(self.segments[0], n):
            self._drop(self.segments[0])
        if self.size_limit is not None and self._growth(n) + self.bytes_used > self.size_limit and self.pos:
            # the segment being written alone is over the limit: start another and drop it
            self._new_segment()
            self._drop(self.segments[0])

    def _growth(self, n: int) -> int:
        """How much appending n bytes adds to the current segment's file."""
        return max(0, self.pos + n - self.segments[-1].size)

    def _must_drop(self, oldest: Segment, n: int) -> bool:
        too_big = self.size_limit is not None and self.bytes_used + self._growth(n) > self.size_limit
        too_old = self.age_limit_ns is not None and oldest.last_time_ns < self.clock() - self.age_limit_ns
        return too_big or too_old

    def append(self, iov: list[bytes | memoryview], n: int) -> None:
        """Write ``n`` bytes of records, encoded for the current segment (``prepare`` was called)."""
        try:
            write_at(self.fd, self.pos, iov)
        except OSError as exc:
            raise HistoryIOError(
                exc.errno, f"history {self.directory}: write failed: {exc.strerror}"
            ) from exc
        self.appended(n)

    def appended(self, n: int) -> None:
        """``n`` bytes of records were written at ``pos`` of the current segment (by ``append``, or by the
        writer's reader process in room ``prepare`` reserved)."""
        self.pos += n
        cur = self.segments[-1]
        cur.size = max(cur.size, self.pos)
        cur.last_time_ns = self.clock()
        self.bytes_appended += n

    def _forget(self, seg: Segment) -> None:
        self.segments.remove(seg)
        self.on_drop(seg.number)

    def _drop(self, seg: Segment) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / segment_name(seg.number))
        self._forget(seg)
        log.debug("history %s: dropped segment %d (retention)", self.directory, seg.number)

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise HistoryIOError(
                exc.errno, f"history {self.directory}: fdatasync failed: {exc.strerror}"
            ) from exc

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.fdatasync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1


def write_at(fd: int, pos: int, iov: list[bytes | memoryview]) -> None:
    """Write all of the buffers ``iov`` at ``pos`` of ``fd``."""
    want = sum(len(b) for b in iov)
    done = os.pwritev(fd, iov, pos)
    if done < want:  # a short write: the rest one call at a time
        rest = memoryview(b"".join(iov))
        while done < want:
            done += os.pwrite(fd, rest[done:], pos + done)
