"""The streaming messages: STREAM (resume point), DATA (ring records, validated), SYNC, RESYNC_PENDING and ACK."""

from __future__ import annotations

import enum
import functools
import operator
import struct
from dataclasses import dataclass, field
from typing import ClassVar

from ..records import (
    OP_DISCARD,
    OP_FLUSH,
    OP_WRITE,
    OP_WRITE_ZEROES,
    REC_KNOWN_FLAGS,
    REC_UNZEROED,
    RECORD_SIZE,
    RecordFields,
    record_data_len,
    record_fields,
    seq_range,
)
from ..seq import SEQ_MASK
from .constants import MAX_BATCH_RECORDS, MAX_RECORD_DATA, SECTOR, ErrorCode, FrameFlag, MsgType
from .errors import _fail
from .fields import _check_len, _check_zero, frame_header


class StreamFlag(enum.IntFlag):
    NONE = 0
    ASSUME_IN_SYNC = 1 << 0  # --no-replication: the operator asserts the replica already equals the source
    # the replica holds the source's data as it was when the source's generation began (WELCOME said so), and
    # the ring holds every write since: stream them all, no scan
    FROM_GENERATION_START = 1 << 1


@dataclass(frozen=True, slots=True)
class Stream:
    """Client -> server: start applying ring records at ``from_seq`` (quick resume, no scan).

    0            8        12         16
    +------------+--------+----------+
    |  from_seq  | flags  | reserved |
    +------------+--------+----------+
    """

    TYPE: ClassVar[MsgType] = MsgType.STREAM
    _S: ClassVar[struct.Struct] = struct.Struct("<QII")

    from_seq: int
    flags: StreamFlag = StreamFlag.NONE

    def pack(self) -> bytes:
        return self._S.pack(self.from_seq, self.flags, 0)

    @classmethod
    def parse(cls, p: memoryview, flags: int) -> Stream:
        _check_len("STREAM", p, cls._S.size)
        from_seq, sflags, rsvd = cls._S.unpack(p)
        if sflags & ~3:
            raise _fail(ErrorCode.BAD_FIELD, f"STREAM flags {sflags:#x} has unknown bits")
        _check_zero("STREAM", "reserved", rsvd)
        return cls(from_seq, StreamFlag(sflags))


# DATA ---------------------------------------------------------------------------------------------------------
#
#   0       4           8
#   +-------+-----------+-------------------------------+-----------------------------------------+
#   | count | data_len  | count x 32-byte descriptors   | data of the WRITE records, concatenated |
#   +-------+-----------+-------------------------------+-----------------------------------------+
#
DATA_HEAD = struct.Struct("<II")


def validate_records(f: RecordFields, device_size: int | None) -> int:
    """Check a batch of descriptors; return the data length it implies.  Raises RemoteProtocolError."""
    n = len(f.seqs)
    if n == 0:
        return 0
    first = f.seqs[0]
    if f.seqs[-1] != (first + n - 1) & SEQ_MASK or (n > 1 and f.seqs != seq_range(first, n)):
        raise _fail(ErrorCode.BAD_RECORD, f"DATA records are not consecutive from seq {first}")
    if not set(f.ops) <= {OP_WRITE, OP_FLUSH, OP_DISCARD, OP_WRITE_ZEROES}:
        bad = next(op for op in f.ops if op not in (1, 2, 3, 4))
        raise _fail(ErrorCode.BAD_RECORD, f"record op {bad} unknown")
    if max(f.flags) > REC_KNOWN_FLAGS and functools.reduce(operator.or_, f.flags) & ~REC_KNOWN_FLAGS:
        raise _fail(ErrorCode.BAD_RECORD, "record flags have unknown bits")
    if max(f.flags) & REC_UNZEROED:
        for fl, op in zip(f.flags, f.ops, strict=True):
            if fl & REC_UNZEROED and op != OP_DISCARD:
                raise _fail(
                    ErrorCode.BAD_RECORD, "record flags have unknown bits (UNZEROED on a non-DISCARD)"
                )
    if any(f.reserved):
        raise _fail(ErrorCode.BAD_FIELD, "record reserved field is not zero")
    if functools.reduce(operator.or_, f.lens) & (SECTOR - 1):
        raise _fail(ErrorCode.BAD_RECORD, "record length is not a multiple of 512")
    data_len = record_data_len(f)
    if max(f.lens) > MAX_RECORD_DATA:
        for ln, op in zip(f.lens, f.ops, strict=True):
            if op == OP_WRITE and ln > MAX_RECORD_DATA:
                raise _fail(ErrorCode.BAD_RECORD, f"WRITE record of {ln} bytes > {MAX_RECORD_DATA}")
    if OP_FLUSH in f.ops:
        for ln, op in zip(f.lens, f.ops, strict=True):
            if op == OP_FLUSH and ln:
                raise _fail(ErrorCode.BAD_RECORD, "FLUSH record with a length")
    if device_size is not None and max(f.sectors) * SECTOR + max(f.lens) > device_size:
        # the cheap bound failed: find the record that really is out of range (if any)
        for s, ln, seq in zip(f.sectors, f.lens, f.seqs, strict=True):
            if s * SECTOR + ln > device_size:
                raise _fail(
                    ErrorCode.OUT_OF_RANGE,
                    f"record seq {seq} covers [{s * SECTOR}, {s * SECTOR + ln}) beyond the device "
                    f"({device_size} bytes)",
                )
    return data_len


