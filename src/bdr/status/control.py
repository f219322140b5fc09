"""The control socket of a daemon: the board its main loop publishes snapshots on, the Unix socket that serves
them as JSON (read by ``bdr status``; ``bdr verify`` asks the client for a verification pass on it), and the
requests a peer sends.

Protocol: the peer sends one request line (``status`` or ``verify``) and reads JSON lines until the socket
closes: ``status`` gets one snapshot; ``verify`` gets ``{"progress": {...}}`` lines while the pass runs, then
``{"result": {...}}``.  Anything else gets ``{"error": "..."}``.  The socket is created mode 0600: only root asks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("bdr.status")

RUN_DIR = Path(os.environ.get("BDR_RUN_DIR", "/run/bdr"))  # where the control sockets are
REQUEST_MAX = 256  # bytes of a request line
Snapshot = dict[str, Any]  # a snapshot as read back from JSON
# a long request ("verify"): called in the socket's thread with a function that sends a progress line
Handler = Callable[[Callable[[Snapshot], None]], Snapshot]


class Board:
    """The latest snapshot of one daemon (a ``schema`` snapshot).  The main loop publishes whole snapshots;
    readers get the last one."""

    def __init__(self) -> None:
        self._snap: Mapping[str, Any] = {}
        self._lock = threading.Lock()

    def publish(self, snap: Mapping[str, Any]) -> None:
        with self._lock:
            self._snap = snap

    def get(self) -> Mapping[str, Any]:
        with self._lock:
            return self._snap


class ControlSocket:
    """The Unix control socket of a daemon, served by a thread of its own (never by the I/O loop)."""

    def __init__(self, path: Path, board: Board, handlers: dict[str, Handler] | None = None) -> None:
        self.path = path
        self.board = board
        self.handlers = handlers or {}
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if path.is_socket() and not _answers(path):
                path.unlink()  # left by a daemon that died
            old = os.umask(0o177)
            try:
                self._sock.bind(str(path))
            finally:
                os.umask(old)
            self._sock.listen(8)
        except OSError:
            self._sock.close()
            raise
        self._stop = False
        self._answering: set[threading.Thread] = set()  # one thread per peer, until it has its answer
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="bdr-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._answer, args=(conn,), name="bdr-control-conn", daemon=True)
            with self._lock:
                self._answering.add(t)
            t.start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            self._answer_one(conn)
        finally:
            with self._lock:
                self._answering.discard(threading.current_thread())

    def _answer_one(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(10)
            request = b""
            while b"\n" not in request and len(request) < REQUEST_MAX:
                chunk = conn.recv(REQUEST_MAX)
                if not chunk:
                    break
                request += chunk
            word = request.split(b"\n", 1)[0].decode("ascii", "replace").strip()

            def send(obj: Mapping[str, Any]) -> None:
                conn.sendall(json.dumps(obj, sort_keys=True).encode() + b"\n")

            if word == "status":
                send(self.board.get())
            elif word in self.handlers:
                conn.settimeout(None)
                send({"result": self.handlers[word](lambda prog: send({"progress": prog}))})
            else:
                send({"error": f"unknown request {word!r}; known: status, {', '.join(self.handlers)}"})

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
        self._thread.join(5)
        deadline = time.monotonic() + 5  # peers still reading an answer (a status takes at most 10 s)
        with self._lock:
            answering = list(self._answering)
        for t in answering:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in answering):
            log.warning("control socket %s: a peer is still being answered at exit", self.path)


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


class StatusUnavailable(Exception):
    """No daemon answers on that socket."""


def request(path: Path, word: str = "status", timeout: float | None = 5.0) -> Iterator[Snapshot]:
    """Send ``word`` to the control socket at ``path``; yield each JSON line of the answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            s.sendall(word.encode() + b"\n")
        except OSError as exc:
            raise StatusUnavailable(f"{path}: {exc.strerror or exc}") from exc
        with s.makefile("rb") as f:
            for line in f:
                yield json.loads(line)


def query(path: Path) -> Snapshot:
    """The current snapshot of the daemon listening at ``path``."""
    for snap in request(path):
        return snap
    raise StatusUnavailable(f"{path}: closed without an answer")


def open_control(
    path: str | None, default: Path, board: Board, handlers: dict[str, Handler]
) -> ControlSocket | None:
    """The daemon's control socket; a daemon still replicates without one (logged), unless the path was given."""
    where = Path(path) if path else default
    try:
        sock = ControlSocket(where, board, handlers)
    except OSError as exc:
        if path:
            raise
        log.warning("no control socket at %s (%s): bdr status will not see this daemon", where, exc.strerror)
        return None
    log.info("control socket %s", where)
    return sock
