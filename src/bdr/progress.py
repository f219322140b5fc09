"""Progress of scans and full replications: a bar with rate and ETA on a terminal, periodic log lines otherwise.

The bar (tqdm, on standard error) is used only when standard error is a terminal and output is not silenced
(``--no-print``); otherwise one log line every ``LOG_EVERY`` seconds names the bytes done, the rate and the ETA.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

LOG_EVERY = 10.0  # seconds between progress log lines without a terminal


class Progress:
    """``update(n)`` after each window; ``close()`` at the end (also on errors)."""

    def __init__(self, what: str, total: int, log: logging.Logger, quiet: bool = False) -> None:
        self.what = what
        self.total = total
        self.done = 0
        self.log = log
        self.started = self._last = time.monotonic()
        self.bar: Any = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs; used through Any; only on a terminal

            self.bar = tqdm(total=total, desc=what, unit="B", unit_scale=True, unit_divisor=1024, leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= LOG_EVERY:
            self._last = now
            self.log.warning("%s", self.line(now))

    def line(self, now: float) -> str:
        took = max(now - self.started, 1e-9)
        rate = self.done / took
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.what}: {self.done >> 20} of {self.total >> 20} MiB ({pct:.0f}%), {rate / (1 << 20):.1f} MiB/s, "
            f"ETA {left:.0f}s"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
