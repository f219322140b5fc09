"""The scan messages of a resync or a verify pass: SCAN_BEGIN, SCAN_REQUEST, SCAN_HASHES, SCAN_DATA, SCAN_END
and SCAN_DONE."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar

from .constants import (
    HASH_SIZE,
    MAX_SCAN_BLOCK,
    MAX_SCAN_HASHES,
    MAX_SCAN_RANGE,
    MIN_SCAN_BLOCK,
    SECTOR,
    ErrorCode,
    MsgType,
)
from .errors import _fail
from .fields import _check_len, _check_zero, frame_header


class ScanMode(enum.IntEnum):
    HASH = 1  # the server hashes replica blocks on request, the client sends blocks that differ
    FULL = 2  # the client sends every block (full replication)


class ScanFlag(enum.IntFlag):
    NONE = 0
    WHOLE_DEVICE = 1 << 0  # the scan covers the whole device (required when the source identity changes)
    DIRECT = 1 << 1  # write the replica directly (--full-scan), not staged in the server's journal
    # the extents are every region the source's persistent change tracking marked since a point the replica
    # holds (WELCOME TRACKABLE): a partial scan that may adopt a new capture ring
    TRACKED = 1 << 2
    # the extents are the regions a demoted source marked (WELCOME MARKED); the ring records of the source's
    # generation from its start follow the scan
    MARKED = 1 << 3


@dataclass(frozen=True, slots=True)
class ScanBegin:
    """Client -> server: a resync starts; the replica is inconsistent until SCAN_END.

    0         4      5       6          8            12         16
    +---------+------+-------+----------+------------+----------+
    | scan_id | mode | flags | reserved | block_size | reserved |
    +---------+------+-------+----------+------------+----------+
    """

    TYPE: ClassVar[MsgType] = MsgType.SCAN_BEGIN
    _S: ClassVar[struct.Struct] = struct.Struct("<IBBHII")

    scan_id: int
    mode: ScanMode
    flags: ScanFlag
    block_size: int

    def pack(self) -> bytes:
        return self._S.pack(self.scan_id, self.mode, self.flags, 0, self.block_size, 0)

    @classmethod
    def parse(cls, p: memoryview, flags: int) -> ScanBegin:
        _check_len("SCAN_BEGIN", p, cls._S.size)
        scan_id, mode, sflags, r1, block_size, r2 = cls._S.unpack(p)
        if mode not in (1, 2):
            raise _fail(ErrorCode.BAD_FIELD, f"SCAN_BEGIN mode {mode} unknown")
        if sflags & ~0xF:
            raise _fail(ErrorCode.BAD_FIELD, f"SCAN_BEGIN flags {sflags:#x} has unknown bits")
        _check_zero("SCAN_BEGIN", "reserved", r1 | r2)
        if (
            block_size < MIN_SCAN_BLOCK
            or block_size > MAX_SCAN_BLOCK
            or block_size & (block_size - 1)
            or block_size % SECTOR
        ):
            raise _fail(
                ErrorCode.BAD_FIELD, f"SCAN_BEGIN block_size {block_size} not a power of two in range"
            )
        return cls(scan_id, ScanMode(mode), ScanFlag(sflags), block_size)


@dataclass(frozen=True, slots=True)
class ScanRequest:
    """Client -> server: hash the replica blocks of [offset, offset + length).

    0         4          8        16       24
    +---------+----------+--------+--------+
    | scan_id | reserved | offset | length |
    +---------+----------+--------+--------+
    offset is block aligned; the last block of the device may be short.
    """

    TYPE: ClassVar[MsgType] = MsgType.SCAN_REQUEST
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQQ")

    scan_id: int
    offset: int
    length: int

    def pack(self) -> bytes:
        return self._S.pack(self.scan_id, 0, self.offset, self.length)

    @classmethod
    def parse(cls, p: memoryview, flags: int) -> ScanRequest:
        _check_len("SCAN_REQUEST", p, cls._S.size)
        scan_id, rsvd, offset, length = cls._S.unpack(p)
        _check_zero("SCAN_REQUEST", "reserved", rsvd)
        if length == 0 or length > MAX_SCAN_RANGE or offset % SECTOR:
            raise _fail(ErrorCode.BAD_FIELD, f"SCAN_REQUEST range [{offset}, +{length}) is not valid")
        return cls(scan_id, offset, length)


@dataclass(frozen=True, slots=True)
class ScanHashes:
    """Server -> client: digests of consecutive blocks starting at ``offset``.

    0         4       8        16
    +---------+-------+--------+----------------------------+
    | scan_id | count | offset | count x 16-byte xxh3_128   |
    +---------+-------+--------+----------------------------+
    """

    TYPE: ClassVar[MsgType] = MsgType.SCAN_HASHES
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQ")

    scan_id: int
    offset: int
    hashes: bytes | memoryview

    @property
    def count(self) -> int:
        return len(self.hashes) // HASH_SIZE

    def digest(self, i: int) -> bytes:
        return bytes(self.hashes[i * HASH_SIZE : (i + 1) * HASH_SIZE])

    def pack(self) -> bytes:
        return self._S.pack(self.scan_id, self.count, self.offset) + bytes(self.hashes)

    @classmethod
    def parse(cls, p: memoryview, flags: int) -> ScanHashes:
        if len(p) < cls._S.size:
            raise _fail(ErrorCode.BAD_LENGTH, f"SCAN_HASHES payload of {len(p)} bytes")
        scan_id, count, offset = cls._S.unpack_from(p)
        if count > MAX_SCAN_HASHES:
            raise _fail(ErrorCode.BAD_LENGTH, f"SCAN_HASHES with {count} hashes > {MAX_SCAN_HASHES}")
        _check_len("SCAN_HASHES", p, cls._S.size + count * HASH_SIZE)
        return cls(scan_id, offset, bytes(p[cls._S.size :]))


class BlockFlag(enum.IntFlag):
    NONE = 0
    ZERO = 1 << 0  # the block is all zeros: no data follows for it


SCAN_DATA_HEAD = struct.Struct("<II")

BLOCK = struct.Struct("<QII")


@dataclass(frozen=True, slots=True)
class ScanData:
    """Client -> server: source blocks to write on the replica (they differ, or it is a full replication)."""

    TYPE: ClassVar[MsgType] = MsgType.SCAN_DATA

    scan_id: int
    blocks: tuple[tuple[int, int, int], ...]  # (offset, length, BlockFlag)
    data: bytes | memoryview

    def pack(self) -> bytes:
        head = SCAN_DATA_HEAD.pack(self.scan_id, len(self.blocks))
        return head + b"".join(BLOCK.pack(*b) for b in self.blocks) + bytes(self.data)

    @classmethod
    def parse(cls, p: memoryview, flags: int, device_size: int | None = None) -> ScanData:
        if len(p) < SCAN_DATA_HEAD.size:
            raise _fail(ErrorCode.BAD_LENGTH, f"SCAN_DATA payload of {len(p)} bytes")
        scan_id, count = SCAN_DATA_HEAD.unpack_from(p)
        end = SCAN_DATA_HEAD.size + count * BLOCK.size
        if end > len(p):
            raise _fail(ErrorCode.BAD_LENGTH, f"SCAN_DATA of {count} blocks in {len(p)} bytes")
        blocks = tuple(BLOCK.iter_unpack(p[SCAN_DATA_HEAD.size : end]))
        need = 0
        for offset, length, bflags in blocks:
            if bflags & ~1:
                raise _fail(ErrorCode.BAD_FIELD, f"SCAN_DATA block flags {bflags:#x} has unknown bits")
            if length == 0 or length > MAX_SCAN_BLOCK or offset % SECTOR or length % SECTOR:
                raise _fail(ErrorCode.BAD_RECORD, f"SCAN_DATA block [{offset}, +{length}) is not valid")
            if device_size is not None and offset + length > device_size:
                raise _fail(
                    ErrorCode.OUT_OF_RANGE, f"SCAN_DATA block [{offset}, +{length}) beyond the device"
                )
            if not bflags & BlockFlag.ZERO:
                need += length
        if end + need != len(p):
            raise _fail(
                ErrorCode.BAD_LENGTH, f"SCAN_DATA blocks need {need} data bytes, frame has {len(p) - end}"
            )
        return cls(scan_id, blocks, p[end:])


def scan_data_header(scan_id: int, blocks: list[tuple[int, int, int]], data_len: int) -> bytes:
    """Frame header + SCAN_DATA head + block table, for a frame whose data is sent as gathered views."""
    table = b"".join(BLOCK.pack(*b) for b in blocks)
    payload = SCAN_DATA_HEAD.size + len(table) + data_len
    return frame_header(MsgType.SCAN_DATA, payload) + SCAN_DATA_HEAD.pack(scan_id, len(blocks)) + table


class ScanEndFlag(enum.IntFlag):
    NONE = 0
    HAS_RESUME_SEQ = 1 << 0  # resume_seq is the seq of the first ring record after the scan
    HAS_CONSISTENT_SEQ = 1 << 1  # the replica is consistent once durable_seq >= consistent_seq
    MORE_TO_COME = 1 << 2  # another resync follows (writes went to the dirty bitmap during this one)


@dataclass(frozen=True, slots=True)
class ScanEnd:
    """Client -> server: all blocks sent.  Ring records follow from resume_seq (without HAS_RESUME_SEQ the
    first DATA record after the scan sets it).

    0         4       8            16               24
    +---------+-------+------------+----------------+
    | scan_id | flags | resume_seq | consistent_seq |
    +---------+-------+------------+----------------+
    """

    TYPE: ClassVar[MsgType] = MsgType.SCAN_END
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQQ")

    scan_id: int
    flags: ScanEndFlag
    resume_seq: int
    consistent_seq: int

    def pack(self) -> bytes:
        return self._S.pack(self.scan_id, self.flags, self.resume_seq, self.consistent_seq)

    @classmethod
    def parse(cls, p: memoryview, flags: int) -> ScanEnd:
        _check_len("SCAN_END", p, cls._S.size)
        scan_id, eflags, resume, consistent = cls._S.unpack(p)
        if eflags & ~7:
            raise _fail(ErrorCode.BAD_FIELD, f"SCAN_END flags {eflags:#x} has unknown bits")
        return cls(scan_id, ScanEndFlag(eflags), resume, consistent)


@dataclass(frozen=True, slots=True)
class ScanDone:
    """Server -> client: the scan's blocks are durable on the replica.

    0         4          8                16              24
    +---------+----------+----------------+---------------+
    | scan_id | reserved | blocks_written | bytes_written |
    +---------+----------+----------------+---------------+
    """

    TYPE: ClassVar[MsgType] = MsgType.SCAN_DONE
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQQ")

    scan_id: int
    blocks_written: int
    bytes_written: int

    def pack(self) -> bytes:
        return self._S.pack(self.scan_id, 0, self.blocks_written, self.bytes_written)

    @classmethod
    def parse(cls, p: memoryview, flags: int) -> ScanDone:
        _check_len("SCAN_DONE", p, cls._S.size)
        scan_id, rsvd, blocks, nbytes = cls._S.unpack(p)
        _check_zero("SCAN_DONE", "reserved", rsvd)
        return cls(scan_id, blocks, nbytes)
