"""BDR wire protocol: framing, messages, incremental decoder and connection state machine.

This module has no networking code at all: bytes go in, typed messages come out, and ``Connection.send(msg)``
returns the bytes to put on the wire.  The daemons (``bdr.client``, ``bdr.server``) are the only code that
touches sockets.

Every frame starts with an 8-byte header, all integers little-endian::

    0        4      5       6          8
    +--------+------+-------+----------+---------------------+
    | length | type | flags | reserved |  payload (length)   |
    |  u32   |  u8  |  u8   | u16 = 0  |                     |
    +--------+------+-------+----------+---------------------+

``length`` counts payload bytes only and is capped at ``MAX_PAYLOAD``; anything larger is refused before a
single payload byte is buffered.  Each message type has a fixed payload layout, drawn next to its class below.

Conversation (client = source side, server = replica side)::

    client                                  server
    AUTH_BEGIN(nonce_c)  ----------------->                      only with a shared secret (--secret-file)
           <-------------------------------  AUTH_CHALLENGE(nonce_s) | ERROR
    AUTH_PROOF(client MAC) --------------->
           <-------------------------------  AUTH_OK(server MAC) | ERROR(AUTH_FAILED)
    HELLO  ------------------------------->
           <-------------------------------  WELCOME | ERROR
    STREAM (resume at seq)  -------------->                      quick resume
    DATA, DATA(SYNC), SYNC  -------------->
           <-------------------------------  ACK(applied, durable)   (after every DATA/SYNC)
    SCAN_BEGIN ---------------------------->                      resync (may follow STREAM/DATA)
    SCAN_REQUEST(range) ------------------>  hash mode only, windowed by the client
           <-------------------------------  SCAN_HASHES(range)
    SCAN_DATA(blocks)  ------------------->
    SCAN_END(resume seq) ----------------->
           <-------------------------------  SCAN_DONE
    DATA ... ------------------------------>   ring records captured during the scan win
    RESYNC_PENDING ----------------------->   ring lost writes: server marks the replica, then ACK,
                                               then the client takes the dirty bitmap and scans it
    SCAN_REQUEST(scan 0, range) ---------->   online verify while streaming (bdr verify): the replica's
           <-------------------------------  SCAN_HASHES(scan 0)   blocks after every DATA sent before it
    GOODBYE ------------------------------->   "we closed it", either side

Before the handshake is over (WELCOME sent) frames are capped at ``HANDSHAKE_MAX_PAYLOAD`` bytes, so an
unauthenticated peer cannot make the server buffer more than that.  A server that requires the shared secret
refuses HELLO before AUTH_OK (AUTH_REQUIRED); the MACs themselves are computed in ``bdr.auth``.

Sequence numbers are the ring's 64-bit record numbers.  ``NO_SEQ`` (2**64 - 1) means "none yet", so that
``next_seq(NO_SEQ) == 0`` is the first record the kernel ever publishes.
"""

from __future__ import annotations

import enum
import functools
import operator
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Final

from .records import OP_DISCARD as OP_DISCARD
from .records import OP_FLUSH as OP_FLUSH
from .records import OP_WRITE as OP_WRITE
from .records import OP_WRITE_ZEROES as OP_WRITE_ZEROES
from .records import REC_FUA as REC_FUA
from .records import REC_KNOWN_FLAGS as REC_KNOWN_FLAGS
from .records import REC_UNZEROED as REC_UNZEROED
from .records import RECORD as RECORD
from .records import RECORD_SIZE as RECORD_SIZE
from .records import RecordFields as RecordFields
from .records import record_data_len as record_data_len
from .records import record_fields as record_fields
from .records import seq_range
from .seq import NO_SEQ as NO_SEQ
from .seq import SEQ_MASK as SEQ_MASK
from .seq import next_seq as next_seq

# --------------------------------------------------------------------------------------------------------------
# Limits.  A DATA frame carries at most MAX_BATCH_RECORDS ring records of at most BDR_SLOT_DATA (4 KiB) each
# from the kernel; the payload cap leaves room for those plus their 32-byte descriptors and the batch header.
# Scan data frames carry at most MAX_SCAN_BLOCK-sized blocks and obey the same payload cap.
# --------------------------------------------------------------------------------------------------------------

PROTOCOL_VERSION: Final = 1
HEADER_SIZE: Final = 8
MAX_BATCH_RECORDS: Final = 4096
MAX_RECORD_DATA: Final = 1 << 20  # one record's data (the kernel uses 4 KiB slots)
MAX_PAYLOAD: Final = 16 * 1024 * 1024 + 256 * 1024
MAX_ERROR_TEXT: Final = 1024  # bytes of UTF-8 in an ERROR message
MAX_SCAN_BLOCK: Final = 4 * 1024 * 1024
MIN_SCAN_BLOCK: Final = 4096
MAX_SCAN_RANGE: Final = 1 << 40  # one SCAN_REQUEST covers at most this many bytes
MAX_SCAN_HASHES: Final = 65536  # hashes in one SCAN_HASHES frame
# SCAN_REQUEST with this scan id while streaming: hash the replica as it is now (bdr verify), nothing is written
VERIFY_SCAN_ID: Final = 0
VERIFY_BLOCK_SIZE: Final = 64 * 1024  # the block of a verify request (the scans' default block)
SECTOR: Final = 512
NONCE_SIZE: Final = 32  # AUTH_BEGIN / AUTH_CHALLENGE nonces
MAC_SIZE: Final = 32  # HMAC-SHA256 in AUTH_PROOF / AUTH_OK
# Until the handshake is over no frame may be larger than this: the largest handshake frame is an ERROR with
# 1 KiB of text; everything else is under 100 bytes.
HANDSHAKE_MAX_PAYLOAD: Final = 4096
HASH_SIZE: Final = 16  # xxh3_128 digest

