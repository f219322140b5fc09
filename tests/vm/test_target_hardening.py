"""The bdr target on the setups that used to break it: multi-TiB devices, write-through disks, copies still
running at a handover, reloads onto another device, two targets in a table, a second consumer, a client that
writes over the kernel's fields, out-of-range numbers and device names that exist in /dev.  The ring is read
with tests/vm/ringtool.py, an independent reader of the ABI header."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.vm.targets import REPO, TOOL, create, jrun, status_fields

VM_DISKS = {"a": "64M", "b": "64M", "cow": "64M", "cow2": "64M"}
VM_KERNELS = ("6.12", "7.x")
VM_MEMORY = "1536M"
TIB_SECTORS = 1 << 31  # 512-byte sectors in a TiB
DELAY = "/sys/module/bdr/parameters/copy_delay_ms"

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def g(guest: Any, bdr_ko: Path) -> Any:
    guest.run(f"modprobe dm-mod && modprobe dm-snapshot && insmod {bdr_ko} && grep -q '^bdr ' /proc/modules")
    return guest


def refused(g: Any, cmd: str, message: str) -> None:
    """cmd (a dmsetup create/reload) fails, and the kernel log says why."""
    g.run("dmesg -C")
    res = g.run(cmd, check=False)
    assert res.rc != 0, f"accepted: {cmd}\n{res.output}"
    log = g.run("dmesg").output
    assert message in log, log


def sparse(g: Any, name: str, tib: int, cow: str) -> str:
    """A writable device of `tib` TiB that reads zeros: a snapshot of a zero target, writes kept on `cow`."""
    sectors = tib * TIB_SECTORS
    g.run(
        f"""set -e
        echo "0 {sectors} zero" | dmsetup create {name}_zero
        dd if=/dev/zero of={cow} bs=1M count=1 oflag=direct status=none
        echo "0 {sectors} snapshot /dev/mapper/{name}_zero {cow} N 8" | dmsetup create {name}
        """
    )
    return f"/dev/mapper/{name}"


def remove_sparse(g: Any, name: str) -> None:
    g.run(f"dmsetup remove {name} && dmsetup remove {name}_zero")


@pytest.mark.parametrize(
    ("tib", "region"),
    [
        (3, ""),
        pytest.param(17, "", marks=pytest.mark.kernels("6.12")),
        pytest.param(16, "8", marks=pytest.mark.kernels("6.12")),
    ],
)
def test_multi_tib_devices_capture_overflow_and_resync_near_the_end(g: Any, tib: int, region: str) -> None:
    """3 and 17 TiB at the default region size, and 16 TiB at 4 KiB regions (2^32 regions as asked): the
    target is created with a region size that keeps the bitmap small, records near the end carry 64-bit
    sectors, and an overflow there is marked in the bitmap; replaying the ring and copying the dirty regions
    onto a replica of the same size makes the written ranges equal."""
    src = sparse(g, "big", tib, g.disk("cow"))
    dst = sparse(g, "bigr", tib, g.disk("cow2"))
    sectors = tib * TIB_SECTORS
    extra = f"2 region_sectors {region}" if region else ""
    try:
        g.run("dmesg -C")
        create(g, "bigm", src, "bdr_big", 64, extra)
        info = jrun(g, f"{TOOL} status /dev/bdr_big")
        assert info["state"] == 0, info
        table = g.run("dmsetup table bigm").output.split()
        region_sectors = int(table[table.index("region_sectors") + 1])
        assert sectors // region_sectors <= 1 << 25, table
        if region:
            assert "region_sectors 8 -> " in g.run("dmesg").output, "a grown region size is reported"
        end = sectors * 512
        # 1: a 64 KiB write 1 MiB before the end goes through the ring with its 64-bit sector
        g.run(
            f"dd if=/dev/urandom of=/dev/mapper/bigm bs=64K count=1 seek={end - (1 << 20)}"
            " oflag=direct,seek_bytes status=none"
        )
        g.run(f"rm -f /tmp/big.rec && {TOOL} dump /dev/bdr_big /tmp/big.rec")
        recs = [json.loads(line) for line in g.run(f"{TOOL} list /tmp/big.rec").output.splitlines()]
        first = (end - (1 << 20)) // 512
        assert [(r["sector"], r["len"]) for r in recs] == [(first + 8 * i, 4096) for i in range(16)], recs
        # 2: the last 2 MiB overflow the 64-slot ring: the regions are marked, not lost
        g.run(
            f"dd if=/dev/urandom of=/dev/mapper/bigm bs=256K count=8 seek={end - (2 << 20)}"
            " oflag=direct,seek_bytes status=none"
        )
        st = status_fields(g, "bigm")
        assert st["state"] == "overflow" and int(st["dropped"]) > 0, st
        g.run(f"{TOOL} dump /dev/bdr_big /tmp/big.rec")
        dirty = jrun(g, f"{TOOL} take /dev/bdr_big")
        assert dirty["region_sectors"] == region_sectors
        assert dirty["regions"] and min(dirty["regions"]) * region_sectors >= (end - (3 << 20)) // 512, dirty
        assert max(dirty["regions"]) == (sectors - 1) // region_sectors, dirty
        # 3: resync: the ring replayed, then each dirty region copied from the source
        g.run(f"{TOOL} replay /tmp/big.rec {dst}")
        regions = " ".join(map(str, dirty["regions"]))
        g.run(
            f"for r in {regions}; do dd if=/dev/mapper/bigm of={dst} bs={region_sectors * 512} count=1 skip=$r"
            " seek=$r iflag=direct oflag=direct conv=notrunc status=none || exit 1; done"
        )
        tail = f"bs=1M count=8 skip={(end >> 20) - 8} iflag=direct status=none"
        same = g.run(f"cmp <(dd if=/dev/mapper/bigm {tail}) <(dd if={dst} {tail})", check=False)
        assert same.rc == 0, same.output
        assert g.run(f"dd if={dst} {tail} | tr -d '\\0' | wc -c").output.strip() != "0", "nothing was written"
        g.run("dmsetup remove bigm")
    finally:
        g.run("dmsetup remove bigm 2>/dev/null; true")
        remove_sparse(g, "big")
        remove_sparse(g, "bigr")


def test_handover_position_is_published(g: Any) -> None:
    """A 1 MiB write whose copy into the ring is slow (copy_delay_ms) reserved its slots before the handover:
    BDR_IOC_TAKE_DIRTY must not return before those records are published, or the client would scan the
    dirty regions first and apply that older record over the newer data afterwards."""
    a = g.disk("a")
    create(g, "ho", a, "bdr_ho", 4096)
    g.run(f"echo 3000 > {DELAY}")
    try:
        # the handover is asked for as soon as the write counted its records, while its copy sleeps
        g.run(
            f"rm -f /tmp/take.out /tmp/take.ready; ({TOOL} take /dev/bdr_ho 256 /tmp/take.ready > /tmp/take.out 2>&1 &);"
            " for i in $(seq 200); do test -e /tmp/take.ready && break; sleep 0.05; done;"
            " dd if=/dev/urandom of=/dev/mapper/ho bs=1M count=1 oflag=direct status=none;"
            " for i in $(seq 200); do test -s /tmp/take.out && break; sleep 0.05; done"
        )
        took = json.loads(g.run("cat /tmp/take.out").output)
        assert took["ring_head"] == 256, "the write reserved its slots before the handover"
        assert took["head_after"] >= took["ring_head"], took
        assert took["next_seq"] == took["ring_head"], took
    finally:
        g.run(f"echo 0 > {DELAY}; dmsetup remove ho")


def test_next_seq_is_the_seq_at_head_while_copies_run(g: Any) -> None:
    """Two slow 1 MiB copies: while the second is still copying after the first was published, next_seq
    in the control page must be the sequence number at head, not past the records still being copied
    (a reconnect then would take the resume point for lost and rescan the whole device)."""
    a = g.disk("a")
    create(g, "ns", a, "bdr_ns", 4096)
    g.run(f"echo 1500 > {DELAY}")
    try:
        g.run(
            f"rm -f /tmp/watch.out /tmp/watch.ready; ({TOOL} watch /dev/bdr_ns 5 /tmp/watch.ready > /tmp/watch.out"
            " 2>&1 &); for i in $(seq 200); do test -e /tmp/watch.ready && break; sleep 0.05; done;"
            " (dd if=/dev/urandom of=/dev/mapper/ns bs=1M count=1 oflag=direct status=none &); sleep 0.6;"
            " (dd if=/dev/urandom of=/dev/mapper/ns bs=1M count=1 seek=8 oflag=direct status=none &);"
            " for i in $(seq 200); do test -s /tmp/watch.out && break; sleep 0.1; done"
        )
        pairs = json.loads(g.run("cat /tmp/watch.out").output)
        heads = [h for h, _ in pairs]
        assert 256 in heads and heads[-1] == 512, (
            f"both copies must be seen finishing one after the other: {pairs}"
        )
        assert all(seq == head for head, seq in pairs), pairs
    finally:
        g.run(f"echo 0 > {DELAY}; sleep 2; dmsetup remove ns")


def test_fua_survives_a_write_through_lower_device(g: Any) -> None:
    """The block layer drops REQ_FUA on the way to a disk without a volatile cache; the record must still
    be a durability point for the replica."""
    b = g.disk("b")
    wc = f"/sys/block/{Path(b).name}/queue/write_cache"
    g.run(f"echo 'write through' > {wc}")
    try:
        create(g, "wt", b, "bdr_wt", 256)
        g.run("dd if=/dev/urandom of=/dev/mapper/wt bs=4096 count=1 seek=7 oflag=direct,dsync status=none")
        g.run(f"rm -f /tmp/wt.rec && {TOOL} dump /dev/bdr_wt /tmp/wt.rec")
        recs = [json.loads(line) for line in g.run(f"{TOOL} list /tmp/wt.rec").output.splitlines()]
        writes = [r for r in recs if r["op"] == 1 and r["sector"] == 56]
        assert writes and writes[0]["flags"] & 1, recs
        g.run("dmsetup remove wt")
    finally:
        g.run(f"echo 'write back' > {wc}")


def test_table_identity(g: Any) -> None:
    """bdr is the only target of its table, from sector 0; a reload onto another device is refused."""
    a, b = g.disk("a"), g.disk("b")
    refused(
        g,
        f'printf "0 1024 bdr {a} bdr_t1 16\\n1024 1024 bdr {b} bdr_t2 16\\n" | dmsetup create two',
        "alone in table",
    )
    refused(
        g,
        f'printf "0 1024 linear {a} 0\\n1024 1024 bdr {b} bdr_t3 16\\n" | dmsetup create mixed',
        "alone in table",
    )
    g.run("dmsetup remove two mixed 2>/dev/null; true")
    create(g, "ident", a, "bdr_ident", 64)
    try:
        refused(g, f'echo "0 1024 bdr {b} bdr_ident 64" | dmsetup reload ident', "cannot change <device>")
        g.run("dmsetup clear ident")
        # the same device, by path or by number, is still a reload that keeps the ring
        g.run("dmsetup table ident | dmsetup reload ident && dmsetup resume ident && test -c /dev/bdr_ident")
    finally:
        g.run("dmsetup remove ident")


def test_every_bio_fits_in_the_ring(g: Any) -> None:
    """A 1 MiB write to a 64-slot ring is split into pieces that fit: the first is published (before, the
    whole bio could never be, however empty the ring); the overflow is logged once."""
    a = g.disk("a")
    create(g, "fit", a, "bdr_fit", 64)
    g.run("dmesg -C")
    g.run("dd if=/dev/urandom of=/dev/mapper/fit bs=1M count=1 oflag=direct status=none")
    st = status_fields(g, "fit")
    assert int(st["records"]) == 64 and st["state"] == "overflow", st
    assert "bdr_fit: ring full (64 slots)" in g.run("dmesg").output
    g.run("dmsetup remove fit")


def test_one_writable_consumer(g: Any) -> None:
    a = g.disk("a")
    create(g, "cons", a, "bdr_cons", 64)
    try:
        got = jrun(g, f"{TOOL} opens /dev/bdr_cons")
        assert got == {"second_rw": 16, "ro_instance_ok": True, "ro_take": 9, "rw_after_close": 0}, got
        # a client started while another consumer holds the ring says so, and writes nothing anywhere
        g.run(f"rm -f /tmp/ready /tmp/stop; ({TOOL} hold /dev/bdr_cons /tmp/ready /tmp/stop > /dev/null &)")
        g.run("for i in $(seq 100); do test -e /tmp/ready && break; sleep 0.1; done; test -e /tmp/ready")
        res = g.run(
            f"{REPO}/.venv/bin/bdr_client --control-device /dev/bdr_cons --source-device /dev/mapper/cons"
            " --address 127.0.0.1 --port 9",
            check=False,
        )
        g.run("touch /tmp/stop")
        assert res.rc != 0 and "the ring has one consumer" in res.output, res.output
    finally:
        g.run("dmsetup remove cons")


def test_kernel_ignores_what_the_client_wrote_over_its_fields(g: Any) -> None:
    a = g.disk("a")
    create(g, "scr", a, "bdr_scr", 64)
    try:
        g.run("dd if=/dev/zero of=/dev/mapper/scr bs=4096 count=2 oflag=direct status=none")
        got = jrun(g, f"{TOOL} scribble /dev/bdr_scr")
        assert got["after"] == got["before"], got
        assert not got["readable"], "a head or state written by the client must not wake it"
    finally:
        g.run("dmsetup remove scr")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("{dev} bdr_bad 4294967297", "Invalid buffer_size_in_writes"),
        ("{dev} bdr_bad 16777217", "Invalid buffer_size_in_writes"),
        ("{dev} bdr_bad -1", "Invalid buffer_size_in_writes"),
        ("{dev} bdr_bad 10 4294967304", "Invalid region_sectors"),
        ("{dev} bdr_bad 10 1 region_sectors", "Invalid argument count"),
        ("{dev} bdr_bad 10 2 region_sectors 100", "Invalid region_sectors"),
        ("{dev} bdr_bad 10 2 bogus 128", "Unrecognised feature argument"),
        ("{dev} null 10", "already exists"),
        ("{dev} kmsg 10", "already exists"),
        ("{dev} mapper 10", "already exists"),
    ],
)
def test_out_of_range_numbers_and_taken_names_are_refused(g: Any, args: str, message: str) -> None:
    refused(g, f'echo "0 1024 bdr {args.format(dev=g.disk("a"))}" | dmsetup create badtbl', message)
    g.run("dmsetup remove badtbl 2>/dev/null; true")


def test_feature_args_and_the_older_form(g: Any) -> None:
    a = g.disk("a")
    for extra in ("2 region_sectors 256", "256", "0", ""):
        create(g, "feat", a, "bdr_feat", 32, extra)
        table = g.run("dmsetup table feat").output.split()
        want = "128" if extra in ("0", "") else "256"
        assert table[4:] == ["bdr_feat", "32", "2", "region_sectors", want], table
        g.run("dmsetup table feat | dmsetup reload feat && dmsetup resume feat && dmsetup remove feat")


def test_module_autoloads_as_dm_bdr(g: Any, bdr_ko: Path) -> None:
    """dm core asks for "dm-<target>" when a table names an unknown target."""
    aliases = [
        line.split()[1]
        for line in g.run(f"modinfo {bdr_ko}").output.splitlines()
        if line.startswith("alias:")
    ]
    assert "dm-bdr" in aliases, aliases
