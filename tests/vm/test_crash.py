"""Crash safety of journal resyncs in the 6.12 guest (real bdr target, real disks): bdr_server SIGKILLed while
receiving scan blocks, during the journal commit and during the journal apply; and the whole guest killed
(QEMU SIGKILLed, cache=none disks kept, a new guest booted on them) during the apply.  After the restart the
replica is the old or the new consistent state (by recorded checksums of both), then converges to identical.

Each resync is a journal scan of the whole device: the client is stopped, 16 MiB are written through a 2 MiB
ring (it overflows), and the target is made anew (as after a reboot of a source without a meta device: no
resume point in its ring), so that the client's next start resyncs through the server's journal, and nothing
reaches the replica before the commit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bdr.journal.faults import CRASH_ENV, CRASH_MODE_ENV
from tests.vm import lab
from tests.vm.lab import Guest
from tests.vm.pair import BIN, Pair

RINGTOOL = f"{BIN}/python {Path(__file__).resolve().parent / 'ringtool.py'}"

VM_DISKS = {"src": "64M", "dst": "64M", "jnl": "48M"}
VM_MEMORY = "2048M"


def sha(g: Guest, dev: str) -> str:
    return g.run(f"sha256sum {dev}").output.split()[0]


def boot_on(images: dict[str, Path], kver: str) -> Guest:
    """A guest on kept disk images (cache=none): a second one booted on them sees what the first left."""
    return lab.boot(disks=VM_DISKS, memory=VM_MEMORY, kver=kver, images=images, cache="none")


def make_pair(g: Guest, bdr_ko: Path) -> Pair:
    g.run(f"modprobe dm-mod && insmod {bdr_ko}")
    p = Pair(g, g.disk("src"), g.disk("dst"), g.disk("jnl"), buffer="2M")
    p.setup()
    return p


def synced_pair(g: Guest, bdr_ko: Path) -> Pair:
    """A pair with both daemons running and the replica in sync."""
    p = make_pair(g, bdr_ko)
    p.start_server()
    p.start_client()
    p.wait_synced()
    return p


def restart_logs(p: Pair) -> None:
    """Empty both logs, so that waiting for a line sees only the daemons started next."""
    p.g.run(f": > {p.server_log}; : > {p.client_log}")


def pending_resync(p: Pair, seek: int) -> tuple[str, str]:
    """With the pair in sync: stop both daemons with 16 MiB written meanwhile (the ring overflows), then make a
    new target (as a reboot of the source host does: no resume point in its ring), so that the next client start
    resyncs the whole device through the journal, and the replica is not written before the commit.  (old, new)
    checksums of the replica."""
    g = p.g
    p.wait_synced()
    p.stop_client()
    g.run(f"dd if=/dev/urandom of={p.mapper} bs=64K count=256 seek={seek} oflag=direct status=none")
    assert p.status()["state"] == "overflow"
    p.stop_server()
    g.run(f"{BIN}/bdr remove {p.name}")
    p.setup()
    return sha(g, p.dst), sha(g, p.mapper)


def crash_server_at(p: Pair, point: str, mode: str = "") -> None:
    restart_logs(p)
    p.server_exec = f"env {CRASH_ENV}={point} {CRASH_MODE_ENV}={mode} "
    p.start_server()
    p.server_exec = ""
    p.start_client(wait_scan=False)
    p.wait_log(p.server_log, f"test hook {CRASH_ENV}={point}", 180)


@pytest.fixture(scope="module")
def pair(guest: Guest, bdr_ko: Path) -> Iterator[Pair]:
    p = make_pair(guest, bdr_ko)
    p.start_server()
    p.start_client()
    yield p
    p.remove()
    guest.run("rmmod bdr")


@pytest.mark.parametrize("point", ["receive", "commit", "apply"])
def test_server_killed_during_a_journal_resync(pair: Pair, point: str) -> None:
    g = pair.g
    old, new = pending_resync(pair, seek={"receive": 100, "commit": 400, "apply": 700}[point])
    assert old != new
    crash_server_at(pair, point)
    pair.wait_server_exit(10)
    pair.stop_client("KILL")
    now = sha(g, pair.dst)
    if point == "apply":
        assert now not in (old, new)  # killed half-way through the apply: a mix until the journal replay
    else:
        assert now == old  # nothing is applied before the commit
    restart_logs(pair)
    pair.start_server()
    after = sha(g, pair.dst)
    log = pair.tail(pair.server_log, 200)
    if point == "apply":
        assert after == new and "replayed a committed resync" in log, log
    else:
        assert after == old and "discarded an uncommitted resync" in log, log
    pair.start_client(wait_scan=False)
    pair.wait_log(pair.client_log, "in sync at ring position", 300)  # after its whole-device rescan
    pair.wait_synced()
    assert pair.identical(), f"{pair.tail(pair.client_log, 60)}\n---\n{pair.tail(pair.server_log, 60)}"


def test_guest_killed_during_the_journal_apply(tmp_path: Path, lab_kernel: str, bdr_ko: Path) -> None:
    images = {name: tmp_path / f"{name}.img" for name in VM_DISKS}
    with boot_on(images, lab_kernel) as g1:
        p = synced_pair(g1, bdr_ko)
        # a base the replica has, then a resync due
        g1.run(f"dd if=/dev/urandom of={p.mapper} bs=1M count=32 seek=8 oflag=direct status=none")
        old, new = pending_resync(p, seek=700)
        assert old != new
        crash_server_at(p, "apply", "pause")  # the server stops half-way through the apply, synced
        g1.check_kernel_log()
        g1.power_cut()
    with boot_on(images, lab_kernel) as g2:
        p = make_pair(g2, bdr_ko)
        mid = sha(g2, p.dst)
        assert mid not in (old, new)  # the replica itself is a mix of both ...
        p.start_server()
        log = p.tail(p.server_log, 200)
        assert "replayed a committed resync" in log, log
        assert sha(g2, p.dst) == new  # ... until the committed resync is replayed at start
        p.start_client(wait_scan=False)  # a new ring after the reboot: a whole-device journal scan
        p.wait_log(p.client_log, "in sync at ring position", 300)
        p.wait_synced()
        assert p.identical()
        p.remove()
        g2.check_kernel_log()


def test_acknowledged_flush_survives_a_power_cut(tmp_path: Path, lab_kernel: str, bdr_ko: Path) -> None:
    """Durability follows flushes, end to end: once fsync returned on the source and the client logged the flush
    as acknowledged, the replica and its metadata hold it even if the replica host loses power right then (the
    daemons are never stopped).  This guest writes block-device pages back at once, so the test cannot tell the
    server's fdatasync from writeback; the ordering itself (fdatasync before the acknowledgement) is checked by
    the server's unit tests."""
    images = {name: tmp_path / f"{name}.img" for name in VM_DISKS}
    with boot_on(images, lab_kernel) as g1:
        p = synced_pair(g1, bdr_ko)
        data_sha = g1.run(
            f"""set -e
            dd if=/dev/urandom of=/tmp/flushdata bs=4096 count=16 status=none
            dd if=/tmp/flushdata of={p.mapper} bs=4096 seek=5000 conv=fsync status=none
            sha256sum < /tmp/flushdata"""
        ).output.split()[0]
        seq = int(g1.run(f"{RINGTOOL} status /dev/{p.chardev}").output.split('"next_seq": ')[1].split(",")[0])
        g1.run(
            f"for i in $(seq 300); do"
            f" awk '/flush acknowledged: replica durable up to seq/ {{s=$NF}} END {{exit !(s >= {seq - 1})}}'"
            f" {p.client_log} && exit 0; sleep 0.1; done; tail {p.client_log}; exit 1"
        )
        g1.power_cut()  # the daemons never stop: nothing after the acknowledgement helps
    with boot_on(images, lab_kernel) as g2:
        back = g2.run(
            f"dd if={g2.disk('dst')} bs=4096 skip=5000 count=16 iflag=direct status=none | sha256sum"
        )
        assert back.output.split()[0] == data_sha
        durable = g2.run(
            f"{BIN}/python -c 'from bdr.journal import Journal; print(Journal(\"{g2.disk('jnl')}\").header.durable_seq)'"
        )
        assert int(durable.output) >= seq - 1
