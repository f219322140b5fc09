"""The point-in-time history with real daemons over loopback: the server keeps it while streaming, bdr status
and the metrics show it, bdr history lists it, bdr restore gives back each recorded moment while the pair runs,
refuses what it cannot give back, and bdr rollback turns the replica back before a resync brings it forward."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest

from .conftest import Lab, Writer, free_port
from .test_status import bdr, scrape, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bdr.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


def moment(lab: Lab) -> tuple[int, float]:
    """A durability point of the source once what came before is durable: its seq, and a time once the replica
    has it (the source file holds the moment's bytes until the next write)."""
    assert lab.producer is not None
    lab.producer.flush(block=True)
    seq = lab.producer.next_seq - 1
    lab.wait_drained()
    return seq, time.time()


def test_history_is_kept_shown_restored_and_rolled_back(lab: Lab) -> None:
    run = lab.tmp / "run"
    hist = lab.tmp / "history"
    lab.images(src_random=True)
    prod = lab.make_producer()
    mport = free_port()
    srv = lab.server(
        "--history", str(hist), "--history-size", "64M", "--metrics-address", f"127.0.0.1:{mport}"
    )
    srv.wait_log("listening on")
    before = time.time()
    lab.client()
    lab.wait_drained()  # the first scan copied the source: a gap, nothing before it is offered
    moments: dict[int, bytes] = {}
    times: dict[int, float] = {}
    rnd = random.Random(4)
    for k in range(5):
        w = Writer(prod, 300, seed=k)
        w.join()
        for _ in range(20):  # and writes over what the last ones wrote
            prod.write(rnd.randrange(0, 64) * 4096, rnd.randbytes(4096), block=True)
        seq, when = moment(lab)
        moments[seq], times[seq] = lab.src.read_bytes(), when
    # status and metrics
    st = wait_for(
        "the history in the server's status",
        lambda s: (s["servers"][0]["history"] or {}).get("newest_seq") == max(moments),
        run,
    )
    h = st["servers"][0]["history"]
    assert h["path"] == str(hist) and h["gaps"] == 1 and "a journal resync rewrote" in h["last_gap"]
    assert h["points"] >= len(moments) and 0 < h["bytes"] <= 64 << 20 and h["oldest_time"] <= h["newest_time"]
    m = scrape(st["servers"][0]["metrics_url"])
    assert m["bdr_server_history_points"] == h["points"] and m["bdr_server_history_gaps"] == 1
    assert m["bdr_server_history_oldest_timestamp_seconds"] == pytest.approx(h["oldest_time"])
    table = bdr("status", run_dir=run).stdout
    assert f"history {hist}: {h['points']} points from " in table, table
    # bdr history
    res = cli("history", str(hist), "--json")
    info = json.loads(res.stdout)
    assert set(moments) <= {p["seq"] for p in info["checkpoints"]}
    assert info["resyncs"][0]["reason"].startswith("a journal resync rewrote") and not info["gaps"]
    text = cli("history", str(hist)).stdout
    assert f"{h['points']} points: oldest" in text and "no moment from" in text, text
    # every moment back, while the pair runs and the source is written meanwhile
    w = Writer(prod, 2000, seed=9, pace=0.001)
    for seq, want in moments.items():
        out = lab.tmp / f"at-{seq}.img"
        res = cli("restore", str(hist), "--at", str(seq), "--to", str(out))
        assert res.returncode == 0, res.stderr
        assert "now holds the replica as of" in res.stdout and f"(seq {seq})" in res.stdout, res.stdout
        assert out.read_bytes() == want, f"moment {seq}"
    w.join()
    # what it cannot give back is refused, naming the gap and the points offered
    first = min(moments)
    res = cli("restore", str(hist), "--at", f"@{before}", "--to", str(lab.tmp / "x.img"))
    assert res.returncode == 1 and "is inside a resync window" in res.stderr, res.stderr
    assert "journal resync rewrote" in res.stderr and "The nearest points offered: after it" in res.stderr
    res = cli("restore", str(hist), "--at", "yesterday", "--to", str(lab.tmp / "x.img"))
    assert res.returncode == 1 and "give a time" in res.stderr
    res = cli("rollback", str(hist), "--at", str(first))
    assert res.returncode == 1 and "in use by another process" in res.stderr, res.stderr
    # rollback: the server stopped, the replica is the moment; the next client start resyncs it forward
    lab.wait_drained()
    for d in lab.daemons:
        assert d.stop() == 0
    target = sorted(moments)[2]
    res = cli("rollback", str(hist), "--at", str(target))
    assert res.returncode == 0 and "rolled back to" in res.stdout, res.stderr
    assert lab.replica.read_bytes() == moments[target]
    assert "the replica was rolled back to" in cli("history", str(hist)).stdout
    srv = lab.server("--history", str(hist), "--history-size", "64M")
    srv.wait_log("the replica was rolled back")
    lab.client()
    srv.wait_log(r"client \S+: source .* durable seq none", count=2)  # no resume point: a resync
    srv.wait_log("journal resync applied", count=2)
    lab.wait_drained()
    assert lab.identical()
    info = json.loads(cli("history", str(hist), "--json").stdout)
    assert len(info["resyncs"]) == 2 and not info["gaps"] and info["rolled_back"] is None
    # the resync kept what it overwrote: the moments before the rollback's point are still given back, those
    # after it (undone, then resynced) fall in its window and are refused
    first = min(moments)
    res = cli("restore", str(hist), "--at", f"@{times[first]}", "--to", str(lab.tmp / "again.img"))
    assert res.returncode == 0 and (lab.tmp / "again.img").read_bytes() == moments[first], res.stderr
    later = sorted(moments)[3]
    res = cli("restore", str(hist), "--at", f"@{times[later]}", "--to", str(lab.tmp / "x.img"))
    assert res.returncode == 1 and "is inside a resync window" in res.stderr, res.stderr
    assert f"(seq {target})" in res.stderr, res.stderr  # the nearest point before it: the rollback's


def test_history_flags_are_checked(lab: Lab) -> None:
    lab.images()
    srv = lab.server("--history-size", "1G")
    assert srv.wait() == 2 and "--history-size and --history-age need --history DIR" in srv.log()
    srv = lab.server("--history", str(lab.tmp / "h"))
    assert srv.wait() == 2 and "--history needs --history-size and/or --history-age" in srv.log()
    srv = lab.server("--history", str(lab.tmp / "h"), "--history-age", "soon")
    assert srv.wait() == 2 and "invalid duration 'soon'" in srv.log()


def test_writes_made_without_the_history_end_what_it_can_give_back(lab: Lab) -> None:
    """The journal names the history that kept every write: a server run without it (or with another one) is
    a gap when the history comes back, never a silently wrong restore."""
    hist = lab.tmp / "history"
    lab.images(src_random=True)
    lab.make_producer()
    srv = lab.server("--history", str(hist), "--history-size", "64M")
    srv.wait_log("listening on")
    cli_d = lab.client()
    lab.wait_drained()
    assert lab.producer is not None
    lab.producer.write(0, b"\x11" * 4096, block=True)
    seq, _ = moment(lab)
    assert cli_d.stop() == 0 and srv.stop() == 0
    # a day without the history
    srv = lab.server()
    srv.wait_log("listening on", count=2)
    assert "the history kept so far stops here" in srv.log()
    cli_d = lab.client()
    lab.producer.write(0, b"\x22" * 4096, block=True)
    lab.producer.flush(block=True)
    srv.wait_log(r"client \S+ connected", count=2)
    deadline = time.monotonic() + 20
    while lab.replica.read_bytes()[:4096] != b"\x22" * 4096:
        assert time.monotonic() < deadline, "the write did not reach the replica"
        time.sleep(0.05)
    assert cli_d.stop() == 0 and srv.stop() == 0
    # the history again: the points before that day are gone, with the reason
    srv = lab.server("--history", str(hist), "--history-size", "64M")
    srv.wait_log("listening on", count=3)
    info = json.loads(cli("history", str(hist), "--json").stdout)
    assert info["points"] == 0 and "written while this history was not kept" in info["gaps"][-1]["reason"]
    res = cli("restore", str(hist), "--at", str(seq), "--to", str(lab.tmp / "x.img"))
    assert res.returncode == 1 and "before a gap in the history" in res.stderr, res.stderr
    assert srv.stop() == 0
