"""Python mirror of ``kernel/bdr_uapi.h``: ring layout, record format, ioctl numbers.

The C header is the single source of truth; ``tests/unit/test_abi.py`` compiles a probe against it and
compares every size, offset and number below.  Keep the field order and types identical to the header.
"""

from __future__ import annotations

import ctypes
import enum

BDR_MAGIC = 0x31524442
BDR_ABI_VERSION = 1
BDR_SLOT_DATA = 4096
BDR_SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << BDR_SECTOR_SHIFT
BDR_DEFAULT_REGION_SECTORS = 128
BDR_MAX_SLOTS = 1 << 24
BDR_NAME_MAX = 32


class Op(enum.IntEnum):
    """``enum bdr_op``: what a ring record describes."""

    WRITE = 1
    FLUSH = 2
    DISCARD = 3
    WRITE_ZEROES = 4


class RecFlag(enum.IntFlag):
    """``bdr_record.flags``."""

    FUA = 1 << 0
    CONT = 1 << 1
    MORE = 1 << 2


class State(enum.IntFlag):
    """``bdr_ring_ctl.state`` bits."""

    OVERFLOW = 1 << 0
    DIRTY = 1 << 1
    DEAD = 1 << 2
    RECOVERED = 1 << 3  # the dirty bitmap was loaded from the meta_device (persistent change tracking)


class Record(ctypes.Structure):
    """``struct bdr_record`` (32 bytes): seq, sector, len, op, flags, reserved."""

    _fields_ = (
        ("seq", ctypes.c_uint64),
        ("sector", ctypes.c_uint64),
        ("len", ctypes.c_uint32),
        ("op", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("reserved", ctypes.c_uint64),
    )


class RingCtl(ctypes.Structure):
    """``struct bdr_ring_ctl``: page 0 of the mapping."""

    _fields_ = (
        ("magic", ctypes.c_uint32),
        ("abi_version", ctypes.c_uint32),
        ("nr_slots", ctypes.c_uint32),
        ("slot_data", ctypes.c_uint32),
        ("desc_offset", ctypes.c_uint64),
        ("data_offset", ctypes.c_uint64),
        ("mmap_size", ctypes.c_uint64),
        ("instance", ctypes.c_uint64),
        ("pad0", ctypes.c_uint64 * 2),
        ("head", ctypes.c_uint64),
        ("state", ctypes.c_uint64),
        ("next_seq", ctypes.c_uint64),
        ("pad1", ctypes.c_uint64 * 5),
        ("tail", ctypes.c_uint64),
        ("seen", ctypes.c_uint64),
        ("pad2", ctypes.c_uint64 * 6),
    )


class Info(ctypes.Structure):
    """``struct bdr_info``: answer of BDR_IOC_INFO."""

    _fields_ = (
        ("magic", ctypes.c_uint32),
        ("abi_version", ctypes.c_uint32),
        ("nr_slots", ctypes.c_uint32),
        ("slot_data", ctypes.c_uint32),
        ("desc_offset", ctypes.c_uint64),
        ("data_offset", ctypes.c_uint64),
        ("mmap_size", ctypes.c_uint64),
        ("dev_sectors", ctypes.c_uint64),
        ("region_sectors", ctypes.c_uint32),
        ("reserved0", ctypes.c_uint32),
        ("nr_regions", ctypes.c_uint64),
        ("bitmap_bytes", ctypes.c_uint64),
        ("instance", ctypes.c_uint64),
        ("name", ctypes.c_char * BDR_NAME_MAX),
    )


class Status(ctypes.Structure):
    """``struct bdr_status``: answer of BDR_IOC_STATUS."""

    _fields_ = (
        ("head", ctypes.c_uint64),
        ("tail", ctypes.c_uint64),
        ("next_seq", ctypes.c_uint64),
        ("state", ctypes.c_uint64),
        ("records", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("dropped", ctypes.c_uint64),
        ("failed", ctypes.c_uint64),
        ("dirty_regions", ctypes.c_uint64),
        ("overflows", ctypes.c_uint64),
    )


class Dirty(ctypes.Structure):
    """``struct bdr_dirty``: argument of BDR_IOC_TAKE_DIRTY."""

    _fields_ = (
        ("bitmap", ctypes.c_uint64),
        ("bitmap_bytes", ctypes.c_uint64),
        ("ring_head", ctypes.c_uint64),
        ("next_seq", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("state", ctypes.c_uint64),
    )


BDR_META_MAGIC = 0x54524442
BDR_META_VERSION = 1
BDR_META_BLOCK = 4096


class MetaHeader(ctypes.LittleEndianStructure):
    """``struct bdr_meta_header``: block 0 of a meta_device (little endian, on disk)."""

    _fields_ = (
        ("magic", ctypes.c_uint32),
        ("version", ctypes.c_uint32),
        ("dev_sectors", ctypes.c_uint64),
        ("region_sectors", ctypes.c_uint32),
        ("reserved0", ctypes.c_uint32),
        ("nr_regions", ctypes.c_uint64),
        ("clear_ring", ctypes.c_uint8 * 16),
        ("clear_pos", ctypes.c_uint64),
        ("clear_generation", ctypes.c_uint64),
        ("reserved2", ctypes.c_uint32),
        ("crc", ctypes.c_uint32),
    )


class TrackFlag(enum.IntFlag):
    """``bdr_track.flags``."""

    ENABLED = 1 << 0
    RECOVERED = 1 << 1
    FAILED = 1 << 2


class Track(ctypes.Structure):
    """``struct bdr_track``: answer of BDR_IOC_TRACK_INFO."""

    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("clear_ring", ctypes.c_uint8 * 16),
        ("clear_pos", ctypes.c_uint64),
        ("clear_generation", ctypes.c_uint64),
        ("loaded_regions", ctypes.c_uint64),
        ("marked_regions", ctypes.c_uint64),
        ("meta_writes", ctypes.c_uint64),
        ("clears", ctypes.c_uint64),
    )


class TrackClear(ctypes.Structure):
    """``struct bdr_track_clear``: argument of BDR_IOC_TRACK_CLEAR."""

    _fields_ = (
        ("pos", ctypes.c_uint64),
        ("ring", ctypes.c_uint8 * 16),
        ("generation", ctypes.c_uint64),
    )


# <asm-generic/ioctl.h>: dir(2) | size(14) | type(8) | nr(8)
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (BDR_IOC_MAGIC << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


BDR_IOC_MAGIC = 0xBD
BDR_IOC_INFO = _ioc(_IOC_READ, 1, ctypes.sizeof(Info))
BDR_IOC_STATUS = _ioc(_IOC_READ, 2, ctypes.sizeof(Status))
BDR_IOC_TAKE_DIRTY = _ioc(_IOC_READ | _IOC_WRITE, 3, ctypes.sizeof(Dirty))
BDR_IOC_TRACK_INFO = _ioc(_IOC_READ, 4, ctypes.sizeof(Track))
BDR_IOC_TRACK_CLEAR = _ioc(_IOC_WRITE, 5, ctypes.sizeof(TrackClear))
BDR_IOC_TRACK_ROTATE = _ioc(_IOC_WRITE, 6, ctypes.sizeof(TrackClear))

RECORD_SIZE = ctypes.sizeof(Record)
SLOT_BYTES = RECORD_SIZE + BDR_SLOT_DATA  # memory one "write" of buffer_size_in_writes costs
