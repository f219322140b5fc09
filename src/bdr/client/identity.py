"""The identities a client sends in HELLO: of its source device and of the capture ring whose sequence numbers
it sends (the server resumes only from the same pair)."""

from __future__ import annotations

import os
from pathlib import Path

import xxhash

from ..kernel.ring import RingConsumer


def source_identity(path: Path, size: int) -> bytes:
    """Stable identity of the source device: its path as given and its size."""
    return xxhash.xxh3_128_digest(
        b"bdr-source\0" + str(path.absolute()).encode() + size.to_bytes(8, "little")
    )


def ring_identity(ring: RingConsumer) -> bytes:
    """Identity of the capture ring whose sequence numbers we send (they restart with a new target).

    For the chardev: this boot, the ring's random instance number (a new target gets a new one, a table reload
    keeps it), the chardev name and the device size.  For a ring file: the file itself."""
    if ring.is_chardev:
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_bytes().strip()
        except OSError:
            boot = b""
        g = ring.geometry
        return xxhash.xxh3_128_digest(
            b"bdr-ring\0"
            + boot
            + b"\0"
            + g.instance.to_bytes(8, "little")
            + g.name.encode()
            + (g.dev_sectors or 0).to_bytes(8, "little")
        )
    st = os.stat(ring.path)
    return xxhash.xxh3_128_digest(
        b"bdr-ringfile\0"
        + str(ring.path.absolute()).encode()
        + st.st_dev.to_bytes(8, "little")
        + st.st_ino.to_bytes(8, "little")
    )
