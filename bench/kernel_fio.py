"""fio through the bdr target and through dm-linear on the same virtio disk, in one VM run.

Prints MB/s and IOPS for 1 MiB sequential writes and 4 KiB random writes, and the ratio bdr / dm-linear
(targets: seq >= 0.7, rand 4K >= 0.95), each with two consumers that release ring slots as they are published,
as the client would (so the figures include the cost of capturing every write): one that sleeps in poll() and
is woken for each publication, and one that releases every 10 ms (batched: nobody sleeps on the ring's wait
queue, so publishing wakes no one).  Then the same through a bdr target whose ring is full (256 slots, nobody
consuming: every write goes to the dirty bitmap), to show that an overflow does not slow the I/O path.  Records
captured and dropped are printed too.  And through a bdr target with persistent change tracking (a meta_device on
a second virtio disk, zeroed before each run, so that every region is new and its first write waits for a
metadata write with FUA), as a ratio to the same target without it.
Runs alternate linear / bdr twice and keep the best of each, to damp the noise of an emulated machine.

Under TCG the guest's memcpy runs at a few GB/s while dm-linear's data never touches the guest CPU (QEMU
moves it on the host), so the sequential ratio here is bounded by copy bandwidth / disk bandwidth; the copy
bandwidth is printed so the figure can be read against it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.vm.lab import Guest, boot, build_module  # noqa: E402

PY = f"{REPO}/.venv/bin/python"
TOOL = f"{PY} {REPO}/tests/vm/ringtool.py"
JOBS = {
    "seq 1M write": "--rw=write --bs=1M --iodepth=8",
    "rand 4K write": "--rw=randwrite --bs=4k --iodepth=32",
}
RUNTIME = 8


def fio(g: Guest, dev: str, args: str) -> tuple[float, float]:
    out = g.run(
        f"fio --name=b --filename={dev} {args} --size=384M --direct=1 --ioengine=libaio"
        f" --time_based --runtime={RUNTIME} --randrepeat=0 --output-format=json",
        timeout=RUNTIME * 10 + 60,
    ).output
    job = json.loads(out[out.index("{") :])["jobs"][0]["write"]
    return float(job["bw_bytes"]), float(job["iops"])


def main() -> int:
    ko = build_module()
    with boot(disks={"d": "512M", "m": "1M"}, memory="2048M") as g:
        d, m = g.disk("d"), g.disk("m")
        g.run(f"modprobe dm-mod && insmod {ko}")
        g.run(f'echo "0 $(blockdev --getsz {d}) linear {d} 0" | dmsetup create lin')
        g.run(
            "dd if=/dev/zero of=/dev/mapper/lin bs=1M count=384 oflag=direct status=none"
        )  # allocate the image
        g.run("dmsetup remove lin")
        # Copy bandwidth: reading a file in /dev/shm copies every byte from the page cache into dd's buffer,
        # as bdr copies every written byte into the ring (/dev/zero -> /dev/null would measure stores only).
        copy = g.run(
            "dd if=/dev/urandom of=/dev/shm/copy bs=1M count=256 status=none"
            " && dd if=/dev/shm/copy of=/dev/null bs=1M 2>&1 | tail -n1 && rm -f /dev/shm/copy"
        ).output.strip()
        print(f"fio in a QEMU/TCG guest, {RUNTIME} s per run, best of 2 alternating runs")
        print(
            f"memory copy bandwidth of one emulated CPU (bdr copies each written byte once): {copy.split(', ')[-1]}"
        )
        print(
            f"{'workload':<15} {'dm-linear':>22} {'bdr':>22} {'ratio':>7} {'bdr, batched consumer':>22} {'ratio':>7}"
            f" {'bdr, ring full':>22} {'ratio':>7} {'bdr + meta_device':>22} {'/ bdr':>7}"
        )
        for label, args in JOBS.items():
            best: dict[str, tuple[float, float]] = {}
            for _ in range(2):
                for target in ("linear", "bdr", "batched", "full", "tracked"):
                    if target == "linear":
                        g.run(f'echo "0 $(blockdev --getsz {d}) linear {d} 0" | dmsetup create t')
                    elif target == "full":
                        g.run(f'echo "0 $(blockdev --getsz {d}) bdr {d} bdr_full 256" | dmsetup create t')
                    else:
                        meta = ""
                        if target == "tracked":
                            g.run(f"dd if=/dev/zero of={m} bs=4K count=1 oflag=direct status=none")
                            meta = f" 2 meta_device {m}"
                        g.run(
                            f'echo "0 $(blockdev --getsz {d}) bdr {d} bdr_bench 65536{meta}" | dmsetup create t'
                        )
                        every = " 10" if target == "batched" else ""
                        g.run(
                            f"rm -f /tmp/stop; ({TOOL} release /dev/bdr_bench /tmp/stop{every} > /tmp/rel.out &)"
                        )
                    bw, iops = fio(g, "/dev/mapper/t", args)
                    if target != "linear":
                        st = g.run("dmsetup status t").output.split()
                        g.run("touch /tmp/stop; sleep 0.5")
                        counters = dict(kv.split("=", 1) for kv in st[3:])
                        print(
                            f"  bdr {target} run: records={counters['records']}"
                            f" dropped={counters['dropped']} overflows={counters['overflows']}"
                            f" state={counters['state']} dirty_regions={counters['dirty_regions']}"
                            + (
                                f" tracked_regions={counters['tracked_regions']} meta_writes={counters['meta_writes']}"
                                if target == "tracked"
                                else ""
                            )
                        )
                    g.run("dmsetup remove t")
                    if bw > best.get(target, (0.0, 0.0))[0]:
                        best[target] = (bw, iops)
            lin = best["linear"]
            row = f"{label:<15} {lin[0] / 1e6:>9.1f} MB/s {lin[1]:>7.0f} IOPS"
            for target in ("bdr", "batched", "full"):
                bw, iops = best[target]
                row += f" {bw / 1e6:>9.1f} MB/s {iops:>7.0f} IOPS {bw / lin[0]:>7.2f}"
            bw, iops = best["tracked"]
            row += f" {bw / 1e6:>9.1f} MB/s {iops:>7.0f} IOPS {bw / best['bdr'][0]:>7.2f}"
            print(row)
        g.check_kernel_log()
    return 0


if __name__ == "__main__":
    sys.exit(main())
