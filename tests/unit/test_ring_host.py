"""The ring consumer refuses a host whose memory ordering or byte order the ring's protocol does not fit, and
does so before it opens anything (no descriptor left behind)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bdr.kernel import ring
from bdr.kernel.layout import RingError
from bdr.testing.ring_producer import RingProducer


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("machine", "byteorder"), [("aarch64", "little"), ("riscv64", "little"), ("s390x", "big")]
)
def test_an_unsupported_host_is_refused_before_the_ring_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, machine: str, byteorder: str
) -> None:
    path = tmp_path / "ring"
    RingProducer(path, 64, 1 << 20).close()
    monkeypatch.setattr(ring.platform, "machine", lambda: machine)
    monkeypatch.setattr(ring.sys, "byteorder", byteorder)
    before = open_fds()
    with pytest.raises(
        RingError, match=f"needs a little-endian x86 host.*not {machine} \\({byteorder}-endian\\)"
    ):
        ring.RingConsumer(path, 1 << 20)
    assert open_fds() == before


def test_this_host_opens_the_ring(tmp_path: Path) -> None:
    path = tmp_path / "ring"
    RingProducer(path, 64, 1 << 20).close()
    with ring.RingConsumer(path, 1 << 20) as c:
        assert c.geometry.nr_slots == 64
