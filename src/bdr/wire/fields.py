"""The frame header, and the field checks every message codec shares."""

from __future__ import annotations

import struct

from .constants import MAX_PAYLOAD, ErrorCode, MsgType
from .errors import LocalProtocolError, _fail

_HDR = struct.Struct("<IBBH")


def frame_header(mtype: MsgType, length: int, flags: int = 0) -> bytes:
    if length > MAX_PAYLOAD:
        raise LocalProtocolError(ErrorCode.FRAME_TOO_LARGE, f"payload of {length} bytes > {MAX_PAYLOAD}")
    return _HDR.pack(length, mtype, flags, 0)


def _check_len(name: str, payload: memoryview | bytes, size: int) -> None:
    if len(payload) != size:
        raise _fail(ErrorCode.BAD_LENGTH, f"{name} payload is {len(payload)} bytes, expected {size}")


def _check_zero(name: str, field: str, value: int) -> None:
    if value:
        raise _fail(ErrorCode.BAD_FIELD, f"{name}.{field} must be zero, got {value:#x}")
