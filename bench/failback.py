"""Failback in the VM lab: bytes the resync sends against the bytes of the blocks that changed.

A (source, 64 MiB of random data, a target with a meta device) replicates to B.  B's server is killed, A writes
blocks B never receives, A's client is killed; B is promoted (`bdr promote --force`, its device behind a target)
and written; A is demoted (`--name`: its marks are kept) and served, and B's client resyncs the regions A marked,
then streams its writes since the promotion.  Printed: the bytes of 4 KiB blocks that differ between A and B
before the resync (what A wrote that never reached B plus what B wrote since its promotion), the bytes the
failback sent (scan blocks and B's ring records; the ratio is the target: at most 1.2), the bytes the scan read
on each side, its time, and whether A ends identical to B.

Usage: python bench/failback.py [--a-blocks N] [--b-blocks N]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.vm.lab import Guest, boot, build_module  # noqa: E402
from tests.vm.test_failover import captured, differing_blocks, wait_log  # noqa: E402

from vm_resync import _WRITER  # noqa: E402

MiB = 1 << 20
BLOCK = 4096
DEVICE = 64 * MiB
BIN = f"{REPO}/.venv/bin"
PORT_B, PORT_A = 8600, 8601


def wait_empty(g: Guest, name: str) -> None:
    g.run(f"until dmsetup status {name} | grep -q ' fill=0/'; do sleep 0.2; done; sleep 2", timeout=600)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a-blocks", type=int, default=64, help="4 KiB blocks A writes that never reach B (64)")
    ap.add_argument(
        "--b-blocks", type=int, default=655, help="4 KiB blocks B writes after its promotion (655)"
    )
    args = ap.parse_args(argv or [])
    ko = build_module()
    with boot(disks={"a": "64M", "b": "64M", "ja": "32M", "jb": "32M", "ma": "1M"}, memory="2048M") as g:
        a, b, ja, jb, ma = (g.disk(n) for n in ("a", "b", "ja", "jb", "ma"))
        g.run(f"modprobe dm-mod && insmod {ko}")
        g.run(f"cat > /tmp/writer.py <<'EOF'\n{_WRITER}\nEOF")
        # A replicates to B
        g.run(
            f"{BIN}/bdr setup --device {a} --name repa --chardev bdr_a --buffer 32M --meta-device {ma} --new-meta"
        )
        g.run(
            f"nohup {BIN}/bdr_server --address 127.0.0.1 --port {PORT_B} --target-device {b} --journal {jb} --verbose"
            " > /tmp/b-server.log 2>&1 &"
        )
        wait_log(g, "/tmp/b-server.log", "listening", 300)
        g.run(
            f"nohup {BIN}/bdr_client --control-device /dev/bdr_a --source-device /dev/mapper/repa --address 127.0.0.1 --port {PORT_B}"
            " --metadata /tmp/a.meta --verbose > /tmp/a-client.log 2>&1 &"
        )
        g.run(f"dd if=/dev/urandom of=/dev/mapper/repa bs=1M count={DEVICE // MiB} oflag=direct status=none")
        wait_empty(g, "repa")
        # streamed writes after the initial resync: B knows up to which seq of A's ring it holds A's data
        g.run(f"{BIN}/python /tmp/writer.py /dev/mapper/repa 16 10")
        wait_empty(g, "repa")
        # the client clears the marks once in sync (at most every 5 s): the 64 MiB copied are no longer marked
        g.run(
            "for i in $(seq 600); do n=$(dmsetup status repa | sed -n 's/.*tracked_regions=\\([0-9]*\\).*/\\1/p');"
            ' [ "$n" -le 16 ] && exit 0; sleep 0.1; done; dmsetup status repa; exit 1'
        )
        # B's server dies; A writes what B never gets; A's client dies
        g.run("pkill -KILL -f bin/bdr_server; while pgrep -f bin/bdr_server; do sleep 0.1; done")
        g.run(f"{BIN}/python /tmp/writer.py /dev/mapper/repa {args.a_blocks} 11")
        g.run("pkill -KILL -f bin/bdr_client; while pgrep -f bin/bdr_client; do sleep 0.1; done")
        # B is promoted and written; A is demoted
        g.run(
            f"{BIN}/bdr promote --journal {jb} --target-device {b} --metadata /tmp/b.meta --force"
            " --name repb --chardev bdr_b --buffer 32M"
        )
        g.run(f"{BIN}/python /tmp/writer.py /dev/mapper/repb {args.b_blocks} 12")
        demoted = g.run(f"{BIN}/bdr demote --journal {ja} --metadata /tmp/a.meta --name repa").output
        assert "kept the marks" in demoted, demoted
        differ = differing_blocks(g, a, b) * BLOCK
        streamed = captured(g, "repb")  # B's writes since its promotion: its ring sends them after the scan
        # failback: A is served, B resyncs it
        g.run(
            f"nohup {BIN}/bdr_server --address 127.0.0.1 --port {PORT_A} --target-device {a} --journal {ja} --verbose"
            " > /tmp/a-server.log 2>&1 &"
        )
        wait_log(g, "/tmp/a-server.log", "listening", 300)
        t0 = time.monotonic()
        g.run(
            f"nohup {BIN}/bdr_client --control-device /dev/bdr_b --source-device /dev/mapper/repb --address 127.0.0.1 --port {PORT_A}"
            " --metadata /tmp/b.meta --verbose > /tmp/b-client.log 2>&1 &"
        )
        wait_log(g, "/tmp/b-client.log", "scan [0-9]+ done in", 300)
        took = time.monotonic() - t0
        wait_empty(g, "repb")
        log = g.run("cat /tmp/b-client.log").output
        m = re.search(
            r"scan \d+ \(hash\) of ([^\n]*?) \((\d+) bytes\).*?scan \d+ done in ([\d.]+)s: (\d+) blocks compared, "
            r"(\d+) differed, \d+ sent with data \((\d+) bytes\)",
            log,
            re.S,
        )
        assert m, log[-3000:]
        assert "marked extents" in m.group(1), log[-3000:] + g.run("tail -n 30 /tmp/a-server.log").output
        scanned, scan_s, scan_sent = int(m.group(2)), float(m.group(3)), int(m.group(6))
        sent = scan_sent + streamed
        g.run("pkill -TERM -f bin/bdr_client; while pgrep -f bin/bdr_client; do sleep 0.1; done")
        identical = differing_blocks(g, a, b) == 0
        g.run("pkill -TERM -f bin/bdr_server; dmsetup remove repb", check=False)
        g.check_kernel_log()
    print(
        f"failback in a QEMU/TCG guest: {DEVICE // MiB} MiB devices; A wrote {args.a_blocks} blocks B never got, "
        f"B wrote {args.b_blocks} blocks after its promotion"
    )
    print(f"  bytes in the 4 KiB blocks that differ      {differ:>12}")
    print(
        f"  bytes the failback sent                   {sent:>12}   ratio {sent / differ:.2f} (target <= 1.2)"
    )
    print(f"    of which scan blocks                    {scan_sent:>12}")
    print(f"    of which B's writes from its ring       {streamed:>12}")
    print(
        f"  bytes it compared (read on each side)     {scanned:>12}   ({scanned / DEVICE:.2f} of the device)"
    )
    print(f"  time from client start to scan done       {took:>9.1f} s   (scan {scan_s:.1f} s)")
    print(f"  A identical to B afterwards: {identical}")
    print(
        "BENCH "
        + json.dumps(
            {
                "bench": "failback",
                "differ_bytes": differ,
                "sent_bytes": sent,
                "scan_sent_bytes": scan_sent,
                "streamed_bytes": streamed,
                "ratio": round(sent / differ, 3),
                "scanned_bytes": scanned,
                "seconds": round(took, 2),
                "identical": identical,
            }
        ),
        flush=True,
    )
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
