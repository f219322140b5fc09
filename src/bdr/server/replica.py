"""The replica device or image file: positioned writes, zeroing, discards, fdatasync; its I/O errors are
ReplicaIOError naming the device."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
from pathlib import Path
from typing import Protocol

from .. import scan
from ..journal import ReplicaIOError
from .errors import ServerError

log = logging.getLogger("bdr.server")


BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
ZERO_CHUNK = 1 << 20
BLKDISCARD = 0x1277
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """fallocate(PUNCH_HOLE | KEEP_SIZE): the range reads as zeros and its space is freed (a file's blocks; on a
    block device, a write-zeroes that may unmap, never a fallback to writing zeros).  False: not supported."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
        return False
    raise OSError(err, os.strerror(err))


class Target(Protocol):
    """What the applier needs from the replica."""

    def write_runs(self, runs: list[tuple[memoryview, int]]) -> None: ...
    def write_zeroes(self, offset: int, length: int) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def sync(self) -> None: ...


class Replica:
    """The target device or image file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise ServerError(f"cannot open target device {self.path}: {exc.strerror}") from exc
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        if not (self.is_block or stat.S_ISREG(st.st_mode)):
            os.close(self.fd)
            raise ServerError(f"target device {self.path} is neither a block device nor a regular file")
        if self.is_block:
            buf = bytearray(8)
            fcntl.ioctl(self.fd, BLKGETSIZE64, buf, True)
            self.size = struct.unpack("<Q", buf)[0]
            bs = bytearray(4)
            fcntl.ioctl(self.fd, BLKSSZGET, bs, True)
            self.block_size = struct.unpack("<I", bs)[0]
        else:
            self.size = st.st_size
            self.block_size = 512
        # a regular file without a single allocated block reads as zeros everywhere
        self.known_zero = not self.is_block and st.st_blocks == 0
        self._zeros = memoryview(bytes(ZERO_CHUNK))
        self.bytes_written = 0
        self.bytes_discarded = 0
        self.can_punch = True  # fallocate(PUNCH_HOLE) works here until it fails once
        self.can_blkdiscard = True

    def error(self, exc: OSError, offset: int | None = None) -> ReplicaIOError:
        """The replica's I/O error, with its path (the byte it happened at goes to the debug log)."""
        if isinstance(exc, ReplicaIOError):
            return exc
        if offset is not None:
            log.debug("replica %s: I/O error at byte %d", self.path, offset)
        return ReplicaIOError(
            exc.errno, f"replica {self.path}: I/O error: {exc.strerror or exc}", str(self.path)
        )

    def write(self, data: memoryview, offset: int) -> None:
        done = 0
        try:
            while done < len(data):
                n = os.pwritev(self.fd, [data[done:]], offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                done += n
        except OSError as exc:
            raise self.error(exc, offset + done) from exc
        self.bytes_written += done
        self.known_zero = False

    def write_runs(self, runs: list[tuple[memoryview, int]]) -> None:
        """Write each (data, offset), in order: one pwrite per run in a tight loop."""
        fd, pwrite = self.fd, os.pwrite
        total = 0
        for data, offset in runs:
            try:
                n = pwrite(fd, data, offset)
            except OSError as exc:
                raise self.error(exc, offset) from exc
            total += n
            if n != len(data):
                self.write(data[n:], offset + n)
        self.bytes_written += total
        self.known_zero = False

    def read(self, view: memoryview, offset: int) -> None:
        try:
            scan.read_exact(self.fd, view, offset)
        except OSError as exc:
            raise self.error(exc, offset) from exc

    def note_written(self, n: int) -> None:
        """Bytes written behind our back (splice)."""
        self.bytes_written += n
        self.known_zero = False

    def write_zeroes(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(ZERO_CHUNK, end - offset)
            self.write(self._zeros[:n], offset)
            offset += n

    def discard(self, offset: int, length: int) -> None:
        """Make [offset, +length) read as zeros, giving the space back where the device can (a thin or sparse
        replica): zero-with-unmap (fallocate PUNCH_HOLE), else a discard checked by reading it back, else
        zeros written."""
        try:
            punched = self.can_punch and _punch_hole(self.fd, offset, length)
        except OSError as exc:
            raise self.error(exc, offset) from exc
        if not punched:
            self.can_punch = False
            if not self.is_block or not self._discard_checked(offset, length):
                self.write_zeroes(offset, length)
                return
        self.bytes_discarded += length

    def _discard_checked(self, offset: int, length: int) -> bool:
        """BLKDISCARD, then read the range back and write zeros where the device did not zero it."""
        if self.can_blkdiscard:
            try:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY):
                    raise self.error(exc, offset) from exc
                self.can_blkdiscard = exc.errno == errno.EINVAL  # misaligned: try the next one
                return False
        else:
            return False
        buf = memoryview(bytearray(min(ZERO_CHUNK, length)))
        end = offset + length
        while offset < end:
            n = min(len(buf), end - offset)
            self.read(buf[:n], offset)
            if buf[:n] != self._zeros[:n]:
                self.write(self._zeros[:n], offset)
            offset += n
        return True

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise self.error(exc) from exc

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
