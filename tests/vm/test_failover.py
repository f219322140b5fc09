"""Failover and failback in the 6.12 guest, two hosts as network namespaces joined by a veth pair: host A
(namespace bdra, disk src, journal ja) and host B (namespace bdrb, disk dst, journal jb), ext4 on the
replicated device, an application writing fsync'd numbered markers (tests/vm/markers.py), real bdr targets.

1. Planned switchover under the application: it stops, the source drains, A is demoted and B promoted; the
   application goes on on B at once; no fsync'd marker is lost, nothing is scanned, and A ends identical to B.
2. Unplanned failover: the guest is power-cut while A (a target with a meta device) writes; B is promoted, its
   ext4 fscks clean, the application writes on B; A comes back, is demoted with its meta device's marks, and B
   resyncs only the regions A marked (sending no more than 1.2x the bytes of the blocks that differ), then
   streams its writes since the promotion, A being a fsck-clean copy whenever it is sampled; then both sides are written apart: the reconnect is refused as a
   split brain naming both generations, nothing written on either side, until A's server is told to discard
   its changes, and A ends identical to B.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path

from tests.vm import lab
from tests.vm.lab import Guest
from tests.vm.pair import BIN, REPO

VM_DISKS = {"src": "64M", "dst": "64M", "ja": "16M", "jb": "16M", "meta": "8M", "cpy": "64M", "trk": "1M"}
VM_MEMORY = "1536M"
A_IP, B_IP, PORT = "192.0.2.1", "192.0.2.2", 7788
MARKERS = f"{BIN}/python {REPO}/tests/vm/markers.py"
BLOCK = 4096  # the scan's block (bytes sent are whole blocks)


class Host:
    """One host: its namespace, its device, its journal, its metadata file."""

    def __init__(self, g: Guest, name: str, ns: str, ip: str, dev: str, journal: str) -> None:
        self.g, self.name, self.ns, self.ip, self.dev, self.journal = g, name, ns, ip, dev, journal
        self.meta = f"/tmp/meta/{name}.meta"
        self.mapper_name = f"rep{name}"
        self.mapper = f"/dev/mapper/{self.mapper_name}"
        self.chardev = f"bdr_{name}"
        self.mnt = f"/tmp/mnt/{name}"
        self.logs = 0

    def run(self, cmd: str, check: bool = True, timeout: float = 300) -> lab.Result:
        return self.g.run(f"ip netns exec {self.ns} {cmd}", check=check, timeout=timeout)

    def new_log(self, what: str) -> str:
        self.logs += 1
        return f"/tmp/{self.name}-{what}{self.logs}.log"

    @property
    def target_args(self) -> str:
        return f"--name {self.mapper_name} --chardev {self.chardev} --buffer 32M"

    def setup_target(self, *extra: str) -> None:
        self.g.run(
            f"{BIN}/bdr setup --device {self.dev} --name {self.mapper_name} --chardev {self.chardev} --buffer 32M "
            + " ".join(extra)
        )

    def start_server(self, *extra: str) -> str:
        log = self.new_log("server")
        args = " ".join(shlex.quote(a) for a in extra)
        self.run(
            f"nohup {BIN}/bdr_server --address {self.ip} --port {PORT} --target-device {self.dev} "
            f"--journal {self.journal} --secret-file /tmp/secret --verbose {args} >> {log} 2>&1 &"
        )
        wait_log(self.g, log, "listening on")
        return log

    def start_client(self, peer: Host) -> str:
        log = self.new_log("client")
        self.run(
            f"nohup {BIN}/bdr_client --control-device /dev/{self.chardev} --source-device {self.mapper} "
            f"--address {peer.ip} --port {PORT} --metadata {self.meta} --secret-file /tmp/secret --verbose"
            f" >> {log} 2>&1 &"
        )
        return log

    def stop(self, what: str, signal: str = "TERM") -> None:
        self.g.run(
            f"pkill -{signal} -f 'bin/bdr_{what} .*{self.dev if what == 'server' else self.chardev}';"
            f" for i in $(seq 300); do pgrep -f 'bin/bdr_{what} .*{self.dev if what == 'server' else self.chardev}'"
            " >/dev/null || exit 0; sleep 0.1; done; exit 1"
        )

    def wait_synced(self, timeout: float = 300) -> None:
        """Until the ring is empty and stays so with no new record (dirty buffers of the device written back
        first), and the client says it is in sync."""
        self.g.run(f"sync; blockdev --flushbufs {self.mapper}")
        deadline = time.monotonic() + timeout
        stable = 0
        last = ""
        while time.monotonic() < deadline:
            st = self.g.run(f"dmsetup status {self.mapper_name}").output
            records = st.split("records=")[1].split()[0]
            if " fill=0/" in st and "state=capturing" in st and records == last:
                stable += 1
                if stable >= 3:
                    out = self.g.run(f"{BIN}/bdr status --json", check=False).output
                    if '"in_sync": true' in out and '"active": false' in out:
                        return
            else:
                stable = 0
            last = records
            time.sleep(1)
        raise AssertionError(
            f"{self.name} did not catch up: {self.g.run('tail -30 /tmp/*client*.log').output}"
        )


def wait_log(g: Guest, log: str, pattern: str, timeout: float = 60) -> str:
    return g.run(
        f"end=$(($(date +%s) + {int(timeout)})); while [ $(date +%s) -lt $end ]; do"
        f" grep -Eq {shlex.quote(pattern)} {log} 2>/dev/null && exit 0; sleep 0.2; done;"
        f" echo 'no line matching {pattern} in {log}:'; tail -30 {log}; exit 1",
        timeout=timeout + 60,
    ).output


def sha(g: Guest, dev: str) -> str:
    return g.run(f"dd if={dev} iflag=direct bs=1M status=none | sha256sum").output.split()[0]


def network(g: Guest, bdr_ko: Path) -> tuple[Host, Host]:
    g.run(
        f"""set -e
        modprobe dm-mod && (lsmod | grep -q '^bdr ' || insmod {bdr_ko})
        modprobe veth
        ip netns add bdra && ip netns add bdrb
        ip link add va type veth peer name vb
        ip link set va netns bdra && ip link set vb netns bdrb
        ip -n bdra addr add {A_IP}/24 dev va && ip -n bdrb addr add {B_IP}/24 dev vb
        for ns in bdra bdrb; do ip -n $ns link set lo up; done
        ip -n bdra link set va up && ip -n bdrb link set vb up
        {BIN}/bdr secret --force /tmp/secret
        mkdir -p /tmp/meta /tmp/mnt/a /tmp/mnt/b /tmp/ctl && mount {g.disk("meta")} /tmp/meta
        """
    )
    a = Host(g, "a", "bdra", A_IP, g.disk("src"), g.disk("ja"))
    b = Host(g, "b", "bdrb", B_IP, g.disk("dst"), g.disk("jb"))
    return a, b


def start_markers(g: Guest, mnt: str) -> None:
    g.run(f"rm -f /tmp/ctl/*; nohup {MARKERS} {mnt} --control /tmp/ctl > /tmp/markers.out 2>&1 &")


def stop_markers(g: Guest) -> int:
    """Stop the application; the number of the last marker it fsync'd."""
    g.run("touch /tmp/ctl/stop; while pgrep -f tests/vm/markers.py >/dev/null; do sleep 0.1; done")
    out = g.run("cat /tmp/markers.out").output
    m = re.search(r"wrote markers up to (\d+)", out)
    assert m, out
    return int(m.group(1))