_LITTLE = sys.byteorder == "little"


class MsgType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    ERROR = 3
    STREAM = 4
    DATA = 5
    SYNC = 6
    ACK = 7
    SCAN_BEGIN = 8
    SCAN_REQUEST = 9
    SCAN_HASHES = 10
    SCAN_DATA = 11
    SCAN_END = 12
    SCAN_DONE = 13
    GOODBYE = 14
    RESYNC_PENDING = 15
    AUTH_BEGIN = 16
    AUTH_CHALLENGE = 17
    AUTH_PROOF = 18
    AUTH_OK = 19


class FrameFlag(enum.IntFlag):
    """Header flags.  Only DATA may carry SYNC: make everything durable, then acknowledge."""

    SYNC = 1 << 0


class ErrorCode(enum.IntEnum):
    """Why a frame or a connection was refused.  Sent in ERROR messages and carried by ``ProtocolError``."""

    FRAME_TOO_LARGE = 1
    BAD_TYPE = 2
    BAD_LENGTH = 3
    BAD_FIELD = 4
    BAD_VERSION = 5
    UNEXPECTED = 6
    BAD_RECORD = 7
    OUT_OF_RANGE = 8
    SEQ_GAP = 9
    SIZE_MISMATCH = 10
    IDENTITY_MISMATCH = 11
    RESUME_IMPOSSIBLE = 12
    IO_ERROR = 13
    BUSY = 14
    SHUTDOWN = 15
    INTERNAL = 16
    TRUNCATED = 17
    CONNECTION_LOST = 18
    AUTH_REQUIRED = 19  # the server requires authentication the client did not offer
    AUTH_FAILED = 20  # wrong proof, or the two sides are configured differently
    WRONG_SOURCE = (
        21  # the replica mirrors another source: replacing it takes --full-scan / --full-replication
    )
    JOURNAL_FULL = (
        22  # the server's journal cannot stage this resync (the client falls back per --journal-full)
    )


class Feature(enum.IntFlag):
    SCAN_XXH3_128 = 1 << 0  # block hashes are xxh3_128 digests
    DISCARD = 1 << 1  # DISCARD / WRITE_ZEROES records are understood


ALL_FEATURES: Final = Feature.SCAN_XXH3_128 | Feature.DISCARD


# --------------------------------------------------------------------------------------------------------------
# Errors, by who is at fault.
# --------------------------------------------------------------------------------------------------------------


class ProtocolError(Exception):
    """Base of every BDR protocol error; ``code`` is an ``ErrorCode``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (or our side failed): our fault."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid, broke the connection, or reported an error: the peer's fault."""


class PeerError(RemoteProtocolError):
    """The peer sent an ERROR message."""


