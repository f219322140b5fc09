"""One-shot mode: ``bdr_client`` without ``--control-device`` syncs a device or an image file to the server by
a whole-device checksum scan and exits (a bdsync-style use; no kernel module, no capture ring).

The client runs its ordinary session with ``NoRing``, a capture ring that never holds a record: the start-up
decision then always scans (a journal scan by default, staged and committed on the server, so the replica is
the old or the new state at every instant; ``--full-scan`` / ``--full-replication`` write directly), the scan
sends the differing blocks, and instead of streaming the client says GOODBYE and exits 0: the replica is
identical to the source as it was read.  The source must not change during the sync.
"""

from __future__ import annotations

from pathlib import Path

import xxhash

from ..kernel import abi
from ..kernel.dirty import DirtyMap
from ..kernel.layout import Geometry
from ..kernel.ring import Batch, RingConsumer


class NoRing(RingConsumer):
    """An always empty capture ring (one-shot mode)."""

    def __init__(self, source: Path, dev_size: int) -> None:  # no super().__init__: nothing to open or map
        self.path = source
        self.is_chardev = False
        self.dev_size = dev_size
        self.geometry = Geometry(0, 0, 0, 0, 0, None, 128, "one-shot")

    def fileno(self) -> int:
        raise OSError("one-shot mode has no capture ring")

    def head(self) -> int:
        return 0

    @property
    def tail(self) -> int:
        return 0

    def state(self) -> abi.State:
        return abi.State(0)

    def next_seq(self) -> int:
        return 0

    def release(self, pos: int) -> None:
        pass

    def mark_seen(self, pos: int) -> None:
        pass

    def seq_at(self, pos: int) -> int:
        return 0

    def tail_seq(self) -> int:
        return 0

    def find_seq(self, seq: int) -> int | None:
        return None

    def wait(self, timeout: float) -> bool:
        return False

    def batch(self, start: int, max_records: int, head: int | None = None) -> Batch | None:
        return None

    def take_dirty(self) -> DirtyMap:
        raise OSError("one-shot mode has no dirty bitmap")

    def close(self) -> None:
        pass


def oneshot_ring_identity(source: Path, dev_size: int) -> bytes:
    """The ``ring_id`` a one-shot sync sends: no ring, so no sequence numbers to resume from."""
    return xxhash.xxh3_128_digest(
        b"bdr-oneshot\0" + str(source.absolute()).encode() + dev_size.to_bytes(8, "little")
    )
