"""Small pieces of the daemon's run time: a log throttle for floods, and the tally of connections and errors
that the status shows."""

from __future__ import annotations

import threading
import time


class Throttle:
    """One log line per ``interval`` seconds for an event that may come in a flood; the others are counted."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last = -1e9
        self._quiet = 0

    def due(self) -> int | None:
        """None: stay quiet; otherwise log now, with this many events kept quiet since the last line."""
        now = time.monotonic()
        if now - self._last < self.interval:
            self._quiet += 1
            return None
        quiet, self._last, self._quiet = self._quiet, now, 0
        return quiet


class Tally:
    """Connections served, and connections that ended with an error (with the last reason); counted from the
    main loop and from the gate's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.connections = 0
        self.errors = 0
        self.last_error: str | None = None

    def failed(self, reason: str) -> None:
        with self._lock:
            self.errors += 1
            self.last_error = reason