class ConnectionLost(RemoteProtocolError):
    """The peer or the network closed the connection without a GOODBYE."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.CONNECTION_LOST, message)


def _fail(code: ErrorCode, message: str) -> RemoteProtocolError:
    return RemoteProtocolError(code, message)


# --------------------------------------------------------------------------------------------------------------
# Frame header
# --------------------------------------------------------------------------------------------------------------

_HDR = struct.Struct("<IBBH")


def frame_header(mtype: MsgType, length: int, flags: int = 0) -> bytes:
    if length > MAX_PAYLOAD:
        raise LocalProtocolError(ErrorCode.FRAME_TOO_LARGE, f"payload of {length} bytes > {MAX_PAYLOAD}")
    return _HDR.pack(length, mtype, flags, 0)


# --------------------------------------------------------------------------------------------------------------
# Messages.  Each class draws its payload and knows how to pack and parse it; ``parse`` rejects anything
# malformed with a RemoteProtocolError carrying a code.
# --------------------------------------------------------------------------------------------------------------


def _check_len(name: str, payload: memoryview | bytes, size: int) -> None:
    if len(payload) != size:
        raise _fail(ErrorCode.BAD_LENGTH, f"{name} payload is {len(payload)} bytes, expected {size}")


def _check_zero(name: str, field: str, value: int) -> None:
    if value:
        raise _fail(ErrorCode.BAD_FIELD, f"{name}.{field} must be zero, got {value:#x}")


# --------------------------------------------------------------------------------------------------------------
# Authentication (shared secret).  The MACs are HMAC-SHA256 over both nonces, the AUTH_BEGIN and AUTH_CHALLENGE
# frames and, with TLS, the server certificate (see bdr.auth); this module only carries them.
# --------------------------------------------------------------------------------------------------------------


class AuthMethod(enum.IntFlag):
    HMAC_SHA256 = 1 << 0  # challenge-response with a shared secret


class AuthFlag(enum.IntFlag):
    NONE = 0
    TLS_BOUND = 1 << 0  # the sender runs over TLS and binds its MAC to the server certificate


_AUTH_METHODS: Final = int(AuthMethod.HMAC_SHA256)


@dataclass(frozen=True, slots=True)
class AuthBegin:
    """Client -> server, first frame when the client has a shared secret.

    0      4     6       8         12                  44
    +------+-----+-------+---------+-------------------+
    |"BDRA"| ver | flags | methods |  nonce_c (32)     |
    +------+-----+-------+---------+-------------------+
    methods: the AuthMethod bits the client can do (unknown bits are allowed: a newer client).
    """

    TYPE: ClassVar[MsgType] = MsgType.AUTH_BEGIN
    _S: ClassVar[struct.Struct] = struct.Struct("<4sHHI32s")
    MAGIC: ClassVar[bytes] = b"BDRA"

    version: int
    flags: AuthFlag
    methods: int
    nonce: bytes

    def pack(self) -> bytes:
        return self._S.pack(self.MAGIC, self.version, self.flags, self.methods, self.nonce)

    @classmethod
    def parse(cls, p: memoryview, flags: int) -> AuthBegin:
        _check_len("AUTH_BEGIN", p, cls._S.size)
        magic, version, aflags, methods, nonce = cls._S.unpack(p)
        if magic != cls.MAGIC:
            raise _fail(ErrorCode.BAD_FIELD, f"AUTH_BEGIN magic {magic!r}, not a BDR client")
        if version != PROTOCOL_VERSION:
            raise _fail(
                ErrorCode.BAD_VERSION, f"client speaks protocol {version}, we speak {PROTOCOL_VERSION}"
            )
        if aflags & ~int(AuthFlag.TLS_BOUND):
            raise _fail(ErrorCode.BAD_FIELD, f"AUTH_BEGIN flags {aflags:#x} has unknown bits")
        if not methods:
            raise _fail(ErrorCode.BAD_FIELD, "AUTH_BEGIN offers no method")
        return cls(version, AuthFlag(aflags), methods, nonce)


@dataclass(frozen=True, slots=True)
class AuthChallenge:
    """Server -> client: the chosen method and the server's nonce.

    0        2       4                  36
    +--------+-------+------------------+
    | method | flags |  nonce_s (32)    |
    +--------+-------+------------------+
    """

    TYPE: ClassVar[MsgType] = MsgType.AUTH_CHALLENGE
    _S: ClassVar[struct.Struct] = struct.Struct("<HH32s")

    method: AuthMethod
    flags: AuthFlag
    nonce: bytes

    def pack(self) -> bytes:
        return self._S.pack(self.method, self.flags, self.nonce)

    @classmethod
    def parse(cls, p: memoryview, flags: int) -> AuthChallenge:
        _check_len("AUTH_CHALLENGE", p, cls._S.size)
        method, aflags, nonce = cls._S.unpack(p)
        if method not in (m.value for m in AuthMethod):
            raise _fail(ErrorCode.BAD_FIELD, f"AUTH_CHALLENGE method {method:#x} unknown")
        if aflags & ~int(AuthFlag.TLS_BOUND):
            raise _fail(ErrorCode.BAD_FIELD, f"AUTH_CHALLENGE flags {aflags:#x} has unknown bits")
        return cls(AuthMethod(method), AuthFlag(aflags), nonce)


@dataclass(frozen=True, slots=True)
class AuthProof:
    """Client -> server: the client's MAC (32 bytes), proof that it knows the secret."""

    TYPE: ClassVar[MsgType] = MsgType.AUTH_PROOF
    NAME: ClassVar[str] = "AUTH_PROOF"

    mac: bytes

    def pack(self) -> bytes:
        return bytes(self.mac)

    @classmethod
    def parse(cls, p: memoryview, flags: int) -> AuthProof:
        _check_len(cls.NAME, p, MAC_SIZE)
        return cls(bytes(p))


@dataclass(frozen=True, slots=True)
class AuthOk:
    """Server -> client: the client's proof is right; the server's own MAC (32 bytes) proves the server knows
    the secret too.  The client checks it before it sends HELLO."""

    TYPE: ClassVar[MsgType] = MsgType.AUTH_OK
    NAME: ClassVar[str] = "AUTH_OK"

    mac: bytes

    def pack(self) -> bytes:
        return bytes(self.mac)

    @classmethod
    def parse(cls, p: memoryview, flags: int) -> AuthOk:
        _check_len(cls.NAME, p, MAC_SIZE)
        return cls(bytes(p))


class HelloFlag(enum.IntFlag):
    NONE = 0


