"""Point-in-time history in the 6.12 guest (real bdr target, ext4 on the source, the history on an ext4 disk of
its own): an application appends fsync'd markers while files come and go; at recorded moments the source's
checksum is taken; every moment is then restored (while replication goes on) to its exact bytes, a clean fsck
and every marker fsync'd before it, and one is served read-only over NBD (bdr export) to the kernel's NBD client.
Then the replica is rolled back to a moment, resynced forward by the next
client start: the moments before the rollback's point are still given back (the resync kept what it
overwrote), those in the resync's window are refused, naming the nearest points offered."""

from __future__ import annotations

import datetime
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.vm.lab import Guest
from tests.vm.pair import BIN, Pair

VM_DISKS = {"src": "32M", "dst": "32M", "jnl": "32M", "rst": "32M", "hist": "160M"}
HIST = "/tmp/hist/h"
MARKERS = f"{BIN}/python {Path(__file__).resolve().parent / 'markers.py'}"
CTL = "/tmp/markers-ctl"
MOMENTS = 10


def sha(g: Guest, dev: str) -> str:
    """The device's bytes past the page cache (O_DIRECT)."""
    return g.run(f"dd if={dev} iflag=direct bs=1M status=none | sha256sum").output.split()[0]


def device_flush(g: Guest, dev: str) -> None:
    """sync, then fsync the block device: its writes are on the device and a FLUSH ends them."""
    g.run(f"sync && {BIN}/python -c 'import os; os.fsync(os.open(\"{dev}\", os.O_RDONLY))'")


@dataclass(frozen=True)
class Moment:
    time: float  # guest clock, once the replica had applied the moment's flush
    sha: str
    last_marker: int


TAKEN: list[Moment] = []  # the first test's moments, for the second


@pytest.fixture(scope="module")
def pair(guest: Guest, bdr_ko: Path) -> Iterator[Pair]:
    g = guest
    g.run(f"modprobe dm-mod && insmod {bdr_ko}")
    g.run(f"mkfs.ext4 -q {g.disk('hist')} && mkdir -p /tmp/hist && mount {g.disk('hist')} /tmp/hist")
    p = Pair(
        g, g.disk("src"), g.disk("dst"), g.disk("jnl"), server_args=f"--history {HIST} --history-size 128M"
    )
    p.setup()
    p.start_server()
    p.start_client()
    g.run(
        f"mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 {p.mapper}"
        f" && mkdir -p /tmp/src {CTL} && mount -o noatime {p.mapper} /tmp/src"
    )
    p.wait_synced()
    yield p
    p.remove()
    g.run("umount /tmp/src; umount /tmp/hist; rmmod bdr", check=False)


def start_markers(g: Guest, seed: int) -> None:
    g.run(f"rm -f {CTL}/*; nohup {MARKERS} /tmp/src --control {CTL} --seed {seed} > /tmp/markers.out 2>&1 &")


def stop_markers(g: Guest) -> None:
    g.run(f"touch {CTL}/stop; while pgrep -f markers.py >/dev/null; do sleep 0.1; done; cat /tmp/markers.out")


def wait_ring_empty(p: Pair) -> None:
    """Every record captured so far is durable on the replica (the client releases a slot only then); with
    writes paused, the replica has the last flush."""
    p.g.run(
        f"for i in $(seq 600); do dmsetup status {p.name} | grep -q 'state=capturing fill=0/' && exit 0;"
        f" sleep 0.1; done; dmsetup status {p.name}; exit 1"
    )


def take_moment(p: Pair) -> Moment:
    """Pause the application, flush, wait until the replica has it; the moment is then."""
    g = p.g
    g.run(
        f"touch {CTL}/pause; for i in $(seq 300); do test -e {CTL}/paused && exit 0; sleep 0.1; done; exit 1"
    )
    last = int(g.run(f"cat {CTL}/paused").output)
    device_flush(g, p.mapper)
    wait_ring_empty(p)
    when = float(g.run("date +%s.%N").output)
    digest = sha(g, p.mapper)
    g.run(f"rm -f {CTL}/pause")
    return Moment(when, digest, last)


def restore(p: Pair, at: str, check: bool = True) -> tuple[int, str]:
    res = p.g.run(f"{BIN}/bdr restore {HIST} --at {at} --to {p.g.disk('rst')}", check=False, timeout=300)
    if check:
        assert res.rc == 0, res.output
    return res.rc, res.output


def check_restored(p: Pair, m: Moment) -> None:
    """The restored device: the moment's bytes, a clean fsck after the journal replay any crash needs, and
    every marker fsync'd before the moment."""
    g, rst = p.g, p.g.disk("rst")
    assert sha(g, rst) == m.sha, f"restored image of the moment at {m.time} differs"
    g.run(f"e2fsck -E journal_only -y {rst} >/dev/null 2>&1; true")
    fsck = g.run(f"e2fsck -f -n {rst}", check=False)
    assert fsck.rc == 0, fsck.output
    lines = g.run(
        f"mkdir -p /tmp/r && mount -o ro {rst} /tmp/r && cut -d' ' -f1 /tmp/r/markers.log; umount /tmp/r"
    )
    numbers = [int(n) for n in lines.output.split()]
    assert numbers[: m.last_marker] == list(range(1, m.last_marker + 1)), (m, numbers[-5:])


