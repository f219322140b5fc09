"""Reading a history: its segments and records, the points it offers, its gaps, and the choice of a point for
``--at`` (with a refusal that names the nearest points when the moment cannot be given back exactly)."""

from __future__ import annotations

import bisect
import datetime
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..seq import fmt_seq
from .format import (
    HEAD_SIZE,
    Entry,
    HistoryFormatError,
    Kind,
    Meta,
    decode,
    payload_intact,
    read_meta,
    segment_name,
    segment_numbers,
)


class PointRefused(Exception):
    """The moment asked for cannot be given back exactly; the message names the nearest points offered."""


@dataclass
class Segment:
    number: int
    path: Path
    fd: int
    entries: list[Entry] = field(default_factory=list)
    end: int = 0  # where the intact records end
    size: int = 0  # the file's size
    torn: bool = False  # an invalid record before the file's end


def scan_segment(seg: Segment) -> None:
    """(Re)read the record headers of ``seg`` from where the last scan stopped."""
    seg.size = os.fstat(seg.fd).st_size
    pos = seg.end
    while pos + HEAD_SIZE <= seg.size:
        e = decode(os.pread(seg.fd, HEAD_SIZE, pos), seg.number, pos)
        if e is None or e.end > seg.size:
            break
        seg.entries.append(e)
        pos = e.end
    seg.end = pos
    seg.torn = pos < seg.size


@dataclass(frozen=True)
class Gap:
    """A place in the history no restore can cross, and why."""

    time_ns: int
    reason: str
    last_point_before: Entry | None  # the newest checkpoint before it (no longer offered)


@dataclass(frozen=True)
class At:
    """A moment asked for: a wall-clock time (ns) or a sequence number."""

    time_ns: int | None = None
    seq: int | None = None

    def __str__(self) -> str:
        return f"seq {self.seq}" if self.seq is not None else fmt_time(self.time_ns or 0)


def parse_at(text: str) -> At:
    """``--at``: a sequence number (digits), ``@`` and Unix seconds, or an ISO 8601 date and time (local time
    unless it names its zone).  A time covers the whole of its last digit: 09:30:00 is up to 09:30:00.999999999,
    and a time copied from ``bdr history`` (milliseconds) finds the point it shows."""
    t = text.strip()
    if t.isdigit():
        return At(seq=int(t))
    if t.startswith("@"):
        m = re.fullmatch(r"@(\d+)(?:\.(\d{1,9}))?", t)
        if not m:
            raise ValueError(f"--at {text!r}: '@' must be followed by Unix seconds (e.g. @1764840600.25)")
        frac = m.group(2) or ""
        ns = int(m.group(1)) * 10**9 + int(frac.ljust(9, "0") or 0)
        return At(time_ns=ns + 10 ** (9 - len(frac)) - 1)
    try:
        dt = datetime.datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(
            f"--at {text!r}: give a time (2026-12-04T09:30:00, local time unless a zone is given), "
            "@UNIX_SECONDS, or a sequence number"
        ) from None
    if dt.tzinfo is None:
        dt = dt.astimezone()
    m = re.search(r"\d:\d\d:\d\d(?:[.,](\d+))?", t)
    # no seconds given: the whole minute (or day); else the last digit given
    minute = 60 if re.search(r"\d:\d\d", t) else 86400
    span = 10**9 * minute if m is None else 10 ** (9 - min(len(m.group(1) or ""), 6))
    whole = int(dt.replace(microsecond=0).timestamp()) * 10**9 + dt.microsecond * 1000
    return At(time_ns=whole + span - 1)


def fmt_time(time_ns: int) -> str:
    """A time for people: local, to the millisecond, with its zone."""
    dt = datetime.datetime.fromtimestamp(time_ns / 1e9).astimezone()
    return dt.isoformat(timespec="milliseconds")


def fmt_point(e: Entry) -> str:
    return f"{fmt_time(e.time_ns)} (seq {fmt_seq(e.seq)})"