@dataclass(frozen=True, slots=True)
class Hello:
    """Client -> server, first frame.

    0      4     6     8        12          16            24           40          56
    +------+-----+-----+--------+-----------+-------------+------------+-----------+
    |"BDRH"| ver |rsvd |features|block_size | device_size | source_id  |  ring_id  |
    +------+-----+-----+--------+-----------+-------------+------------+-----------+
    source_id: identity of the source device; ring_id: identity of the capture ring whose sequence
    numbers the client will send (seq numbers are only comparable within one ring_id).
    """

    TYPE: ClassVar[MsgType] = MsgType.HELLO
    _S: ClassVar[struct.Struct] = struct.Struct("<4sHHIIQ16s16s")
    MAGIC: ClassVar[bytes] = b"BDRH"

    version: int
    features: int
    block_size: int
    device_size: int
    source_id: bytes
    ring_id: bytes

    def pack(self) -> bytes:
        return self._S.pack(
            self.MAGIC,
            self.version,
            0,
            self.features,
            self.block_size,
            self.device_size,
            self.source_id,
            self.ring_id,
        )

    @classmethod
    def parse(cls, p: memoryview, flags: int) -> Hello:
        _check_len("HELLO", p, cls._S.size)
        magic, version, rsvd, features, block_size, size, source_id, ring_id = cls._S.unpack(p)
        if magic != cls.MAGIC:
            raise _fail(ErrorCode.BAD_FIELD, f"HELLO magic {magic!r}, not a BDR client")
        if version != PROTOCOL_VERSION:
            raise _fail(
                ErrorCode.BAD_VERSION, f"client speaks protocol {version}, we speak {PROTOCOL_VERSION}"
            )
        _check_zero("HELLO", "reserved", rsvd)
        _check_block_size("HELLO", block_size)
        if size == 0 or size % SECTOR:
            raise _fail(ErrorCode.BAD_FIELD, f"HELLO device_size {size} is not a positive multiple of 512")
        return cls(version, features, block_size, size, source_id, ring_id)


def _check_block_size(name: str, block_size: int) -> None:
    if block_size < SECTOR or block_size > 65536 or block_size & (block_size - 1):
        raise _fail(
            ErrorCode.BAD_FIELD, f"{name} block_size {block_size} is not a power of two in [512, 64K]"
        )


class WelcomeFlag(enum.IntFlag):
    NONE = 0
    SEQ_VALID = 1 << 0  # durable_seq is meaningful for (source_id, ring_id)
    CONSISTENT = 1 << 1  # the replica is a prefix-consistent copy of the source
    SCANNING = 1 << 2  # a resync was interrupted: the replica is a mix until a new scan completes
    KNOWN_ZERO = 1 << 3  # the replica reads as zeros everywhere (freshly created sparse file)
    FRESH = 1 << 4  # the replica has never received data


@dataclass(frozen=True, slots=True)
class Welcome:
    """Server -> client, answer to HELLO when the handshake succeeds.

    0      4     6      8        12          16            24          40         56            64
    +------+-----+------+--------+-----------+-------------+-----------+----------+-------------+
    |"BDRW"| ver |flags |features|block_size | device_size | source_id | ring_id  | durable_seq |
    +------+-----+------+--------+-----------+-------------+-----------+----------+-------------+
    device_size is the replica's; source_id/ring_id/durable_seq are what the replica last mirrored.
    """

    TYPE: ClassVar[MsgType] = MsgType.WELCOME
    _S: ClassVar[struct.Struct] = struct.Struct("<4sHHIIQ16s16sQ")
    MAGIC: ClassVar[bytes] = b"BDRW"

    version: int
    flags: WelcomeFlag
    features: int
    block_size: int
    device_size: int
    source_id: bytes
    ring_id: bytes
    durable_seq: int

    def pack(self) -> bytes:
        return self._S.pack(
            self.MAGIC,
            self.version,
            self.flags,
            self.features,
            self.block_size,
            self.device_size,
            self.source_id,
            self.ring_id,
            self.durable_seq,
        )

    @classmethod
    def parse(cls, p: memoryview, flags: int) -> Welcome:
        _check_len("WELCOME", p, cls._S.size)
        magic, version, wflags, features, block_size, size, source_id, ring_id, durable = cls._S.unpack(p)
        if magic != cls.MAGIC:
            raise _fail(ErrorCode.BAD_FIELD, f"WELCOME magic {magic!r}, not a BDR server")
        if version != PROTOCOL_VERSION:
            raise _fail(
                ErrorCode.BAD_VERSION, f"server speaks protocol {version}, we speak {PROTOCOL_VERSION}"
            )
        if wflags & ~0x1F:
            raise _fail(ErrorCode.BAD_FIELD, f"WELCOME flags {wflags:#x} has unknown bits")
        _check_block_size("WELCOME", block_size)
        return cls(version, WelcomeFlag(wflags), features, block_size, size, source_id, ring_id, durable)


