"""Socket handling shared by both daemons: TCP keepalive, and a close that lets the last bytes reach the peer."""

from __future__ import annotations

import socket
import time

from ..security import tls


def close_gently(sock: socket.socket | tls.ServerTls, linger: float = 0.5) -> None:
    """Close a refused connection so that what we sent last (an ERROR, a TLS alert) reaches the peer: FIN
    first, then read what the peer still sends for a moment (closing with unread bytes would send a reset,
    and a reset can overtake the last bytes)."""
    raw = sock.raw if isinstance(sock, tls.ServerTls) else sock
    try:
        raw.shutdown(socket.SHUT_WR)
        raw.settimeout(linger)
        deadline = time.monotonic() + linger
        while time.monotonic() < deadline and raw.recv(65536):
            pass
    except OSError:
        pass
    finally:
        raw.close()


def keepalive(sock: socket.socket) -> None:
    """Notice a dead peer within ~15 s even when no data flows."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 5)):
        opt = getattr(socket, name, None)
        if opt is not None:
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)
