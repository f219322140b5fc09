"""The history's retention and crash safety in the 6.12 guest: with a small --history-size under a steady
stream of fsync'd writes the history never passes its size and drops its oldest points first; bdr_server
SIGKILLed while writing history, then the whole guest power-cut while writing it (QEMU killed, cache=none disks
kept, a new guest booted on them): after each, a point recorded before is restored to its exact bytes."""

from __future__ import annotations

from pathlib import Path

from tests.vm import lab
from tests.vm.lab import Guest
from tests.vm.pair import BIN, Pair
from tests.vm.test_history import device_flush, sha

VM_DISKS = {"src": "64M", "dst": "64M", "jnl": "32M", "rst": "64M", "hist": "96M"}
VM_MEMORY = "1536M"
HIST = "/tmp/hist/h"
LIMIT = 32 << 20


def boot_on(images: dict[str, Path], kver: str) -> Guest:
    return lab.boot(disks=VM_DISKS, memory=VM_MEMORY, kver=kver, images=images, cache="none")


def make_pair(g: Guest) -> Pair:
    g.run(f"mkdir -p /tmp/hist && mount {g.disk('hist')} /tmp/hist")
    return Pair(
        g, g.disk("src"), g.disk("dst"), g.disk("jnl"), server_args=f"--history {HIST} --history-size {LIMIT}"
    )


def start_writes(g: Guest, dev: str, kib: int, pause: float) -> None:
    """Rounds of random O_DIRECT writes, each ended by an fsync (a durability point), until stopped."""
    g.run(
        f"nohup bash -c 'while ! test -e /tmp/stop-writes; do"
        f" dd if=/dev/urandom of={dev} bs=64K count={kib // 64} seek=$((RANDOM % 960)) oflag=direct"
        f" conv=fsync,notrunc status=none; sleep {pause}; done' > /tmp/writes.out 2>&1 &"
    )


def stop_writes(g: Guest) -> None:
    g.run(
        "touch /tmp/stop-writes; while pgrep -f stop-writes >/dev/null; do sleep 0.1; done; rm /tmp/stop-writes"
    )


def history_bytes(g: Guest) -> int:
    out = g.run(
        f"find {HIST} -name '*.seg' -printf '%s\\n' 2>/dev/null | awk '{{s += $1}} END {{print s + 0}}'"
    )
    return int(out.output)


def moment(p: Pair) -> tuple[float, str]:
    device_flush(p.g, p.mapper)
    p.wait_synced()
    return float(p.g.run("date +%s.%N").output), sha(p.g, p.mapper)


def restored(g: Guest, at: float) -> str:
    res = g.run(f"{BIN}/bdr restore {HIST} --at @{at:.6f} --to {g.disk('rst')}", check=False, timeout=300)
    assert res.rc == 0, res.output
    return sha(g, g.disk("rst"))


def test_retention_and_crashes_leave_a_usable_history(tmp_path: Path, lab_kernel: str, bdr_ko: Path) -> None:
    images = {name: tmp_path / f"{name}.img" for name in VM_DISKS}
    with boot_on(images, lab_kernel) as g:
        g.run(f"modprobe dm-mod && insmod {bdr_ko} && mkfs.ext4 -q {g.disk('hist')}")
        g.run(f"dd if=/dev/urandom of={g.disk('src')} bs=1M count=64 oflag=direct status=none")
        p = make_pair(g)
        p.setup()
        p.start_server()
        p.start_client()
        p.wait_synced()
        # retention: far more history than the limit is written; it never holds more than the limit
        start_writes(g, p.mapper, 2048, 0)
        sizes = []
        for _ in range(15):
            sizes.append(history_bytes(g))
            g.run("sleep 1")
        stop_writes(g)
        p.wait_synced()
        sizes.append(history_bytes(g))
        assert max(sizes) <= LIMIT, sizes
        segments = g.run(f"ls {HIST}").output.split()
        assert "0000000000000001.seg" not in segments, f"the oldest segment was not dropped: {segments}"
        # bdr_server SIGKILLed while it writes history, restarted: the client resends what was not durable
        t1, sha1 = moment(p)
        start_writes(g, p.mapper, 256, 0.3)
        g.run("sleep 2")
        p.stop_server("KILL")
        p.start_server()
        g.run("sleep 2")
        stop_writes(g)
        t2, sha2 = moment(p)
        assert restored(g, t1) == sha1
        assert restored(g, t2) == sha2
        # the guest's power cut while the history is written
        start_writes(g, p.mapper, 256, 0.3)
        g.run("sleep 3")
        g.power_cut()
    with boot_on(images, lab_kernel) as g2:
        p2 = make_pair(g2)
        p2.start_server()  # the history is opened (a torn record at its end cut), the replica untouched
        assert history_bytes(g2) <= LIMIT
        assert restored(g2, t2) == sha2
        assert restored(g2, t1) == sha1
        log = g2.run(f"cat {p2.server_log}").output
        assert "history" in log and "points offered" in log, log
