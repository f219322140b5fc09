"""The client's connection to the server: TCP with the socket options streaming needs, then the TLS handshake
when TLS is on, and the channel binding the shared-secret exchange is tied to."""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import Callable

from ..daemon.sockets import keepalive
from ..security import auth, tls

log = logging.getLogger("bdr.client")

CONNECT_TIMEOUT = 10.0  # a few SYN retransmissions on a lossy link
IO_TIMEOUT = 30.0


def connect_tcp(address: str, port: int) -> socket.socket:
    sock = socket.create_connection((address, port), timeout=CONNECT_TIMEOUT)
    # blocking mode, so that MSG_DONTWAIT receives return at once; sends give up after IO_TIMEOUT
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(IO_TIMEOUT), 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    keepalive(sock)
    return sock


def connect(
    args: argparse.Namespace, tls_ctx: ssl.SSLContext | None, stopping: Callable[[], bool]
) -> tuple[socket.socket | tls.TlsStream, bytes]:
    """A connected socket (TLS handshake done when TLS is on) and the TLS channel binding (b"" without)."""
    sock = connect_tcp(args.address, args.port)
    if tls_ctx is None:
        return sock, b""
    name = args.tls_server_name or args.address
    try:
        ssock = tls_ctx.wrap_socket(sock, server_hostname=name, do_handshake_on_connect=False)
        tls.handshake(ssock, IO_TIMEOUT, stopping)
        cert = ssock.getpeercert(binary_form=True)
    except BaseException:
        sock.close()
        raise
    assert cert is not None
    log.info("TLS %s with %s, server certificate %r verified", ssock.version(), name, tls.peer_subject(ssock))
    return tls.TlsStream(ssock, IO_TIMEOUT), auth.server_end_point(cert)
