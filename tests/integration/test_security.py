"""Real daemons over loopback: mutual TLS, shared secret, the safe default, and peers that must be refused.

Every refusal test ends by checking that the replica file is byte for byte what it was before: nothing from an
unauthenticated peer reached it.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import struct
import time
from pathlib import Path

import pytest

from bdr import wire as p
from bdr.journal import JFlag, Journal
from bdr.security import certs

from .conftest import Lab, Writer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two unrelated CAs, each with a server certificate for 127.0.0.1 and a client certificate."""
    base = tmp_path_factory.mktemp("pki")
    good = certs.make(base / "good", ("127.0.0.1", "localhost")).out
    other = certs.make(base / "other", ("127.0.0.1",), client_name="intruder").out
    (base / "secret").write_text("correct horse battery staple 1234\n")
    (base / "wrong").write_text("incorrect horse battery staple 99\n")
    for f in ("secret", "wrong"):
        (base / f).chmod(0o600)
    return {"good": good, "other": other, "secret": base / "secret", "wrong": base / "wrong"}


def server_tls(d: Path, ca: Path | None = None) -> tuple[str, ...]:
    return (
        "--tls-cert",
        str(d / "server.pem"),
        "--tls-key",
        str(d / "server.key"),
        "--tls-ca",
        str(ca or d / "ca.pem"),
    )


