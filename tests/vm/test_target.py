"""The bdr device-mapper target in real kernels (6.12 and the newest trixie-backports one): exact capture,
operations, failures, overflow, concurrency, lifecycle and table parsing.  Each test checks the ring against the
device with tests/vm/ringtool.py, an independent reader of the ABI header's ring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.vm.targets import PY, REPO, TOOL, create, jrun, status_fields

WORKLOAD = f"{PY} {REPO}/tests/vm/workload.py"

VM_DISKS = {"a": "64M", "b": "64M"}
VM_MEMORY = "1536M"
VM_KERNELS = ("6.12", "7.x")

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def g(guest: Any, bdr_ko: Path) -> Any:
    guest.run(f"modprobe dm-mod && modprobe dm-flakey && insmod {bdr_ko} && grep -q '^bdr ' /proc/modules")
    return guest


def test_exact_capture_replays_to_device(g: Any) -> None:
    """Random buffered and O_DIRECT writes; replaying the ring on the initial image gives the device."""
    a = g.disk("a")
    g.run(
        f"""set -e
        dd if=/dev/urandom of={a} bs=1M count=64 oflag=direct status=none
        dd if={a} of=/tmp/initial bs=1M iflag=direct status=none
        """
    )
    create(g, "exact", a, "bdr_exact", 40000)
    g.run(f"{WORKLOAD} /dev/mapper/exact --seed 7 --count 300")
    summary = jrun(g, f"{TOOL} dump /dev/bdr_exact /tmp/exact.rec")
    assert summary["records"] > 300
    assert summary["state"] == 0, "no overflow expected with a large ring"
    g.run(
        f"""set -e
        {TOOL} replay /tmp/exact.rec /tmp/initial
        cmp /tmp/initial /dev/mapper/exact
        dmsetup remove exact
        rm -f /tmp/initial /tmp/exact.rec
        """
    )


def test_operations_flush_fua_discard_zeroes(g: Any) -> None:
    b = g.disk("b")
    create(g, "ops", b, "bdr_ops", 4096)
    g.run(
        """set -e
        dd if=/dev/urandom of=/dev/mapper/ops bs=16384 count=1 seek=40960 oflag=direct,seek_bytes status=none
        sync /dev/mapper/ops
        dd if=/dev/urandom of=/dev/mapper/ops bs=4096 count=1 seek=20 oflag=direct,dsync status=none
        blkdiscard -o 1048576 -l 1048576 /dev/mapper/ops
        blkdiscard -z -o 4194304 -l 65536 /dev/mapper/ops
        """
    )
    g.run(f"{TOOL} dump /dev/bdr_ops /tmp/ops.rec")
    recs = [json.loads(line) for line in g.run(f"{TOOL} list /tmp/ops.rec").output.splitlines()]
    seqs = [r["seq"] for r in recs]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "sequence numbers must be consecutive"
    ops = [(r["op"], r["sector"], r["len"], r["flags"]) for r in recs]
    writes = [o for o in ops if o[0] == 1]
    # the 16 KiB O_DIRECT write: 4 records of 4 KiB at sectors 80, 88, 96, 104, chained with CONT/MORE
    first = [o for o in writes if 80 <= o[1] < 112]
    assert [(o[1], o[2]) for o in first] == [(80, 4096), (88, 4096), (96, 4096), (104, 4096)]
    assert first[0][3] & 4 and not first[0][3] & 2 and first[-1][3] & 2 and not first[-1][3] & 4
    # sync -> flush record after those writes
    i_last = ops.index(first[-1])
    assert any(o[0] == 2 for o in ops[i_last + 1 :]), ops
    # O_DIRECT|O_DSYNC -> FUA-flagged write at sector 160
    fua = [o for o in writes if o[1] == 160]
    assert fua and fua[0][3] & 1, ops
    assert (3, 2048, 1048576, 0) in ops, "blkdiscard range"
    assert (4, 8192, 65536, 0) in ops, "blkdiscard -z range"
    g.run("dmsetup remove ops")


def test_failed_writes_are_not_published(g: Any) -> None:
    """dm-flakey below bdr fails writes: they are counted, marked dirty, and never put in the ring."""
    b = g.disk("b")
    g.run(
        f"""set -e
        echo "0 $(blockdev --getsz {b}) flakey {b} 0 3600 0" | dmsetup create flaky
        """
    )
    create(g, "onflaky", "/dev/mapper/flaky", "bdr_flaky", 1024)
    g.run("dd if=/dev/urandom of=/dev/mapper/onflaky bs=4096 count=1 seek=5 oflag=direct status=none")
    g.run(
        f"""set -e
        dmsetup suspend onflaky
        dmsetup suspend flaky
        echo "0 $(blockdev --getsz {b}) flakey {b} 0 0 3600 1 error_writes" | dmsetup load flaky
        dmsetup resume flaky
        dmsetup resume onflaky
        """
    )
    res = g.run(
        "dd if=/dev/urandom of=/dev/mapper/onflaky bs=4096 count=1 seek=300 oflag=direct status=none",
        check=False,
    )
    assert res.rc != 0, "the write through error_writes must fail"
    st = status_fields(g, "onflaky")
    assert int(st["failed"]) >= 1 and st["state"] == "dirty", st
    g.run(f"{TOOL} dump /dev/bdr_flaky /tmp/flaky.rec")
    recs = [json.loads(line) for line in g.run(f"{TOOL} list /tmp/flaky.rec").output.splitlines()]
    assert any(r["op"] == 1 and r["sector"] == 40 for r in recs), "the good write is published"
    assert not any(r["op"] == 1 and r["sector"] <= 2400 < r["sector"] + r["len"] // 512 for r in recs), recs
    dirty = jrun(g, f"{TOOL} take /dev/bdr_flaky")
    assert 2400 // dirty["region_sectors"] in dirty["regions"], dirty
    g.run("dmsetup remove onflaky && dmsetup remove flaky && rm -f /tmp/flaky.rec")


def test_overflow_keeps_io_going_and_covers_every_write(g: Any) -> None:
    a = g.disk("a")
    g.run(f"dd if={a} of=/tmp/before bs=1M iflag=direct status=none")
    create(g, "ovf", a, "bdr_ovf", 16)
    g.run(
        "dd if=/dev/urandom of=/dev/mapper/ovf bs=64K count=256 oflag=direct status=none"
        " && dd if=/dev/urandom of=/dev/mapper/ovf bs=4K count=300 seek=9000 status=none && sync"
    )
    st = status_fields(g, "ovf")
    assert st["state"] == "overflow" and int(st["dropped"]) > 0 and int(st["overflows"]) >= 1, st
    g.run(f"{TOOL} dump /dev/bdr_ovf /tmp/ovf.rec")
    dirty = jrun(g, f"{TOOL} take /dev/bdr_ovf")
    assert dirty["state"] & 1 and dirty["nr_dirty"] == len(dirty["regions"]) > 0
    # every 4 KiB block that changed is covered by a ring record or a dirty region
    g.run(f"{TOOL} replay /tmp/ovf.rec /tmp/before")
    covered = set(dirty["regions"])
    rs = dirty["region_sectors"]
    changed = set(jrun(g, f"{TOOL} diff /tmp/before /dev/mapper/ovf"))
    assert changed, "the writes must have changed the device"
    uncovered = {blk for blk in changed if (blk * 8) // rs not in covered}
    assert not uncovered, f"blocks neither in the ring nor in the bitmap: {sorted(uncovered)[:10]}"
    # re-armed: the next write is captured in the ring again
    assert status_fields(g, "ovf")["state"] == "capturing"
    g.run("dd if=/dev/urandom of=/dev/mapper/ovf bs=4096 count=1 seek=3 oflag=direct status=none")
    again = jrun(g, f"{TOOL} dump /dev/bdr_ovf /tmp/ovf2.rec")
    assert again["records"] == 1 and again["state"] == 0, again
    g.run("dmsetup remove ovf && rm -f /tmp/before /tmp/ovf.rec /tmp/ovf2.rec")


def test_concurrent_overlapping_writers_replay_equals_device(g: Any) -> None:
    a = g.disk("a")
    g.run(f"dd if={a} of=/tmp/initial bs=1M iflag=direct status=none")
    create(g, "conc", a, "bdr_conc", 40000)
    g.run(
        "fio --name=ovl --filename=/dev/mapper/conc --rw=randwrite --bsrange=4k-64k --size=4M"
        " --io_size=24M --numjobs=4 --iodepth=16 --ioengine=libaio --direct=1 --randrepeat=0"
        " --group_reporting --output-format=terse >/dev/null",
        timeout=300,
    )
    summary = jrun(g, f"{TOOL} dump /dev/bdr_conc /tmp/conc.rec")
    assert summary["state"] == 0, summary
    g.run(f"{TOOL} replay /tmp/conc.rec /tmp/initial && cmp /tmp/initial /dev/mapper/conc")
    g.run("dmsetup remove conc && rm -f /tmp/initial /tmp/conc.rec")


def test_lifecycle_64_targets_remove_while_mapped_reload(g: Any, bdr_ko: Path) -> None:
    a = g.disk("a")
    g.run(
        f"""set -e
        for i in $(seq 0 63); do
          echo "0 2048 linear {a} $((i * 2048))" | dmsetup create lin$i
          echo "0 2048 bdr /dev/mapper/lin$i bdr_m$i 16" | dmsetup create m$i
        done
        for i in $(seq 0 63); do test -c /dev/bdr_m$i; done
        for i in $(seq 0 63); do dd if=/dev/zero of=/dev/mapper/m$i bs=4096 count=1 oflag=direct status=none; done
        for i in $(seq 0 63); do dmsetup status m$i | grep -q 'records=1 '; done
        for i in $(seq 0 63); do dmsetup remove m$i; dmsetup remove lin$i; done
        """,
        timeout=300,
    )
    # remove while the chardev is open and mapped: the mapping stays valid and reports the target dead
    create(g, "held", a, "bdr_held", 64)
    g.run("dd if=/dev/zero of=/dev/mapper/held bs=4096 count=2 oflag=direct status=none")
    g.run(f"rm -f /tmp/ready /tmp/stop; ({TOOL} hold /dev/bdr_held /tmp/ready /tmp/stop > /tmp/hold.out &) ")
    g.run("for i in $(seq 100); do test -e /tmp/ready && break; sleep 0.1; done; test -e /tmp/ready")
    g.run("dmsetup remove held && test ! -e /dev/bdr_held")
    assert g.run("rmmod bdr", check=False).rc != 0, "the module must stay while the chardev is open"
    g.run("touch /tmp/stop; for i in $(seq 100); do test -s /tmp/hold.out && break; sleep 0.1; done")
    held = json.loads(g.run("cat /tmp/hold.out").output)
    assert held["state"] & 4 and held["head"] == 2 and held["magic"] == 0x31524442, held
    # reload + resume keeps the ring and its records
    create(g, "rl", a, "bdr_rl", 64)
    g.run("dd if=/dev/zero of=/dev/mapper/rl bs=4096 count=1 oflag=direct status=none")
    g.run("dmsetup table rl | dmsetup reload rl && dmsetup resume rl")
    g.run("dd if=/dev/zero of=/dev/mapper/rl bs=4096 count=1 seek=1 oflag=direct status=none")
    assert status_fields(g, "rl")["records"] == "2"
    bad = g.run(f'echo "0 2048 bdr {a} bdr_rl 65" | dmsetup reload rl', check=False)
    assert bad.rc != 0
    g.run("dmsetup clear rl; dmsetup remove rl")
    g.run(f"rmmod bdr && insmod {bdr_ko}")


def test_poll_wakes_only_for_unseen_records_and_instance_is_per_ring(g: Any) -> None:
    a, b = g.disk("a"), g.disk("b")
    create(g, "pa", a, "bdr_pa", 64)
    create(g, "pb", b, "bdr_pb", 64)
    g.run("dd if=/dev/zero of=/dev/mapper/pa bs=4096 count=2 oflag=direct status=none")
    unseen = jrun(g, f"{TOOL} seen /dev/bdr_pa 0")
    assert unseen["readable"] and unseen["head"] == 2, unseen
    seen = jrun(g, f"{TOOL} seen /dev/bdr_pa")
    assert not seen["readable"], "records already read must not wake the consumer"
    g.run("dd if=/dev/zero of=/dev/mapper/pa bs=4096 count=1 oflag=direct status=none")
    assert jrun(g, f"{TOOL} seen /dev/bdr_pa 2")["readable"], "a new record must wake the consumer"
    other = jrun(g, f"{TOOL} seen /dev/bdr_pb")
    assert seen["instance"] != 0 and other["instance"] not in (0, seen["instance"])
    g.run("dmsetup table pa | dmsetup reload pa && dmsetup resume pa")
    assert jrun(g, f"{TOOL} seen /dev/bdr_pa")["instance"] == seen["instance"], "a reload keeps the ring"
    g.run("dmsetup remove pa && dmsetup remove pb")
    create(g, "pa", a, "bdr_pa", 64)
    assert jrun(g, f"{TOOL} seen /dev/bdr_pa")["instance"] != seen["instance"], "a new target, a new instance"
    g.run("dmsetup remove pa")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("{dev} bdr_bad", "Invalid argument count"),
        ("{dev} bdr_bad 10 128 9", "Invalid argument count"),
        ("{dev} bdr_bad ten", "Invalid buffer_size_in_writes"),
        ("{dev} bdr_bad 0", "Invalid buffer_size_in_writes"),
        ("{dev} bdr_bad 10x", "Invalid buffer_size_in_writes"),
        ("{dev} bdr_bad 10 100", "Invalid region_sectors"),
        ("/dev/nonexistent bdr_bad 10", "Device lookup failed"),
        ("{dev} bad/name 10", "Invalid chardev_name"),
        ("{dev} bdr_dup 10", "already in use"),
    ],
)
def test_bad_table_lines_are_refused(g: Any, args: str, message: str) -> None:
    a = g.disk("a")
    if "bdr_dup" in args:
        g.run(
            f'echo "0 1024 linear {a} 0" | dmsetup create duphost && echo "0 1024 bdr /dev/mapper/duphost bdr_dup 10" | dmsetup create dup1'
        )
    try:
        g.run("dmesg -C")
        res = g.run(f'echo "0 1024 bdr {args.format(dev=a)}" | dmsetup create badtbl', check=False)
        assert res.rc != 0, res.output
        assert "failed" in res.output
        log = g.run("dmesg").output
        assert message in log, log
        assert g.run("dmsetup info badtbl", check=False).rc != 0 or g.run("dmsetup remove badtbl").rc == 0
    finally:
        if "bdr_dup" in args:
            g.run("dmsetup remove dup1; dmsetup remove duphost")
