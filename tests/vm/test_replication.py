"""Real-time replication end to end in a guest of each lab kernel (6.12 and the newest trixie-backports one):
bdr target, bdr_client and bdr_server over loopback, real workloads, then the replica compared with the source
and checked with fsck."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.lab import Guest
from tests.vm.pair import Pair

VM_DISKS = {"src": "128M", "dst": "128M", "jnl": "32M"}
VM_MEMORY = "2048M"
VM_KERNELS = ("6.12", "7.x")


@pytest.fixture(scope="module")
def pair(guest: Guest, bdr_ko: Path) -> Iterator[Pair]:
    guest.run(f"modprobe dm-mod && insmod {bdr_ko}")
    p = Pair(guest, guest.disk("src"), guest.disk("dst"), guest.disk("jnl"), proxy_port=8001)
    p.setup()
    p.start_server()
    p.start_proxy()
    p.start_client()
    yield p
    p.remove()
    guest.run("rmmod bdr")


def test_workloads_replicate_identically(pair: Pair) -> None:
    g = pair.g
    g.run(
        f"""set -e
        dd if=/dev/urandom of={pair.mapper} bs=1M count=48 seek=60 oflag=direct status=none
        mkfs.ext4 -q -F {pair.mapper}
        mkdir -p /tmp/m && mount {pair.mapper} /tmp/m
        cp -a /usr/include/linux /tmp/m/
        fio --name=v --filename=/tmp/m/fio.dat --size=32M --io_size=32M --rw=randwrite --bs=4k --direct=1 \
            --ioengine=libaio --iodepth=8 --verify=crc32c --do_verify=1 --randrepeat=0 --output=/tmp/fio.out
        umount /tmp/m
        sync
        """,
        timeout=600,
    )
    st = pair.wait_synced()
    assert int(st["dropped"]) == 0, st
    assert pair.identical(), "replica differs from the source"
    fsck = g.run(f"fsck.ext4 -n -f {pair.dst}", check=False)
    assert fsck.rc == 0, fsck.output


@pytest.mark.kernels("6.12")  # the daemons, whatever the kernel
def test_server_killed_and_restarted_mid_stream(pair: Pair) -> None:
    g = pair.g
    g.run(
        f"(dd if=/dev/urandom of={pair.mapper} bs=64K count=1200 seek=200 oflag=direct status=none; sync;"
        " touch /tmp/w1.done) > /dev/null 2>&1 &"
    )
    g.run("sleep 1")
    pair.stop_server("KILL")
    g.run("sleep 2")
    pair.start_server()
    g.run("for i in $(seq 600); do test -e /tmp/w1.done && exit 0; sleep 0.2; done; exit 1", timeout=200)
    pair.wait_synced()
    assert pair.identical(), "replica differs after the server was killed"
    client_log = pair.tail(pair.client_log, 400)
    assert re.search(r"(?i)connection|reconnect|lost|closed", client_log), client_log
    assert re.search(r"quick resume|resync|scan", client_log), client_log
    g.run("rm -f /tmp/w1.done")


@pytest.mark.kernels("6.12")  # the daemons, whatever the kernel
def test_tcp_connection_cut_mid_stream(pair: Pair) -> None:
    g = pair.g
    g.run(
        f"(dd if=/dev/urandom of={pair.mapper} bs=64K count=1200 seek=50 oflag=direct status=none; sync;"
        " touch /tmp/w2.done) > /dev/null 2>&1 &"
    )
    g.run("sleep 1")
    pair.stop_proxy()
    g.run("sleep 3")
    pair.start_proxy()
    g.run("for i in $(seq 600); do test -e /tmp/w2.done && exit 0; sleep 0.2; done; exit 1", timeout=200)
    pair.wait_synced()
    assert pair.identical(), "replica differs after the connection was cut"
    g.run("rm -f /tmp/w2.done")


def test_flush_is_durable_on_the_replica_once_acknowledged(pair: Pair) -> None:
    """After fsync returns on the source and the client logs the flush as acknowledged, an O_DIRECT read of
    the replica device returns the data."""
    g = pair.g
    g.run(
        f"""set -e
        dd if=/dev/urandom of=/tmp/flushdata bs=4096 count=16 status=none
        dd if=/tmp/flushdata of={pair.mapper} bs=4096 seek=5000 conv=fsync status=none
        """
    )
    seq = int(
        g.run(f"{BIN_PY} {RINGTOOL} status /dev/{pair.chardev}").output.split('"next_seq": ')[1].split(",")[0]
    )
    # the flush record is the last one published by the fsync: wait for its acknowledgement
    g.run(
        f"for i in $(seq 300); do"
        f" awk '/flush acknowledged: replica durable up to seq/ {{s=$NF}} END {{exit !(s >= {seq - 1})}}'"
        f" {pair.client_log} && exit 0; sleep 0.1; done; tail {pair.client_log}; exit 1"
    )
    g.run(
        f"dd if={pair.dst} of=/tmp/flushback bs=4096 skip=5000 count=16 iflag=direct status=none"
        " && cmp /tmp/flushdata /tmp/flushback"
    )


BIN_PY = f"{Path(__file__).resolve().parents[2]}/.venv/bin/python"
RINGTOOL = f"{Path(__file__).resolve().parents[2]}/tests/vm/ringtool.py"
