"""`make demo`: BDR replicating a real workload, end to end, in the QEMU test lab.

In a guest running the 6.12 kernel: a source disk behind the bdr target, bdr_server and bdr_client started
with the manual's commands over loopback, then a real workload on the source (mkfs.ext4, a tree of files
copied in, fio random writes with verification, sync).  When the client has everything acknowledged, both
daemons are stopped with SIGTERM, the replica is compared with the source byte for byte and checked with
fsck.  Exits non-zero if they differ.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.vm.lab import Guest, boot, build_module  # noqa: E402

BIN = f"{REPO}/.venv/bin"
SIZE = "512M"
PORT = 8000


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def status(g: Guest) -> dict[str, str]:
    fields = g.run("dmsetup status demo").output.split()[3:]
    return dict(kv.split("=", 1) for kv in fields)


def wait_synced(g: Guest, timeout: float = 300) -> None:
    """Until every captured write is acknowledged durable by the server (the client then empties the ring)."""
    deadline = time.monotonic() + timeout
    stable = 0
    last = ""
    while time.monotonic() < deadline:
        st = status(g)
        used = st["fill"].split("/")[0]
        if used == "0" and st["state"] == "capturing" and st["records"] == last:
            stable += 1
            if stable >= 3:
                return
        else:
            stable = 0
        last = st["records"]
        time.sleep(1)
    raise SystemExit(f"demo: replication did not catch up within {timeout:.0f}s: {st}")


def main() -> int:
    step("building the bdr kernel module against the 6.12 headers")
    ko = build_module()
    step(f"booting the 6.12 kernel in QEMU with a {SIZE} source, a {SIZE} replica and a journal disk")
    with boot(disks={"src": SIZE, "dst": SIZE, "jnl": "64M"}, memory="2048M") as g:
        src, dst, jnl = g.disk("src"), g.disk("dst"), g.disk("jnl")
        g.run(f"modprobe dm-mod && insmod {ko}")
        step(f"bdr setup --device {src} --name demo --chardev bdr_demo --buffer 128M")
        print(
            g.run(f"{BIN}/bdr setup --device {src} --name demo --chardev bdr_demo --buffer 128M").output,
            end="",
        )
        step(f"starting bdr_server (replica {dst}, journal {jnl}) and bdr_client on 127.0.0.1:{PORT}")
        g.run(
            f"nohup {BIN}/bdr_server --address 127.0.0.1 --port {PORT} --target-device {dst} --journal {jnl}"
            " --verbose > /tmp/server.log 2>&1 &"
        )
        g.run(
            f"nohup {BIN}/bdr_client --control-device /dev/bdr_demo --source-device /dev/mapper/demo"
            f" --address 127.0.0.1 --port {PORT} --verbose > /tmp/client.log 2>&1 &"
        )
        g.run(
            "for i in $(seq 600); do grep -q 'scan .* done' /tmp/client.log && exit 0; sleep 0.2; done;"
            " cat /tmp/client.log; exit 1",
            timeout=180,
        )
        t0 = time.monotonic()
        step("workload: mkfs.ext4, copy a tree of files, fio random writes with verify, sync")
        tree = "/usr/lib/python3.11" if Path("/usr/lib/python3.11").is_dir() else "/usr/share/doc"
        g.run(
            f"""set -e
            mkfs.ext4 -q -F /dev/mapper/demo
            mkdir -p /tmp/mnt && mount /dev/mapper/demo /tmp/mnt
            cp -a {tree} /tmp/mnt/tree
            fio --name=rw --filename=/tmp/mnt/fio.dat --size=64M --rw=randwrite --bs=4k --direct=1
                --ioengine=libaio --iodepth=16 --io_size=64M --verify=crc32c --do_verify=1 --randrepeat=0
                --output=/tmp/fio.out
            dd if=/dev/urandom of=/tmp/mnt/random.bin bs=1M count=32 status=none
            sync
            umount /tmp/mnt
            """.replace("\n                --", " --"),
            timeout=900,
        )
        files = g.run(f"find {tree} -type f | wc -l").output.strip()
        print(f"    copied {files} files from {tree}, wrote 64 MiB with fio (verified), 32 MiB with dd")
        step("waiting until the client has every write acknowledged by the server")
        wait_synced(g)
        elapsed = time.monotonic() - t0
        st = status(g)
        step("stopping bdr_client and bdr_server (SIGTERM)")
        g.run("pkill -TERM -f bin/bdr_client; pkill -TERM -f bin/bdr_server; sleep 2", check=False)
        g.run("! pgrep -f 'bin/bdr_(client|server)' || { sleep 5; ! pgrep -f 'bin/bdr_(client|server)'; }")
        step("comparing source and replica, and checking the replica's file system")
        same = g.run(f"cmp -n $(blockdev --getsize64 {src}) /dev/mapper/demo {dst}", check=False)
        fsck = g.run(f"fsck.ext4 -n -f {dst}", check=False)
        server_log = g.run("cat /tmp/server.log").output
        client_log = g.run("cat /tmp/client.log").output
        g.run(f"{BIN}/bdr remove demo && rmmod bdr")
        g.check_kernel_log()

    replicated = int(st["bytes"])
    print()
    print("BDR demo summary")
    print(f"  writes captured      {st['records']} records, {replicated / 2**20:.1f} MiB")
    print(f"  dropped to bitmap    {st['dropped']}")
    print(
        f"  workload + catch-up  {elapsed:.1f} s under emulation ({replicated / 2**20 / elapsed:.1f} MiB/s on average)"
    )
    print(f"  fsck of the replica  {'clean' if fsck.rc == 0 else f'ERRORS (rc {fsck.rc})'}")
    if same.rc == 0 and fsck.rc == 0:
        print("  source and replica   identical")
        return 0
    print("  source and replica   DIFFER")
    print(same.output)
    print(fsck.output)
    for name, log in (("server", server_log), ("client", client_log)):
        print(f"--- {name} log (last 30 lines) ---")
        print("\n".join(log.splitlines()[-30:]))
    return 1


if __name__ == "__main__":
    sys.exit(main())
