"""Smoke test: the bdr module loads in the 6.12 guest, a bdr target passes writes to its device, and
everything unloads again."""

from __future__ import annotations

from pathlib import Path

from tests.vm import lab

VM_DISKS = {"src": "64M"}


def test_smoke_create_write_read_remove(guest: lab.Guest, bdr_ko: Path) -> None:
    src = guest.disk("src")
    guest.run(f"modprobe dm-mod && insmod {bdr_ko} && grep -q '^bdr ' /proc/modules")
    try:
        sectors = int(guest.run(f"blockdev --getsz {src}").output)
        assert sectors == 64 * 2048
        guest.run(f'echo "0 {sectors} bdr {src} bdrsmoke 64" | dmsetup create smoke')
        guest.run("test -b /dev/mapper/smoke && test -c /dev/bdrsmoke")
        assert guest.run("dmsetup table smoke").output.split()[:3] == ["0", str(sectors), "bdr"]
        # a 1 MiB pattern written through the target at offset 4 MiB lands unchanged on the device below
        guest.run(
            f"""set -e
            dd if=/dev/urandom of=/tmp/pattern bs=4096 count=256 status=none
            dd if=/tmp/pattern of=/dev/mapper/smoke bs=4096 seek=1024 oflag=direct status=none
            dd if={src} of=/tmp/readback bs=4096 skip=1024 count=256 iflag=direct status=none
            cmp /tmp/pattern /tmp/readback
            """
        )
        guest.run("dmsetup remove smoke && test ! -e /dev/mapper/smoke && test ! -e /dev/bdrsmoke")
        guest.run("rmmod bdr && ! grep -q '^bdr ' /proc/modules")
    finally:
        if guest.alive:
            guest.run(
                "dmsetup remove smoke 2>/dev/null; rmmod bdr 2>/dev/null; rm -f /tmp/pattern /tmp/readback",
                check=False,
            )
