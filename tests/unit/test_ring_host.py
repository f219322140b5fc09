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


def test_a_ring_file_is_looked_at_again_soon_while_records_come_and_less_often_when_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ring file has no poll(): the consumer naps.  Short naps while the producer keeps publishing (a long one
    after each drain leaves the stream idle), longer ones, up to NAP_MAX, while nothing comes."""
    naps: list[float] = []
    monkeypatch.setattr(ring.time, "sleep", naps.append)
    path = tmp_path / "ring"
    prod = RingProducer(path, 64, 1 << 20)
    try:
        with ring.RingConsumer(path, 1 << 20) as c:
            for _ in range(6):
                c.wait(1.0)
            idle = list(naps)
            naps.clear()
            for _ in range(3):
                prod.write_run(0, bytes(4096))
                c.wait(1.0)
            busy = list(naps)
            c.wait(0.0001)
    finally:
        prod.close()
    assert idle[0] == ring.NAP_MIN and idle[-1] == ring.NAP_MAX and idle == sorted(idle)
    assert busy == [ring.NAP_MIN] * 3
    assert naps[-1] == 0.0001  # never longer than the caller's timeout
