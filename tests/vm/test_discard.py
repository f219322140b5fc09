"""Discards in the 6.12 guest: a discard is a hint, so after blkdiscard, mkfs, fstrim of ext4 and blkdiscard -z
the replica must read what the source reads, whether the source disk zeroes discarded ranges (QEMU
discard=unmap: the image gets a hole) or keeps its data (discard=ignore: the guest still sees discard
support).  Where the source reads zeros no data travels, and the replica disk gives the space back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.vm.lab import Guest
from tests.vm.pair import BIN, Pair

MiB = 1 << 20
VM_DISKS = {"srci": "64M", "dsti": "64M", "jnli": "80M", "srcu": "64M", "dstu": "64M", "jnlu": "80M"}
VM_DISCARD = {"srci": "ignore", "dsti": "ignore"}
VM_MEMORY = "2048M"


def sent_bytes(p: Pair) -> int:
    """Data bytes the client sent so far: ring records and scan blocks."""
    targets = json.loads(p.g.run(f"{BIN}/bdr status --json").output)["targets"]
    rep = next(t["client"] for t in targets if t["name"] == p.name)["replicated"]
    return int(rep["bytes"]) + int(rep["scan_bytes"])


@pytest.mark.parametrize("mode", ["ignore", "unmap"])
def test_discarded_ranges_read_the_same_on_source_and_replica(guest: Guest, bdr_ko: Path, mode: str) -> None:
    g = guest
    g.run(f"lsmod | grep -q '^bdr ' || (modprobe dm-mod && insmod {bdr_ko})")
    k = mode[0]
    port = 8100 if mode == "ignore" else 8200
    p = Pair(
        g,
        g.disk(f"src{k}"),
        g.disk(f"dst{k}"),
        g.disk(f"jnl{k}"),
        name=f"d{k}",
        chardev=f"bdr_d{k}",
        port=port,
    )
    p.setup()
    p.start_server()
    p.start_client()
    try:
        m = p.mapper
        g.run(f"dd if=/dev/urandom of={m} bs=1M count=64 oflag=direct status=none")
        p.wait_synced()
        # 1. blkdiscard of a range
        g.run(f"blkdiscard -o {20 * MiB} -l {4 * MiB} {m}")
        p.wait_synced()
        zero = g.run(f"dd if={p.src} iflag=direct bs=1M skip=20 count=4 status=none | tr -d '\\0' | wc -c")
        source_zeroed = zero.output.strip() == "0"
        assert source_zeroed == (mode == "unmap"), f"the {mode} disk: source zeroed {source_zeroed}"
        assert p.same_on_disk(), "replica differs after blkdiscard"
        # 2. ext4 (mkfs discards the whole device), files written and deleted, fstrim
        g.run(
            f"""set -e
            mkfs.ext4 -q -F {m}
            mkdir -p /tmp/d{k} && mount -o nodiscard {m} /tmp/d{k}
            dd if=/dev/urandom of=/tmp/d{k}/big bs=1M count=40 status=none
            cp -a /usr/include/linux /tmp/d{k}/
            sync
            rm /tmp/d{k}/big
            sync
            """,
            timeout=300,
        )
        p.wait_synced()
        before = sent_bytes(p)
        trimmed = g.run(f"fstrim -v /tmp/d{k}").output
        g.run("sync")
        p.wait_synced()
        sent = sent_bytes(p) - before
        print(
            f"discard={mode}: {trimmed.strip()}; bytes sent for it: {sent} ({sent / (64 * MiB):.4f} of the device)"
        )
        if mode == "unmap":
            assert sent < 4 * MiB, f"fstrim of a source that reads zeros sent {sent} bytes"
        g.run(f"umount /tmp/d{k}")
        p.wait_synced()
        assert p.same_on_disk(), "replica differs after mkfs / fstrim"
        fsck = g.run(f"fsck.ext4 -n -f {p.dst}", check=False)
        assert fsck.rc == 0, fsck.output
        # 3. blkdiscard -z: WRITE_ZEROES, defined content on every disk
        g.run(f"blkdiscard -z -o {8 * MiB} -l {2 * MiB} {m}")
        p.wait_synced()
        assert p.same_on_disk(), "replica differs after blkdiscard -z"
        if mode == "unmap":  # the replica disk gave the discarded space back (holes in its image)
            used = g.disk_image(f"dst{k}").stat().st_blocks * 512
            src_used = g.disk_image(f"src{k}").stat().st_blocks * 512
            print(f"discard={mode}: image space used: source {src_used}, replica {used} of {64 * MiB} bytes")
            assert used < 32 * MiB, f"the replica image still uses {used} bytes"
    finally:
        p.remove()
