"""The source device: opened once, its size, reads of it (a block device past the page cache), and the check of
what a discarded range of it reads as."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import stat
import struct
from pathlib import Path

from .. import scan
from .errors import ClientError, SourceError

BLKGETSIZE64 = 0x80081272
DISCARD_BLOCK = 512  # granularity of the check of a discarded range that does not read as zeros (a sector)


def device_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = bytearray(8)
        fcntl.ioctl(fd, BLKGETSIZE64, buf, True)
        return int(struct.unpack("<Q", buf)[0])
    return st.st_size


class Source:
    """The source device ``name`` (as given on the command line), open for reading."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = src = Path(name)
        try:
            self.fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ClientError(f"cannot open source device {src}: {exc.strerror}") from exc
        self.size = device_size(self.fd)
        # a block device is read past its page cache (a file system on it writes file data to the device
        # directly, and a discarded range may still be cached as it was); a regular file's page cache is the
        # file itself, coherent with every writer, and reading through it costs no disk read for cached pages
        self.direct_fd = -1
        if stat.S_ISBLK(os.fstat(self.fd).st_mode):
            with contextlib.suppress(OSError):
                self.direct_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        self.direct_buf = mmap.mmap(-1, 1 << 20)  # page-aligned, for O_DIRECT
        self.window_buf = memoryview(mmap.mmap(-1, scan.WINDOW))  # a scan window, page-aligned for O_DIRECT
        if self.size == 0 or self.size % 512:
            self.close()
            raise ClientError(f"source device {src} has {self.size} bytes, not a positive multiple of 512")

    def read(self, view: memoryview, offset: int) -> None:
        """Read the source past the page cache: a file system mounted on the source writes file data to the
        device directly, so cached pages of the block device may be stale (O_DIRECT where the source allows it;
        an unaligned request falls back to a cached read)."""
        if self.direct_fd >= 0:
            try:
                scan.read_exact(self.direct_fd, view, offset)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        scan.read_exact(self.fd, view, offset)

    def read_window(self, view: memoryview, off: int) -> None:
        """``read``, for a scan: a failure is a SourceError."""
        try:
            self.read(view, off)
        except OSError as exc:
            raise SourceError(
                f"cannot read source device {self.name} at byte {off} (+{len(view)}): {exc.strerror or exc}"
            ) from exc

    def nonzero_blocks(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The sectors of [offset, +length) where the source does not read zeros, as (offset, length).
        Read from the device, past the page cache."""
        buf = memoryview(self.direct_buf)
        end = offset + length
        out: list[tuple[int, int]] = []
        try:
            while offset < end:
                n = min(len(buf), end - offset)
                view = buf[:n]
                self.read(view, offset)
                if scan.digest(view) != scan.zero_digest(n):
                    for o in range(0, n, DISCARD_BLOCK):
                        k = min(DISCARD_BLOCK, n - o)
                        if scan.digest(view[o : o + k]) != scan.zero_digest(k):
                            out.append((offset + o, k))
                offset += n
        except OSError as exc:
            raise SourceError(
                f"cannot read source device {self.name} at byte {offset}: {exc.strerror or exc}"
            ) from exc
        finally:
            buf.release()
        return out

    def close(self) -> None:
        os.close(self.fd)
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