class History:
    """A history directory read as it is now; ``refresh`` reads what was appended since."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise HistoryFormatError(f"{self.directory}: no such history directory")
        self.meta: Meta = read_meta(self.directory)
        self.segments: list[Segment] = []
        self.refresh()

    def refresh(self) -> None:
        """Open segments written since, and read the records appended to the open ones."""
        known = {s.number for s in self.segments}
        for n in segment_numbers(self.directory):
            if n in known or (self.segments and n < self.segments[-1].number):
                continue
            path = self.directory / segment_name(n)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # dropped by retention meanwhile
            self.segments.append(Segment(n, path, fd))
        for seg in self.segments:
            scan_segment(seg)

    def close(self) -> None:
        for seg in self.segments:
            os.close(seg.fd)
        self.segments = []

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what it holds ------------------------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        return [e for seg in self.segments for e in seg.entries]

    @property
    def bytes_used(self) -> int:
        return sum(seg.size for seg in self.segments)

    def barriers(self) -> list[tuple[int, Gap]]:
        """Indexes into ``entries()`` before which no restore can go: GAP records, and records lost in the middle
        (a segment missing from the numbering, a segment whose records end before the file does)."""
        out: list[tuple[int, Gap]] = []
        i = 0
        last_point: Entry | None = None
        for k, seg in enumerate(self.segments):
            if k and seg.number != self.segments[k - 1].number + 1:
                out.append((i, Gap(self._first_time(seg), "segments missing from the history", last_point)))
            for e in seg.entries:
                if e.kind is Kind.GAP:
                    out.append((i, Gap(e.time_ns, self.reason(e), last_point)))
                elif e.kind is Kind.CHECKPOINT:
                    last_point = e
                i += 1
            if seg.torn and k != len(self.segments) - 1:
                out.append((i, Gap(self._first_time(seg), f"segment {seg.path.name} is damaged", last_point)))
        return out

    @staticmethod
    def _first_time(seg: Segment) -> int:
        return seg.entries[0].time_ns if seg.entries else 0

    def windows(self) -> list[tuple[Entry, Entry | None, Entry | None]]:
        """The resync windows since the last gap: (its RESYNC record, the newest point offered before it, the
        first after it)."""
        points = self.points()
        keys = [(e.segment, e.pos) for e in points]
        bars = self.barriers()
        out = []
        for e in self.entries()[bars[-1][0] if bars else 0 :]:  # those before a gap are moot
            if e.kind is Kind.RESYNC:
                k = bisect.bisect_left(keys, (e.segment, e.pos))
                out.append((e, points[k - 1] if k else None, points[k] if k < len(points) else None))
        return out

    def points(self) -> list[Entry]:
        """The checkpoints offered: those after the last barrier, oldest first, but none a rollback voided (the
        points after its target, up to its record)."""
        entries = self.entries()
        bars = self.barriers()
        start = bars[-1][0] if bars else 0
        void = [
            ((e.offset, e.length), (e.segment, e.pos)) for e in entries[start:] if e.kind is Kind.ROLLBACK
        ]
        return [
            e
            for e in entries[start:]
            if e.kind is Kind.CHECKPOINT and not any(a < (e.segment, e.pos) < b for a, b in void)
        ]

    def reason(self, e: Entry) -> str:
        """The text of a GAP, RESYNC, START or ROLLBACK record."""
        return self.read_payload(e).decode("utf-8", "replace")

    def read_payload(self, e: Entry) -> bytes:
        seg = next(s for s in self.segments if s.number == e.segment)
        data = os.pread(seg.fd, e.payload_len, e.pos + HEAD_SIZE)
        if not payload_intact(e, data):
            raise HistoryFormatError(
                f"{seg.path}: record at byte {e.pos} is damaged (payload checksum); the history cannot give "
                "back points before it"
            )
        return data

    def undo_after(self, point: Entry) -> list[Entry]:
        """The UNDO records written after ``point``, in the order they were written."""
        entries = self.entries()
        i = next(k for k, e in enumerate(entries) if e.segment == point.segment and e.pos == point.pos)
        bars = [b for b, _ in self.barriers() if b > i]
        if bars:
            raise PointRefused(
                f"the point {fmt_point(point)} is no longer offered: the replica was rewritten without history "
                "after it"
            )
        return [e for e in entries[i + 1 :] if e.kind is Kind.UNDO]

    # -- choosing a point -------------------------------------------------------------------------------------

    def select(self, at: At) -> Entry:
        """The newest point offered at or before ``at``; PointRefused when there is none, or when ``at`` falls
        in a resync window (the source's states there never were on the replica)."""
        points = self.points()
        windows = self.windows()
        if at.seq is not None:
            # sequence numbers may start again after a resync (a new capture ring): only the points since the
            # last one are looked up by number
            if windows:
                last, _, _ = windows[-1]
                points = [e for e in points if (e.segment, e.pos) > (last.segment, last.pos)]
            chosen = [e for e in points if e.seq <= at.seq]
            if not chosen and windows:
                raise PointRefused(
                    f"{at} is not after the last resync ({fmt_time(windows[-1][0].time_ns)}): sequence numbers "
                    "may start again at a resync, so older points are asked for by time; "
                    + self._offered(self.points())
                )
        else:
            assert at.time_ns is not None
            for r, before, after in windows:
                end = after.time_ns if after is not None else None
                if r.offset < at.time_ns and (end is None or at.time_ns < end):
                    near = [
                        f"before it {fmt_point(before)}" if before is not None else "",
                        f"after it {fmt_point(after)}" if after is not None else "",
                    ]
                    nearest = " and ".join(n for n in near if n) or "none"
                    raise PointRefused(
                        f"{at} is inside a resync window, from {fmt_time(r.offset)} to "
                        f"{fmt_time(end) if end is not None else 'the next point'}: {self.reason(r)}; the source's "
                        f"states in it were never on the replica. The nearest points offered: {nearest}"
                    )
            chosen = [e for e in points if e.time_ns <= at.time_ns]
        if chosen:
            return chosen[-1]
        raise PointRefused(self._refusal(at, self.points()))

    @staticmethod
    def _offered(points: list[Entry]) -> str:
        if points:
            return f"the oldest point offered is {fmt_point(points[0])}, the newest {fmt_point(points[-1])}"
        return "no point is offered yet (the next durability point of the source that reaches the replica makes one)"

    def _refusal(self, at: At, points: list[Entry]) -> str:
        bars = self.barriers()
        offered = self._offered(points)
        if bars:
            gap = bars[-1][1]
            before = (
                f"; the newest point before it, {fmt_point(gap.last_point_before)}, can no longer be given back"
                if gap.last_point_before is not None
                else ""
            )
            return (
                f"{at} is before a gap in the history at {fmt_time(gap.time_ns)}: {gap.reason}{before}. "
                f"Nothing before the gap can be restored exactly; {offered}"
            )
        return f"{at} is older than the history holds (retention); {offered}"

    def summary(self) -> dict[str, object]:
        """What ``bdr history --json`` prints."""
        points = self.points()
        entries = self.entries()
        last = next((e for e in reversed(entries) if e.kind is not Kind.START), None)
        return {
            "directory": str(self.directory),
            "replica": self.meta.replica,
            "replica_bytes": self.meta.replica_bytes,
            "bytes_used": self.bytes_used,
            "segments": len(self.segments),
            "points": len(points),
            "oldest": _point_json(points[0]) if points else None,
            "newest": _point_json(points[-1]) if points else None,
            "gaps": [
                {
                    "time": fmt_time(g.time_ns),
                    "time_ns": g.time_ns,
                    "reason": g.reason,
                    "last_point_before": _point_json(g.last_point_before) if g.last_point_before else None,
                }
                for _, g in self.barriers()
            ],
            "resyncs": [
                {
                    "from": fmt_time(r.offset),
                    "to": fmt_time(r.time_ns),
                    "reason": self.reason(r),
                    "last_point_before": _point_json(b) if b is not None else None,
                    "first_point_after": _point_json(a) if a is not None else None,
                }
                for r, b, a in self.windows()
            ],
            "rolled_back": self.reason(last) if last is not None and last.kind is Kind.ROLLBACK else None,
            "checkpoints": [_point_json(e) for e in points],
        }


def _point_json(e: Entry) -> dict[str, object]:
    return {"seq": e.seq, "time": fmt_time(e.time_ns), "time_ns": e.time_ns}
