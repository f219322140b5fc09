"""Giving back a past moment: ``restore`` writes the replica as of a checkpoint to another device or file while
replication goes on; ``rollback`` turns the replica itself back, with its server stopped.

Both undo the UNDO records written after the checkpoint, newest first: each block ends with the before-image of
the oldest write after the checkpoint, which is what it held then.  A restore copies the replica first and reads
the history after the copy, so any write the copy saw has its before-image among the records it undoes (the
server makes a before-image durable before it writes the replica).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from .. import replica_state
from ..journal import Journal, JournalError, RecordArea
from ..journal.format import AreaState
from ..progress import Progress
from ..seq import NO_SEQ
from .format import (
    CHUNK,
    FLAG_ZERO,
    HEAD_SIZE,
    Entry,
    Kind,
    encode,
    fsync_dir,
    payload_intact,
    segment_name,
    unpack_extents,
)
from .index import At, History, fmt_point
from .writer import HistoryError, lock_history

log = logging.getLogger("bdr")

COPY_CHUNK = 8 << 20
_ZEROS = bytes(CHUNK)


@dataclass(frozen=True)
class Outcome:
    point: Entry
    undone: int  # writes undone (extents of UNDO records)
    undone_bytes: int
    copied_bytes: int
    seconds: float


def _open_device(path: str, flags: int) -> tuple[int, int, bool]:
    """fd, size in bytes, is a block device."""
    fd = os.open(path, flags | os.O_CLOEXEC)
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return fd, os.lseek(fd, 0, os.SEEK_END), True
    return fd, st.st_size, False


def _undo(h: History, point: Entry, undo: list[Entry], fd: int, size: int, quiet: bool) -> tuple[int, int]:
    """Write the before-images of ``undo`` to ``fd``, newest first.  Returns the extents and bytes written."""
    fds = {seg.number: seg.fd for seg in h.segments}
    total = sum(e.length for e in undo)
    progress = Progress(f"undoing {len(undo)} batches of writes since {fmt_point(point)}", total, log, quiet)
    extents = done = 0
    try:
        for e in reversed(undo):
            payload = os.pread(fds[e.segment], e.payload_len, e.pos + HEAD_SIZE)
            if not payload_intact(e, payload):
                if not (h.directory / segment_name(e.segment)).exists():
                    raise HistoryError(
                        f"the history dropped the records after {fmt_point(point)} while they were read "
                        "(retention, the point being one of the oldest): choose a newer point"
                    )
                raise HistoryError(
                    f"history {h.directory}: the before-images at byte {e.pos} of segment "
                    f"{segment_name(e.segment)} are damaged (checksum); the point cannot be given back"
                )
            offsets, lengths, flags, at = unpack_extents(payload, e.offset)
            starts = []
            for n, fl in zip(lengths, flags, strict=True):
                starts.append(at)
                if not fl & FLAG_ZERO:
                    at += n
            view = memoryview(payload)
            for k in range(len(offsets) - 1, -1, -1):  # newest first within the record too
                off, n = offsets[k], lengths[k]
                if off + n > size:
                    raise HistoryError(f"a before-image at byte {off} is beyond the end of the device")
                data = _ZEROS[:n] if flags[k] & FLAG_ZERO else view[starts[k] : starts[k] + n]
                _pwrite_all(fd, data, off)
            extents += len(offsets)
            done += e.length
            progress.update(e.length)
    finally:
        progress.close()
    return extents, done


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _copy(src: int, dst: int, size: int, files: bool, quiet: bool) -> None:
    progress = Progress("copying the replica", size, log, quiet)
    pos = 0
    try:
        buf = memoryview(bytearray(COPY_CHUNK)) if not files else None
        while pos < size:
            n = min(COPY_CHUNK, size - pos)
            if buf is None:
                k = os.copy_file_range(src, dst, n, pos, pos)
                if k <= 0:
                    raise OSError(5, "copy_file_range copied nothing")
            else:
                k = os.preadv(src, [buf[:n]], pos)
                if k <= 0:
                    raise OSError(5, "short read of the replica")
                _pwrite_all(dst, buf[:k], pos)
            pos += k
            progress.update(k)
    finally:
        progress.close()


def restore(directory: str | os.PathLike[str], at: At, dest: str, quiet: bool = False) -> Outcome:
    """Write the replica as of the newest checkpoint at or before ``at`` to ``dest`` (a device, or a file that is
    created or overwritten), while the server may go on applying writes."""
    t0 = time.monotonic()
    with History(directory) as h:
        point = h.select(at)
        replica = h.meta.replica
        src, size, _ = _open_device(replica, os.O_RDONLY)
        try:
            _check_size(h, size)
            if Path(dest).exists() and os.path.samefile(dest, replica):
                raise HistoryError(f"{dest} is the replica itself: use bdr rollback to turn it back")
            try:
                dst, dsize, dblock = _open_device(dest, os.O_RDWR | os.O_CREAT)
            except OSError as exc:
                raise HistoryError(f"cannot open {dest}: {exc.strerror}") from exc
            try:
                if dblock and dsize < size:
                    raise HistoryError(f"{dest} holds {dsize} bytes; the replica needs {size}")
                if not dblock:
                    os.ftruncate(dst, size)
                _copy(src, dst, size, not dblock and stat.S_ISREG(os.fstat(src).st_mode), quiet)
                h.refresh()  # the writes applied during the copy have their before-images here now
                undo = h.undo_after(point)
                undone, n = _undo(h, point, undo, dst, size, quiet)
                os.fsync(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)
    return Outcome(point, undone, n, size, time.monotonic() - t0)


def rollback(directory: str | os.PathLike[str], at: At, quiet: bool = False) -> Outcome:
    """Turn the replica back to the newest checkpoint at or before ``at``.  Its bdr_server must be stopped; the
    next client start resyncs it forward (or it is used as it is)."""
    t0 = time.monotonic()
    d = Path(directory)
    lock = lock_history(d, "bdr rollback")
    try:
        with History(d) as h:
            point = h.select(at)
            undo = h.undo_after(point)
            try:
                journal = Journal(h.meta.journal)
            except JournalError as exc:
                raise HistoryError(str(exc)) from exc
            try:
                _check_no_pending_resync(journal)
                fd, size, _ = _open_device(h.meta.replica, os.O_RDWR)
                try:
                    _check_size(h, size)
                    _verify(h, point, undo)  # a damaged record stops the rollback before it starts
                    # the points after the target are void from now on, whatever happens: the replica is a mix of
                    # two moments while the before-images are written (the journal says so too); running the
                    # same rollback again finishes it
                    _append_marker(h, point, b"rolling back to " + fmt_point(point).encode())
                    journal.store(replica_state.rollback_begun(journal.header))
                    undone, n = _undo(h, point, undo, fd, size, quiet)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                journal.store(replica_state.rolled_back(journal.header))
            finally:
                journal.close()
            _cut_after(h, point)
    finally:
        os.close(lock)
    return Outcome(point, undone, n, 0, time.monotonic() - t0)


def _check_size(h: History, size: int) -> None:
    if size != h.meta.replica_bytes:
        raise HistoryError(
            f"{h.meta.replica} holds {size} bytes, but the history {h.directory} is of a replica of "
            f"{h.meta.replica_bytes} bytes: not the same replica"
        )


def _verify(h: History, point: Entry, undo: list[Entry]) -> None:
    fds = {seg.number: seg.fd for seg in h.segments}
    for e in undo:
        if not payload_intact(e, os.pread(fds[e.segment], e.payload_len, e.pos + HEAD_SIZE)):
            raise HistoryError(
                f"history {h.directory}: the before-images at byte {e.pos} of segment {segment_name(e.segment)} "
                f"are damaged (checksum); {fmt_point(point)} cannot be given back"
            )


def _append_marker(h: History, point: Entry, why: bytes) -> None:
    """A ROLLBACK record at the end of the history, naming ``point``: the points after it are void."""
    _write_rollback(h.segments[-1].path, h.segments[-1].number, h.segments[-1].end, point, why)


def _write_rollback(path: Path, segment: int, at: int, point: Entry, why: bytes) -> None:
    """A ROLLBACK record naming ``point`` at byte ``at`` of the segment file, which ends after it."""
    rec = encode(segment, Kind.ROLLBACK, NO_SEQ, time.time_ns(), point.segment, point.pos, payload=why) + why
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        _pwrite_all(fd, rec, at)
        os.ftruncate(fd, at + len(rec))
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _check_no_pending_resync(journal: Journal) -> None:
    fd = os.open(journal.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        area = RecordArea(fd, str(journal.path), None)
        if area.state.state is AreaState.COMMITTED:
            raise HistoryError(
                f"journal {journal.path} holds a committed resync that bdr_server applies when it starts: start "
                "bdr_server once (it applies the resync), stop it, then roll back"
            )
    finally:
        os.close(fd)


def _cut_after(h: History, point: Entry) -> None:
    """The history after a rollback ends at ``point`` (what came after is undone), with a ROLLBACK record."""
    for seg in reversed(h.segments):
        if seg.number > point.segment:
            os.unlink(seg.path)
    fsync_dir(h.directory)
    seg = next(s for s in h.segments if s.number == point.segment)
    why = f"rolled back to {fmt_point(point)} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}".encode()
    _write_rollback(seg.path, seg.number, point.end, point, why)
