"""Operator logging for the daemons (one line per event, timestamps) and the --benchmark figures."""

from __future__ import annotations

import logging
import sys
import time


def setup_logging(name: str, verbose: bool, debug: bool, no_print: bool) -> None:
    """Log lines go to stdout (``--no-print`` silences it); errors also reach stderr when stdout is silenced.

    Default: warnings and the main lifecycle events; ``--verbose``: every connection, scan and resync step;
    ``--debug``: frames and durability points."""
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    root = logging.getLogger("bdr")
    root.handlers.clear()
    root.setLevel(level)
    root.propagate = False
    fmt = logging.Formatter(
        f"%(asctime)s.%(msecs)03d {name}[%(process)d] %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S"
    )
    if no_print:
        err = logging.StreamHandler(sys.stderr)
        err.setLevel(logging.ERROR)
        err.setFormatter(fmt)
        root.addHandler(err)
    else:
        out = logging.StreamHandler(sys.stdout)
        out.setFormatter(fmt)
        root.addHandler(out)


class BenchClock:
    """Throughput over the last interval and since the first byte, for --benchmark lines."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.t0: float | None = None
        self.last_t = time.monotonic()
        self.last_bytes = 0
        self.last_records = 0

    def report(self, nbytes: int, records: int, final: bool = False) -> str | None:
        now = time.monotonic()
        if self.t0 is None:
            if nbytes == 0 and records == 0:
                self.last_t = now
                return None
            self.t0 = self.last_t
        dt = now - self.last_t
        if dt < self.interval and not final:
            return None
        rate = (nbytes - self.last_bytes) / dt / 1e6 if dt > 0 else 0.0
        recs = (records - self.last_records) / dt if dt > 0 else 0.0
        total = now - self.t0
        avg = nbytes / total / 1e6 if total > 0 else 0.0
        self.last_t, self.last_bytes, self.last_records = now, nbytes, records
        kind = "final" if final else "interval"
        return (
            f"{kind} MB/s={rate:.1f} records/s={recs:.0f} avg_MB/s={avg:.1f} total_MB={nbytes / 1e6:.1f} "
            f"records={records} elapsed_s={total:.2f}"
        )
