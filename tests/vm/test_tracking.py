"""Persistent change tracking in the 6.12 guest: a bdr target with a meta_device, ext4 on it, the source guest
power-cut while an application writes; after the reboot the new target loads the marks and the client resyncs
only the marked regions (bytes scanned printed, far below the device size), ending identical and fsck-clean.
Without a meta_device a new target still means a scan of the whole device.  Under a load that never lets the
ring empty, the marks of regions no longer written still go.  Then the target's own rules: a
write whose mark cannot be written fails and leaves the device untouched, and table lines naming an unusable
meta_device are refused with a message.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import lab
from tests.vm.lab import Guest
from tests.vm.pair import BIN, Pair

VM_DISKS = {"src": "64M", "dst": "64M", "jnl": "16M", "meta": "1M", "cm": "8M", "d2": "16M"}
VM_MEMORY = "1536M"
DEV_BYTES = 64 << 20
REGION = 64 << 10


def status(g: Guest, name: str) -> dict[str, str]:
    fields = g.run(f"dmsetup status {name}").output.split()[3:]
    return dict(kv.split("=", 1) for kv in fields)


def boot(images: dict[str, Path], kver: str, bdr_ko: Path) -> Guest:
    g = lab.boot(disks=VM_DISKS, memory=VM_MEMORY, kver=kver, images=images, cache="none")
    g.run(f"modprobe dm-mod && insmod {bdr_ko} && mkdir -p /tmp/cm /tmp/mnt")
    return g


def setup_target(g: Guest, *extra: str) -> str:
    return g.run(
        f"{BIN}/bdr setup --device {g.disk('src')} --name rep --chardev bdr_rep --buffer 32M {' '.join(extra)}"
    ).output


def pair(g: Guest) -> Pair:
    return Pair(
        g,
        g.disk("src"),
        g.disk("dst"),
        g.disk("jnl"),
        buffer="32M",
        client_args="--metadata /tmp/cm/src.meta",
    )


def wait_cleared(g: Guest, timeout: float = 60) -> None:
    """Until the client cleared the marks (it does so when in sync, at most every few seconds)."""
    deadline = time.monotonic() + timeout
    st: dict[str, str] = {}
    while time.monotonic() < deadline:
        st = status(g, "rep")
        if st["tracked_regions"] == "0":
            return
        time.sleep(1)
    raise AssertionError(f"the marks were not cleared: {st}")


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory, lab_kernel: str, bdr_ko: Path) -> Iterator[Guest]:
    """A source with ext4 and a meta_device, power-cut while an application writes; the guest booted again on
    the same disks (cache=none), the module loaded."""
    tmp = tmp_path_factory.mktemp("tracking")
    images = {name: tmp / f"{name}.img" for name in VM_DISKS}
    with boot(images, lab_kernel, bdr_ko) as g1:
        g1.run(f"mkfs.ext4 -q {g1.disk('cm')} && mount {g1.disk('cm')} /tmp/cm")
        out = setup_target(g1, f"--meta-device {g1.disk('meta')} --new-meta")
        assert "change tracking on" in out, out
        assert "meta_device formatted: 1024 regions tracked" in g1.dmesg()
        p = pair(g1)
        p.start_server()
        p.start_client()
        p.wait_synced()
        g1.run(f"mkfs.ext4 -q -E nodiscard {p.mapper} && mount {p.mapper} /tmp/mnt")
        g1.run("for i in $(seq 20); do head -c 300K /dev/urandom > /tmp/mnt/base$i; done; sync")
        p.wait_synced()
        wait_cleared(g1)
        # the application: files rewritten and fsync'd, over and over, and a file under steady direct writes
        # that keep the ring from emptying (the client rotates the marks' epochs meanwhile), until the power goes
        g1.run(
            "nohup sh -c 'i=0; while :; do dd if=/dev/urandom of=/tmp/mnt/app$((i % 6)) bs=64K count=3"
            " conv=fsync status=none; i=$((i + 1)); done' > /dev/null 2>&1 &"
        )
        g1.run(
            "nohup fio --name=hot --filename=/tmp/mnt/hot --size=1M --rw=randwrite --bs=4k --direct=1"
            " --ioengine=libaio --iodepth=16 --time_based --runtime=600 > /dev/null 2>&1 &"
        )
        time.sleep(15)
        marked = int(status(g1, "rep")["tracked_regions"])
        assert marked > 0
        g1.power_cut()
    with boot(images, lab_kernel, bdr_ko) as g2:
        g2.run(f"mount {g2.disk('cm')} /tmp/cm")
        yield g2


def test_source_power_cut_resyncs_only_the_tracked_regions(crashed: Guest) -> None:
    g = crashed
    setup_target(g, f"--meta-device {g.disk('meta')}")
    m = re.search(r"meta_device loaded: (\d+) of 1024 regions may differ", g.dmesg())
    assert m, g.dmesg()
    loaded = int(m.group(1))
    st = status(g, "rep")
    assert st["state"] == "dirty" and int(st["dirty_regions"]) == loaded > 0, st
    p = pair(g)
    p.start_server()
    p.start_client()
    p.wait_synced()
    log = g.run(f"cat {p.client_log}").output
    m = re.search(r"scan 1 \(hash\) of (\d+) tracked extents \((\d+) bytes\)", log)
    assert m, log
    scanned = int(m.group(2))
    print(f"after the power cut: {loaded} regions marked, {scanned} of {DEV_BYTES} bytes scanned")
    assert scanned <= loaded * REGION
    assert scanned < DEV_BYTES // 8
    assert "scan of the whole device" not in log
    assert p.same_on_disk()
    # ext4 on the source replays its journal; the replica follows and is a clean filesystem
    g.run(f"mount {p.mapper} /tmp/mnt && ls /tmp/mnt/app0 && umount /tmp/mnt")
    p.wait_synced()
    assert p.same_on_disk()
    g.run(f"e2fsck -fn {p.dst}")
    wait_cleared(g)
    g.check_kernel_log()

    # without a meta_device a new target has no marks to offer: the whole device is scanned, as before
    p.stop_client()
    g.run(f"{BIN}/bdr remove rep")
    setup_target(g)
    assert "tracked_regions" not in g.run("dmsetup status rep").output
    g.run(f"dd if=/dev/urandom of={p.mapper} bs=64K count=2 seek=100 oflag=direct status=none")
    g.run(f": > {p.client_log}")
    p.start_client()
    p.wait_synced()
    log = g.run(f"cat {p.client_log}").output
    assert re.search(r"scan \d+ \(hash\) of the whole device", log), log
    assert p.same_on_disk()
    p.remove()


def test_marks_of_regions_no_longer_written_go_while_writes_go_on(crashed: Guest) -> None:
    """Under a steady write load that seldom lets the ring empty (fio, 100 writes a second on the first MiB, and
    acknowledgements 200 ms away: netem on the loopback), the marks of a 16 MiB area written once meanwhile are
    cleared by the client's epochs within a few of them (an epoch lasts 5 s), not kept until the load stops."""
    g = crashed
    setup_target(g, f"--meta-device {g.disk('meta')} --new-meta")
    p = pair(g)
    p.start_server()
    p.start_client()
    p.wait_synced()
    g.run("modprobe sch_netem && tc qdisc add dev lo root netem delay 100ms")
    g.run(
        f"nohup fio --name=hot --filename={p.mapper} --rw=randwrite --bs=4k --size=1M --direct=1"
        " --ioengine=libaio --iodepth=4 --rate_iops=100 --time_based --runtime=600 --randrepeat=0"
        " > /tmp/fio-hot.out 2>&1 &"
    )
    try:
        g.run(f"dd if=/dev/urandom of={p.mapper} bs=64K count=256 seek=256 oflag=direct status=none")
        seen = [int(status(g, "rep")["tracked_regions"])]
        # marked (an epoch may already have taken the first of them, if the dd outlasted it)
        assert seen[0] >= 128, seen
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and seen[-1] > 32:
            time.sleep(2)
            seen.append(int(status(g, "rep")["tracked_regions"]))
        print(f"marked regions while fio writes the first MiB: {seen}")
        assert g.run("pgrep -x fio", check=False).rc == 0, "fio stopped early"
        assert seen[-1] <= 32, f"the marks of the area written during the load stayed: {seen}"
        assert int(status(g, "rep")["meta_rotations"]) > 0
    finally:
        g.run("pkill -x fio; while pgrep -x fio >/dev/null; do sleep 0.2; done; tc qdisc del dev lo root")
    p.wait_synced()
    assert p.same_on_disk()
    g.check_kernel_log()
    p.remove()


