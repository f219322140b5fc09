"""Start-up resync in the VM lab: a 64 MiB source with 1 % of its 4 KiB blocks changed while the daemons were
stopped (and its target removed, as after a reboot: the ring is gone), timed from `bdr_client` start until the
client logs that the scan is done (the server has committed and applied it: the replica is identical).  Next to
it, as a reference measured in the same run, the streaming of the same number of changed blocks through the
running pair, timed from the first write until the ring is empty (every record acknowledged durable).

The time is broken down from the daemons' log lines (process start and imports, connection and handshake,
scan, commit).  The original implementation took 11.2-11.4 s for the start-up resync in this lab.

Usage: python bench/vm_resync.py [--changed-percent P]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.vm.lab import Guest, boot, build_module  # noqa: E402
from tests.vm.pair import Pair  # noqa: E402

MiB = 1 << 20
BLOCK = 4096
DEVICE = 64 * MiB
ORIGINAL_SECONDS = 11.3  # the original daemons, same lab, same workload
PY = f"{REPO}/.venv/bin/python"

# Writes `count` random 4 KiB blocks (distinct offsets, random data) to a device with O_DIRECT, then fsync.
_WRITER = r"""
import mmap, os, random, sys
dev, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(seed)
fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
nblocks = os.lseek(fd, 0, os.SEEK_END) // 4096
buf = mmap.mmap(-1, 4096)
for b in rnd.sample(range(nblocks), count):
    buf[:] = rnd.randbytes(4096)
    os.pwrite(fd, buf, b * 4096)
os.fsync(fd)
"""

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) ")


def stamp(line: str) -> float:
    m = _STAMP.match(line)
    if not m:
        raise ValueError(f"no time stamp in {line!r}")
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()


def first(lines: list[str], pattern: str) -> tuple[float, str]:
    """The time stamp and text of the first log line matching ``pattern``."""
    for ln in lines:
        if re.search(pattern, ln):
            return stamp(ln), ln
    raise AssertionError(f"no log line matches {pattern!r}:\n" + "\n".join(lines[-30:]))


def guest_now(g: Guest) -> float:
    return float(g.run("date +%s.%N").output.strip())


def stream_reference(g: Guest, p: Pair, blocks: int) -> float:
    """Seconds from the first of ``blocks`` random 4 KiB writes through the target until the ring is empty."""
    g.run(f"cat > /tmp/writer.py <<'EOF'\n{_WRITER}\nEOF")
    out = g.run(
        f"t0=$(date +%s.%N); {PY} /tmp/writer.py {p.mapper} {blocks} 1"
        f" && until dmsetup status {p.name} | grep -q ' fill=0/'; do sleep 0.05; done; t1=$(date +%s.%N);"
        ' echo "$t0 $t1"',
        timeout=300,
    ).output.split()
    return float(out[-1]) - float(out[-2])


def startup_resync(g: Guest, p: Pair, blocks: int) -> dict[str, float | str]:
    """Daemons stopped, target removed, ``blocks`` blocks changed on the source disk, target set up again;
    then the client is started and timed until its scan is done."""
    p.stop()
    g.run(f"{REPO}/.venv/bin/bdr remove {p.name}")
    g.run(f"{PY} /tmp/writer.py {p.src} {blocks} 2")
    p.setup()
    g.run(f": > {p.client_log}; : > {p.server_log}")
    p.start_server()
    t0 = guest_now(g)
    p.start_client(wait_scan=False)
    p.wait_log(p.client_log, r"scan [0-9]+ done in", 300)
    t_end_host = guest_now(g)
    cl = g.run(f"cat {p.client_log}").output.splitlines()
    sv = g.run(f"cat {p.server_log}").output.splitlines()
    t_conn, _ = first(cl, r"connected to ")
    t_begin, begin = first(cl, r"scan \d+ \(.*\) of ")
    t_done, done = first(cl, r"scan \d+ done in")
    t_ended, _ = first(sv, r"scan \d+ ended after")
    return {
        "total_s": t_done - t0,
        "start_s": t_conn - t0,  # process start, imports, ring and source opened, TCP connect
        "handshake_s": t_begin - t_conn,  # HELLO/WELCOME, the decision to scan
        "scan_s": t_ended - t_begin,  # read, hash, compare, send, stage (until the server has SCAN_END)
        "commit_s": t_done - t_ended,  # the server commits and applies the staged blocks, SCAN_DONE
        "polled_s": t_end_host - t0,  # the same, seen by polling the log (an upper bound)
        "scan_line": done.split(": ", 1)[-1],
        "begin_line": begin.split(": ", 1)[-1],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--changed-percent", type=float, default=1.0, help="share of 4 KiB blocks changed (1)")
    args = ap.parse_args(argv or [])
    blocks = int(DEVICE // BLOCK * args.changed_percent / 100)
    ko = build_module()
    with boot(disks={"src": "64M", "dst": "64M", "jnl": "128M"}, memory="2048M") as g:
        g.run(f"modprobe dm-mod && insmod {ko}")
        p = Pair(g, g.disk("src"), g.disk("dst"), g.disk("jnl"), port=8500)
        p.setup()
        try:
            p.start_server()
            p.start_client()
            g.run(f"dd if=/dev/urandom of={p.mapper} bs=1M count={DEVICE // MiB} oflag=direct status=none")
            p.wait_synced(timeout=600)
            stream_s = stream_reference(g, p, blocks)
            p.wait_synced(timeout=300)
            r = startup_resync(g, p, blocks)
            p.wait_synced(timeout=300)
            identical = p.same_on_disk()
        finally:
            p.remove()
        g.check_kernel_log()
    total = float(r["total_s"])
    print(
        f"start-up resync in a QEMU/TCG guest: {DEVICE // MiB} MiB device, {blocks} blocks of 4 KiB changed"
    )
    print(f"  bdr, client start -> scan done   {total:7.2f} s   (original daemons: {ORIGINAL_SECONDS} s)")
    for key, what in (
        ("start_s", "process start, imports, connect"),
        ("handshake_s", "handshake, scan decided"),
        ("scan_s", "scan: read, hash, compare, send, stage"),
        ("commit_s", "server commits and applies, SCAN_DONE"),
    ):
        print(f"    {what:<40} {float(r[key]):6.2f} s")
    print(f"    client: {r['begin_line']}")
    print(f"    client: {r['scan_line']}")
    print(f"  streaming the same {blocks} blocks (reference)   {stream_s:7.2f} s")
    print(
        f"  ratio resync / original {total / ORIGINAL_SECONDS:.2f}, resync / streaming {total / stream_s:.2f}"
    )
    print(f"  replica identical afterwards: {identical}")
    result = {
        "bench": "vm_resync",
        "device_mib": DEVICE // MiB,
        "changed_blocks": blocks,
        "resync_s": round(total, 2),
        "original_s": ORIGINAL_SECONDS,
        "stream_s": round(stream_s, 2),
        **{k: round(float(v), 2) for k, v in r.items() if k.endswith("_s")},
        "identical": identical,
    }
    print("BENCH " + json.dumps(result), flush=True)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
