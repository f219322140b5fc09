"""The daemon's wake-up channel: signals and requests from other threads interrupt the main loop's waits."""

from __future__ import annotations

import contextlib
import select
import signal
import socket
from collections.abc import Callable


class Wakeup:
    """A socket pair: a signal (``set_wakeup_fd``) or ``poke`` makes ``fd`` readable; ``drain`` empties it."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self.fd = self.reader.fileno()

    def install_signals(self, on_stop: Callable[[], None]) -> None:
        """SIGTERM and SIGINT call ``on_stop`` and wake the loop."""

        def on_signal(signum: int, frame: object) -> None:
            on_stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)

    def poke(self) -> None:
        """Wake the loop (from another thread)."""
        with contextlib.suppress(OSError):
            self.writer.send(b"v")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self.reader.recv(512):
                pass

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake up at once for a signal."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        if poller.poll(int(seconds * 1000)):
            self.drain()

    def close(self) -> None:
        self.reader.close()
        self.writer.close()