def markers_present(g: Guest, mnt: str, last: int) -> None:
    """Every marker 1..last is in the log, in order (nothing fsync'd was lost)."""
    nums = [int(line.split()[0]) for line in g.run(f"cat {mnt}/markers.log").output.splitlines() if line]
    assert nums[:last] == list(range(1, last + 1)), f"markers lost: {len(nums)} lines, expected 1..{last}"


def first_boot(g: Guest, bdr_ko: Path, *target: str) -> tuple[Host, Host]:
    """A replicates to B, ext4 made on A's target (``target``: more bdr setup flags), both in sync."""
    g.run(f"mkfs.ext4 -q {g.disk('meta')}")
    a, b = network(g, bdr_ko)
    a.setup_target(*target)
    b.start_server()
    a.start_client(b)
    g.run(f"mkfs.ext4 -q -E nodiscard {a.mapper} && mount {a.mapper} {a.mnt}")
    a.wait_synced()  # the first resync committed: B holds the file system
    return a, b


def test_planned_switchover_loses_no_marker_and_scans_nothing(guest: Guest, bdr_ko: Path) -> None:
    g = guest
    a, b = first_boot(g, bdr_ko)
    start_markers(g, a.mnt)
    g.run("sleep 8")
    # the switchover: the application stops, the source drains, A is demoted, B promoted
    t0 = time.monotonic()
    last = stop_markers(g)
    g.run(f"umount {a.mnt}")
    a.wait_synced()
    a.stop("client")
    assert "stopped in sync" in g.run("cat /tmp/a-client*.log").output
    res = g.run(f"{BIN}/bdr demote --journal {a.journal} --metadata {a.meta} --name {a.mapper_name}")
    assert "streams its writes since its promotion" in res.output, res.output
    b.stop("server")
    g.run(
        f"{BIN}/bdr promote --journal {b.journal} --target-device {b.dev} --metadata {b.meta} {b.target_args}"
    )
    g.run(f"mount {b.mapper} {b.mnt}")
    writable = time.monotonic() - t0
    print(f"planned switchover: {writable:.1f} s from stopping the application to ext4 writable on B")
    markers_present(g, b.mnt, last)
    # the application goes on on B; A serves as the replica; B streams its writes, no scan
    start_markers(g, b.mnt)
    server_log = a.start_server()
    client_log = b.start_client(a)
    g.run("sleep 6")
    last2 = stop_markers(g)
    assert last2 > last
    g.run(f"umount {b.mnt}")
    b.wait_synced()
    client = g.run(f"cat {client_log}").output
    server = g.run(f"cat {server_log}").output
    assert "no scan" in client and "scan" not in server.replace("no scan", ""), client + server
    same_devices(g, a.dev, b.dev, client_log, server_log)
    g.run(f"mount -o ro {a.dev} {a.mnt}")  # A's copy: the application's whole log
    markers_present(g, a.mnt, last2)
    g.run(f"umount {a.mnt}")