@dataclass(frozen=True, slots=True)
class Error:
    """Either direction: the sender refuses to go on; the connection closes after it.

    0      2          4
    +------+----------+---------------------------+
    | code | reserved | message (UTF-8, <= 1 KiB) |
    +------+----------+---------------------------+
    """

    TYPE: ClassVar[MsgType] = MsgType.ERROR
    _S: ClassVar[struct.Struct] = struct.Struct("<HH")

    code: ErrorCode
    message: str

    def pack(self) -> bytes:
        text = self.message.encode("utf-8", "replace")[:MAX_ERROR_TEXT]
        # cutting may split a multi-byte character: drop the partial tail so the text stays valid UTF-8
        text = text.decode("utf-8", "ignore").encode("utf-8")
        return self._S.pack(self.code, 0) + text

    @classmethod
    def parse(cls, p: memoryview, flags: int) -> Error:
        if len(p) < cls._S.size or len(p) > cls._S.size + MAX_ERROR_TEXT:
            raise _fail(ErrorCode.BAD_LENGTH, f"ERROR payload of {len(p)} bytes")
        code, rsvd = cls._S.unpack_from(p)
        _check_zero("ERROR", "reserved", rsvd)
        try:
            ecode = ErrorCode(code)
        except ValueError:
            raise _fail(ErrorCode.BAD_FIELD, f"ERROR code {code} unknown") from None
        try:
            text = bytes(p[cls._S.size :]).decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(ErrorCode.BAD_FIELD, "ERROR message is not UTF-8") from None
        return cls(ecode, text)


class StreamFlag(enum.IntFlag):
    NONE = 0
    ASSUME_IN_SYNC = 1 << 0  # --no-replication: the operator asserts the replica already equals the source


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
        if sflags & ~1:
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
    prefix: memoryview, length: int, device_size: int | None = None
) -> tuple[memoryview, RecordFields, int]:
    """Parse and validate the head and descriptors of a DATA payload of ``length`` bytes from its first bytes
    (``prefix`` holds at least the descriptors; the data may still be on the wire).  Returns the descriptor
    view, their columns and the data length."""
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


class ScanMode(enum.IntEnum):
    HASH = 1  # the server hashes replica blocks on request, the client sends blocks that differ
    FULL = 2  # the client sends every block (full replication)


class ScanFlag(enum.IntFlag):
    NONE = 0
    WHOLE_DEVICE = 1 << 0  # the scan covers the whole device (required when the source identity changes)
    DIRECT = 1 << 1  # write the replica directly (--full-scan), not staged in the server's journal


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
        if sflags & ~3:
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


# SCAN_DATA ----------------------------------------------------------------------------------------------------
#
#   0         4       8
#   +---------+-------+---------------------------+------------------------------------------+
#   | scan_id | count | count x (offset u64,      | data of the non-ZERO blocks, concatenated |
#   |         |       |  length u32, flags u32)   |                                          |
#   +---------+-------+---------------------------+------------------------------------------+

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


class GoodbyeReason(enum.IntEnum):
    SHUTDOWN = 1  # the daemon is stopping (SIGTERM / SIGINT)
    DONE = 2  # nothing more to do (one-shot sync)


@dataclass(frozen=True, slots=True)
class Goodbye:
    """Either direction: a clean close ("we closed it").

    0        2          4
    +--------+----------+
    | reason | reserved |
    +--------+----------+
    """

    TYPE: ClassVar[MsgType] = MsgType.GOODBYE
    _S: ClassVar[struct.Struct] = struct.Struct("<HH")

    reason: GoodbyeReason

    def pack(self) -> bytes:
        return self._S.pack(self.reason, 0)

    @classmethod
    def parse(cls, p: memoryview, flags: int) -> Goodbye:
        _check_len("GOODBYE", p, cls._S.size)
        reason, rsvd = cls._S.unpack(p)
        _check_zero("GOODBYE", "reserved", rsvd)
        try:
            return cls(GoodbyeReason(reason))
        except ValueError:
            raise _fail(ErrorCode.BAD_FIELD, f"GOODBYE reason {reason} unknown") from None


Message = (
    Hello
    | Welcome
    | Error
    | Stream
    | Data
    | Sync
    | Ack
    | ScanBegin
    | ScanRequest
    | ScanHashes
    | ScanData
    | ScanEnd
    | ScanDone
    | Goodbye
    | ResyncPending
    | AuthBegin
    | AuthChallenge
    | AuthProof
    | AuthOk
)

_SIMPLE_PARSERS: dict[MsgType, Callable[[memoryview, int], Message]] = {
    MsgType.HELLO: Hello.parse,
    MsgType.WELCOME: Welcome.parse,
    MsgType.ERROR: Error.parse,
    MsgType.STREAM: Stream.parse,
    MsgType.SYNC: Sync.parse,
    MsgType.ACK: Ack.parse,
    MsgType.SCAN_BEGIN: ScanBegin.parse,
    MsgType.SCAN_REQUEST: ScanRequest.parse,
    MsgType.SCAN_HASHES: ScanHashes.parse,
    MsgType.SCAN_END: ScanEnd.parse,
    MsgType.SCAN_DONE: ScanDone.parse,
    MsgType.GOODBYE: Goodbye.parse,
    MsgType.RESYNC_PENDING: ResyncPending.parse,
    MsgType.AUTH_BEGIN: AuthBegin.parse,
    MsgType.AUTH_CHALLENGE: AuthChallenge.parse,
    MsgType.AUTH_PROOF: AuthProof.parse,
    MsgType.AUTH_OK: AuthOk.parse,
}