def export_shows_the_moment(p: Pair, m: Moment) -> None:
    """bdr export serves the moment over NBD while replication goes on: the kernel's NBD client shows its exact
    bytes as /dev/nbd0, which mounts read-only; the export stops on SIGTERM."""
    g = p.g
    g.run(
        f"nohup {BIN}/bdr export {HIST} --at @{m.time:.6f} > /tmp/export.out 2>&1 & echo $! > /tmp/export.pid"
    )
    g.run(
        "for i in $(seq 300); do grep -q 'read-only over NBD' /tmp/export.out && exit 0; sleep 0.1; done;"
        " cat /tmp/export.out; exit 1"
    )
    g.run("modprobe nbd && nbd-client -N bdr 127.0.0.1 10809 /dev/nbd0", timeout=60)
    try:
        assert sha(g, "/dev/nbd0") == m.sha, g.run("cat /tmp/export.out").output
        # a mounted file system's journal is not replayed on a read-only device (noload): the markers in place
        lines = g.run(
            "mkdir -p /tmp/e && mount -o ro,noload /dev/nbd0 /tmp/e && head -3 /tmp/e/markers.log | cut -d' ' -f1;"
            " umount /tmp/e"
        )
        assert lines.output.split() == ["1", "2", "3"], lines.output
    finally:
        g.run("nbd-client -d /dev/nbd0", check=False)
    g.run(
        "kill -TERM $(cat /tmp/export.pid); while kill -0 $(cat /tmp/export.pid) 2>/dev/null; do sleep 0.1; done"
    )
    out = g.run("cat /tmp/export.out").output
    assert "connected" in out and "stopped" in out, out


def test_restore_gives_back_every_recorded_moment_while_replication_goes_on(pair: Pair) -> None:
    g = pair.g
    rnd = random.Random(16)
    start_markers(g, 1)
    moments = []
    for _ in range(MOMENTS):
        time.sleep(rnd.uniform(0.5, 3))
        moments.append(take_moment(pair))
    assert len({m.sha for m in moments}) == MOMENTS, (
        "the application did not change the source between moments"
    )
    hist = g.run(f"{BIN}/bdr history {HIST}").output
    assert re.search(r"\d+ points: oldest", hist), hist
    # restored while the application goes on writing and the server applies (and keeps history)
    for i, m in enumerate(moments):
        at = f"@{m.time:.6f}"
        if i % 3 == 1:  # the same moment as a local time with its zone
            at = datetime.datetime.fromtimestamp(m.time).astimezone().isoformat()
        restore(pair, at)
        check_restored(pair, m)
    export_shows_the_moment(pair, moments[3])
    stop_markers(g)
    # the server kept the before-images of large batches in its reader process, which ran all along
    assert g.run("pgrep -f 'from bdr.history.reader import main'", check=False).rc == 0
    started = g.run(f"grep 'history: reader process started' {pair.server_log}", check=False)
    assert started.rc == 0, pair.tail(pair.server_log)
    fallback = g.run(f"grep 'before-images itself' {pair.server_log}", check=False)
    assert fallback.rc == 1, fallback.output
    TAKEN[:] = moments


def test_rollback_then_resync_forward_and_the_gap_is_refused(pair: Pair) -> None:
    g = pair.g
    moments = TAKEN
    assert moments, "needs the moments of the test above"
    target = moments[-3]
    g.run("umount /tmp/src")
    device_flush(g, pair.mapper)
    pair.wait_synced()
    present = sha(g, pair.mapper)
    pair.stop_client()
    pair.stop_server()
    out = g.run(f"{BIN}/bdr rollback {HIST} --at @{target.time:.6f}", timeout=300).output
    assert "rolled back to" in out, out
    assert sha(g, pair.dst) == target.sha
    hist = g.run(f"{BIN}/bdr history {HIST}").output
    assert "the replica was rolled back to" in hist, hist
    # the next client start resyncs the replica forward to the source's present
    pair.start_server()
    pair.start_client()
    pair.wait_synced()
    assert sha(g, pair.dst) == present
    log = pair.tail(pair.server_log, 200)
    assert "replica was rolled back" in log and "journal resync applied" in log, log
    # that resync kept what it overwrote: a moment before the rollback's point is still given back exactly...
    restore(pair, f"@{moments[0].time:.6f}")
    check_restored(pair, moments[0])
    # ...but the moments after it were undone, then resynced over: they are refused, naming the nearest points
    rc, msg = restore(pair, f"@{moments[-1].time:.6f}", check=False)
    assert rc == 1, msg
    assert "inside a resync window" in msg and "journal resync rewrote" in msg, msg
    assert "The nearest points offered: before it" in msg, msg
    # and the next durability point of the source is offered again
    device_flush(g, pair.mapper)
    pair.wait_synced()
    when = float(g.run("date +%s.%N").output)
    restore(pair, f"@{when:.6f}")
    assert sha(g, g.disk("rst")) == present