def test_a_write_whose_mark_cannot_be_written_fails(crashed: Guest) -> None:
    g = crashed
    d2 = g.disk("d2")
    # the meta_device is a dm-linear device over the first 64 KiB of d2; the data device is the rest of d2
    g.run(
        f"""set -e
        dd if=/dev/zero of={d2} bs=1M count=16 oflag=direct status=none
        dmsetup create m2 --table '0 128 linear {d2} 0'
        dmsetup create d2data --table '0 16384 linear {d2} 2048'
        dmsetup create t2 --table "0 16384 bdr /dev/mapper/d2data bdr_t2 1024 2 meta_device /dev/mapper/m2"
        """
    )
    g.run("dd if=/dev/urandom of=/dev/mapper/t2 bs=4K count=1 seek=0 oflag=direct status=none")
    assert status(g, "t2")["tracked_regions"] == "1"
    # the meta_device fails from now on: a write to an unmarked region fails and never reaches the disk
    g.run("dmsetup suspend m2 && dmsetup load m2 --table '0 128 error' && dmsetup resume m2")
    res = g.run(
        "dd if=/dev/urandom of=/dev/mapper/t2 bs=4K count=1 seek=512 oflag=direct status=none", check=False
    )
    assert res.rc != 0
    g.run(
        "dd if=/dev/mapper/d2data bs=4K skip=512 count=1 iflag=direct status=none | cmp -n 4096 - /dev/zero"
    )
    # nor may a reload drop the meta_device from under the marks
    res = g.run("dmsetup reload t2 --table '0 16384 bdr /dev/mapper/d2data bdr_t2 1024'", check=False)
    assert res.rc != 0 and "A reload cannot add, remove or change meta_device" in g.dmesg()
    st = status(g, "t2")
    assert st["meta_failed"] == "1", st
    assert "change tracking stopped, writes to the device fail" in g.dmesg()
    g.run("dmsetup remove t2 && dmsetup remove d2data && dmsetup remove m2")
    g.check_kernel_log()


