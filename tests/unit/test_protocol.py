"""Wire protocol: one table of (message, bytes) drives encoder and decoder; property tests for the rest."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bdr import wire as p
from bdr.wire import ErrorCode as E


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


SRC = b"\x11" * 16
RING = b"\x22" * 16
W512 = b"\xab" * 512
NC = bytes(range(32))  # client nonce
NS = bytes(range(32, 64))  # server nonce
MAC = b"\x5a" * 32

# One row per message: the message and its exact frame bytes (header + payload), written out by hand from
# the layouts drawn in bdr/wire (next to each message class), so a layout change shows up here.
CASES: list[tuple[str, p.Message, bytes]] = [
    (
        "hello",
        p.Hello(1, 3, 4096, 1 << 20, SRC, RING),
        h("38000000 01 00 0000") + b"BDRH" + h("0100 0000 03000000 00100000 0000100000000000") + SRC + RING,
    ),
    (
        "welcome",
        p.Welcome(1, p.WelcomeFlag.SEQ_VALID | p.WelcomeFlag.CONSISTENT, 3, 512, 2 << 20, SRC, RING, 41),
        h("40000000 02 00 0000")
        + b"BDRW"
        + h("0100 0300 03000000 00020000 0000200000000000")
        + SRC
        + RING
        + h("2900000000000000"),
    ),
    (
        "error",
        p.Error(p.ErrorCode.SIZE_MISMATCH, "too small"),
        h("0d000000 03 00 0000 0a00 0000") + b"too small",
    ),
    (
        "stream",
        p.Stream(5, p.StreamFlag.ASSUME_IN_SYNC),
        h("10000000 04 00 0000 0500000000000000 01000000 00000000"),
    ),
    (
        "data write+flush",
        p.Data(
            h("0700000000000000 0800000000000000 00020000 0100 0000 0000000000000000")
            + h("0800000000000000 0000000000000000 00000000 0200 0000 0000000000000000"),
            W512,
        ),
        h("48020000 05 00 0000 02000000 00020000")
        + h("0700000000000000 0800000000000000 00020000 0100 0000 0000000000000000")
        + h("0800000000000000 0000000000000000 00000000 0200 0000 0000000000000000")
        + W512,
    ),
    (
        "data sync, fua write + discard",
        p.Data(
            h("ffffffffffffffff 0000000000000000 00020000 0100 0100 0000000000000000")
            + h("0000000000000000 0100000000000000 00100000 0300 0000 0000000000000000"),
            W512,
            sync=True,
        ),
        h("48020000 05 01 0000 02000000 00020000")
        + h("ffffffffffffffff 0000000000000000 00020000 0100 0100 0000000000000000")
        + h("0000000000000000 0100000000000000 00100000 0300 0000 0000000000000000")
        + W512,
    ),
    ("data empty", p.Data(b"", b""), h("08000000 05 00 0000 00000000 00000000")),
    ("sync", p.Sync(), h("00000000 06 00 0000")),
    ("ack", p.Ack(9, p.NO_SEQ), h("10000000 07 00 0000 0900000000000000 ffffffffffffffff")),
    (
        "scan begin",
        p.ScanBegin(3, p.ScanMode.HASH, p.ScanFlag.WHOLE_DEVICE, 65536),
        h("10000000 08 00 0000 03000000 01 01 0000 00000100 00000000"),
    ),
    (
        "scan request",
        p.ScanRequest(3, 65536, 1 << 20),
        h("18000000 09 00 0000 03000000 00000000 0000010000000000 0000100000000000"),
    ),
    (
        "scan hashes",
        p.ScanHashes(3, 131072, b"\x01" * 16 + b"\x02" * 16),
        h("30000000 0a 00 0000 03000000 02000000 0000020000000000") + b"\x01" * 16 + b"\x02" * 16,
    ),
    (
        "scan data",
        p.ScanData(3, ((0, 512, 0), (4096, 4096, p.BlockFlag.ZERO)), W512),
        h("28020000 0b 00 0000 03000000 02000000")
        + h("0000000000000000 00020000 00000000")
        + h("0010000000000000 00100000 01000000")
        + W512,
    ),
    (
        "scan end",
        p.ScanEnd(3, p.ScanEndFlag.HAS_RESUME_SEQ | p.ScanEndFlag.HAS_CONSISTENT_SEQ, 10, 20),
        h("18000000 0c 00 0000 03000000 03000000 0a00000000000000 1400000000000000"),
    ),
    (
        "scan done",
        p.ScanDone(3, 2, 4608),
        h("18000000 0d 00 0000 03000000 00000000 0200000000000000 0012000000000000"),
    ),
    ("goodbye", p.Goodbye(p.GoodbyeReason.SHUTDOWN), h("04000000 0e 00 0000 0100 0000")),
    ("resync pending", p.ResyncPending(), h("00000000 0f 00 0000")),
    (
        "auth begin",
        p.AuthBegin(1, p.AuthFlag.TLS_BOUND, int(p.AuthMethod.HMAC_SHA256), NC),
        h("2c000000 10 00 0000") + b"BDRA" + h("0100 0100 01000000") + NC,
    ),
    (
        "auth challenge",
        p.AuthChallenge(p.AuthMethod.HMAC_SHA256, p.AuthFlag.NONE, NS),
        h("24000000 11 00 0000 0100 0000") + NS,
    ),
    ("auth proof", p.AuthProof(MAC), h("20000000 12 00 0000") + MAC),
    ("auth ok", p.AuthOk(MAC), h("20000000 13 00 0000") + MAC),
]
IDS = [c[0] for c in CASES]


def decode_all(data: bytes, chunk: int | None = None, device_size: int | None = 1 << 30) -> list[p.Message]:
    dec = p.FrameDecoder()
    out: list[p.Message] = []
    pieces = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    for piece in pieces:
        dec.feed(piece)
        while (fr := dec.next_frame()) is not p.NEED_DATA:
            assert isinstance(fr, p.Frame)
            msg = p.parse_payload(fr.type, fr.flags, fr.payload, device_size)
            out.append(_materialise(msg))
    return out


def _materialise(msg: p.Message) -> p.Message:
    """Copy views out of the decoder buffer (they are only valid until the next feed)."""
    if isinstance(msg, p.Data):
        return p.Data(bytes(msg.records), bytes(msg.data), msg.sync)
    if isinstance(msg, p.ScanData):
        return p.ScanData(msg.scan_id, msg.blocks, bytes(msg.data))
    return msg


@pytest.mark.parametrize(("name", "msg", "wire"), CASES, ids=IDS)
def test_encode(name: str, msg: p.Message, wire: bytes) -> None:
    assert p.encode(msg) == wire


@pytest.mark.parametrize(("name", "msg", "wire"), CASES, ids=IDS)
def test_decode_whole(name: str, msg: p.Message, wire: bytes) -> None:
    assert decode_all(wire) == [msg]


@pytest.mark.parametrize(("name", "msg", "wire"), CASES, ids=IDS)
def test_decode_byte_by_byte(name: str, msg: p.Message, wire: bytes) -> None:
    assert decode_all(wire, chunk=1) == [msg]


@pytest.mark.parametrize(("name", "msg", "wire"), CASES, ids=IDS)
def test_decode_with_trailing_bytes(name: str, msg: p.Message, wire: bytes) -> None:
    dec = p.FrameDecoder()
    dec.feed(wire + b"\x05\x00")
    fr = dec.next_frame()
    assert isinstance(fr, p.Frame)
    assert _materialise(p.parse_payload(fr.type, fr.flags, fr.payload, 1 << 30)) == msg
    assert dec.next_frame() is p.NEED_DATA
    assert dec.buffered == 2
    dec.feed(b"")  # end of stream inside the next header
    with pytest.raises(p.RemoteProtocolError) as ei:
        dec.next_frame()
    assert ei.value.code is E.TRUNCATED


def test_all_cases_back_to_back() -> None:
    stream = b"".join(c[2] for c in CASES)
    assert decode_all(stream, chunk=7) == [c[1] for c in CASES]


def test_zero_copy_receive_path() -> None:
    wire = b"".join(c[2] for c in CASES)
    dec = p.FrameDecoder(min_buffer=64)
    got = []
    pos = 0
    while pos < len(wire):
        buf = dec.writable(16)
        n = min(len(buf), 100, len(wire) - pos)
        buf[:n] = wire[pos : pos + n]
        dec.commit(n)
        pos += n
        while (fr := dec.next_frame()) is not p.NEED_DATA:
            assert isinstance(fr, p.Frame)
            got.append(_materialise(p.parse_payload(fr.type, fr.flags, fr.payload, 1 << 30)))
    assert got == [c[1] for c in CASES]


# -- rejection table: (payload-level frame bytes, code) -------------------------------------------------------


def frame(t: int, payload: bytes, flags: int = 0) -> bytes:
    return struct.pack("<IBBH", len(payload), t, flags, 0) + payload


def rec(seq: int, sector: int, ln: int, op: int, flags: int = 0, rsvd: int = 0) -> bytes:
    return struct.pack("<QQIHHQ", seq, sector, ln, op, flags, rsvd)


def data_payload(recs: bytes, data: bytes, count: int | None = None, dlen: int | None = None) -> bytes:
    n = len(recs) // 32 if count is None else count
    return struct.pack("<II", n, len(data) if dlen is None else dlen) + recs + data


HELLO_OK = CASES[0][2][8:]

REJECTS: list[tuple[str, bytes, E]] = [
    ("frame too large", struct.pack("<IBBH", p.MAX_PAYLOAD + 1, 5, 0, 0), E.FRAME_TOO_LARGE),
    ("header reserved", struct.pack("<IBBH", 0, 6, 0, 1), E.BAD_FIELD),
    ("unknown type", frame(99, b""), E.BAD_TYPE),
    ("type zero", frame(0, b""), E.BAD_TYPE),
    ("flags on non-data", frame(6, b"", flags=1), E.BAD_FIELD),
    ("unknown data flag", frame(5, data_payload(b"", b""), flags=2), E.BAD_FIELD),
    ("hello short", frame(1, HELLO_OK[:-1]), E.BAD_LENGTH),
    ("hello magic", frame(1, b"XXXX" + HELLO_OK[4:]), E.BAD_FIELD),
    ("hello version", frame(1, HELLO_OK[:4] + b"\x02\x00" + HELLO_OK[6:]), E.BAD_VERSION),
    ("hello reserved", frame(1, HELLO_OK[:6] + b"\x01\x00" + HELLO_OK[8:]), E.BAD_FIELD),
    ("hello block size", frame(1, HELLO_OK[:12] + struct.pack("<I", 1000) + HELLO_OK[16:]), E.BAD_FIELD),
    ("hello size zero", frame(1, HELLO_OK[:16] + bytes(8) + HELLO_OK[24:]), E.BAD_FIELD),
    ("sync with payload", frame(6, b"x"), E.BAD_LENGTH),
    ("ack short", frame(7, bytes(15)), E.BAD_LENGTH),
    ("error unknown code", frame(3, struct.pack("<HH", 999, 0)), E.BAD_FIELD),
    ("error bad utf8", frame(3, struct.pack("<HH", 1, 0) + b"\xff"), E.BAD_FIELD),
    ("error text too long", frame(3, struct.pack("<HH", 1, 0) + b"a" * 2000), E.BAD_LENGTH),
    ("stream flags", frame(4, struct.pack("<QII", 0, 4, 0)), E.BAD_FIELD),
    ("data count > limit", frame(5, data_payload(b"", b"", count=5000)), E.BAD_LENGTH),
    ("data length mismatch", frame(5, data_payload(rec(1, 0, 512, 1), W512, dlen=0)), E.BAD_LENGTH),
    ("data missing bytes", frame(5, data_payload(rec(1, 0, 512, 1), b"", dlen=0)), E.BAD_LENGTH),
    ("data seq gap", frame(5, data_payload(rec(1, 0, 0, 2) + rec(3, 0, 0, 2), b"")), E.BAD_RECORD),
    ("data bad op", frame(5, data_payload(rec(1, 0, 0, 9), b"")), E.BAD_RECORD),
    ("data bad flags", frame(5, data_payload(rec(1, 0, 0, 2, flags=8), b"")), E.BAD_RECORD),
    ("data reserved", frame(5, data_payload(rec(1, 0, 0, 2, rsvd=1), b"")), E.BAD_FIELD),
    ("data unaligned len", frame(5, data_payload(rec(1, 0, 100, 1), b"x" * 100)), E.BAD_RECORD),
    ("flush with len", frame(5, data_payload(rec(1, 0, 512, 2), b"")), E.BAD_RECORD),
    (
        "write beyond device",
        frame(5, data_payload(rec(1, (1 << 21) - 1, 1024, 1), bytes(1024))),
        E.OUT_OF_RANGE,
    ),
    ("discard beyond device", frame(5, data_payload(rec(1, 0, (1 << 30) + 512, 3), b"")), E.OUT_OF_RANGE),
    ("scan begin mode", frame(8, struct.pack("<IBBHII", 1, 3, 0, 0, 65536, 0)), E.BAD_FIELD),
    ("scan begin block", frame(8, struct.pack("<IBBHII", 1, 1, 0, 0, 65535, 0)), E.BAD_FIELD),
    ("scan request empty", frame(9, struct.pack("<IIQQ", 1, 0, 0, 0)), E.BAD_FIELD),
    ("scan hashes count", frame(10, struct.pack("<IIQ", 1, 2, 0) + bytes(16)), E.BAD_LENGTH),
    (
        "scan data beyond",
        frame(11, struct.pack("<II", 1, 1) + struct.pack("<QII", 1 << 30, 512, 0) + W512),
        E.OUT_OF_RANGE,
    ),
    (
        "scan data short",
        frame(11, struct.pack("<II", 1, 1) + struct.pack("<QII", 0, 1024, 0) + W512),
        E.BAD_LENGTH,
    ),
    (
        "scan data table cut",
        frame(11, struct.pack("<II", 1, 2) + struct.pack("<QII", 0, 512, 1)),
        E.BAD_LENGTH,
    ),
    ("scan end flags", frame(12, struct.pack("<IIQQ", 1, 8, 0, 0)), E.BAD_FIELD),
    ("goodbye reason", frame(14, struct.pack("<HH", 7, 0)), E.BAD_FIELD),
    ("auth begin short", frame(16, b"BDRA" + bytes(39)), E.BAD_LENGTH),
    ("auth begin magic", frame(16, b"XXXX" + struct.pack("<HHI", 1, 0, 1) + NC), E.BAD_FIELD),
    ("auth begin version", frame(16, b"BDRA" + struct.pack("<HHI", 2, 0, 1) + NC), E.BAD_VERSION),
    ("auth begin flags", frame(16, b"BDRA" + struct.pack("<HHI", 1, 2, 1) + NC), E.BAD_FIELD),
    ("auth begin no method", frame(16, b"BDRA" + struct.pack("<HHI", 1, 0, 0) + NC), E.BAD_FIELD),
    ("auth challenge method", frame(17, struct.pack("<HH", 2, 0) + NS), E.BAD_FIELD),
    ("auth challenge flags", frame(17, struct.pack("<HH", 1, 4) + NS), E.BAD_FIELD),
    ("auth challenge long", frame(17, struct.pack("<HH", 1, 0) + NS + b"x"), E.BAD_LENGTH),
    ("auth proof short", frame(18, MAC[:31]), E.BAD_LENGTH),
    ("auth ok long", frame(19, MAC + b"x"), E.BAD_LENGTH),
]


@pytest.mark.parametrize(("name", "wire", "code"), REJECTS, ids=[r[0] for r in REJECTS])
def test_reject(name: str, wire: bytes, code: E) -> None:
    with pytest.raises(p.RemoteProtocolError) as ei:
        decode_all(wire)
    assert ei.value.code is code


def test_oversized_frame_refused_before_payload_arrives() -> None:
    dec = p.FrameDecoder()
    dec.feed(struct.pack("<IBBH", p.MAX_PAYLOAD + 1, 5, 0, 0))
    with pytest.raises(p.RemoteProtocolError) as ei:
        dec.next_frame()
    assert ei.value.code is E.FRAME_TOO_LARGE


def test_error_text_is_capped_at_encode() -> None:
    wire = p.encode(p.Error(E.INTERNAL, "é" * 2000))
    (msg,) = decode_all(wire)
    assert isinstance(msg, p.Error)
    assert len(msg.message.encode()) <= p.MAX_ERROR_TEXT


def test_seq_wraps_after_no_seq() -> None:
    assert p.next_seq(p.NO_SEQ) == 0
    recs = rec(p.SEQ_MASK, 0, 0, 2) + rec(0, 0, 0, 2)
    (msg,) = decode_all(frame(5, data_payload(recs, b"")))
    assert isinstance(msg, p.Data)
    assert msg.fields().seqs == [p.SEQ_MASK, 0]


# -- connection state machine -----------------------------------------------------------------------------------


def hello() -> p.Hello:
    return p.Hello(1, 3, 4096, 1 << 20, SRC, RING)


def welcome() -> p.Welcome:
    return p.Welcome(1, p.WelcomeFlag.NONE, 3, 4096, 1 << 20, SRC, RING, p.NO_SEQ)


def pair() -> tuple[p.Connection, p.Connection]:
    return p.Connection(p.Role.CLIENT), p.Connection(p.Role.SERVER)


def relay(src: bytes, dst: p.Connection) -> list[p.Message]:
    dst.feed(src)
    out = []
    while (ev := dst.next_event()) is not p.NEED_DATA:
        assert not isinstance(ev, p.NeedData)
        out.append(_materialise(ev))
    return out


def test_conversation_in_memory() -> None:
    c, s = pair()
    assert relay(c.send(hello()), s) == [hello()]
    assert s.device_size == 1 << 20
    assert relay(s.send(welcome()), c) == [welcome()]
    relay(c.send(p.Stream(0)), s)
    batch = p.Data(rec(0, 0, 512, 1), W512)
    assert relay(c.send(batch), s) == [batch]
    relay(s.send(p.Ack(0, p.NO_SEQ)), c)
    relay(c.send(p.ScanBegin(1, p.ScanMode.HASH, p.ScanFlag.NONE, 65536)), s)
    assert c.phase is s.phase is p.Phase.SCANNING
    relay(c.send(p.ScanRequest(1, 0, 65536)), s)
    relay(s.send(p.ScanHashes(1, 0, bytes(16))), c)
    relay(c.send(p.ScanEnd(1, p.ScanEndFlag.NONE, 0, 0)), s)
    assert c.phase is s.phase is p.Phase.STREAMING
    relay(s.send(p.ScanDone(1, 0, 0)), c)  # replies may lag behind the client's phase
    relay(c.send(p.Goodbye(p.GoodbyeReason.SHUTDOWN)), s)
    assert c.phase is s.phase is p.Phase.CLOSED


@pytest.mark.parametrize(
    ("setup", "msg"),
    [
        ([], p.Stream(0)),
        ([hello()], hello()),
        ([hello(), welcome()], p.Data(b"", b"")),
        ([hello(), welcome(), p.Stream(0)], p.ScanRequest(1, 0, 512)),
        ([hello(), welcome(), p.ScanBegin(1, p.ScanMode.HASH, p.ScanFlag.NONE, 65536)], p.Data(b"", b"")),
    ],
)
def test_client_out_of_order_is_local_then_remote_error(setup: list[p.Message], msg: p.Message) -> None:
    c, s = pair()
    for m in setup:
        if isinstance(m, p.Welcome):
            relay(s.send(m), c)
        else:
            relay(c.send(m), s)
    with pytest.raises(p.LocalProtocolError) as ei:
        c.send(msg)
    assert ei.value.code is E.UNEXPECTED
    with pytest.raises(p.RemoteProtocolError) as ei2:
        relay(p.encode(msg), s)
    assert ei2.value.code is E.UNEXPECTED


def test_server_may_not_welcome_before_hello_and_error_is_raised_as_peer_error() -> None:
    c, s = pair()
    with pytest.raises(p.LocalProtocolError):
        s.send(welcome())
    relay(c.send(hello()), s)
    with pytest.raises(p.PeerError) as ei:
        relay(s.send(p.Error(E.SIZE_MISMATCH, "replica smaller")), c)
    assert ei.value.code is E.SIZE_MISMATCH
    assert "replica smaller" in str(ei.value)


def test_server_bounds_records_by_the_device_size_from_hello() -> None:
    c, s = pair()
    relay(c.send(hello()), s)
    relay(s.send(welcome()), c)
    relay(c.send(p.Stream(0)), s)
    with pytest.raises(p.RemoteProtocolError) as ei:
        relay(c.send(p.Data(rec(0, 2048, 512, 1), W512)), s)
    assert ei.value.code is E.OUT_OF_RANGE


# -- properties ---------------------------------------------------------------------------------------------------

u64 = st.integers(0, p.SEQ_MASK)
u32 = st.integers(0, 2**32 - 1)
ident = st.binary(min_size=16, max_size=16)
blk = st.sampled_from([512, 1024, 4096, 65536])
sizes = st.integers(1, 2**40).map(lambda n: n * 512)


@st.composite
def data_msgs(draw: st.DrawFn) -> p.Data:
    n = draw(st.integers(0, 12))
    first = draw(u64)
    recs, data = b"", b""
    for i in range(n):
        op = draw(st.sampled_from([1, 1, 2, 3, 4]))
        ln = 0 if op == 2 else draw(st.integers(0, 8)) * 512
        sector = draw(st.integers(0, 1000))
        flags = draw(st.integers(0, 7))
        recs += rec((first + i) & p.SEQ_MASK, sector, ln, op, flags)
        if op == 1:
            data += draw(st.binary(min_size=ln, max_size=ln))
    return p.Data(recs, data, draw(st.booleans()))


@st.composite
def scan_datas(draw: st.DrawFn) -> p.ScanData:
    blocks, data = [], b""
    for _ in range(draw(st.integers(0, 5))):
        ln = draw(st.integers(1, 8)) * 512
        zero = draw(st.booleans())
        blocks.append((draw(st.integers(0, 1000)) * 512, ln, int(p.BlockFlag.ZERO) if zero else 0))
        if not zero:
            data += draw(st.binary(min_size=ln, max_size=ln))
    return p.ScanData(draw(u32), tuple(blocks), data)


messages = st.one_of(
    st.builds(p.Hello, st.just(1), u32, blk, sizes, ident, ident),
    st.builds(p.Welcome, st.just(1), st.integers(0, 31).map(p.WelcomeFlag), u32, blk, u64, ident, ident, u64),
    st.builds(p.Error, st.sampled_from(list(E)), st.text(max_size=100)),
    st.builds(p.Stream, u64, st.sampled_from(list(p.StreamFlag))),
    data_msgs(),
    st.just(p.Sync()),
    st.builds(p.Ack, u64, u64),
    st.builds(
        p.ScanBegin,
        u32,
        st.sampled_from(list(p.ScanMode)),
        st.integers(0, 1).map(p.ScanFlag),
        st.sampled_from([4096, 65536, 1 << 20]),
    ),
    st.builds(p.ScanRequest, u32, st.integers(0, 2**40).map(lambda n: n * 512), st.integers(1, 2**30)),
    st.builds(p.ScanHashes, u32, u64, st.binary(max_size=10).map(lambda b: b * 16)),
    scan_datas(),
    st.builds(p.ScanEnd, u32, st.integers(0, 7).map(p.ScanEndFlag), u64, u64),
    st.builds(p.ScanDone, u32, u64, u64),
    st.builds(p.Goodbye, st.sampled_from(list(p.GoodbyeReason))),
    st.just(p.ResyncPending()),
    st.builds(
        p.AuthBegin,
        st.just(1),
        st.sampled_from(list(p.AuthFlag)),
        st.integers(1, 2**32 - 1),
        st.binary(min_size=32, max_size=32),
    ),
    st.builds(
        p.AuthChallenge,
        st.just(p.AuthMethod.HMAC_SHA256),
        st.sampled_from(list(p.AuthFlag)),
        st.binary(min_size=32, max_size=32),
    ),
    st.builds(p.AuthProof, st.binary(min_size=32, max_size=32)),
    st.builds(p.AuthOk, st.binary(min_size=32, max_size=32)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(messages, max_size=6), st.integers(1, 64))
def test_round_trip_in_chunks(msgs: list[p.Message], chunk: int) -> None:
    wire = b"".join(p.encode(m) for m in msgs)
    assert decode_all(wire, device_size=None) == msgs
    assert decode_all(wire, chunk=chunk, device_size=None) == msgs


def _decode_or_code(wire: bytes) -> None:
    """Garbage must either decode or fail with a RemoteProtocolError carrying a code, nothing else."""
    dec = p.FrameDecoder(max_payload=1 << 16)
    dec.feed(wire)
    dec.feed(b"")
    try:
        while (fr := dec.next_frame()) is not p.NEED_DATA:
            assert isinstance(fr, p.Frame)
            p.parse_payload(fr.type, fr.flags, fr.payload, 1 << 30)
    except p.RemoteProtocolError as exc:
        assert isinstance(exc.code, p.ErrorCode)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_is_rejected_with_a_code(garbage: bytes) -> None:
    _decode_or_code(garbage)


@settings(max_examples=300, deadline=None)
@given(messages, st.data())
def test_truncated_frame_is_rejected(msg: p.Message, data: st.DataObject) -> None:
    wire = p.encode(msg)
    cut = data.draw(st.integers(1, len(wire) - 1))
    dec = p.FrameDecoder()
    dec.feed(wire[:cut])
    assert dec.next_frame() is p.NEED_DATA
    dec.feed(b"")
    with pytest.raises(p.RemoteProtocolError) as ei:
        dec.next_frame()
    assert ei.value.code is E.TRUNCATED


@settings(max_examples=300, deadline=None)
@given(messages, st.data())
def test_mutated_frame_decodes_or_fails_with_code(msg: p.Message, data: st.DataObject) -> None:
    wire = bytearray(p.encode(msg))
    i = data.draw(st.integers(0, len(wire) - 1))
    wire[i] ^= data.draw(st.integers(1, 255))
    _decode_or_code(bytes(wire))


# -- authentication phase -----------------------------------------------------------------------------------------


def auth_pair() -> tuple[p.Connection, p.Connection]:
    return p.Connection(p.Role.CLIENT, auth=True), p.Connection(p.Role.SERVER, auth=True)


def test_auth_conversation_in_order_then_hello() -> None:
    c, s = auth_pair()
    assert c.phase is s.phase is p.Phase.AUTH and not s.authenticated
    begin = p.AuthBegin(1, p.AuthFlag.NONE, 1, NC)
    assert relay(c.send(begin), s) == [begin]
    relay(s.send(p.AuthChallenge(p.AuthMethod.HMAC_SHA256, p.AuthFlag.NONE, NS)), c)
    relay(c.send(p.AuthProof(MAC)), s)
    assert not s.authenticated
    relay(s.send(p.AuthOk(MAC)), c)
    assert c.phase is s.phase is p.Phase.HANDSHAKE and c.authenticated and s.authenticated
    assert relay(c.send(hello()), s) == [hello()]
    relay(s.send(welcome()), c)
    assert c.phase is s.phase is p.Phase.READY


@pytest.mark.parametrize(
    ("setup", "msg", "code"),
    [
        ([], hello(), E.AUTH_REQUIRED),  # HELLO before the exchange
        ([], p.AuthProof(MAC), E.UNEXPECTED),  # a proof before any challenge
        ([p.AuthBegin(1, p.AuthFlag.NONE, 1, NC)], p.AuthBegin(1, p.AuthFlag.NONE, 1, NC), E.UNEXPECTED),
        ([p.AuthBegin(1, p.AuthFlag.NONE, 1, NC)], hello(), E.AUTH_REQUIRED),
        ([p.AuthBegin(1, p.AuthFlag.NONE, 1, NC)], p.Stream(0), E.UNEXPECTED),
    ],
)
def test_client_out_of_order_in_auth(setup: list[p.Message], msg: p.Message, code: E) -> None:
    s = p.Connection(p.Role.SERVER, auth=True)
    for m in setup:
        relay(p.encode(m), s)
    with pytest.raises(p.RemoteProtocolError) as ei:
        relay(p.encode(msg), s)
    assert ei.value.code is code


def test_server_without_auth_refuses_auth_begin_with_a_reason() -> None:
    s = p.Connection(p.Role.SERVER)
    with pytest.raises(p.RemoteProtocolError) as ei:
        relay(p.encode(p.AuthBegin(1, p.AuthFlag.NONE, 1, NC)), s)
    assert ei.value.code is E.AUTH_FAILED and "--secret-file" in ei.value.message


def test_server_may_not_skip_the_challenge() -> None:
    c, s = auth_pair()
    relay(c.send(p.AuthBegin(1, p.AuthFlag.NONE, 1, NC)), s)
    with pytest.raises(p.LocalProtocolError):
        s.send(p.AuthOk(MAC))
    with pytest.raises(p.LocalProtocolError):
        s.send(welcome())


def test_handshake_frames_are_capped_until_welcome() -> None:
    s = p.Connection(p.Role.SERVER)
    s.feed(struct.pack("<IBBH", p.HANDSHAKE_MAX_PAYLOAD + 1, p.MsgType.HELLO, 0, 0))
    with pytest.raises(p.RemoteProtocolError) as ei:
        s.next_event()
    assert ei.value.code is E.FRAME_TOO_LARGE
    c, s = pair()
    relay(c.send(hello()), s)
    relay(s.send(welcome()), c)
    assert s.decoder.max_payload == c.decoder.max_payload == p.MAX_PAYLOAD


def test_data_before_hello_is_refused_before_its_payload_is_parsed() -> None:
    s = p.Connection(p.Role.SERVER)
    # a DATA frame whose record would be out of range for any device: the phase check comes first
    with pytest.raises(p.RemoteProtocolError) as ei:
        relay(frame(5, data_payload(rec(0, 1 << 50, 512, 1), W512)), s)
    assert ei.value.code is E.UNEXPECTED
