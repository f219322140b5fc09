"""The incremental frame decoder: bytes in, (type, flags, payload) frames out, with the payload cap enforced
before anything is buffered."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from .constants import HEADER_SIZE, MAX_PAYLOAD, ErrorCode, MsgType
from .errors import _fail
from .fields import _HDR


class NeedData(enum.Enum):
    """Returned by ``next_frame`` / ``next_event`` when a whole frame is not buffered yet."""

    NEED_DATA = 0


NEED_DATA: Final = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    flags: int
    payload: memoryview


@dataclass(frozen=True, slots=True)
class FrameStart:
    """The streamed-body event: a frame whose header has arrived and whose body may not have.  ``prefix`` is the
    part of the payload buffered so far (a view, valid until the next ``writable()`` / ``feed()``); ``number``
    counts the frames before this one in the stream."""

    type: int
    flags: int
    length: int
    number: int
    prefix: memoryview

    @property
    def complete(self) -> bool:
        return len(self.prefix) >= self.length


class FrameDecoder:
    """Splits a byte stream into frames without blocking and, on the hot path, without copying.

    Feed it with ``feed(data)`` (copies) or, zero-copy, ``recv_into(buf := writable()); commit(n)``.
    ``next_frame()`` returns a ``Frame`` or ``NEED_DATA``; a half-received header or payload stays buffered
    (nothing is consumed until the whole frame is there).  The payload of a returned frame is a view of the
    internal buffer, valid until the next ``writable()`` / ``feed()`` call.

    A caller that wants a large body without the buffer (the server splices DATA straight into the replica)
    asks ``frame_start()`` for the header and the prefix buffered so far, reads the rest of the body off the
    stream itself, and reports it with ``body_taken(n)``; the decoder then goes on at the next frame.
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

    def frame_start(self) -> FrameStart | None:
        """The frame at the start of the buffer, once its header is there (its body may still be on the wire)."""
        if self._end - self._start < HEADER_SIZE:
            return None
        length, mtype, flags, _ = _HDR.unpack_from(self._buf, self._start)
        end = min(self._end, self._start + HEADER_SIZE + length)
        return FrameStart(mtype, flags, length, self.frames, self._mv[self._start + HEADER_SIZE : end])

    def body_taken(self, n: int) -> None:
        """The caller read the last ``n`` bytes of the current frame's body off the stream itself (after the
        buffered prefix): the frame is done, the next one starts with the next byte of the stream."""
        start = self.frame_start()
        if (
            start is None
            or len(start.prefix) + n != start.length
            or self._end != self._start + HEADER_SIZE + len(start.prefix)
        ):
            raise ValueError("body_taken: the bytes taken do not end the current frame")
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
