"""Integration harness: real bdr_server / bdr_client subprocesses over loopback TCP, image files, a ring file fed
by a RingProducer in the test process, and a TCP proxy the tests can cut."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bdr.testing.ring_producer import RingProducer

DEV = 32 << 20
SLOTS = 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """One daemon subprocess whose combined output goes to a log file."""

    def __init__(self, name: str, argv: list[str], logdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = logdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        logf = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *self.argv],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        logf.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, pattern: str, timeout: float = 20.0, count: int = 1) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            found = list(re.finditer(pattern, self.log()))
            if len(found) >= count:
                return found[count - 1]
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: no {pattern!r} within {timeout}s; log:\n{self.log()[-3000:]}"
                )
            assert self.proc is not None
            if self.proc.poll() is not None and not found:
                raise AssertionError(
                    f"{self.name} exited {self.proc.returncode} before {pattern!r}:\n{self.log()}"
                )
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait: the exit code."""
        assert self.proc is not None
        self.signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)


class Proxy:
    """A TCP relay between client and server that can drop every connection (RST) or stop listening."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.connections = 0
        self.start()

    def start(self) -> None:
        lst = socket.create_server(("127.0.0.1", self.port))
        self.listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                a, _ = lst.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                a.close()
                continue
            with self.lock:
                self.conns += [a, b]
                self.connections += 1
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 20):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        """Reset every relayed connection, as a network failure would."""
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.shutdown(socket.SHUT_RDWR)  # wakes the relay threads blocked in recv()
            s.close()

    def stop_listening(self) -> None:
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            self.listener.close()
            self.listener = None

    def close(self) -> None:
        self.stop_listening()
        self.cut()


class Lab:
    """Files and processes of one integration test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.src = tmp / "source.img"
        self.replica = tmp / "replica.img"
        self.journal = tmp / "journal"
        self.ring = tmp / "ring"
        self.port = free_port()
        self.daemons: list[Daemon] = []
        self.proxies: list[Proxy] = []
        self.producer: RingProducer | None = None

    def images(self, src_random: bool = False, replica_size: int = DEV, seed: int = 0) -> None:
        data = random.Random(seed).randbytes(DEV) if src_random else bytes(DEV)
        self.src.write_bytes(data)
        with open(self.replica, "wb") as f:
            f.truncate(replica_size)

    def make_producer(self, slots: int = SLOTS) -> RingProducer:
        self.producer = RingProducer(self.ring, slots, DEV, source=self.src)
        return self.producer

    def server(self, *extra: str, port: int | None = None) -> Daemon:
        argv = ["bdr.server", "--address", "127.0.0.1", "--port", str(port or self.port)]
        argv += ["--target-device", str(self.replica), "--journal", str(self.journal), "--verbose", *extra]
        d = Daemon("server", argv, self.tmp)
        self.daemons.append(d)
        return d.start()

    def client(self, *extra: str, port: int | None = None) -> Daemon:
        argv = ["bdr.client", "--address", "127.0.0.1", "--port", str(port or self.port)]
        argv += ["--control-device", str(self.ring), "--source-device", str(self.src), "--verbose", *extra]
        d = Daemon("client", argv, self.tmp)
        self.daemons.append(d)
        return d.start()

    def proxy(self) -> Proxy:
        px = Proxy(self.port)
        self.proxies.append(px)
        return px

    def wait_drained(self, timeout: float = 30.0) -> None:
        """Wait until every record is released (acknowledged durable by the server), no resync is pending, and
        the client says it is in sync at the current ring head."""
        assert self.producer is not None
        prod = self.producer
        client = next(d for d in reversed(self.daemons) if d.name == "client")
        deadline = time.monotonic() + timeout
        while (
            prod.tail != prod.head
            or prod.state
            or f"in sync at ring position {prod.head}:" not in client.log()
        ):
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {d.name}\n{d.log()[-2500:]}" for d in self.daemons)
                raise AssertionError(
                    f"ring not drained (tail {prod.tail}, head {prod.head}, state {prod.state})\n{logs}"
                )
            time.sleep(0.02)

    def identical(self) -> bool:
        return subprocess.run(["cmp", "-s", str(self.src), str(self.replica)], check=False).returncode == 0

    def close(self) -> None:
        for px in self.proxies:
            px.close()
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(10)
        if self.producer is not None:
            self.producer.close()


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    # the daemons' control sockets (bdr status) go to the test's own run directory, not /run/bdr
    monkeypatch.setenv("BDR_RUN_DIR", str(tmp_path / "run"))
    lb = Lab(tmp_path)
    yield lb
    lb.close()


class Writer:
    """Random writes (with flushes) to the source + ring from a background thread."""

    def __init__(self, prod: RingProducer, n: int, seed: int, pace: float = 0.0) -> None:
        self.prod = prod
        self.n = n
        self.rnd = random.Random(seed)
        self.pace = pace
        self.done = threading.Event()
        self.written = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for i in range(self.n):
                size = self.rnd.choice([512, 4096, 4096, 4096, 16384, 65536])
                off = self.rnd.randrange(0, (DEV - size) // 512) * 512
                self.prod.write(off, self.rnd.randbytes(size), fua=(i % 97 == 0), block=True)
                if i % 64 == 63:
                    self.prod.flush(block=True)
                if i % 200 == 199:
                    self.prod.discard(self.rnd.randrange(0, DEV // 65536) * 65536, 65536, block=True)
                self.written = i + 1
                if self.pace:
                    time.sleep(self.pace)
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def join(self, timeout: float = 60.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "writer stuck"
        assert self.error is None, self.error


@pytest.fixture
def writer_factory() -> type[Writer]:
    return Writer


os.environ.setdefault("PYTHONUNBUFFERED", "1")
