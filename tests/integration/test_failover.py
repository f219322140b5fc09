"""Failover and failback with real daemons over loopback, two "hosts" as two sets of files: A is the source, B
the replica.  B is promoted, A demoted, and B's data replicates back to A (a resync that ends identical); then
both sides are written while apart, and the reconnect is refused as a split brain, naming both generations,
with nothing written on either side, until the operator names the side that loses."""

from __future__ import annotations

import hashlib
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bdr import replica_state
from bdr.client.identity import ring_identity
from bdr.client.metadata import read_metadata, write_metadata
from bdr.generations import fmt_id
from bdr.journal import Journal
from bdr.kernel.ring import RingConsumer
from bdr.seq import NO_SEQ, next_seq
from bdr.testing.meta_area import pack_meta_area
from bdr.testing.ring_producer import RingProducer

from .conftest import DEV, SLOTS, Daemon, Lab, Writer, free_port
from .test_status import bdr, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bdr.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


def promote_replica(lab: Lab, meta: Path) -> None:
    """bdr promote of the lab's replica (its server stopped), its new source's metadata written to ``meta``."""
    res = cli(
        "promote", "--journal", str(lab.journal), "--target-device", str(lab.replica), "--metadata", str(meta)
    )
    assert res.returncode == 0, res.stderr


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start(lab: Lab, name: str, *argv: str) -> Daemon:
    d = Daemon(name, list(argv), lab.tmp)
    lab.daemons.append(d)
    return d.start()


