"""Resyncs under a sustained write load in the 6.12 guest: the client starts while fio (2 jobs, 4k-256k random
writes, O_DIRECT) writes the mapper for half a minute, and the target is suspended, reloaded with its own table and
resumed five times meanwhile.  With a journal twice the device size the staged resync fits (each block is staged
once) and the replica ends identical; with a journal smaller than the device the client falls back to a direct
resync (--journal-full direct, the default) and the replica ends identical too."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.vm.lab import Guest
from tests.vm.pair import Pair

MiB = 1 << 20
VM_DISKS = {"src": "64M", "dst": "64M", "jnl": "128M", "jsmall": "16M"}
VM_MEMORY = "2048M"
FIO = (
    "fio --name=load --filename={dev} --rw=randwrite --bsrange=4k-256k --direct=1 --ioengine=libaio --iodepth=8"
    " --numjobs=2 --time_based --runtime={secs} --randrepeat=0 --output=/tmp/fio-{tag}.out"
)


def load_with_reloads(p: Pair, tag: str, secs: int = 30) -> None:
    """fio on the mapper for ``secs``; the client starts meanwhile; five suspend / reload / resume cycles."""
    g = p.g
    g.run(f"nohup {FIO.format(dev=p.mapper, secs=secs, tag=tag)} > /dev/null 2>&1 & echo $! > /tmp/fio.pid")
    g.run("sleep 3")
    p.start_client(wait_scan=False)
    for _ in range(5):
        g.run(f"sleep {secs // 7}")
        g.run(
            f"dmsetup table {p.name} > /tmp/table && dmsetup suspend {p.name} && dmsetup reload {p.name} /tmp/table"
            f" && dmsetup resume {p.name}"
        )
    g.run("while kill -0 $(cat /tmp/fio.pid) 2>/dev/null; do sleep 1; done", timeout=secs + 120)


@pytest.fixture(scope="module")
def loaded(guest: Guest, bdr_ko: Path) -> Guest:
    guest.run(f"modprobe dm-mod && insmod {bdr_ko}")
    return guest


def test_resync_under_load_fits_a_journal_twice_the_device(loaded: Guest) -> None:
    g = loaded
    p = Pair(g, g.disk("src"), g.disk("dst"), g.disk("jnl"), port=8300)
    p.setup()
    try:
        p.start_server()
        load_with_reloads(p, "big")
        p.wait_synced(timeout=600)
        assert p.same_on_disk(), "replica differs after the load"
        log = g.run(f"cat {p.server_log}").output
        peaks = [int(x) for x in re.findall(r"at most (\d+) bytes of records staged", log)]
        print(f"journal {128 * MiB} bytes (device {64 * MiB}): peak staged per resync {peaks}")
        assert peaks, log[-3000:]
        assert "too small" not in log
        assert max(peaks) <= 128 * MiB - MiB
    finally:
        p.remove()


def test_resync_under_load_with_a_small_journal_falls_back_to_direct(loaded: Guest) -> None:
    g = loaded
    g.run(f"dd if=/dev/zero of={g.disk('jsmall')} bs=1M count=2 status=none")
    p = Pair(g, g.disk("src"), g.disk("dst"), g.disk("jsmall"), name="rsm", chardev="bdr_rsm", port=8400)
    p.setup()
    try:
        p.start_server()
        load_with_reloads(p, "small", secs=24)
        p.wait_synced(timeout=600)
        assert p.same_on_disk(), "replica differs after the load"
        client = g.run(f"cat {p.client_log}").output
        assert "Resyncing with direct writes" in client, client[-3000:]
        server = g.run(f"cat {p.server_log}").output
        m = re.search(r"too small for this resync: (\d+) bytes of records needed .*holds (\d+) bytes", server)
        assert m, server[-3000:]
        print(f"journal {16 * MiB} bytes: a resync needed {m.group(1)}, the record area holds {m.group(2)}")
        assert "storage error" not in server and "IO_ERROR" not in server
    finally:
        p.remove()
