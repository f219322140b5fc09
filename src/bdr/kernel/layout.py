"""The ring's geometry: where the control page, the descriptors and the data slots lie in the mapping, as the
kernel lays them out (kernel/bdr_uapi.h), and what a dirty bitmap of a device needs."""

from __future__ import annotations

import mmap
from dataclasses import dataclass

from ..records import RECORD_SIZE
from . import abi

PAGE = mmap.PAGESIZE
DIRTY_SUFFIX = ".dirty"


class RingError(Exception):
    """The ring cannot be used: wrong path, wrong magic or version, inconsistent geometry, corrupt record."""


@dataclass(frozen=True, slots=True)
class Geometry:
    nr_slots: int
    slot_data: int
    desc_offset: int
    data_offset: int
    mmap_size: int
    dev_sectors: int | None  # None for a ring file: the caller knows the source size
    region_sectors: int
    name: str
    instance: int = 0  # random per kernel ring (sequence numbers restart with a new one); 0 for a file

    def nr_regions(self, dev_size: int) -> int:
        region = self.region_sectors * abi.SECTOR_SIZE
        return (dev_size + region - 1) // region

    def bitmap_bytes(self, dev_size: int) -> int:
        return (self.nr_regions(dev_size) + 63) // 64 * 8


def ring_layout(nr_slots: int) -> tuple[int, int, int]:
    """(desc_offset, data_offset, mmap_size) for a ring of nr_slots, as the kernel lays it out."""
    desc_offset = PAGE
    data_offset = _align(desc_offset + nr_slots * RECORD_SIZE, PAGE)
    return desc_offset, data_offset, data_offset + nr_slots * abi.BDR_SLOT_DATA


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a
