"""What a running daemon reports about itself: a snapshot its main loop publishes, served

- as JSON on a Unix control socket (``--status-socket``, default ``/run/bdr/client-<chardev>.sock`` or
  ``/run/bdr/server-<port>.sock``), read by ``bdr status`` and used by ``bdr verify`` to ask the client for a
  verification pass, and
- as Prometheus metrics over HTTP (``--metrics-address HOST:PORT``, path ``/metrics``).

Both read the same snapshot, so ``bdr status --json`` and a scrape taken at the same moment show the same numbers.

Control socket protocol: the peer sends one request line (``status`` or ``verify``) and reads JSON lines until the
socket closes: ``status`` gets one snapshot; ``verify`` gets ``{"progress": {...}}`` lines while the pass runs, then
``{"result": {...}}``.  Anything else gets ``{"error": "..."}``.  The socket is created mode 0600: only root asks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("bdr.status")

RUN_DIR = Path(os.environ.get("BDR_RUN_DIR", "/run/bdr"))  # where the control sockets are
REQUEST_MAX = 256  # bytes of a request line
Snapshot = dict[str, Any]
# a long request ("verify"): called in the socket's thread with a function that sends a progress line
Handler = Callable[[Callable[[Snapshot], None]], Snapshot]


class Board:
    """The latest snapshot of one daemon.  The main loop publishes whole dicts; readers get the last one."""

    def __init__(self) -> None:
        self._snap: Snapshot = {}
        self._lock = threading.Lock()

    def publish(self, snap: Snapshot) -> None:
        with self._lock:
            self._snap = snap

    def get(self) -> Snapshot:
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
        self._thread = threading.Thread(target=self._serve, name="bdr-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), name="bdr-control-conn", daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(10)
            request = b""
            while b"\n" not in request and len(request) < REQUEST_MAX:
                chunk = conn.recv(REQUEST_MAX)
                if not chunk:
                    break
                request += chunk
            word = request.split(b"\n", 1)[0].decode("ascii", "replace").strip()

            def send(obj: Snapshot) -> None:
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


# -- Prometheus ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One metric: its name, kind ("counter" or "gauge"), help text, and where its value is in the snapshot."""

    name: str
    kind: str
    help: str
    path: tuple[str, ...]


def lookup(snap: Snapshot, path: tuple[str, ...]) -> float | None:
    value: Any = snap
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, int | float) else None


class _SnapshotCollector(Collector):
    def __init__(self, board: Board, specs: list[Spec], states: tuple[str, ...], prefix: str) -> None:
        self.board, self.specs, self.states, self.prefix = board, specs, states, prefix

    def collect(self) -> Iterator[Metric]:
        snap = self.board.get()
        for spec in self.specs:
            value = lookup(snap, spec.path)
            if value is None:
                continue
            family = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
            yield family(f"{self.prefix}_{spec.name}", spec.help, value=value)
        state = GaugeMetricFamily(
            f"{self.prefix}_state", "1 for the daemon's current state", labels=["state"]
        )
        for s in self.states:
            state.add_metric([s], 1.0 if snap.get("state") == s else 0.0)
        yield state


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` (``:PORT`` alone listens on loopback; port 0: any free port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"metrics address {text!r} is not HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


class MetricsEndpoint:
    """``/metrics`` at ``address``, served from a thread of its own."""

    def __init__(
        self, address: str, board: Board, specs: list[Spec], states: tuple[str, ...], prefix: str
    ) -> None:
        host, port = parse_address(address)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_SnapshotCollector(board, specs, states, prefix))
        self.server, self._thread = start_http_server(port, host, registry=registry)
        self.port = int(self.server.server_port)
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}/metrics"
        log.info("Prometheus metrics on %s", self.url)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
