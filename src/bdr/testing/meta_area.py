"""A target's tracking area (``struct bdr_meta_header`` and the bitmap, kernel/bdr_uapi.h) built in userspace,
for tests of what reads it where no kernel target can write one."""

from __future__ import annotations

import zlib

from ..kernel import abi
from ..kernel.meta import BLOCK, CRC_BYTES, HEADER, MAGIC, VERSION


def pack_meta_area(
    dev_size: int, region_bytes: int, ring: bytes, pos: int, generation: int, regions: list[int]
) -> bytes:
    """The bytes of a meta device for a ``dev_size``-byte device: marked ``regions`` (region numbers), the last
    clear at ``pos`` of ``ring`` in ``generation``."""
    nr = (dev_size + region_bytes - 1) // region_bytes
    fields = (
        MAGIC,
        VERSION,
        dev_size // abi.SECTOR_SIZE,
        region_bytes // abi.SECTOR_SIZE,
        0,
        nr,
        ring,
        pos,
        generation,
        0,
    )
    crc = zlib.crc32(HEADER.pack(*fields, 0)[:CRC_BYTES]) ^ 0xFFFFFFFF
    head = HEADER.pack(*fields, crc)
    bitmap = bytearray((nr + 8 * BLOCK - 1) // (8 * BLOCK) * BLOCK)
    for r in regions:
        bitmap[r // 8] |= 1 << (r % 8)
    return head.ljust(BLOCK, b"\0") + bytes(bitmap)
