"""The gate: a new connection is made secure (TLS) and authenticated (shared secret) on a thread of its own,
bounded in number in total and per host, before it may become the session; the main loop takes the connections
through it.  The gate owns its threads and joins them when it closes."""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .. import wire as p
from ..daemon.sockets import close_gently, keepalive
from ..security import auth, tls
from .errors import SessionClosed
from .runtime import Tally, Throttle
from .session import ServerSession

log = logging.getLogger("bdr.server")


Admitted = tuple[socket.socket | tls.ServerTls, ServerSession, str, float]


class Gate:
    """Connections from accept to authenticated.  ``new_session(peer, auth)`` makes the session object of a
    connection; ``serving()`` is the peer of the running session (None: none); ``stopping()`` says the daemon
    stops; ``wake()`` wakes the main loop when a connection is through.  Refusals are counted in ``tally``.
    A connection has ``handshake_timeout`` seconds for TLS and authentication; at most ``max_pending``
    connections (``max_pending_per_host`` from one host) are in their handshake at once."""

    def __init__(
        self,
        tls_ctx: ssl.SSLContext | None,
        secret: bytes | None,
        binding: bytes,
        new_session: Callable[[str, auth.ServerAuth | None], ServerSession],
        serving: Callable[[], str | None],
        stopping: Callable[[], bool],
        wake: Callable[[], None],
        tally: Tally,
        handshake_timeout: float,
        max_pending: int,
        max_pending_per_host: int,
    ) -> None:
        self.tls_ctx, self.secret, self.binding = tls_ctx, secret, binding
        self.new_session, self.serving, self.stopping, self.wake = new_session, serving, stopping, wake
        self.tally = tally
        self.handshake_timeout = handshake_timeout
        self.max_pending, self.max_pending_per_host = max_pending, max_pending_per_host
        self._gate_lock = threading.Lock()
        self._pending: dict[str, int] = {}  # connections in their handshake, by host
        self._full_log = Throttle()
        self._busy_log = Throttle()  # a flood of connections does not flood the log
        self._admitted: queue.SimpleQueue[Admitted] = (
            queue.SimpleQueue()
        )  # through, waiting for the main loop
        self._threads: set[threading.Thread] = set()

    def _start(self, target: Callable[..., None], args: tuple[Any, ...], name: str) -> None:
        def run() -> None:
            try:
                target(*args)
            finally:
                with self._gate_lock:
                    self._threads.discard(threading.current_thread())

        t = threading.Thread(target=run, name=name, daemon=True)
        with self._gate_lock:
            self._threads.add(t)
        t.start()

    def close(self, timeout: float = 5.0) -> None:
        """Wait for the gate's threads (they see ``stopping()`` within a fraction of a second), then close the
        connections still waiting for the main loop."""
        deadline = time.monotonic() + timeout
        while True:
            with self._gate_lock:
                threads = list(self._threads)
            if not threads or time.monotonic() > deadline:
                break
            threads[0].join(max(0.0, deadline - time.monotonic()))
        for sock, *_ in self.take_admitted():
            sock.close()

    def accept(self, listener: socket.socket) -> None:
        """A new connection: authenticated on a thread of its own (bounded in number, in total and per host)."""
        try:
            raw, addr = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:  # out of file descriptors or memory: retry later
            log.error("accept failed: %s", exc)
            time.sleep(0.1)
            return
        host, peer = addr[0], f"{addr[0]}:{addr[1]}"
        with self._gate_lock:
            total, mine = sum(self._pending.values()), self._pending.get(host, 0)
            full = total >= self.max_pending or mine >= self.max_pending_per_host
            if not full:
                self._pending[host] = mine + 1
            elif (quiet := self._full_log.due()) is not None:
                log.warning(
                    "refusing connection from %s: %d connections already authenticating (%d from %s)%s",
                    peer,
                    total,
                    mine,
                    host,
                    f"; {quiet} more refused since the last report" if quiet else "",
                )
        if full:
            raw.close()
            return
        self._start(self._gate, (raw, host, peer), f"bdr-gate-{peer}")

    def take_admitted(self) -> Iterator[tuple[socket.socket | tls.ServerTls, ServerSession, str, float]]:
        """The connections through the gate, waiting for the main loop, until there are none."""
        while True:
            try:
                yield self._admitted.get_nowait()
            except queue.Empty:
                return

    def _refused(self, peer: str, reason: str) -> None:
        """A connection the gate let not through: logged, and counted in the status (errors, last error)."""
        log.warning("client %s: %s", peer, reason)
        self.tally.failed(f"client {peer}: {reason}")

    def _gate(self, raw: socket.socket, host: str, peer: str) -> None:
        try:
            self.admit(raw, peer)
        finally:
            with self._gate_lock:
                self._pending[host] -= 1
                if not self._pending[host]:
                    del self._pending[host]

    def admit(self, raw: socket.socket, peer: str) -> None:
        """TLS handshake and shared-secret proof within self.handshake_timeout; then the connection waits for the
        main loop, which makes it the session or refuses it as busy."""
        try:
            log.warning("client %s connected", peer)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keepalive(raw)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    raw.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
            deadline = time.monotonic() + self.handshake_timeout
            sock = self._secure(raw, peer, deadline)
            if sock is None:
                raw.close()
                return
            server_auth = auth.ServerAuth(self.secret, self.binding) if self.secret is not None else None
            sess = self.new_session(peer, server_auth)
            if server_auth is not None and not self._authenticate(sock, sess, peer, deadline):
                return
            if self.serving() is not None:
                self._refuse_busy(sock, peer)
                return
            self._admitted.put((sock, sess, peer, deadline))
            with contextlib.suppress(OSError):
                self.wake()
        except Exception:  # a thread's death must not go unnoticed
            log.exception("client %s: unexpected error while authenticating", peer)
            raw.close()

    def _authenticate(
        self, sock: socket.socket | tls.ServerTls, sess: ServerSession, peer: str, deadline: float
    ) -> bool:
        """The shared-secret exchange (AUTH_BEGIN ... AUTH_OK); False when refused (logged, closed)."""
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        try:
            while sess.conn.phase is p.Phase.AUTH:
                left = deadline - time.monotonic()
                if left <= 0:
                    msg = f"no complete handshake within {self.handshake_timeout:.0f}s"
                    raise SessionClosed(f"refused: {msg}", p.encode(p.Error(p.ErrorCode.UNEXPECTED, msg)))
                if self.stopping():
                    raise SessionClosed("server shutting down")
                if not tls.pending(sock) and not poller.poll(int(min(left, 0.2) * 1000) + 1):
                    continue
                sock.settimeout(max(left, 0.1))
                n = sock.recv_into(sess.conn.writable(65536))
                sess.conn.commit(n)
                if n == 0:
                    raise SessionClosed("connection lost: closed by the client during authentication")
                reply = sess.receive(authenticating=True)
                if reply:
                    sock.sendall(reply)
            return True
        except SessionClosed as exc:
            self._refused(peer, exc.reason)
            if exc.reply:
                with contextlib.suppress(OSError):
                    sock.settimeout(1.0)
                    sock.sendall(exc.reply)
                close_gently(sock)
            else:
                sock.close()
        except (OSError, p.RemoteProtocolError) as exc:
            reason = tls.describe(exc) if isinstance(exc, ssl.SSLError) else str(exc)
            self._refused(peer, f"connection lost during authentication: {reason}")
            sock.close()
        return False

    def _refuse_busy(self, sock: socket.socket | tls.ServerTls, peer: str) -> None:
        """An authenticated client while another is served: ERROR BUSY, then the close."""
        current = self.serving() or "another client"
        with self._gate_lock:
            if (quiet := self._busy_log.due()) is not None:
                more = f" ({quiet} more refused since the last report)" if quiet else ""
                log.warning("refusing connection from %s: already serving %s%s", peer, current, more)
        with contextlib.suppress(OSError):
            sock.settimeout(1.0)
            sock.sendall(p.encode(p.Error(p.ErrorCode.BUSY, f"server already serves a client ({current})")))
        close_gently(sock)

    def refuse_admitted(self) -> None:
        """Connections through the gate while a session runs: refused as busy, each on a thread (the close
        lingers a moment)."""
        for sock, _, peer, _ in self.take_admitted():
            self._start(self._refuse_busy, (sock, peer), f"bdr-refuse-{peer}")

    def _secure(self, raw: socket.socket, peer: str, deadline: float) -> socket.socket | tls.ServerTls | None:
        """The TLS handshake of a new connection (the plain socket without TLS); None when refused (logged)."""
        if self.tls_ctx is None:
            return raw
        ssock: tls.ServerTls | None = None
        try:
            first = self._peek(raw, deadline)
            if first is None:
                log.warning("client %s: closed the connection before the TLS handshake", peer)
                return None
            if first[:1] != b"\x16":  # not a TLS handshake record
                if len(first) >= 5 and first[4] in (p.MsgType.HELLO, p.MsgType.AUTH_BEGIN):
                    msg = "this server requires TLS: give the client --tls-ca (and --tls-cert, --tls-key)"
                    with contextlib.suppress(OSError):
                        raw.settimeout(1.0)
                        raw.sendall(p.encode(p.Error(p.ErrorCode.AUTH_REQUIRED, msg)))
                self._refused(peer, "refused: a plaintext connection to a TLS server")
                close_gently(raw)
                return None
            ssock = tls.ServerTls(raw, self.tls_ctx)
            ssock.handshake(max(0.0, deadline - time.monotonic()), lambda: self.stopping())
        except InterruptedError:
            return None
        except (OSError, ssl.SSLError) as exc:
            self._refused(peer, f"refused: TLS handshake failed: {tls.describe(exc)}")
            if ssock is not None and not isinstance(exc, TimeoutError):
                close_gently(ssock)  # the TLS alert reaches the client before the close
            return None
        who = tls.peer_subject(ssock)
        log.info(
            "client %s: TLS %s, %s",
            peer,
            ssock.version(),
            f"client certificate {who!r}" if who else "no client certificate",
        )
        return ssock

    def _peek(self, raw: socket.socket, deadline: float) -> bytes | None:
        """The first bytes the client sends (left in the socket), None if it closes first."""
        poller = select.poll()
        poller.register(raw, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"nothing received within {self.handshake_timeout:.0f}s")
            if self.stopping():
                raise InterruptedError("stopping")
            if poller.poll(int(min(left, 0.2) * 1000) + 1):
                data = raw.recv(8, socket.MSG_PEEK)
                return data or None
