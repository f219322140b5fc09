"""The handshake's messages: the shared-secret exchange (AUTH_BEGIN, AUTH_CHALLENGE, AUTH_PROOF, AUTH_OK), HELLO,
WELCOME, and ERROR (which may end any phase)."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar, Final

from ..generations import Generations, GenerationsError
from .constants import MAC_SIZE, MAX_ERROR_TEXT, PROTOCOL_VERSION, SECTOR, ErrorCode, MsgType
from .errors import _fail
from .fields import _check_len, _check_zero


def _trailer(name: str, p: memoryview, fixed: int) -> Generations | None:
    """The generation history after the fixed part of HELLO / WELCOME (absent: None)."""
    if len(p) < fixed:
        raise _fail(ErrorCode.BAD_LENGTH, f"{name} payload is {len(p)} bytes, expected at least {fixed}")
    rest = p[fixed:]
    if not len(rest):
        return None
    try:
        gens = Generations.unpack(rest)
        size = Generations.encoded_size(rest)
    except (GenerationsError, ValueError) as exc:
        raise _fail(ErrorCode.BAD_FIELD, f"{name} generation history: {exc}") from None
    if gens is None or size != len(rest):
        raise _fail(ErrorCode.BAD_LENGTH, f"{name} generation history of {len(rest)} bytes is malformed")
    return gens


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
    numbers the client will send (seq numbers are only comparable within one ring_id).  The source's generation
    history (``bdr.generations``) may follow, when the client keeps one (``--metadata``).
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
    generations: Generations | None = None

    def pack(self) -> bytes:
        fixed = self._S.pack(
            self.MAGIC,
            self.version,
            0,
            self.features,
            self.block_size,
            self.device_size,
            self.source_id,
            self.ring_id,
        )
        return fixed if self.generations is None else fixed + self.generations.pack()

    @classmethod
    def parse(cls, p: memoryview, flags: int) -> Hello:
        gens = _trailer("HELLO", p, cls._S.size)
        magic, version, rsvd, features, block_size, size, source_id, ring_id = cls._S.unpack_from(p)
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
        return cls(version, features, block_size, size, source_id, ring_id, gens)


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
    # the replica holds the client's source as it was when the source's current generation began (a switchover
    # after a stop in sync): streaming every write of the generation brings it up to date, no scan needed
    AT_GENERATION_START = 1 << 5
    # the replica is a consistent copy of the client's source device as of durable_seq of ring_id, and the
    # generations say nothing else wrote it since: a resync of only the regions the source's persistent change
    # tracking marked since a point at or before that one brings it up to date (SCAN_BEGIN TRACKED)
    TRACKABLE = 1 << 6
    # the replica is a demoted source that holds the client's source as it was when the source's current
    # generation began, except in the regions its meta device marked (MARKS follows WELCOME): a resync of those
    # (SCAN_BEGIN MARKED), then every write of the generation, bring it up to date
    MARKED = 1 << 7


@dataclass(frozen=True, slots=True)
class Welcome:
    """Server -> client, answer to HELLO when the handshake succeeds.

    0      4     6      8        12          16            24          40         56            64
    +------+-----+------+--------+-----------+-------------+-----------+----------+-------------+
    |"BDRW"| ver |flags |features|block_size | device_size | source_id | ring_id  | durable_seq |
    +------+-----+------+--------+-----------+-------------+-----------+----------+-------------+
    device_size is the replica's; source_id/ring_id/durable_seq are what the replica last mirrored.  The
    replica's generation history may follow (only to a client that announced Feature.GENERATIONS).
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
    generations: Generations | None = None

    def pack(self) -> bytes:
        fixed = self._S.pack(
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
        return fixed if self.generations is None else fixed + self.generations.pack()

    @classmethod
    def parse(cls, p: memoryview, flags: int) -> Welcome:
        gens = _trailer("WELCOME", p, cls._S.size)
        magic, version, wflags, features, block_size, size, source_id, ring_id, durable = cls._S.unpack_from(
            p
        )
        if magic != cls.MAGIC:
            raise _fail(ErrorCode.BAD_FIELD, f"WELCOME magic {magic!r}, not a BDR server")
        if version != PROTOCOL_VERSION:
            raise _fail(
                ErrorCode.BAD_VERSION, f"server speaks protocol {version}, we speak {PROTOCOL_VERSION}"
            )
        if wflags & ~0xFF:
            raise _fail(ErrorCode.BAD_FIELD, f"WELCOME flags {wflags:#x} has unknown bits")
        _check_block_size("WELCOME", block_size)
        return cls(
            version, WelcomeFlag(wflags), features, block_size, size, source_id, ring_id, durable, gens
        )


@dataclass(frozen=True, slots=True)
class Marks:
    """Server -> client, right after a WELCOME with MARKED: the regions the demoted source's meta device marked
    when it was demoted.  They hold every write it made after its ring position ``clear_pos`` of ring
    ``clear_ring`` in ``generation``, the point of the marks' last clear.

    0            8            24          32      36         40
    +------------+------------+-----------+-------+----------+-------------------------------+
    | generation | clear_ring | clear_pos | count | reserved | count x (offset, length) u64  |
    +------------+------------+-----------+-------+----------+-------------------------------+
    """

    TYPE: ClassVar[MsgType] = MsgType.MARKS
    _S: ClassVar[struct.Struct] = struct.Struct("<Q16sQII")
    _E: ClassVar[struct.Struct] = struct.Struct("<QQ")

    generation: int
    clear_ring: bytes
    clear_pos: int
    extents: list[tuple[int, int]]

    def pack(self) -> bytes:
        head = self._S.pack(self.generation, self.clear_ring, self.clear_pos, len(self.extents), 0)
        return head + b"".join(self._E.pack(o, n) for o, n in self.extents)

    @classmethod
    def parse(cls, p: memoryview, flags: int) -> Marks:
        if len(p) < cls._S.size:
            raise _fail(
                ErrorCode.BAD_LENGTH, f"MARKS payload is {len(p)} bytes, expected at least {cls._S.size}"
            )
        gen, ring, pos, count, rsvd = cls._S.unpack_from(p)
        _check_zero("MARKS", "reserved", rsvd)
        _check_len("MARKS", p, cls._S.size + count * cls._E.size)
        ext: list[tuple[int, int]] = []
        end = 0
        for i in range(count):
            o, n = cls._E.unpack_from(p, cls._S.size + i * cls._E.size)
            if not n or o < end or o % SECTOR or n % SECTOR:
                raise _fail(
                    ErrorCode.BAD_FIELD, f"MARKS extent {i} ({o}, +{n}) is empty, unaligned or out of order"
                )
            ext.append((o, n))
            end = o + n
        return cls(gen, bytes(ring), pos, ext)


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