def parse_payload(mtype: int, flags: int, payload: memoryview, device_size: int | None = None) -> Message:
    """Turn one frame into a message, or raise RemoteProtocolError with a code."""
    try:
        t = MsgType(mtype)
    except ValueError:
        raise _fail(ErrorCode.BAD_TYPE, f"unknown message type {mtype}") from None
    if flags and t is not MsgType.DATA:
        raise _fail(ErrorCode.BAD_FIELD, f"{t.name} frame with flags {flags:#x}")
    if flags & ~int(FrameFlag.SYNC):
        raise _fail(ErrorCode.BAD_FIELD, f"frame flags {flags:#x} has unknown bits")
    if t is MsgType.DATA:
        return Data.parse(payload, flags, device_size)
    if t is MsgType.SCAN_DATA:
        return ScanData.parse(payload, flags, device_size)
    return _SIMPLE_PARSERS[t](payload, flags)


def encode(msg: Message) -> bytes:
    """The whole frame for one message (copies data; the daemons send DATA as gathered views instead)."""
    payload = msg.pack()
    flags = msg.frame_flags if isinstance(msg, Data) else 0
    return frame_header(msg.TYPE, len(payload), flags) + payload


# --------------------------------------------------------------------------------------------------------------
# Incremental decoder
# --------------------------------------------------------------------------------------------------------------


class NeedData(enum.Enum):
    """Returned by ``next_frame`` / ``next_event`` when a whole frame is not buffered yet."""

    NEED_DATA = 0


NEED_DATA: Final = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    flags: int
    payload: memoryview


class FrameDecoder:
    """Splits a byte stream into frames without blocking and, on the hot path, without copying.

    Feed it with ``feed(data)`` (copies) or, zero-copy, ``recv_into(buf := writable()); commit(n)``.
    ``next_frame()`` returns a ``Frame`` or ``NEED_DATA``; a half-received header or payload stays buffered
    (nothing is consumed until the whole frame is there).  The payload of a returned frame is a view of the
    internal buffer, valid until the next ``writable()`` / ``feed()`` call.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD, min_buffer: int = 1 << 20) -> None:
        self.max_payload = max_payload
        self._buf = bytearray(max(min_buffer, HEADER_SIZE))
        self._mv = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self.eof = False
        self.frames = 0  # frames consumed so far: identifies the frame being received

    @property
    def buffered(self) -> int:
        return self._end - self._start

    def _need(self) -> int:
        """Bytes the frame at the start of the buffer needs in total (header + payload), if known."""
        if self.buffered < HEADER_SIZE:
            return HEADER_SIZE
        length: int = _HDR.unpack_from(self._buf, self._start)[0]
        return HEADER_SIZE + min(length, self.max_payload)

    def writable(self, min_free: int = 65536) -> memoryview:
        """A view of free buffer space for ``recv_into``; call ``commit(n)`` with the bytes received.

        While a frame's header is buffered but its payload is not complete, the view ends where that frame
        ends, and without a header it is at most ``min_free`` bytes: the next frame then starts on an empty
        buffer, so a large payload is never moved to make room (only a partial header or a short prefix is).
        """
        if self._start == self._end:
            self._start = self._end = 0
        total = 0
        if self._end - self._start >= HEADER_SIZE:
            total = HEADER_SIZE + min(_HDR.unpack_from(self._buf, self._start)[0], self.max_payload)
            if self._end - self._start >= total:
                total = 0  # a whole frame is buffered already: any free space will do
        need = total if total else self.buffered + min_free
        if len(self._buf) - self._start < need:
            if len(self._buf) < need:
                grown = bytearray(max(need, 2 * len(self._buf)))
                grown[: self.buffered] = self._mv[self._start : self._end]
                self._mv.release()
                self._buf = grown
                self._mv = memoryview(self._buf)
            else:
                self._buf[: self.buffered] = self._mv[self._start : self._end]
            self._end -= self._start
            self._start = 0
        if total:
            return self._mv[self._end : self._start + total]
        return self._mv[self._end : self._end + max(min_free, HEADER_SIZE)]

    def commit(self, n: int) -> None:
        if n == 0:
            self.eof = True
        self._end += n

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes (an empty ``data`` means end of stream)."""
        if not data:
            self.eof = True
            return
        src = memoryview(data).cast("B")
        while src:
            view = self.writable(len(src))
            n = min(len(view), len(src))
            view[:n] = src[:n]
            self._end += n
            src = src[n:]

    def peek_header(self) -> tuple[int, int, int] | None:
        """(type, flags, payload length) of the frame at the start of the buffer, once its header is there."""
        if self._end - self._start < HEADER_SIZE:
            return None
        length, mtype, flags, _ = _HDR.unpack_from(self._buf, self._start)
        return mtype, flags, length

    def current_payload(self) -> memoryview:
        """The buffered bytes of the current frame's payload (the frame may not be complete)."""
        return self._mv[self._start + HEADER_SIZE : self._end]

    def drop_current(self) -> None:
        """Forget the current frame, whose missing payload bytes the caller took off the stream itself."""
        self._start = self._end = 0
        self.frames += 1

    def next_frame(self) -> Frame | NeedData:
        avail = self._end - self._start
        if avail < HEADER_SIZE:
            if self.eof and avail:
                raise _fail(ErrorCode.TRUNCATED, f"stream ended inside a frame header ({avail} bytes)")
            return NEED_DATA
        length, mtype, flags, rsvd = _HDR.unpack_from(self._buf, self._start)
        if length > self.max_payload:
            raise _fail(ErrorCode.FRAME_TOO_LARGE, f"frame of {length} bytes > limit {self.max_payload}")
        if rsvd:
            raise _fail(ErrorCode.BAD_FIELD, f"frame header reserved field {rsvd:#x}")
        if mtype not in _TYPES:
            raise _fail(ErrorCode.BAD_TYPE, f"unknown message type {mtype}")
        if avail < HEADER_SIZE + length:
            if self.eof:
                raise _fail(ErrorCode.TRUNCATED, f"stream ended inside a {MsgType(mtype).name} frame")
            return NEED_DATA
        body = self._start + HEADER_SIZE
        self._start = body + length
        self.frames += 1
        return Frame(mtype, flags, self._mv[body : body + length])


