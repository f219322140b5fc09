"""Journal scans with real daemons: the resync is staged, committed, applied; a server SIGKILLed while
receiving scan blocks, during the commit or during the apply restarts with the old or the new consistent replica
and converges; a journal too small for a resync is a clear refusal with the --full-scan fallback."""

from __future__ import annotations

import hashlib
import os
import random
import re
from pathlib import Path

import pytest

from bdr.journal.faults import CRASH_ENV
from bdr.journal.format import RECORDS_AT
from bdr.testing.ring_producer import RingProducer

from .conftest import DEV, Daemon, Lab, Writer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BLOCK = 65536


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def differing_replica(lab: Lab, every: int = 4, seed: int = 7) -> tuple[str, str]:
    """Source random, replica = source with every ``every``-th 64 KiB block different.  (old, new) digests."""
    lab.images(src_random=True, seed=seed)
    data = bytearray(lab.src.read_bytes())
    rnd = random.Random(seed + 1)
    for b in range(0, DEV // BLOCK, every):
        data[b * BLOCK : (b + 1) * BLOCK] = rnd.randbytes(BLOCK)
    lab.replica.write_bytes(bytes(data))
    return digest(lab.replica), digest(lab.src)


def test_journal_resync_with_writes_during_the_scan_ends_identical(lab: Lab) -> None:
    differing_replica(lab)
    prod = lab.make_producer()
    srv = lab.server()
    srv.wait_log("listening on")
    cli = lab.client()
    w = Writer(prod, 2000, seed=3)
    w.join()
    lab.wait_drained()
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert lab.identical()
    log = srv.log()
    assert "staged in the journal" in log
    assert "journal resync applied" in log


@pytest.mark.parametrize("point", ["receive", "commit", "apply"])
def test_server_killed_during_a_journal_resync_restarts_consistent(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    old, new = differing_replica(lab)
    lab.make_producer()
    monkeypatch.setenv(CRASH_ENV, point)  # test hook: the server SIGKILLs itself there
    srv = lab.server()
    monkeypatch.delenv(CRASH_ENV, raising=False)
    srv.wait_log("listening on")
    cli = lab.client()
    srv.wait_log(f"test hook {CRASH_ENV}={point}")
    assert srv.wait(20) == -9
    cli.kill()
    now = digest(lab.replica)
    if point in ("receive", "commit"):
        assert now == old  # not committed: the replica was never touched
    # restart: the journal is replayed (apply) or discarded (receive, commit) before anything is served
    srv2 = lab.server()
    srv2.wait_log("listening on", count=2)
    after = digest(lab.replica)
    if point == "apply":
        assert now not in (old, new)  # killed half-way through the apply ...
        assert after == new  # ... and the committed resync is replayed
        assert "replayed a committed resync" in srv2.log()
    else:
        assert after == old
        assert "discarded an uncommitted resync" in srv2.log()
    # and the next client start converges
    cli2 = lab.client()
    lab.wait_drained()
    assert cli2.stop() == 0
    assert srv2.stop() == 0
    assert lab.identical()


def test_journal_too_small_is_refused_with_the_full_scan_fallback(lab: Lab) -> None:
    old, _ = differing_replica(lab, every=1)
    lab.make_producer()
    srv = lab.server("--journal-size", str(2 << 20))  # 1 MiB of records for 32 MiB of differing blocks
    srv.wait_log("listening on")
    cli = lab.client("--journal-full", "stop")
    assert cli.wait(30) == 3
    assert "journal" in cli.log() and "too small for this resync" in cli.log()
    assert "--full-scan" in cli.log()
    assert digest(lab.replica) == old  # nothing was applied
    cli2 = lab.client("--full-scan")
    srv.wait_log("writes the replica directly: the replica is inconsistent until it completes")
    lab.wait_drained()
    assert cli2.stop() == 0
    assert srv.stop() == 0
    assert lab.identical()
    assert os.path.getsize(lab.journal) <= 2 << 20


def test_corrupt_committed_journal_is_refused_at_server_start(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    differing_replica(lab)
    lab.make_producer()
    monkeypatch.setenv(CRASH_ENV, "apply")  # leaves a committed, half-applied resync
    srv = lab.server()
    monkeypatch.delenv(CRASH_ENV)
    srv.wait_log("listening on")
    cli = lab.client()
    assert srv.wait(30) == -9
    cli.kill()
    with open(lab.journal, "r+b") as f:  # flip a byte in the data of the first record
        f.seek(RECORDS_AT + 64 + 1000)
        b = f.read(1)
        f.seek(RECORDS_AT + 64 + 1000)
        f.write(bytes([b[0] ^ 0x5A]))
    before = digest(lab.replica)
    srv2 = lab.server()
    assert srv2.wait(20) == 2
    assert re.search(
        r"record 0 at byte \d+ has a bad checksum; refusing to apply a corrupt journal", srv2.log()
    )
    assert digest(lab.replica) == before  # nothing applied


def test_a_replica_of_another_source_is_refused_unless_replaced_on_purpose(lab: Lab) -> None:
    lab.images(src_random=True)
    prod = lab.make_producer()
    srv = lab.server()
    srv.wait_log("listening on")
    cli = lab.client()
    Writer(prod, 500, seed=4).join()
    lab.wait_drained()
    assert cli.stop() == 0
    before = digest(lab.replica)
    # another device (another path) pointed at the same replica by mistake
    other = lab.tmp / "other.img"
    other.write_bytes(random.Random(99).randbytes(DEV))
    ring2 = lab.tmp / "ring2"
    prod2 = RingProducer(ring2, 256, DEV, source=other)
    try:

        def other_client(name: str, *extra: str) -> Daemon:
            argv = ["bdr.client", "--address", "127.0.0.1", "--port", str(lab.port), "--verbose"]
            argv += ["--control-device", str(ring2), "--source-device", str(other), *extra]
            d = Daemon(name, argv, lab.tmp)
            lab.daemons.append(d)
            return d.start()

        wrong = other_client("wrong-client")
        assert wrong.wait(30) == 3
        assert re.search(
            r"refused us: replica .* mirrors another source \(\w+, \d+ bytes\), not this one", wrong.log()
        )
        assert "--full-scan or --full-replication" in wrong.log()
        assert digest(lab.replica) == before  # untouched
        assert srv.proc is not None and srv.proc.poll() is None  # and the server still serves
        # replaced on purpose: --full-scan makes it a copy of the other device
        again = other_client("replacing-client", "--full-scan")
        again.wait_log(r"scan 1 done")
        again.wait_log(r"in sync at ring position")
        assert again.stop() == 0
    finally:
        prod2.close()
    assert srv.stop() == 0
    assert digest(lab.replica) == digest(other)


def test_journal_too_small_falls_back_to_a_direct_resync(lab: Lab) -> None:
    """--journal-full direct (the default): the refused journal resync is followed at once by a direct one;
    the client's status names the state and the remedy while it runs, and the replica converges."""
    differing_replica(lab, every=1)
    lab.make_producer()
    srv = lab.server("--journal-size", str(2 << 20))
    srv.wait_log("listening on")
    cli = lab.client()
    cli.wait_log(
        "cannot stage this resync in its journal: .*too small for this resync.*Resyncing with direct"
    )
    cli.wait_log("writes the replica directly: the server's journal is too small for it")
    srv.wait_log("writes the replica directly: the replica is inconsistent until it completes")
    lab.wait_drained()
    cli.wait_log("direct resync complete")
    assert cli.proc is not None and cli.proc.poll() is None
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert lab.identical()
    assert os.path.getsize(lab.journal) <= 2 << 20


def test_rewritten_blocks_fit_a_journal_as_large_as_the_device(lab: Lab) -> None:
    """Ring writes staged with a journal scan overwrite blocks the scan staged: each is staged once, so a journal
    barely larger than the device holds a resync of the whole device however often its blocks are rewritten."""
    differing_replica(lab, every=1)
    prod = lab.make_producer(slots=16384)
    rng = random.Random(5)
    for _ in range(192):  # 48 MiB of rewrites in the ring, staged after the scan's 32 MiB: 2.3 x the journal
        prod.write(rng.randrange(DEV // 262144) * 262144, os.urandom(262144))
    srv = lab.server("--journal-size", str(DEV + DEV // 16 + (1 << 20)))
    srv.wait_log("listening on")
    cli = lab.client("--journal-full", "stop")
    lab.wait_drained(timeout=60)
    assert "compacted the staged resync" in srv.log()
    assert "too small" not in cli.log()
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert lab.identical()
