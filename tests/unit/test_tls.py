"""The server's TLS connection over memory BIOs (tls.ServerTls), against a real ssl client over a socket pair."""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bdr.security import certs, tls


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return certs.make(tmp_path_factory.mktemp("pki"), ("127.0.0.1",)).out


@pytest.fixture
def pair(pki: Path) -> Iterator[tuple[tls.ServerTls, ssl.SSLSocket]]:
    """A ServerTls and the client SSL socket it talks to, handshake done."""
    a, b = socket.socketpair()
    server = tls.ServerTls(
        a, tls.server_context(str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem"))
    )
    cctx = tls.client_context(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"))
    client = cctx.wrap_socket(b, server_hostname="127.0.0.1", do_handshake_on_connect=False)
    t = threading.Thread(target=client.do_handshake)
    t.start()
    server.handshake(5.0)
    t.join(5)
    assert server.version() == "TLSv1.3" and tls.peer_subject(server) == "bdr-client"
    yield server, client
    client.close()
    server.close()


def read_exactly(server: tls.ServerTls, n: int) -> tuple[bytes, list[int]]:
    buf = memoryview(bytearray(n))
    got, calls = 0, []
    while got < n:
        k = server.recv_into(buf[got:])
        assert k > 0, "closed early"
        calls.append(k)
        got += k
    return bytes(buf), calls


def test_one_receive_takes_many_records(pair: tuple[tls.ServerTls, ssl.SSLSocket]) -> None:
    server, client = pair
    data = os.urandom(100 * 1024)  # seven 16 KiB records
    client.sendall(data)
    time.sleep(0.2)  # all of it in the socket
    head, _ = read_exactly(server, 10)
    assert server.pending() > 0  # poll() cannot see what was already taken from the socket
    rest, calls = read_exactly(server, len(data) - 10)
    assert head + rest == data
    assert calls[0] > 16 * 1024, calls  # more than one record per call


def test_replies_reach_the_client(pair: tuple[tls.ServerTls, ssl.SSLSocket]) -> None:
    server, client = pair
    server.settimeout(5.0)
    server.sendall(b"ack" * 10000)
    got = b""
    while len(got) < 30000:
        got += client.recv(65536)
    assert got == b"ack" * 10000


def test_peer_close_reads_as_zero(pair: tuple[tls.ServerTls, ssl.SSLSocket]) -> None:
    server, client = pair
    client.sendall(b"last words")
    client.close()
    got, _ = read_exactly(server, 10)
    assert got == b"last words"
    server.settimeout(5.0)
    assert server.recv_into(memoryview(bytearray(100))) == 0


def test_a_silent_peer_times_out(pair: tuple[tls.ServerTls, ssl.SSLSocket]) -> None:
    server, _ = pair
    server.settimeout(0.3)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        server.recv_into(memoryview(bytearray(100)))
    assert 0.25 < time.monotonic() - t0 < 3


def test_handshake_of_a_silent_peer_times_out(pki: Path) -> None:
    a, b = socket.socketpair()
    with a, b:
        server = tls.ServerTls(a, tls.server_context(str(pki / "server.pem"), str(pki / "server.key"), None))
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="TLS handshake not finished"):
            server.handshake(0.5)
        assert time.monotonic() - t0 < 3
        with pytest.raises(InterruptedError):
            server.handshake(10.0, stop=lambda: True)
        b.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then the peer goes away
        b.shutdown(socket.SHUT_WR)
        t0 = time.monotonic()
        with pytest.raises(ssl.SSLError):
            server.handshake(10.0)
        assert time.monotonic() - t0 < 1


def test_a_bad_handshake_sends_the_alert(pki: Path, tmp_path: Path) -> None:
    other = certs.make(tmp_path / "other", ("127.0.0.1",)).out
    a, b = socket.socketpair()
    server = tls.ServerTls(
        a, tls.server_context(str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem"))
    )
    cctx = tls.client_context(str(pki / "ca.pem"), str(other / "client.pem"), str(other / "client.key"))
    client = cctx.wrap_socket(b, server_hostname="127.0.0.1", do_handshake_on_connect=False)
    errors: list[BaseException] = []

    def run_client() -> None:
        try:
            client.do_handshake()
            client.recv(10)  # TLS 1.3: the client hears of a refused certificate on its first read
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    t = threading.Thread(target=run_client)
    t.start()
    with pytest.raises(ssl.SSLCertVerificationError):
        server.handshake(5.0)
    t.join(5)
    server.close()
    client.close()
    assert errors and "UNKNOWN_CA" in str(errors[0])
