"""The on-disk format of the journal's record area, where a resync is staged, committed and applied: its
layout, the area state block (two checksummed copies), and the records.

A journal scan (the default resync) must not turn the replica into a mix of old and new blocks.  The server
stages everything the resync brings -- the corrected scan blocks, then the ring writes captured meanwhile --
as records after the header area of the ``--journal`` path, writes a commit record, and only then applies the
records to the replica.  At every instant the replica, after replay, is the old or the new consistent state.

Layout (offsets in the journal device or file)::

    0        4 KiB    8 KiB          12 KiB         16 KiB           1 MiB
    +--------+--------+--------------+--------------+--- ... --------+----------+----------+-----+--------+
    | hdr A  | hdr B  | area state A | area state B | reserved       | record 0 | record 1 | ... | COMMIT |
    +--------+--------+--------------+--------------+--- ... --------+----------+----------+-----+--------+

Area state block (4096 bytes, little-endian; two copies written alternately like the metadata header, the
valid copy with the highest generation wins)::

    0        8        12       16           24      32           40        48       4088      4096
    +--------+--------+--------+------------+-------+------------+---------+--- 0 ---+---------+
    | magic  | version| state  | generation | epoch | commit_off | records |         | xxh3_64 |
    +--------+--------+--------+------------+-------+------------+---------+---------+---------+

Record (a 64-byte header, then ``length`` bytes of data for BLOCK records; the next record starts at the next
64-byte boundary)::

    0        8      10      12         16      24      32       40       48        56         64
    +--------+------+-------+----------+-------+-------+--------+--------+---------+----------+
    | magic  | type | flags | reserved | epoch | index | offset | length | xxh3_64 | reserved |
    +--------+------+-------+----------+-------+-------+--------+--------+---------+----------+

The record checksum covers header bytes 0..48 and the data.  Types: BLOCK (write ``length`` bytes of data at
``offset``), ZERO (write ``length`` zero bytes at ``offset``, no data), COMMIT (``offset`` = xxh3_64 of the
concatenated checksums of records 0..index-1, ``length`` = 0): the last record of a committed resync.

Ordering rules (each step durable before the next):

1. records, then the COMMIT record, ``fdatasync``;
2. area state COMMITTED (epoch, commit_off, records), ``fdatasync`` -- the commit point;
3. the caller updates the metadata header (consistent, durable sequence number);
4. apply the records in order to the replica, replica ``fdatasync``;
5. area state CLEAN.

At server start: CLEAN -- nothing to do; OPEN -- an uncommitted resync, discarded (the metadata header still
says SCANNING, so the next client start rescans); COMMITTED -- every record is verified first, then all are
applied again (idempotent: records only ever set bytes to fixed values, in order).  A committed journal with a
bad checksum is refused, never partly applied.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import xxhash

from .copies import intact, seal
from .errors import JournalError
from .header import HEADER_AREA, HEADER_BLOCK

STATE_MAGIC = b"BDRJSTA\x00"
REC_MAGIC = b"BDRJREC\x00"
AREA_VERSION = 1
STATE_AT = 2 * HEADER_BLOCK  # two copies: STATE_AT and STATE_AT + HEADER_BLOCK
RECORDS_AT = HEADER_AREA
ALIGN = 64
STATE_STRUCT = struct.Struct("<8sIIQQQQ")
REC = struct.Struct("<8sHHIQQQQ")  # checksummed part (48 bytes); then the checksum and 8 reserved bytes
REC_HEADER = 64


class AreaState(enum.IntEnum):
    CLEAN = 0  # nothing staged (or everything applied)
    OPEN = 1  # a resync is being staged; not committed
    COMMITTED = 2  # the records up to the COMMIT record must be applied


class RecType(enum.IntEnum):
    BLOCK = 1
    ZERO = 2
    COMMIT = 3


@dataclass(frozen=True, slots=True)
class Record:
    type: RecType
    epoch: int
    index: int
    offset: int
    length: int
    data: bytes = b""

    def pack(self) -> bytes:
        head = REC.pack(REC_MAGIC, self.type, 0, 0, self.epoch, self.index, self.offset, self.length)
        h = xxhash.xxh3_64()
        h.update(head)
        h.update(self.data)
        csum = h.intdigest()
        out = head + csum.to_bytes(8, "little") + bytes(8) + self.data
        return out + bytes(-len(out) % ALIGN)

    @property
    def size(self) -> int:
        return aligned(REC_HEADER + len(self.data))


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def record_checksum(head: bytes, data: bytes | memoryview) -> int:
    h = xxhash.xxh3_64()
    h.update(head[: REC.size])
    h.update(data)
    return h.intdigest()


def parse_record_header(buf: bytes) -> tuple[RecType, int, int, int, int, int] | None:
    """(type, epoch, index, offset, length, checksum) of a record header, None if it is not one."""
    if len(buf) < REC_HEADER or buf[:8] != REC_MAGIC:
        return None
    _, rtype, flags, res, epoch, index, offset, length = REC.unpack_from(buf)
    if rtype not in (1, 2, 3) or flags or res:
        return None
    csum = int.from_bytes(buf[REC.size : REC.size + 8], "little")
    return RecType(rtype), epoch, index, offset, length, csum


@dataclass(frozen=True, slots=True)
class StateBlock:
    state: AreaState = AreaState.CLEAN
    generation: int = 0
    epoch: int = 0
    commit_off: int = 0
    records: int = 0

    def pack(self) -> bytes:
        fixed = STATE_STRUCT.pack(
            STATE_MAGIC, AREA_VERSION, self.state, self.generation, self.epoch, self.commit_off, self.records
        )
        return seal(fixed)

    @classmethod
    def parse(cls, block: bytes) -> StateBlock | None:
        if not intact(block, STATE_MAGIC):
            return None
        _, version, state, gen, epoch, commit_off, records = STATE_STRUCT.unpack_from(block)
        if version > AREA_VERSION:
            raise JournalError(
                f"journal record area from a newer BDR (version {version}, we know {AREA_VERSION})"
            )
        if state not in (0, 1, 2):
            return None
        return cls(AreaState(state), gen, epoch, commit_off, records)