DIFF = f"""{BIN}/python -c '
import os, sys
fds = [os.open(p, os.O_RDONLY | os.O_DIRECT) for p in sys.argv[1:3]]
import mmap
bufs = [mmap.mmap(-1, {BLOCK}) for _ in fds]
n = 0
while True:
    got = [os.readv(fd, [b]) for fd, b in zip(fds, bufs)]
    if not got[0]:
        break
    n += bufs[0][: got[0]] != bufs[1][: got[1]]
print(n)
'"""


LIST_DIFF = (
    DIFF.replace("n = 0", "n = []; off = 0")
    .replace(
        "    n += bufs[0][: got[0]] != bufs[1][: got[1]]",
        "    n += [off] if bufs[0][: got[0]] != bufs[1][: got[1]] else []\n    off += got[0]",
    )
    .replace("print(n)", "print(len(n), n[:40])")
)


def same_devices(g: Guest, x: str, y: str, *logs: str) -> None:
    """The two devices hold the same bytes; if not, which blocks differ and what the daemons said."""
    if sha(g, x) == sha(g, y):
        return
    diff = g.run(f"{LIST_DIFF} {x} {y}").output
    tails = "\n".join(g.run(f"tail -40 {log}").output for log in logs)
    raise AssertionError(f"{x} and {y} differ: {diff}\n{tails}")


