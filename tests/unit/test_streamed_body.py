"""The frame decoder's streamed-body event: a frame's header and the payload buffered so far, before the body is
complete; the body then either arrives through the decoder as usual, or the caller takes it off the stream
itself and says how much it took, and the decoder goes on at the next frame."""

from __future__ import annotations

import pytest

from bdr import wire as p


def frame(mtype: p.MsgType, payload: bytes, flags: int = 0) -> bytes:
    return p.frame_header(mtype, len(payload), flags) + payload


def test_no_event_before_the_header_is_complete() -> None:
    dec = p.FrameDecoder()
    dec.feed(frame(p.MsgType.SYNC, b"")[:5])
    assert dec.frame_start() is None


def test_header_first_then_a_body_buffered_by_the_decoder() -> None:
    body = bytes(range(256)) * 4
    wire = frame(p.MsgType.GOODBYE, body, 0) + frame(p.MsgType.SYNC, b"")
    dec = p.FrameDecoder()
    dec.feed(wire[: 8 + 100])  # a frame split across reads
    start = dec.frame_start()
    assert start is not None and (start.type, start.length, start.number) == (p.MsgType.GOODBYE, len(body), 0)
    assert bytes(start.prefix) == body[:100] and not start.complete
    assert dec.next_frame() is p.NEED_DATA
    dec.feed(wire[8 + 100 :])
    start = dec.frame_start()
    assert start is not None and start.complete and bytes(start.prefix) == body  # no bytes of the next frame
    f = dec.next_frame()
    assert isinstance(f, p.Frame) and bytes(f.payload) == body
    start = dec.frame_start()
    assert start is not None and (start.type, start.number) == (p.MsgType.SYNC, 1)


def test_a_body_taken_by_the_caller() -> None:
    body = b"x" * 5000
    wire = frame(p.MsgType.GOODBYE, body) + frame(p.MsgType.SYNC, b"")
    dec = p.FrameDecoder()
    first = 8 + 1000
    view = dec.writable(first)
    view[:first] = wire[:first]
    dec.commit(first)
    start = dec.frame_start()
    assert start is not None and len(start.prefix) == 1000
    stream = memoryview(wire)[first:]
    taken = start.length - len(start.prefix)  # what the caller reads off the socket itself
    stream = stream[taken:]
    with pytest.raises(ValueError, match="do not end the current frame"):
        dec.body_taken(taken - 1)
    dec.body_taken(taken)
    dec.feed(stream)
    f = dec.next_frame()
    assert isinstance(f, p.Frame) and f.type == p.MsgType.SYNC and f.payload.nbytes == 0
    assert dec.next_frame() is p.NEED_DATA


def test_the_connection_passes_the_event_on() -> None:
    c = p.Connection(p.Role.SERVER)
    assert c.frame_start() is None and not c.mid_frame
    c.feed(frame(p.MsgType.HELLO, b"\0" * 10)[:12])
    start = c.frame_start()
    assert start is not None and start.type == p.MsgType.HELLO and c.mid_frame