@dataclass(frozen=True, slots=True)
class Data:
    """Client -> server: a batch of ring records.  ``records`` and ``data`` may be views of a receive buffer,
    valid until the decoder is fed again."""

    TYPE: ClassVar[MsgType] = MsgType.DATA

    records: memoryview | bytes
    data: memoryview | bytes
    sync: bool = False
    cols: RecordFields | None = field(default=None, compare=False, repr=False)  # set by parse (validated)

    @property
    def count(self) -> int:
        return len(self.records) // RECORD_SIZE

    def fields(self) -> RecordFields:
        return self.cols if self.cols is not None else record_fields(self.records)

    def pack(self) -> bytes:
        return DATA_HEAD.pack(self.count, len(self.data)) + bytes(self.records) + bytes(self.data)

    @property
    def frame_flags(self) -> int:
        return FrameFlag.SYNC if self.sync else 0

    @classmethod
    def parse(cls, p: memoryview, flags: int, device_size: int | None = None) -> Data:
        records, cols, data_len = parse_data_head(p, len(p), device_size)
        return cls(records, p[len(p) - data_len :], bool(flags & FrameFlag.SYNC), cols)


def data_head_size(prefix: memoryview | bytes) -> int | None:
    """Bytes of a DATA payload up to the end of its descriptors, once its first 8 bytes are known."""
    if len(prefix) < DATA_HEAD.size:
        return None
    count: int = DATA_HEAD.unpack_from(prefix)[0]
    return DATA_HEAD.size + min(count, MAX_BATCH_RECORDS + 1) * RECORD_SIZE


def parse_data_head(
    prefix: memoryview, length: int, device_size: int | None = None, cols: RecordFields | None = None
) -> tuple[memoryview, RecordFields, int]:
    """Parse and validate the head and descriptors of a DATA payload of ``length`` bytes from its first bytes
    (``prefix`` holds at least the descriptors; the data may still be on the wire).  Returns the descriptor
    view, their columns and the data length.  ``cols``: the descriptors' columns, if the caller split them
    already (``record_fields`` of the same bytes)."""
    if length < DATA_HEAD.size or len(prefix) < DATA_HEAD.size:
        raise _fail(ErrorCode.BAD_LENGTH, f"DATA payload of {length} bytes")
    count, data_len = DATA_HEAD.unpack_from(prefix)
    if count > MAX_BATCH_RECORDS:
        raise _fail(ErrorCode.BAD_LENGTH, f"DATA batch of {count} records > {MAX_BATCH_RECORDS}")
    desc_end = DATA_HEAD.size + count * RECORD_SIZE
    if desc_end + data_len != length:
        raise _fail(
            ErrorCode.BAD_LENGTH, f"DATA of {count} records and {data_len} data bytes in {length} bytes"
        )
    records = prefix[DATA_HEAD.size : desc_end]
    if cols is None or len(cols.seqs) != count:
        cols = record_fields(records)
    want = validate_records(cols, device_size)
    if want != data_len:
        raise _fail(ErrorCode.BAD_LENGTH, f"DATA records need {want} data bytes, frame has {data_len}")
    return records, cols, data_len


def data_frame_header(count: int, data_len: int, sync: bool = False) -> bytes:
    """Frame header + DATA head for a batch sent as gathered views (descriptors and data not copied)."""
    payload = DATA_HEAD.size + count * RECORD_SIZE + data_len
    return frame_header(MsgType.DATA, payload, FrameFlag.SYNC if sync else 0) + DATA_HEAD.pack(
        count, data_len
    )


@dataclass(frozen=True, slots=True)
class Sync:
    """Client -> server: make everything applied so far durable, then ACK.  Empty payload."""

    TYPE: ClassVar[MsgType] = MsgType.SYNC

    def pack(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, p: memoryview, flags: int) -> Sync:
        _check_len("SYNC", p, 0)
        return cls()


@dataclass(frozen=True, slots=True)
class ResyncPending:
    """Client -> server: the ring lost writes (overflow, failed write); before the client takes the dirty bitmap,
    the server must record on disk that the replica needs a resync, so that losing the client or the
    connection from here on ends in a scan, never in a quick resume past the lost writes.  Answered by an ACK.
    Empty payload."""

    TYPE: ClassVar[MsgType] = MsgType.RESYNC_PENDING

    def pack(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, p: memoryview, flags: int) -> ResyncPending:
        _check_len("RESYNC_PENDING", p, 0)
        return cls()


@dataclass(frozen=True, slots=True)
class Ack:
    """Server -> client after each DATA / SYNC: everything up to applied_seq is written to the replica,
    everything up to durable_seq is on stable storage (NO_SEQ: none yet).

    0             8             16
    +-------------+-------------+
    | applied_seq | durable_seq |
    +-------------+-------------+
    """

    TYPE: ClassVar[MsgType] = MsgType.ACK
    _S: ClassVar[struct.Struct] = struct.Struct("<QQ")

    applied_seq: int
    durable_seq: int

    def pack(self) -> bytes:
        return self._S.pack(self.applied_seq, self.durable_seq)

    @classmethod
    def parse(cls, p: memoryview, flags: int) -> Ack:
        _check_len("ACK", p, cls._S.size)
        applied, durable = cls._S.unpack(p)
        return cls(applied, durable)