@pytest.mark.parametrize(
    ("meta", "prepare", "message"),
    [
        (
            "/dev/mapper/m3",
            "dd if=/dev/urandom of=/dev/mapper/m3 bs=4K count=1 oflag=direct status=none",
            "meta_device holds no bdr tracking area",
        ),
        (
            "/dev/mapper/m3",
            "dmsetup remove m3 && dmsetup create m3 --table '0 8 linear {d2} 0'",
            "meta_device too small",
        ),
        ("/dev/mapper/d3data", "", "meta_device must be another device"),
    ],
)
def test_unusable_meta_devices_are_refused(crashed: Guest, meta: str, prepare: str, message: str) -> None:
    g = crashed
    d2 = g.disk("d2")
    g.run(
        f"dd if=/dev/zero of={d2} bs=1M count=1 oflag=direct status=none;"
        f" dmsetup create m3 --table '0 128 linear {d2} 0' && dmsetup create d3data --table '0 16384 linear {d2} 2048'"
    )
    try:
        if prepare:
            g.run(prepare.format(d2=d2))
        res = g.run(
            f"dmsetup create t3 --table '0 16384 bdr /dev/mapper/d3data bdr_t3 1024 2 meta_device {meta}'",
            check=False,
        )
        assert res.rc != 0
        assert message in g.dmesg()
    finally:
        g.run("dmsetup remove t3; dmsetup remove d3data; dmsetup remove m3", check=False)
