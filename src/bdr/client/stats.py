"""The client's counters of what it sent, kept across connections (status, metrics, --benchmark lines)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..scan import ScanStats


@dataclass(slots=True)
class ClientStats:
    records: int = 0
    bytes: int = 0
    frames: int = 0
    discarded: int = 0  # bytes of DISCARD records
    # sent -> acknowledged durable, per batch, since the last --benchmark line
    lag_sum: float = 0.0
    lag_n: int = 0
    lag_max: float = 0.0
    scans: list[ScanStats] = field(default_factory=list)

    def count_batch(self, records: int, data_len: int) -> None:
        self.records += records
        self.bytes += data_len
        self.frames += 1

    def count_durable(self, lag: float) -> None:
        """A batch acknowledged durable ``lag`` seconds after it was sent."""
        self.lag_sum += lag
        self.lag_n += 1
        self.lag_max = max(self.lag_max, lag)
