"""Fuzzing (hypothesis): the frame decoder, the server session (sans-io) and the server's receive loop over a
socketpair, fed arbitrary bytes and mangled frames.

In the ordinary suite each test runs a bounded number of examples (a few seconds in all); ``make fuzz`` runs
many more (BDR_FUZZ_EXAMPLES).  Properties: the decoder either yields frames or fails with a coded
RemoteProtocolError, the same way however the bytes are cut; the server session ends only with SessionClosed;
before authentication nothing reaches the replica or its metadata, and after a HELLO no write lands beyond the
device size the client announced.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server_splice import serve_one

from bdr import wire as p
from bdr.journal import Journal
from bdr.security import auth
from bdr.server import Applier, Replica, Server, ServerSession, SessionClosed

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("BDR_FUZZ_EXAMPLES", "0"))
REPLICA = 1 << 20
DEVICE = REPLICA - 65536  # what the fuzzed client announces: the last 64 KiB must never be written
SECRET = b"fuzzing-secret-0123456789"


def fuzz_settings(default: int) -> settings:
    return settings(
        max_examples=EXAMPLES or default,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
        derandomize=not EXAMPLES,  # the ordinary suite is reproducible; make fuzz explores
    )


# -- input: raw bytes, well-formed frames of every type with random fields, and frames mangled afterwards -------

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
small_off = st.integers(0, REPLICA // 512 + 256).map(lambda n: n * 512)


@st.composite
def data_frames(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(0, 6))
    first = draw(u64)
    recs, data = b"", b""
    for i in range(n):
        op = draw(st.sampled_from([1, 1, 2, 3, 4]))
        ln = 0 if op == 2 else draw(st.integers(0, 16)) * 512
        sector = draw(small_off) // 512
        recs += struct.pack("<QQIHHQ", (first + i) & p.SEQ_MASK, sector, ln, op, draw(st.integers(0, 1)), 0)
        if op == 1:
            data += b"\xaa" * ln
    return p.encode(p.Data(recs, data, draw(st.booleans())))


@st.composite
def scan_data_frames(draw: st.DrawFn) -> bytes:
    blocks, data = [], b""
    for _ in range(draw(st.integers(0, 4))):
        ln = draw(st.integers(1, 16)) * 512
        zero = draw(st.booleans())
        blocks.append((draw(small_off), ln, int(p.BlockFlag.ZERO) if zero else 0))
        if not zero:
            data += b"\xbb" * ln
    return p.encode(p.ScanData(draw(st.integers(0, 3)), tuple(blocks), data))


def hello_frame(size: int = DEVICE) -> bytes:
    return p.encode(p.Hello(1, p.ALL_FEATURES, 512, size, b"s" * 16, b"r" * 16))


valid_frames = st.one_of(
    st.just(hello_frame()),
    st.builds(lambda f: p.encode(p.Stream(0, p.StreamFlag(f))), st.integers(0, 1)),
    data_frames(),
    scan_data_frames(),
    st.just(p.encode(p.Sync())),
    st.just(p.encode(p.ResyncPending())),
    st.builds(
        lambda i, m, f: p.encode(p.ScanBegin(i, p.ScanMode(m), p.ScanFlag(f), 65536)),
        st.integers(0, 3),
        st.integers(1, 2),
        st.integers(0, 3),
    ),
    st.builds(lambda i, o: p.encode(p.ScanRequest(i, o, 65536)), st.integers(0, 3), small_off),
    st.builds(
        lambda i, f, r: p.encode(p.ScanEnd(i, p.ScanEndFlag(f), r, r)),
        st.integers(0, 3),
        st.integers(0, 7),
        u64,
    ),
    st.builds(lambda n: p.encode(p.AuthBegin(1, p.AuthFlag.NONE, 1, n)), st.binary(min_size=32, max_size=32)),
    st.builds(lambda m: p.encode(p.AuthProof(m)), st.binary(min_size=32, max_size=32)),
    st.just(p.encode(p.Goodbye(p.GoodbyeReason.SHUTDOWN))),
    st.builds(
        lambda c, t: p.encode(p.Error(p.ErrorCode(c), t)),
        st.sampled_from([int(c) for c in p.ErrorCode]),
        st.text(max_size=20),
    ),
)


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    wire = bytearray(draw(valid_frames))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(wire) - 1))
        wire[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        wire = wire[: draw(st.integers(0, len(wire)))]
    return bytes(wire)


headers = st.builds(
    lambda ln, t, f, r: struct.pack("<IBBH", ln, t, f, r),
    st.one_of(st.integers(0, 64), u32),
    st.integers(0, 255),
    st.integers(0, 3),
    st.sampled_from([0, 0, 0, 1]),
)
pieces = st.one_of(valid_frames, mangled(), headers, st.binary(max_size=64))
streams = st.lists(pieces, max_size=8).map(b"".join)


# -- the decoder ----------------------------------------------------------------------------------------------------


def decode(wire: bytes, cuts: list[int]) -> tuple[list[tuple[int, int, bytes]], p.ErrorCode | None]:
    dec = p.FrameDecoder(max_payload=1 << 16, min_buffer=64)
    frames: list[tuple[int, int, bytes]] = []
    pos = 0
    try:
        for cut in [*sorted(cuts), len(wire)]:
            if cut > pos:
                dec.feed(wire[pos:cut])
                pos = cut
            while (fr := dec.next_frame()) is not p.NEED_DATA:
                assert isinstance(fr, p.Frame)
                p.parse_payload(fr.type, fr.flags, fr.payload, DEVICE)
                frames.append((fr.type, fr.flags, bytes(fr.payload)))
        dec.feed(b"")
        assert dec.next_frame() is p.NEED_DATA
    except p.RemoteProtocolError as exc:
        assert isinstance(exc.code, p.ErrorCode)
        return frames, exc.code
    return frames, None


@fuzz_settings(250)
@given(streams, st.lists(st.integers(0, 600), max_size=6))
def test_decoder_same_result_however_the_bytes_are_cut(wire: bytes, cuts: list[int]) -> None:
    cuts = [c for c in cuts if c <= len(wire)]
    assert decode(wire, cuts) == decode(wire, [])


# -- the server session, sans-io -------------------------------------------------------------------------------------


class Env:
    def __init__(self, tmp: Path) -> None:
        self.img = tmp / "replica.img"
        self.img.write_bytes(os.urandom(REPLICA))
        self.content = self.img.read_bytes()
        self.replica = Replica(self.img)
        self.journal = Journal(tmp / "journal")
        self.generation = self.journal.header.generation

    def session(self, secret: bool) -> ServerSession:
        server_auth = auth.ServerAuth(SECRET) if secret else None
        return ServerSession(
            self.replica, self.journal, Applier(self.replica, self.journal), "fuzz", server_auth
        )

    def close(self) -> None:
        self.replica.close()
        self.journal.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("fuzz"))
    yield e
    e.close()


def run_session(sess: ServerSession, wire: bytes, chunk: int) -> None:
    """Feed the stream in chunks, as a socket would; only SessionClosed may end it."""
    try:
        for i in range(0, len(wire), chunk):
            sess.conn.feed(wire[i : i + chunk])
            sess.receive()
        sess.conn.feed(b"")
        sess.receive()
    except SessionClosed as exc:
        assert not exc.fatal, exc.reason  # fuzzed input is never a storage error


@fuzz_settings(200)
@given(streams, st.integers(1, 4096))
def test_unauthenticated_input_never_touches_the_replica(env: Env, wire: bytes, chunk: int) -> None:
    run_session(env.session(secret=True), wire, chunk)
    assert os.pread(env.replica.fd, REPLICA, 0) == env.content
    assert env.journal.header.generation == env.generation


@fuzz_settings(200)
@given(streams, st.integers(1, 4096))
def test_input_after_hello_never_writes_beyond_the_announced_device(
    env: Env, wire: bytes, chunk: int
) -> None:
    """Without a secret a well-formed conversation may write, but only inside [0, DEVICE)."""
    run_session(env.session(secret=False), hello_frame() + wire, chunk)
    assert os.pread(env.replica.fd, REPLICA - DEVICE, DEVICE) == env.content[DEVICE:]
    assert os.fstat(env.replica.fd).st_size == REPLICA


# -- the daemon's receive loop over loopback TCP ---------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, bytes]]:
    tmp = tmp_path_factory.mktemp("fuzzd")
    img = tmp / "replica.img"
    img.write_bytes(os.urandom(REPLICA))
    secret = tmp / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    args = argparse.Namespace(
        address="127.0.0.1",
        port=0,
        target_device=str(img),
        journal=str(tmp / "journal"),
        benchmark=False,
        tls_cert=None,
        tls_key=None,
        tls_ca=None,
        secret_file=str(secret),
        insecure=False,
    )
    server = Server(args)
    server.listen()
    yield server, img.read_bytes()
    server.close()


@fuzz_settings(40)
@given(streams)
def test_daemon_loop_refuses_fuzzed_streams(daemon: tuple[Server, bytes], wire: bytes) -> None:
    server, content = daemon
    with socket.create_server(("127.0.0.1", 0)) as lst:  # a loopback TCP pair, as the daemon gets
        a = socket.create_connection(lst.getsockname())
        b, _ = lst.accept()
    t = threading.Thread(target=serve_one, args=(server, b, "fuzz"), daemon=True)
    t.start()
    try:
        a.settimeout(5)
        a.sendall(wire)
        a.shutdown(socket.SHUT_WR)
        while a.recv(65536):
            pass
    except OSError:
        pass
    finally:
        t.join(10)
        a.close()
    assert not t.is_alive()
    assert os.pread(server.replica.fd, REPLICA, 0) == content
    assert server.failed is None and not server.stopping