def differing_blocks(g: Guest, x: str, y: str) -> int:
    """Blocks (of the scan's size) that differ between two devices (read past the page cache)."""
    return int(g.run(f"{DIFF} {x} {y}").output.split()[-1])


def captured(g: Guest, name: str) -> int:
    """Bytes of write data the bdr target ``name`` captured since it was created."""
    return int(g.run(f"dmsetup status {name}").output.split("bytes=")[1].split()[0])


def fsck_clean_copy(g: Guest, dev: str) -> None:
    """A copy of ``dev`` mounts (its ext4 journal replayed, as after a crash) and fscks clean."""
    cpy = g.disk("cpy")
    g.run(f"dd if={dev} of={cpy} iflag=direct oflag=direct bs=1M status=none")
    g.run(f"mkdir -p /tmp/mnt/c && mount {cpy} /tmp/mnt/c && umount /tmp/mnt/c")
    res = g.run(f"e2fsck -f -n {cpy}", check=False)
    assert res.rc == 0, res.output


def scan_done(log: str) -> re.Match[str]:
    m = re.search(
        r"scan \d+ done in [\d.]+s: (\d+) blocks compared, (\d+) differed, \d+ sent with data \((\d+) bytes\)",
        log,
    )
    assert m, log[-3000:]
    return m


