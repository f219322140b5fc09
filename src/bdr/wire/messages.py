"""GOODBYE, the union of all messages, and the codec registry: a frame's payload to its message, a message to
its frame."""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from .constants import ErrorCode, FrameFlag, MsgType
from .errors import _fail
from .fields import _check_len, _check_zero, frame_header
from .handshake import AuthBegin, AuthChallenge, AuthOk, AuthProof, Error, Hello, Marks, Welcome
from .scan import ScanBegin, ScanData, ScanDone, ScanEnd, ScanHashes, ScanRequest
from .stream import Ack, Data, ResyncPending, Stream, Sync


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
    | Marks
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
    MsgType.MARKS: Marks.parse,
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