def client_tls(d: Path, ca: Path | None = None) -> tuple[str, ...]:
    return (
        "--tls-ca",
        str(ca or d / "ca.pem"),
        "--tls-cert",
        str(d / "client.pem"),
        "--tls-key",
        str(d / "client.key"),
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def seeded(lab: Lab) -> str:
    """Images with a random source and a replica with known content; the replica's checksum."""
    lab.images(src_random=True, seed=11)
    lab.replica.write_bytes(bytes(range(256)) * (lab.src.stat().st_size // 256))
    lab.make_producer()
    return digest(lab.replica)


def test_mutual_tls_with_secret_replicates(lab: Lab, pki: dict[str, Path]) -> None:
    lab.images(src_random=True, seed=12)
    prod = lab.make_producer()
    srv = lab.server(*server_tls(pki["good"]), "--secret-file", str(pki["secret"]))
    srv.wait_log("listening on")
    assert "security: TLS, client certificates checked against" in srv.log()
    cli = lab.client(*client_tls(pki["good"]), "--secret-file", str(pki["secret"]))
    Writer(prod, 1500, seed=13).join()
    lab.wait_drained()
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert lab.identical()
    assert re.search(r"client .*: TLS TLSv1\.3, client certificate 'bdr-client'", srv.log())
    assert "authenticated (shared secret, TLS-bound)" in srv.log()
    assert "server 127.0.0.1:" in cli.log() and "authenticated (shared secret)" in cli.log()


def test_secret_without_tls_replicates(lab: Lab, pki: dict[str, Path]) -> None:
    lab.images(src_random=True, seed=14)
    prod = lab.make_producer()
    srv = lab.server("--secret-file", str(pki["secret"]))
    srv.wait_log("listening on")
    cli = lab.client("--secret-file", str(pki["secret"]))
    Writer(prod, 500, seed=15).join()
    lab.wait_drained()
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert lab.identical()


def test_client_certificate_from_another_ca_is_refused(lab: Lab, pki: dict[str, Path]) -> None:
    before = seeded(lab)
    srv = lab.server(*server_tls(pki["good"]))
    srv.wait_log("listening on")
    # the client trusts the right CA for the server, but its own certificate comes from another CA
    cli = lab.client(*client_tls(pki["other"], ca=pki["good"] / "ca.pem"))
    srv.wait_log(r"refused: TLS handshake failed: certificate verification failed")
    cli.wait_log(r"ERROR: TLS session with .* refused: TLSV1_ALERT_UNKNOWN_CA: .*; retrying in 30s")
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert digest(lab.replica) == before
    assert "WELCOME" not in srv.log() and "scan" not in cli.log()


def test_client_without_certificate_is_refused(lab: Lab, pki: dict[str, Path]) -> None:
    before = seeded(lab)
    srv = lab.server(*server_tls(pki["good"]))
    srv.wait_log("listening on")
    cli = lab.client("--tls-ca", str(pki["good"] / "ca.pem"))
    srv.wait_log(r"refused: TLS handshake failed: .*certificate")
    cli.wait_log(r"ERROR: TLS session with .* refused: .*requires a client certificate")
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert digest(lab.replica) == before


def test_server_certificate_from_another_ca_is_refused_by_the_client(lab: Lab, pki: dict[str, Path]) -> None:
    before = seeded(lab)
    srv = lab.server(*server_tls(pki["other"], ca=pki["good"] / "ca.pem"))  # an impostor's certificate
    srv.wait_log("listening on")
    cli = lab.client(*client_tls(pki["good"]))
    cli.wait_log(r"ERROR: TLS handshake with .* failed: certificate verification failed: .*; retrying in 30s")
    srv.wait_log(r"refused: TLS handshake failed")
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert digest(lab.replica) == before


def test_wrong_secret_is_refused_both_ways(lab: Lab, pki: dict[str, Path]) -> None:
    before = seeded(lab)
    srv = lab.server("--secret-file", str(pki["secret"]))
    srv.wait_log("listening on")
    cli = lab.client("--secret-file", str(pki["wrong"]))
    srv.wait_log(r"authentication failed: wrong shared secret")
    cli.wait_log(r"ERROR: server .* refused us: wrong shared secret.*; retrying in 30s")
    assert cli.stop() == 0
    cli2 = lab.client()  # no secret at all
    srv.wait_log(r"authentication failed: the server requires shared-secret authentication first")
    cli2.wait_log(r"ERROR: server .* refused us: the server requires shared-secret authentication")
    assert cli2.stop() == 0
    assert srv.stop() == 0
    assert digest(lab.replica) == before
    h = Journal(lab.journal).header
    assert not h.flags & JFlag.SOURCE_KNOWN and h.generation == 0  # the metadata was never written either


def test_server_without_the_secret_refuses_a_client_that_has_one(lab: Lab, pki: dict[str, Path]) -> None:
    before = seeded(lab)
    srv = lab.server()
    srv.wait_log("listening on")
    cli = lab.client("--secret-file", str(pki["secret"]))
    cli.wait_log(r"ERROR: server .* refused us: .*the server has no secret")
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert digest(lab.replica) == before


def test_no_credentials_on_a_non_loopback_address_refuses_to_start(lab: Lab, pki: dict[str, Path]) -> None:
    before = seeded(lab)
    for address in ("0.0.0.0", "::"):
        srv = lab.server("--address", address)  # later flags win
        assert srv.wait() == 2
        log = srv.log()
        assert f"refusing to listen on {address} without client authentication" in log, log
        assert "--tls-ca" in log and "--secret-file" in log and "--insecure" in log
        srv.log_path.unlink()
    # TLS without client certificates does not authenticate clients either
    srv = lab.server(
        "--address",
        "0.0.0.0",
        "--tls-cert",
        str(pki["good"] / "server.pem"),
        "--tls-key",
        str(pki["good"] / "server.key"),
    )
    assert srv.wait() == 2
    assert "without client authentication" in srv.log()
    assert not lab.journal.exists()  # refused before touching the journal
    assert digest(lab.replica) == before


def test_plaintext_client_against_tls_server_is_refused(lab: Lab, pki: dict[str, Path]) -> None:
    before = seeded(lab)
    srv = lab.server(*server_tls(pki["good"]))
    srv.wait_log("listening on")
    cli = lab.client()
    srv.wait_log(r"refused: a plaintext connection to a TLS server")
    cli.wait_log(r"ERROR: server .* refused us: this server requires TLS: give the client --tls-ca")
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert digest(lab.replica) == before


def test_tls_client_against_plaintext_server_is_refused(lab: Lab, pki: dict[str, Path]) -> None:
    before = seeded(lab)
    srv = lab.server()
    srv.wait_log("listening on")
    cli = lab.client(*client_tls(pki["good"]))
    srv.wait_log(r"the client speaks TLS, this server has no --tls-cert")
    cli.wait_log(r"ERROR: TLS handshake with .* failed")
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert digest(lab.replica) == before


# -- hostile peers against a real daemon ------------------------------------------------------------------------


def _connect(lab: Lab) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", lab.port), timeout=5)
    s.settimeout(5)
    return s


def _read_error(s: socket.socket) -> p.Error:
    dec = p.FrameDecoder()
    while True:
        data = s.recv(65536)
        dec.feed(data)
        fr = dec.next_frame()
        if fr is not p.NEED_DATA:
            assert isinstance(fr, p.Frame)
            msg = p.parse_payload(fr.type, fr.flags, fr.payload)
            assert isinstance(msg, p.Error), msg
            return msg
        assert data, "closed without an ERROR"


def test_garbage_oversized_frames_and_a_second_client_are_refused(lab: Lab, pki: dict[str, Path]) -> None:
    before = seeded(lab)
    srv = lab.server("--secret-file", str(pki["secret"]))
    srv.wait_log("listening on")
    with _connect(lab) as s:  # garbage
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_error(s).code in (p.ErrorCode.FRAME_TOO_LARGE, p.ErrorCode.BAD_TYPE)
    srv.wait_log(r"client 127\.0\.0\.1:\d+: protocol error from client", count=1)
    with _connect(lab) as s:  # a frame too large for the handshake: refused before its payload arrives
        s.sendall(struct.pack("<IBBH", 1 << 20, p.MsgType.AUTH_BEGIN, 0, 0))
        assert _read_error(s).code is p.ErrorCode.FRAME_TOO_LARGE
    with _connect(lab) as s:  # DATA before anything: refused, never parsed
        frame = p.encode(p.Data(struct.pack("<QQIHHQ", 0, 0, 512, 1, 0, 0), b"\xee" * 512))
        s.sendall(frame)
        err = _read_error(s)
        assert err.code is p.ErrorCode.UNEXPECTED, err
    # a client that authenticated holds the slot: a second one is refused as busy, with a logged reason
    (first, _), (second, conn) = _authenticated(lab, pki["secret"]), _authenticated(lab, pki["secret"])
    with second:
        assert _error_after(second, conn).code is p.ErrorCode.BUSY
    srv.wait_log(r"refusing connection from 127\.0\.0\.1:\d+: already serving 127\.0\.0\.1:\d+")
    first.close()
    srv.wait_log(r"client 127\.0\.0\.1:\d+ disconnected", count=1)
    assert srv.proc is not None and srv.proc.poll() is None  # still serving
    assert srv.stop() == 0
    assert digest(lab.replica) == before


def _authenticated(lab: Lab, secret: Path) -> tuple[socket.socket, p.Connection]:
    """A connection that proved the shared secret (AUTH_OK received), and no further; and its protocol state
    (which may hold what the server sent next)."""
    from bdr.security import auth as authmod

    s = _connect(lab)
    c = p.Connection(p.Role.CLIENT, auth=True)
    ca = authmod.ClientAuth(secret.read_bytes().strip())
    s.sendall(c.send(ca.begin()))
    for expect in (p.AuthChallenge, p.AuthOk):
        while (ev := c.next_event()) is p.NEED_DATA:
            c.feed(s.recv(4096))
        assert isinstance(ev, expect), ev
        if isinstance(ev, p.AuthChallenge):
            s.sendall(c.send(ca.on_challenge(ev)))
    return s, c


def test_stalled_and_flooding_peers_do_not_lock_out_the_client(lab: Lab, pki: dict[str, Path]) -> None:
    """Unauthenticated connections are handled beside the session, a few per host: a peer that connects
    and stalls, or floods the port, keeps the real client out neither before nor during its session."""
    lab.images(src_random=True, seed=16)
    prod = lab.make_producer()
    srv = lab.server("--secret-file", str(pki["secret"]))
    srv.wait_log("listening on")
    stalled = []
    for _ in range(4):  # from another loopback address: the per-host limit is the flooder's alone
        s = socket.create_connection(("127.0.0.1", lab.port), timeout=5, source_address=("127.0.0.2", 0))
        s.sendall(p.encode(p.AuthBegin(1, p.AuthFlag.NONE, 1, b"n" * 32)))  # and never proves anything
        stalled.append(s)
    srv.wait_log(r"client 127\.0\.0\.2:\d+ connected", count=4)
    for _ in range(20):  # the flood beyond the limit is closed at once (recv would time out otherwise)
        with (
            socket.create_connection(
                ("127.0.0.1", lab.port), timeout=5, source_address=("127.0.0.2", 0)
            ) as s,
            contextlib.suppress(ConnectionResetError),
        ):
            assert s.recv(100) == b""
    srv.wait_log(
        r"refusing connection from 127\.0\.0\.2:\d+: 4 connections already authenticating \(4 from 127\.0\.0\.2\)"
    )
    assert srv.log().count("already authenticating") == 1  # the flood is one line in the log
    cli = lab.client("--secret-file", str(pki["secret"]))  # while the stalled ones still hold their sockets
    Writer(prod, 800, seed=17).join()
    lab.wait_drained()
    for s in stalled:
        s.close()
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert lab.identical()
    assert "authenticated (shared secret)" in cli.log() and "already serves" not in cli.log()


# -- timeouts of the daemon's loop, in process (shortened) -------------------------------------------------------


@pytest.fixture
def inproc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pki: dict[str, Path]):  # type: ignore[no-untyped-def]
    import argparse
    import threading

    from bdr.server import daemon as srvmod

    monkeypatch.setattr(srvmod, "HANDSHAKE_TIMEOUT", 1.0)
    monkeypatch.setattr(srvmod, "FRAME_TIMEOUT", 1.5)
    img = tmp_path / "replica.img"
    img.write_bytes(b"\x33" * (1 << 20))
    args = argparse.Namespace(
        address="127.0.0.1",
        port=0,
        target_device=str(img),
        journal=str(tmp_path / "journal"),
        benchmark=False,
        secret_file=str(pki["secret"]),
        tls_cert=None,
        tls_key=None,
        tls_ca=None,
        insecure=False,
    )
    server = srvmod.Server(args)
    lst = server.listen()
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    yield server, lst.getsockname()[1], img
    server.stopping = True
    t.join(10)
    server.close()


def _error_after(s: socket.socket, conn: p.Connection | None = None) -> p.Error:
    """Read what the server sends until its ERROR (an AUTH_CHALLENGE or WELCOME may come first)."""
    conn = conn or p.Connection(p.Role.CLIENT, auth=True)
    while True:
        try:
            ev = conn.next_event()
        except p.PeerError as exc:
            return p.Error(exc.code, exc.message)
        if ev is p.NEED_DATA:
            data = s.recv(65536)
            assert data, "closed without an ERROR"
            conn.feed(data)


def _closed_with(port: int, send: p.Message | None) -> tuple[p.Error, float]:
    conn = p.Connection(p.Role.CLIENT, auth=True)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        t0 = time.monotonic()
        if send is not None:
            s.sendall(conn.send(send))
        return _error_after(s, conn), time.monotonic() - t0


def test_silent_peer_is_dropped_after_the_handshake_timeout(inproc) -> None:  # type: ignore[no-untyped-def]
    server, port, img = inproc
    before = img.read_bytes()
    err, took = _closed_with(port, None)  # connects, says nothing
    assert err.code is p.ErrorCode.UNEXPECTED and "no complete handshake within 1s" in err.message
    assert 0.9 < took < 5
    err, took = _closed_with(port, p.AuthBegin(1, p.AuthFlag.NONE, 1, b"n" * 32))  # and never proves
    assert err.code is p.ErrorCode.UNEXPECTED and "no complete handshake" in err.message
    assert 0.9 < took < 5
    assert server.errors == 2  # what bdr status shows of the refusals
    assert re.fullmatch(
        r"client 127\.0\.0\.1:\d+: refused: no complete handshake within 1s", server.last_error
    )
    assert img.read_bytes() == before


def test_peer_stalling_mid_frame_is_dropped(inproc, pki: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    from bdr.security import auth as authmod

    _, port, img = inproc
    before = img.read_bytes()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        # authenticate and finish the handshake, then send half a DATA frame and stall
        c = p.Connection(p.Role.CLIENT, auth=True)
        ca = authmod.ClientAuth(pki["secret"].read_bytes().strip())

        def reply() -> p.Message:
            while True:
                ev = c.next_event()
                if ev is not p.NEED_DATA:
                    assert not isinstance(ev, p.NeedData), ev
                    return ev
                c.feed(s.recv(4096))

        s.sendall(c.send(ca.begin()))
        ch = reply()
        assert isinstance(ch, p.AuthChallenge)
        s.sendall(c.send(ca.on_challenge(ch)))
        ok = reply()
        assert isinstance(ok, p.AuthOk)
        ca.on_ok(ok)
        s.sendall(c.send(p.Hello(1, p.ALL_FEATURES, 512, 1 << 20, b"s" * 16, b"r" * 16)))
        assert isinstance(reply(), p.Welcome)
        t0 = time.monotonic()
        data = p.encode(p.Data(struct.pack("<QQIHHQ", 1, 0, 512, 1, 0, 0), b"\x55" * 512, False))
        s.sendall(data[: len(data) // 2])
        err = _error_after(s, c)
        assert err.code is p.ErrorCode.TRUNCATED and "stalled in the middle of a frame" in err.message
        assert 1.4 < time.monotonic() - t0 < 6
    assert img.read_bytes() == before