_TYPES = frozenset(int(t) for t in MsgType)
_AUTH_ORDER: Final = {MsgType.AUTH_BEGIN: 1, MsgType.AUTH_CHALLENGE: 2, MsgType.AUTH_PROOF: 3}


# --------------------------------------------------------------------------------------------------------------
# Connection state machine
# --------------------------------------------------------------------------------------------------------------


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class Phase(enum.Enum):
    AUTH = "auth"  # shared-secret challenge-response, before HELLO (only when a secret is configured)
    HANDSHAKE = "handshake"  # before HELLO / WELCOME
    READY = "ready"  # handshake done, neither streaming nor scanning
    STREAMING = "streaming"
    SCANNING = "scanning"
    CLOSED = "closed"


# Which messages each side may send in each phase of the conversation.
_CLIENT_MAY_SEND: dict[Phase, frozenset[MsgType]] = {
    Phase.AUTH: frozenset({MsgType.AUTH_BEGIN, MsgType.AUTH_PROOF, MsgType.ERROR}),
    Phase.HANDSHAKE: frozenset({MsgType.HELLO, MsgType.ERROR}),
    Phase.READY: frozenset({MsgType.STREAM, MsgType.SCAN_BEGIN, MsgType.ERROR, MsgType.GOODBYE}),
    Phase.STREAMING: frozenset(
        {
            MsgType.DATA,
            MsgType.SYNC,
            MsgType.RESYNC_PENDING,
            MsgType.SCAN_BEGIN,
            MsgType.SCAN_REQUEST,  # VERIFY_SCAN_ID only (the server refuses another id outside a scan)
            MsgType.ERROR,
            MsgType.GOODBYE,
        }
    ),
    Phase.SCANNING: frozenset(
        {MsgType.SCAN_REQUEST, MsgType.SCAN_DATA, MsgType.SCAN_END, MsgType.ERROR, MsgType.GOODBYE}
    ),
    Phase.CLOSED: frozenset(),
}
# Server replies lag behind the client's phase (a SCAN_DONE may arrive while the client already streams).
_SERVER_AFTER_HANDSHAKE = frozenset(
    {MsgType.ACK, MsgType.SCAN_HASHES, MsgType.SCAN_DONE, MsgType.ERROR, MsgType.GOODBYE}
)


