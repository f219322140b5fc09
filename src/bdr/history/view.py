"""A past moment read in place: the replica's bytes where nothing was written since the point, the history's
before-images where something was, read on demand while replication goes on (``bdr export`` serves it).

For each byte the moment's content is the before-image of the oldest write after the point (see restore.py).
The view keeps a map of the ranges written since the point to where that before-image is, built from the UNDO
records and extended as the server appends more.  A read takes the replica's bytes first and the history's
records after: a write the read saw has its before-image among them (the server makes it durable before it
writes the replica), so the map covers it.

The view ends (ViewGone) when it can no longer give the moment exactly: retention dropped or reused a segment
holding a before-image it needs, or the history says the replica was rewritten without before-images (a gap)
or turned back (a rollback) after the point.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import heapq
import itertools
import os

from .format import (
    FLAG_ZERO,
    HEAD_SIZE,
    Entry,
    HistoryFormatError,
    Kind,
    decode,
    payload_intact,
    unpack_extents,
)
from .index import At, History, Segment, fmt_point
from .writer import HistoryError

INSERT_MAX = 64  # new extents inserted one by one into the map; more: the map is built again


class ViewGone(HistoryError):
    """The point can no longer be given back (the message says why)."""


@dataclasses.dataclass(frozen=True)
class _Source:
    segment: Segment
    inode: int
    pos: int  # of the range's first byte in the segment file; -1: the range held zeros

    def skip(self, n: int) -> _Source:
        """The source of the range that starts ``n`` bytes later."""
        return self if self.pos < 0 or not n else dataclasses.replace(self, pos=self.pos + n)


class PointView:
    """The replica as of the newest point at or before ``at`` of the history ``directory``, read-only."""

    def __init__(self, directory: str | os.PathLike[str], at: At) -> None:
        self.history = History(directory)
        self.fd = -1
        self.size = self.history.meta.replica_bytes
        # the ranges written since the point, disjoint, sorted by start: [starts[i], ends[i]) is in srcs[i]
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.srcs: list[_Source] = []
        self.gone: str | None = None
        try:
            self.point: Entry = self.history.select(at)
            self._last = self.point  # the newest record mapped
            self.history.undo_after(self.point)  # PointRefused if a gap lies after the point
            self.fd = os.open(self.history.meta.replica, os.O_RDONLY | os.O_CLOEXEC)
            if os.lseek(self.fd, 0, os.SEEK_END) != self.size:
                raise HistoryError(
                    f"{self.history.meta.replica} does not hold {self.size} bytes, as the replica of the history "
                    f"{self.history.directory} did: not the same replica"
                )
            self._extend()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.history.close()

    def __enter__(self) -> PointView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def written(self) -> int:
        """Bytes of the replica written since the point (read from the history)."""
        return sum(e - s for s, e in zip(self.starts, self.ends, strict=True))

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` as they were at the point.  ViewGone if that can no longer be
        given; OSError if the replica or the history cannot be read."""
        if self.gone is not None:
            raise ViewGone(self.gone)
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"bytes {offset}..{offset + length} are outside the replica ({self.size} bytes)")
        buf = bytearray(_pread_all(self.fd, length, offset))
        self.history.refresh()
        self._extend()
        for s, e, src in self._covering(offset, offset + length):
            a, b = max(s, offset), min(e, offset + length)
            if src.pos < 0:
                buf[a - offset : b - offset] = bytes(b - a)
            else:
                buf[a - offset : b - offset] = _pread_all(src.segment.fd, b - a, src.pos + a - s)
                # read, then checked: the writer renames a segment before it writes over it
                self._check_kept(src.segment, src.inode)
        return bytes(buf)

    def _covering(self, a: int, b: int) -> list[tuple[int, int, _Source]]:
        i = max(0, bisect.bisect_right(self.starts, a) - 1)
        out = []
        while i < len(self.starts) and self.starts[i] < b:
            if self.ends[i] > a:
                out.append((self.starts[i], self.ends[i], self.srcs[i]))
            i += 1
        return out

    def _check_kept(self, seg: Segment, inode: int) -> None:
        """ViewGone unless ``seg`` is still in the history: not dropped, not reused (renamed) by retention."""
        if not self._kept(seg, inode):
            self._dropped()

    @staticmethod
    def _kept(seg: Segment, inode: int) -> bool:
        try:
            return os.stat(seg.path).st_ino == inode
        except FileNotFoundError:
            return False

    def _dropped(self) -> None:
        self.gone = (
            f"the history no longer holds the before-images of {fmt_point(self.point)} (retention dropped them as "
            "it became one of the oldest points, or a rollback cut them); it can no longer be read"
        )
        raise ViewGone(self.gone)

    def _extend(self) -> None:
        """Map the UNDO records appended since the last call; note a gap or a rollback before the point after
        it.  Segments retention dropped are let go (one that may hold a before-image the view needs ends it).
        A rollback writes over the history after its point, or deletes it: the newest record mapped is checked
        to be still there."""
        segs = self.history.segments
        while len(segs) > 1 and not self._kept(segs[0], os.fstat(segs[0].fd).st_ino):
            if segs[0].number >= self.point.segment:
                self._dropped()
            os.close(segs.pop(0).fd)  # older than the point: none of its records is needed
        last = self._last
        seg = next(s for s in segs if s.number == last.segment)
        if decode(os.pread(seg.fd, HEAD_SIZE, last.pos), last.segment, last.pos) != last:
            self._check_kept(seg, os.fstat(seg.fd).st_ino)
            self.gone = (
                f"the replica was rolled back: the history no longer holds the records after "
                f"{fmt_point(self.point)} that this export read"
            )
            raise ViewGone(self.gone)
        fresh: list[tuple[int, int, _Source]] = []  # the extents of the new records, oldest first
        try:
            self._scan(last, fresh)
        finally:
            self._merge(fresh)

    def _scan(self, last: Entry, fresh: list[tuple[int, int, _Source]]) -> None:
        for seg in self.history.segments:
            if seg.number < last.segment:
                continue
            inode = os.fstat(seg.fd).st_ino
            for k, e in enumerate(seg.entries):
                if (e.segment, e.pos) <= (last.segment, last.pos):
                    continue
                if e.kind is Kind.GAP or (
                    e.kind is Kind.ROLLBACK and (e.offset, e.length) < (self.point.segment, self.point.pos)
                ):
                    what = (
                        "rewritten without history" if e.kind is Kind.GAP else "rolled back to an older point"
                    )
                    self.gone = f"the replica was {what} after {fmt_point(self.point)}"
                    with contextlib.suppress(HistoryFormatError, OSError):
                        self.gone += f": {self.history.reason(e)}"
                    raise ViewGone(self.gone)
                if e.kind is Kind.UNDO and not self._read_extents(
                    seg, inode, e, fresh, k + 1 < len(seg.entries)
                ):
                    return  # being written: the replica write it precedes has not begun; read again next time
                self._last = e

    def _read_extents(
        self, seg: Segment, inode: int, e: Entry, out: list[tuple[int, int, _Source]], followed: bool
    ) -> bool:
        """Add the extents of the UNDO record ``e`` to ``out``; False if its payload is not all written yet
        (the newest record of a segment whose file is reused may show its header first)."""
        payload = _pread_all(seg.fd, e.payload_len, e.pos + HEAD_SIZE)
        if not payload_intact(e, payload):
            self._check_kept(seg, inode)
            if not followed:
                return False
            self.gone = (
                f"history {self.history.directory}: the before-images at byte {e.pos} of {seg.path.name} are "
                "damaged (checksum)"
            )
            raise ViewGone(self.gone)
        offsets, lengths, flags, at = unpack_extents(payload, e.offset)
        data = e.pos + HEAD_SIZE + at
        for off, n, fl in zip(offsets, lengths, flags, strict=True):
            zero = bool(fl & FLAG_ZERO)
            out.append((off, off + n, _Source(seg, inode, -1 if zero else data)))
            if not zero:
                data += n
        return True

    def _merge(self, fresh: list[tuple[int, int, _Source]]) -> None:
        """Map the parts of the ``fresh`` extents (oldest first, all newer than those mapped) not mapped yet:
        the oldest write's before-image of each byte wins.  A few are inserted one by one; many, the map is
        built again in one sweep (n log n, however many overlap)."""
        if len(fresh) <= INSERT_MAX:
            for a, b, src in fresh:
                self._add(a, b, src)
            return
        extents = [*zip(self.starts, self.ends, self.srcs, strict=True), *fresh]  # oldest first
        order = sorted(range(len(extents)), key=lambda k: extents[k][0])
        bounds = sorted({x for a, b, _ in extents for x in (a, b)})
        starts: list[int] = []
        ends: list[int] = []
        srcs: list[_Source] = []
        active: list[int] = []  # a heap of the extents begun, the oldest (first in ``extents``) on top
        owner = -1  # the extent of the last range mapped
        j = 0
        for x, y in itertools.pairwise(bounds):
            while j < len(order) and extents[order[j]][0] <= x:
                heapq.heappush(active, order[j])
                j += 1
            while active and extents[active[0]][1] <= x:
                heapq.heappop(active)
            if not active:
                continue
            k = active[0]
            if k == owner and ends[-1] == x:
                ends[-1] = y
                continue
            a, _, src = extents[k]
            starts.append(x)
            ends.append(y)
            srcs.append(src.skip(x - a))
            owner = k
        self.starts, self.ends, self.srcs = starts, ends, srcs

    def _add(self, a: int, b: int, src: _Source) -> None:
        """Map the parts of [a, b) not mapped yet to ``src`` (the bytes at a)."""
        holes = []
        at = a
        for s, e, _ in self._covering(a, b):
            if s > at:
                holes.append((at, s))
            at = max(at, e)
        if at < b:
            holes.append((at, b))
        for s, e in holes:
            i = bisect.bisect_left(self.starts, s)
            self.starts.insert(i, s)
            self.ends.insert(i, e)
            self.srcs.insert(i, src.skip(s - a))


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    parts = []
    while n:
        got = os.pread(fd, n, offset)
        if not got:  # past the end of an image file: zeros
            parts.append(bytes(n))
            break
        parts.append(got)
        n -= len(got)
        offset += len(got)
    return b"".join(parts)
