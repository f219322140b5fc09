"""Online verification (``bdr verify``): compare source and replica by block hashes while replication runs,
report the ranges that differ, repair nothing.

The client runs the pass in its streaming loop, one window at a time (``VerifyJob.next``): it asks the server to
hash a window of the replica (SCAN_REQUEST with ``VERIFY_SCAN_ID``; the server hashes after applying every record
sent before the request), reads the same window of the source and compares (``VerifyJob.record``).  A write
captured after the request may make the two differ without any fault, so a block that differs is looked at again
a little later; it is reported as a mismatch only when it differed twice with no write to it captured in between.
A block written at every look is reported as not verified ("busy").  An overflow of the ring during the pass
ends it with an error (the resync that follows may repair the very blocks being compared).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .blocks import windows

MAX_LOOKS = 4  # looks at a block written during each look before it is reported busy
RECHECK_DELAY = (
    0.1  # seconds before a differing block is looked at again (writes in flight complete meanwhile)
)


def coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted (offset, length) ranges with touching or overlapping ones merged."""
    out: list[tuple[int, int]] = []
    for off, ln in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            last_off, last_ln = out[-1]
            out[-1] = (last_off, max(last_ln, off + ln - last_off))
        else:
            out.append((off, ln))
    return out


def overlaps(off: int, ln: int, extents: list[tuple[int, int]]) -> bool:
    return any(o < off + ln and off < o + n for o, n in extents)


@dataclass
class VerifyJob:
    """One verification pass of ``dev_size`` bytes; shared between the client's loop and the control socket."""

    dev_size: int
    block_size: int
    started: float = field(default_factory=time.monotonic)
    windows: collections.deque[tuple[int, int]] = field(default_factory=collections.deque)
    rechecks: collections.deque[tuple[float, int, int, int]] = field(default_factory=collections.deque)
    compared: int = 0  # bytes of the device compared at least once
    looks: int = 0  # SCAN_REQUESTs sent
    mismatches: list[tuple[int, int]] = field(default_factory=list)
    busy: list[tuple[int, int]] = field(default_factory=list)
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.windows.extend(windows([(0, self.dev_size)], self.dev_size, self.block_size))

    def next(self, now: float) -> tuple[int, int, int] | None:
        """(offset, length, look) to compare next; None when nothing is due now (see ``finished``)."""
        if self.rechecks and self.rechecks[0][0] <= now:
            _, off, ln, look = self.rechecks.popleft()
            return off, ln, look
        if self.windows:
            off, ln = self.windows.popleft()
            return off, ln, 0
        return None

    @property
    def finished(self) -> bool:
        return not self.windows and not self.rechecks

    def record(
        self, off: int, ln: int, look: int, differing: list[tuple[int, int]], written: list[tuple[int, int]]
    ) -> None:
        """The outcome of one look at [off, off + ln): its differing blocks, and the extents written since the
        request was sent (from the ring)."""
        self.looks += 1
        if look == 0:
            self.compared += ln
        due = time.monotonic() + RECHECK_DELAY
        for b_off, b_len in differing:
            changed = overlaps(b_off, b_len, written)
            if look >= 1 and not changed:
                self.mismatches.append((b_off, b_len))
            elif look + 1 >= MAX_LOOKS:
                self.busy.append((b_off, b_len))
            else:
                self.rechecks.append((due, b_off, b_len, look + 1))

    def fail(self, why: str) -> None:
        self.error = why
        self.done.set()

    def progress(self) -> dict[str, Any]:
        return {
            "compared_bytes": self.compared,
            "device_bytes": self.dev_size,
            "rechecks": len(self.rechecks),
            "mismatches": len(self.mismatches),
            "seconds": round(time.monotonic() - self.started, 3),
        }

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = self.progress()
        out.update(
            ok=self.error is None and not self.mismatches,
            error=self.error,
            mismatch_ranges=[list(r) for r in coalesce(self.mismatches)],
            busy_ranges=[list(r) for r in coalesce(self.busy)],
            block_size=self.block_size,
        )
        return out