class Connection:
    """One side of a BDR conversation: ``send(msg) -> bytes``, ``feed``/``next_event`` -> messages.

    The phase advances on what the client sends (HELLO, WELCOME, STREAM, SCAN_BEGIN, SCAN_END), seen either
    as sent (client role) or as received (server role), so both ends agree on what is allowed next.  With
    ``auth`` the conversation starts with the AUTH exchange, in order (BEGIN, CHALLENGE, PROOF, OK), and HELLO
    is refused until AUTH_OK.  A received frame's type is checked against the phase before its payload is
    parsed; until the handshake is over, frames are capped at HANDSHAKE_MAX_PAYLOAD.
    """

    def __init__(self, role: Role, max_payload: int = MAX_PAYLOAD, auth: bool = False) -> None:
        self.role = role
        self.auth = auth
        self.phase = Phase.AUTH if auth else Phase.HANDSHAKE
        self.decoder = FrameDecoder(min(max_payload, HANDSHAKE_MAX_PAYLOAD))
        self._max_payload = max_payload
        self.device_size: int | None = None  # bound for record offsets, known after HELLO
        self._hello_seen = False
        self._auth_step = 0  # AUTH messages seen so far: 1 BEGIN, 2 CHALLENGE, 3 PROOF

    @property
    def authenticated(self) -> bool:
        """The AUTH exchange is over (or there is none)."""
        return self.phase is not Phase.AUTH and (not self.auth or self._auth_step == 3)

    # -- state ---------------------------------------------------------------------------------------------

    def _check_client_msg(self, t: MsgType, local: bool) -> None:
        exc = LocalProtocolError if local else RemoteProtocolError
        if self.phase is Phase.AUTH:
            if t is MsgType.HELLO:
                raise exc(ErrorCode.AUTH_REQUIRED, "the server requires shared-secret authentication first")
            if t is MsgType.ERROR or (t is MsgType.AUTH_BEGIN and self._auth_step == 0):
                return
            if t is MsgType.AUTH_PROOF and self._auth_step == 2:
                return
        elif t in _CLIENT_MAY_SEND[self.phase] and not (t is MsgType.HELLO and self._hello_seen):
            return
        elif t is MsgType.AUTH_BEGIN and not self.auth and self.phase is Phase.HANDSHAKE:
            raise exc(
                ErrorCode.AUTH_FAILED,
                "the client offers shared-secret authentication, the server has no secret: "
                "give both --secret-file or neither",
            )
        raise exc(ErrorCode.UNEXPECTED, f"client may not send {t.name} in phase {self.phase.value}")

    def _check_server_msg(self, t: MsgType, local: bool) -> None:
        if self.phase is Phase.CLOSED:
            ok = False
        elif self.phase is Phase.AUTH:
            ok = (
                t is MsgType.ERROR
                or (t is MsgType.AUTH_CHALLENGE and self._auth_step == 1)
                or (t is MsgType.AUTH_OK and self._auth_step == 3)
            )
        elif self.phase is Phase.HANDSHAKE:
            ok = t is MsgType.ERROR or (self._hello_seen and t is MsgType.WELCOME)
        else:
            ok = t in _SERVER_AFTER_HANDSHAKE
        if not ok:
            exc = LocalProtocolError if local else RemoteProtocolError
            raise exc(ErrorCode.UNEXPECTED, f"server may not send {t.name} in phase {self.phase.value}")

    def _check(self, t: MsgType, from_client: bool) -> None:
        """May ``t`` be sent now (by the client if ``from_client``)?  Local error if we are the sender."""
        if from_client:
            self._check_client_msg(t, local=self.role is Role.CLIENT)
        else:
            self._check_server_msg(t, local=self.role is Role.SERVER)

    def _advance(self, msg: Message, from_client: bool) -> None:
        t = msg.TYPE
        self._check(t, from_client)
        if isinstance(msg, ScanRequest) and self.phase is Phase.STREAMING and msg.scan_id != VERIFY_SCAN_ID:
            exc = LocalProtocolError if from_client == (self.role is Role.CLIENT) else RemoteProtocolError
            raise exc(ErrorCode.UNEXPECTED, f"SCAN_REQUEST for scan {msg.scan_id} outside a scan")
        if t is MsgType.HELLO:
            assert isinstance(msg, Hello)
            self._hello_seen = True
            self.device_size = msg.device_size
        elif t is MsgType.WELCOME:
            self.phase = Phase.READY
            self.decoder.max_payload = self._max_payload
        elif t is MsgType.STREAM or t is MsgType.SCAN_END:
            self.phase = Phase.STREAMING
        elif t is MsgType.SCAN_BEGIN:
            self.phase = Phase.SCANNING
        elif t is MsgType.ERROR or t is MsgType.GOODBYE:
            self.phase = Phase.CLOSED
        elif t is MsgType.AUTH_OK:
            self.phase = Phase.HANDSHAKE
        elif t in _AUTH_ORDER:
            self._auth_step = _AUTH_ORDER[t]

    # -- sending ---------------------------------------------------------------------------------------------

    def send(self, msg: Message) -> bytes:
        """Check that we may send ``msg`` now and return its frame."""
        self._advance(msg, from_client=self.role is Role.CLIENT)
        return encode(msg)

    def expect_data(self) -> None:
        """Check that the peer may send DATA now (for a DATA frame taken off the stream without next_event)."""
        self._check_client_msg(MsgType.DATA, local=self.role is Role.CLIENT)

    def send_data_header(self, count: int, data_len: int, sync: bool = False) -> bytes:
        """For a DATA frame sent as gathered views: check the phase and return header + DATA head."""
        self._check_client_msg(MsgType.DATA, local=True)
        if count > MAX_BATCH_RECORDS:
            raise LocalProtocolError(ErrorCode.BAD_LENGTH, f"batch of {count} records > {MAX_BATCH_RECORDS}")
        return data_frame_header(count, data_len, sync)

    def send_scan_data_header(self, scan_id: int, blocks: list[tuple[int, int, int]], data_len: int) -> bytes:
        self._check_client_msg(MsgType.SCAN_DATA, local=True)
        return scan_data_header(scan_id, blocks, data_len)

    # -- receiving -------------------------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.decoder.feed(data)

    def writable(self, min_free: int = 65536) -> memoryview:
        return self.decoder.writable(min_free)

    def commit(self, n: int) -> None:
        self.decoder.commit(n)

    def next_event(self) -> Message | NeedData:
        """The next message from the peer, or NEED_DATA.  Raises RemoteProtocolError (PeerError for ERROR)."""
        frame = self.decoder.next_frame()
        if frame is NEED_DATA:
            return NEED_DATA
        from_client = self.role is Role.SERVER
        self._check(MsgType(frame.type), from_client)  # not allowed now: refused before its payload is parsed
        bound = self.device_size if from_client else None
        msg = parse_payload(frame.type, frame.flags, frame.payload, bound)
        self._advance(msg, from_client)
        if isinstance(msg, Error):
            raise PeerError(msg.code, msg.message)
        return msg