def drained(prod: RingProducer, client: Daemon, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while prod.tail != prod.head or f"in sync at ring position {prod.head}:" not in client.log():
        assert time.monotonic() < deadline, client.log()[-3000:]
        time.sleep(0.05)


def test_failover_failback_and_split_brain(lab: Lab) -> None:
    run = lab.tmp / "run"
    a_meta, b_meta, a_meta2 = lab.tmp / "a.meta", lab.tmp / "b.meta", lab.tmp / "a2.meta"
    a_journal = lab.tmp / "a.journal"  # the journal A's server uses once A is demoted
    lab.images(src_random=True)
    prod_a = lab.make_producer()
    srv_b = lab.server()
    srv_b.wait_log("listening on")
    cl_a = lab.client("--metadata", str(a_meta))
    lab.wait_drained()
    Writer(prod_a, 300, seed=1).join()
    lab.wait_drained()
    assert lab.identical()
    gen_a = read_metadata(a_meta).generations  # type: ignore[union-attr]
    st = wait_for(
        "the replica's generation", lambda s: (s["servers"][0]["generations"] or {}).get("current"), run
    )
    assert st["servers"][0]["generations"]["current"] == fmt_id(gen_a.current)  # taken at the first scan
    assert st["targets"][0]["client"]["generations"]["current"] == fmt_id(gen_a.current)

    # unplanned failover: A is lost (its last write never reached B); B is promoted
    cl_a.kill()
    prod_a.write(7 * 4096, random.Random(9).randbytes(4096), block=True)  # unacknowledged
    assert srv_b.stop() == 0
    promote_replica(lab, b_meta)
    gen_b = read_metadata(b_meta).generations  # type: ignore[union-attr]
    assert gen_b.past[-1][0] == gen_a.current and gen_b.current != gen_a.current
    again = lab.server()  # no server serves a promoted replica
    assert again.wait() != 0 and "was promoted to a source" in again.log()

    # failback: A is demoted and served; B, the source now, resyncs it (A's lost write is overwritten)
    res = cli("demote", "--journal", str(a_journal), "--metadata", str(a_meta))
    assert res.returncode == 0, res.stderr
    port = free_port()
    serve_a = ["bdr.server", "--address", "127.0.0.1", "--port", str(port), "--verbose"]
    serve_a += ["--target-device", str(lab.src), "--journal", str(a_journal)]
    srv_a = start(lab, "server-a", *serve_a)
    srv_a.wait_log("listening on")
    prod_b = RingProducer(lab.tmp / "ring-b", SLOTS, DEV, source=lab.replica)
    lab.producer = None
    prod_a.close()
    client_b = ["bdr.client", "--address", "127.0.0.1", "--port", str(port), "--verbose"]
    client_b += ["--control-device", str(lab.tmp / "ring-b"), "--source-device", str(lab.replica)]
    client_b += ["--metadata", str(b_meta)]
    cl_b = start(lab, "client-b", *client_b)
    srv_a.wait_log("the replica is behind and is resynced")
    Writer(prod_b, 300, seed=2).join()
    drained(prod_b, cl_b)
    assert lab.identical()
    st = wait_for(
        "A to take B's generation",
        lambda s: any((x["generations"] or {}).get("current") == fmt_id(gen_b.current) for x in s["servers"]),
        run,
    )

    # split brain: B is written while A is apart, and A is promoted and written too
    cl_b.signal(signal.SIGTERM)
    assert cl_b.wait() == 0
    prod_b.write(3 * 4096, random.Random(10).randbytes(4096), block=True)
    assert srv_a.stop() == 0
    res = cli(
        "promote", "--journal", str(a_journal), "--target-device", str(lab.src), "--metadata", str(a_meta2)
    )
    assert res.returncode == 0, res.stderr
    with open(lab.src, "r+b") as f:
        f.seek(11 * 4096)
        f.write(random.Random(11).randbytes(4096))
    res = cli("demote", "--journal", str(a_journal), "--metadata", str(a_meta2))
    assert res.returncode == 0, res.stderr
    before = digest(lab.src), digest(lab.replica)
    srv_a = start(lab, "server-a2", *serve_a)
    srv_a.wait_log("listening on")
    cl_b = start(lab, "client-b2", *client_b)
    assert cl_b.wait(30) != 0  # refused: the client stops
    refusal = srv_a.wait_log(r"refused: (split brain: .*)").group(1)
    gen_b2 = read_metadata(b_meta).generations  # type: ignore[union-attr]
    gen_a2 = read_metadata(a_meta2).generations  # type: ignore[union-attr]
    assert fmt_id(gen_b2.current) in refusal and fmt_id(gen_a2.current) in refusal, refusal
    # B's one write since the split went through its ring and is counted; A's was written to the device with
    # no capture ring (no target in this lab), which nothing counts
    assert "the source's side wrote 4.0 KiB and the replica's 0 B" in refusal, refusal
    assert "SPLIT_BRAIN" in cl_b.log() and "--discard-local-changes" in cl_b.log()
    assert (digest(lab.src), digest(lab.replica)) == before  # nothing written on either side
    st = wait_for("the decision in the status", lambda s: s["servers"][0]["generations_decision"], run)
    assert st["servers"][0]["generations_decision"].startswith("split brain")
    assert st["servers"][0]["split_brain"] == {"source_written": 4096, "replica_written": 0}
    table = bdr("status", run_dir=run).stdout
    assert (
        f"role replica, generation {fmt_id(gen_a2.current)}, last client's generation {fmt_id(gen_b2.current)}"
        in table
    ), table
    assert "at the last connect: split brain" in table, table
    assert "SPLIT BRAIN: written since the split: source's side 4.0 KiB, this replica's 0 B" in table, table

    # a client that keeps no generations cannot say it descends from A's data either
    legacy = start(lab, "client-b-legacy", *client_b[:-2])
    assert legacy.wait(30) != 0
    assert "keeps a generation history" in legacy.log() and "(SPLIT_BRAIN)" in legacy.log(), legacy.log()
    assert (digest(lab.src), digest(lab.replica)) == before
    # the operator keeps B's data: A's server discards its local changes
    assert srv_a.stop() == 0
    srv_a = start(lab, "server-a3", *serve_a, "--discard-local-changes")
    srv_a.wait_log("listening on")
    cl_b = start(lab, "client-b3", *client_b)
    srv_a.wait_log("--discard-local-changes: this replica's changes are overwritten")
    Writer(prod_b, 100, seed=3).join()
    drained(prod_b, cl_b)
    assert lab.identical()
    srv_a.wait_log("--discard-local-changes is spent")  # a later split brain is refused again
    prod_b.close()


def a_replicates_to_b(lab: Lab, a_meta: Path) -> tuple[RingProducer, Daemon, Daemon]:
    """A (the lab's source, random data, ``--metadata a_meta``) replicates to B (the lab's replica): its
    producer, B's server and A's client, once 200 writes are replicated."""
    lab.images(src_random=True)
    prod_a = lab.make_producer()
    srv_b = lab.server()
    srv_b.wait_log("listening on")
    cl_a = lab.client("--metadata", str(a_meta))
    Writer(prod_a, 200, seed=1).join()
    lab.wait_drained()
    return prod_a, srv_b, cl_a


@pytest.mark.parametrize("same_ring", [True, False], ids=["ring-of-the-generation", "another-ring"])
def test_switchover_after_a_stop_in_sync_streams_without_a_scan(lab: Lab, same_ring: bool) -> None:
    """A stops in sync and is demoted at that seq (what bdr demote --name finds in an empty ring); B is promoted
    with a ring created for the new generation (bdr promote --name): B streams its writes since, no scan.  If
    B's ring is not the one created with the generation, B resyncs A instead.  Both end identical."""
    a_meta, b_meta = lab.tmp / "a.meta", lab.tmp / "b.meta"
    a_journal = lab.tmp / "a.journal"
    prod_a, srv_b, cl_a = a_replicates_to_b(lab, a_meta)
    Writer(prod_a, 50, seed=4).join()
    cl_a.signal(signal.SIGTERM)  # at once: the client sends what its ring holds, then marks the stop in sync
    assert cl_a.wait() == 0
    meta_a = read_metadata(a_meta)
    assert meta_a is not None and meta_a.synced is not None, cl_a.log()
    assert srv_b.stop() == 0
    # bdr demote --name: the target's ring was empty at the seq of the stop in sync
    j = Journal(a_journal)
    j.store(replica_state.demoted(j.header, meta_a.generations, meta_a.synced))
    j.close()
    prod_a.close()
    lab.producer = None
    promote_replica(lab, b_meta)
    ring_b = lab.tmp / "ring-b"
    prod_b = RingProducer(ring_b, SLOTS, DEV, source=lab.replica)
    Writer(prod_b, 200, seed=2).join()  # B is written before it reaches A
    # bdr promote --name: the ring created with the generation is recorded
    meta_b = read_metadata(b_meta)
    assert meta_b is not None
    with RingConsumer(ring_b, dev_size=DEV) as ring:
        rid = ring_identity(ring) if same_ring else bytes(15) + b"x"
    write_metadata(b_meta, meta_b.with_(gen_ring=rid))
    port = free_port()
    srv_a = start(
        lab,
        "server-a",
        "bdr.server",
        "--address",
        "127.0.0.1",
        "--port",
        str(port),
        "--verbose",
        "--target-device",
        str(lab.src),
        "--journal",
        str(a_journal),
    )
    srv_a.wait_log("listening on")
    client_b = [
        "bdr.client",
        "--address",
        "127.0.0.1",
        "--port",
        str(port),
        "--verbose",
        "--metadata",
        str(b_meta),
    ]
    client_b += ["--control-device", str(ring_b), "--source-device", str(lab.replica)]
    cl_b = start(lab, "client-b", *client_b)
    Writer(prod_b, 100, seed=3).join()
    drained(prod_b, cl_b)
    assert lab.identical()
    scanned = re.search(r"scan \d+ \(hash\) of the whole device", cl_b.log())
    if same_ring:
        assert "no scan" in cl_b.log() and not scanned, cl_b.log()
        assert "streams its generation from its first write" in srv_a.log()
    else:
        assert scanned and "no scan" not in cl_b.log(), cl_b.log()
    prod_b.close()


@pytest.mark.parametrize("cleared", ["at-the-promotion-point", "after-it"])
def test_failback_resyncs_only_the_regions_the_old_source_marked(lab: Lab, cleared: str) -> None:
    """A is lost with writes B never had; B is promoted (bdr promote --name: a ring created with the new
    generation) and written.  A is demoted with its meta device: its marks, last cleared at the point B held,
    are kept in A's journal and offered to B, which resyncs only those regions and then streams its writes since
    the promotion from its ring.  Marks cleared after that point could miss A's writes: B scans the whole device.
    Both end identical."""
    a_meta, b_meta = lab.tmp / "a.meta", lab.tmp / "b.meta"
    a_journal, a_track = lab.tmp / "a.journal", lab.tmp / "a.track"
    prod_a, srv_b, cl_a = a_replicates_to_b(lab, a_meta)
    cl_a.kill()
    with RingConsumer(lab.ring, dev_size=DEV) as ring:
        ring_a = ring_identity(ring)
    lost = [7, 300, 301, 5000]  # A's writes that never reached B (4 KiB blocks)
    for blk in lost:
        prod_a.write(blk * 4096, random.Random(blk).randbytes(4096), block=True)
    assert srv_b.stop() == 0
    prod_a.close()
    lab.producer = None
    promote_replica(lab, b_meta)
    meta_b = read_metadata(b_meta)
    meta_a = read_metadata(a_meta)
    assert meta_b is not None and meta_a is not None
    assert meta_b.base_ring == ring_a and meta_b.base_seq != NO_SEQ, meta_b
    ring_b = lab.tmp / "ring-b"
    prod_b = RingProducer(ring_b, SLOTS, DEV, source=lab.replica)
    Writer(prod_b, 200, seed=2).join()  # B is written before it reaches A
    with RingConsumer(ring_b, dev_size=DEV) as ring:
        write_metadata(b_meta, meta_b.with_(gen_ring=ring_identity(ring)))
    # A's meta device: its lost writes' regions (64 KiB) marked, and one region it did not write
    region = 64 << 10
    marked = sorted({blk * 4096 // region for blk in lost} | {200})
    pos = next_seq(meta_b.base_seq) + (1 if cleared == "after-it" else 0)
    a_track.write_bytes(pack_meta_area(DEV, region, ring_a, pos, meta_a.generations.current, marked))
    res = cli("demote", "--journal", str(a_journal), "--metadata", str(a_meta), "--meta-device", str(a_track))
    assert res.returncode == 0, res.stderr
    assert f"kept the marks of {a_track}: {len(marked)} ranges, {len(marked) * region} bytes" in res.stdout
    port = free_port()
    srv_a = start(
        lab,
        "server-a",
        *["bdr.server", "--address", "127.0.0.1", "--port", str(port), "--verbose"],
        *["--target-device", str(lab.src), "--journal", str(a_journal)],
    )
    srv_a.wait_log("listening on")
    client_b = ["bdr.client", "--address", "127.0.0.1", "--port", str(port), "--verbose"]
    client_b += [
        "--metadata",
        str(b_meta),
        "--control-device",
        str(ring_b),
        "--source-device",
        str(lab.replica),
    ]
    cl_b = start(lab, "client-b", *client_b)
    Writer(prod_b, 100, seed=3).join()
    drained(prod_b, cl_b)
    assert lab.identical()
    log = cl_b.log()
    assert "offering the marks kept when this device was demoted" in srv_a.log()
    if cleared == "after-it":
        assert "but they were last cleared at seq" in log and "of the whole device" in log, log
        return
    scan = re.search(r"scan \d+ \(hash\) of (\d+) marked extents \((\d+) bytes\)", log)
    assert scan and int(scan.group(2)) == len(marked) * region, log
    assert "of the whole device" not in log, log
    done = re.search(r"scan \d+ done in .*: (\d+) blocks compared, (\d+) differed", log)
    assert done and int(done.group(1)) == len(marked) * region // 4096, log
    assert 0 < int(done.group(2)) <= len(lost) + 200, log  # A's lost blocks, and B's writes the scan read
    prod_b.close()
