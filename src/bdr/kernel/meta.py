"""A target's meta device read from userspace (``struct bdr_meta_header`` and the tracking bitmap, as laid out
in kernel/bdr_uapi.h): which regions may hold writes that the replica did not hold at the last clear.

The marks on the device are a superset of the target's: a mark is written before any write to its region
completes, and a clear reaches the device after the header that records it.  ``bdr demote`` reads them once the
target is gone (removed, or lost with a crash) to tell the promoted side what the old source may have written
after the replica's last durable point.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import zlib
from dataclasses import dataclass

from . import abi
from .dirty import DirtyMap

MAGIC = 0x54524442  # "BDRT"
VERSION = 1
BLOCK = 4096
HEADER = struct.Struct("<IIQIIQ16sQQII")  # struct bdr_meta_header
CRC_BYTES = 68  # the CRC covers the header up to itself


class MetaError(Exception):
    """The meta device cannot be read or holds no valid tracking area; the message says why."""


@dataclass(frozen=True, slots=True)
class Marks:
    dev_size: int  # bytes of the device the area was made for
    region_bytes: int
    clear_ring: bytes  # the client's ring, position and generation of the last clear (zeros: none)
    clear_pos: int
    clear_generation: int
    extents: list[tuple[int, int]]  # the marked regions, as merged byte ranges of the device

    @property
    def marked_bytes(self) -> int:
        return sum(n for _, n in self.extents)


def _open(path: str) -> int:
    """``path`` opened exclusively (a block device a target still holds is refused: its marks would go on
    changing), past the page cache (the target writes its marks with bios of its own) where the file allows."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_EXCL
    try:
        try:
            return os.open(path, flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # a file system without O_DIRECT
                raise
            return os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise MetaError(
                f"meta device {path} is in use (a bdr target still over it?): remove the target first, or give "
                "bdr demote its --name"
            ) from exc
        raise MetaError(f"cannot open meta device {path}: {exc.strerror}") from exc


def _pread(fd: int, n: int, off: int) -> bytes:
    """``n`` bytes at ``off`` through an aligned buffer (what O_DIRECT needs)."""
    size = max(BLOCK, (n + BLOCK - 1) // BLOCK * BLOCK)
    with mmap.mmap(-1, size) as buf:
        got = os.preadv(fd, [buf], off)
        return bytes(buf[: min(got, n)])


def read_marks(path: str) -> Marks:
    """The tracking area of meta device ``path``."""
    fd = _open(path)
    try:
        block = _pread(fd, BLOCK, 0)
        if len(block) < BLOCK:
            raise MetaError(f"meta device {path} is smaller than its {BLOCK}-byte header")
        magic, version, dev_sectors, region_sectors, _, nr_regions, ring, pos, gen, _, crc = (
            HEADER.unpack_from(block)
        )
        if block[:BLOCK].count(0) == BLOCK:
            raise MetaError(f"meta device {path} holds no tracking area (its header is zeros)")
        if magic != MAGIC or version != VERSION:
            raise MetaError(
                f"meta device {path} holds no BDR tracking area (magic {magic:#x}, version {version})"
            )
        if crc != zlib.crc32(block[:CRC_BYTES]) ^ 0xFFFFFFFF:
            raise MetaError(f"meta device {path}: the tracking area's header is damaged (CRC)")
        region = region_sectors * abi.SECTOR_SIZE
        dev_size = dev_sectors * abi.SECTOR_SIZE
        if not region or nr_regions != (dev_size + region - 1) // region:
            raise MetaError(f"meta device {path}: inconsistent geometry in its header")
        nbytes = (nr_regions + 7) // 8
        bitmap = _pread(fd, nbytes, BLOCK)
        if len(bitmap) < nbytes:
            raise MetaError(f"meta device {path} is too small for its bitmap of {nr_regions} regions")
    except OSError as exc:
        raise MetaError(f"cannot read meta device {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    dm = DirtyMap(bitmap, region, 0, 0, 0, 0)
    return Marks(dev_size, region, ring, pos, gen, dm.extents(dev_size))