def test_unplanned_failover_failback_and_split_brain(tmp_path: Path, lab_kernel: str, bdr_ko: Path) -> None:
    images = {name: tmp_path / f"{name}.img" for name in VM_DISKS}
    with lab.boot(disks=VM_DISKS, memory=VM_MEMORY, kver=lab_kernel, images=images, cache="none") as g:
        a, b = first_boot(g, bdr_ko, f"--meta-device {g.disk('trk')} --new-meta")
        start_markers(g, a.mnt)
        g.run("sleep 5")
        g.power_cut()  # A dies while it writes (and B with it: one guest)
    with lab.boot(disks=VM_DISKS, memory=VM_MEMORY, kver=lab_kernel, images=images, cache="none") as g:
        a, b = network(g, bdr_ko)
        # unplanned failover: B is promoted; its ext4 mounts and fscks clean
        res = g.run(
            f"{BIN}/bdr promote --journal {b.journal} --target-device {b.dev} --metadata {b.meta} --force "
            f"{b.target_args}"
        )
        print(res.output)
        g.run(f"mount {b.mapper} {b.mnt} && umount {b.mnt}")  # the ext4 journal replayed
        res = g.run(f"e2fsck -f -n {b.mapper}", check=False)
        assert res.rc == 0, res.output
        g.run(f"mount {b.mapper} {b.mnt}")
        start_markers(g, b.mnt)
        g.run("sleep 3")
        stop_markers(g)
        g.run(f"umount {b.mnt}")
        # A comes back, is demoted (its target is gone with the power cut; its meta device's marks are kept)
        # and served; B resyncs the regions A marked, then streams its writes since the promotion
        res = g.run(
            f"{BIN}/bdr demote --journal {a.journal} --metadata {a.meta} --meta-device {g.disk('trk')}"
        )
        assert "resyncs it" in res.output, res.output
        kept = re.search(r"kept the marks of \S+: (\d+) ranges, (\d+) bytes", res.output)
        assert kept, res.output
        marked = int(kept.group(2))
        written = captured(g, b.mapper_name)
        differ = differing_blocks(g, a.dev, b.dev) * BLOCK
        server_log = a.start_server()
        client_log = b.start_client(a)
        wait_log(g, client_log, r"scan [0-9]+ done")
        log = g.run(f"cat {client_log}").output
        m = scan_done(log)
        compared, sent = int(m.group(1)) * BLOCK, int(m.group(3))
        print(
            f"failback resync: A marked {marked} bytes (of {64 << 20}), B compared {compared} and sent {sent} "
            f"in the scan, then {written} bytes of writes since its promotion from its ring: {sent + written} "
            f"bytes sent; {differ} bytes in the blocks that differ"
        )
        assert re.search(rf"scan \d+ \(hash\) of {kept.group(1)} marked extents \({marked} bytes\)", log), log
        assert "of the whole device" not in log, log
        assert compared == marked < (64 << 20) // 4  # only the marked regions were read
        assert sent <= 1.2 * differ  # only what differs in them
        assert sent + written <= 1.2 * (marked + written)
        assert "offering the marks kept when this device was demoted" in g.run(f"cat {server_log}").output
        # A follows B while B writes: a copy of A at any moment is a file system that fscks clean
        g.run(f"mount {b.mapper} {b.mnt}")
        start_markers(g, b.mnt)
        g.run("sleep 3")
        fsck_clean_copy(g, a.dev)
        stop_markers(g)
        g.run(f"umount {b.mnt}")
        b.wait_synced()
        same_devices(g, a.dev, b.dev)

        # split brain: B is written while apart from A, and A is promoted and written too
        b.stop("client")
        b_before = captured(g, b.mapper_name)
        g.run(f"mount {b.mapper} {b.mnt} && echo b > {b.mnt}/b-alone && umount {b.mnt}")
        b_wrote = captured(g, b.mapper_name) - b_before
        a.stop("server")
        a2 = f"{a.meta}2"
        g.run(
            f"{BIN}/bdr promote --journal {a.journal} --target-device {a.dev} --metadata {a2} {a.target_args}"
        )
        g.run(f"mount {a.mapper} {a.mnt} && echo a > {a.mnt}/a-alone && umount {a.mnt}")
        a_wrote = captured(g, a.mapper_name)  # the target bdr promote created: all of it is A's since
        g.run(f"{BIN}/bdr demote --journal {a.journal} --metadata {a2} --name {a.mapper_name}")
        before = sha(g, a.dev), sha(g, b.dev)
        server_log = a.start_server()
        client_log = b.start_client(a)
        g.run(
            "for i in $(seq 300); do pgrep -f 'bin/bdr_client' >/dev/null || exit 0; sleep 0.2; done; exit 1"
        )
        client, server = g.run(f"cat {client_log}").output, g.run(f"cat {server_log}").output
        assert "(SPLIT_BRAIN)" in client, client
        refusal = re.search(r"refused: (split brain: .*)", server)
        assert refusal, server
        gens = set(re.findall(r"generation ([0-9a-f]{16})", refusal.group(1)))
        assert len(gens) >= 3, refusal.group(1)  # the shared one, the source's and the replica's
        # how much each side wrote since the split: what each target captured, in the message and the status
        amounts = re.search(
            r"since then the source's side wrote (.+?) and the replica's (.+?);", refusal.group(1)
        )
        assert amounts, refusal.group(1)
        servers = json.loads(g.run(f"{BIN}/bdr status --json").output)["servers"]
        split = next(s["split_brain"] for s in servers if s.get("split_brain"))
        print(f"split brain: B wrote {b_wrote} bytes, A {a_wrote}; the refusal says {amounts.group(0)}")
        assert b_wrote > 0 and a_wrote > 0
        assert split == {"source_written": b_wrote, "replica_written": a_wrote}, split
        assert (sha(g, a.dev), sha(g, b.dev)) == before  # nothing written on either side
        # the operator keeps B's data; the server is killed at two points of the resync, and a copy of A
        # after each restart (the journal replayed) fscks clean
        a.stop("server")
        server_log = a.start_server("--discard-local-changes")
        b.start_client(a)
        for delay in (1.5, 0.7):
            g.run(f"sleep {delay}")
            g.run("pkill -STOP -f bin/bdr_client")
            a.stop("server", "KILL")
            server_log = a.start_server("--discard-local-changes")
            fsck_clean_copy(g, a.dev)
            g.run("pkill -CONT -f bin/bdr_client")
        b.wait_synced()
        same_devices(g, a.dev, b.dev)
        assert (
            "--discard-local-changes: this replica's changes are overwritten"
            in g.run("cat /tmp/a-server*.log").output
        )
