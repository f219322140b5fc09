"""Operator view of real daemons over loopback: bdr status (table and --json) from the daemons' control sockets,
the Prometheus endpoints with the same numbers, and bdr verify on a healthy and on a damaged replica."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .conftest import DEV, Lab, Writer, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def bdr(*args: str, run_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bdr.cli", *args, "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def status_json(run_dir: Path) -> dict[str, Any]:
    res = bdr("status", "--json", run_dir=run_dir)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r'(bdr_\w+(?:\{state="\w+"\})?) (\S+)', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def wait_for(what: str, cond: Any, run_dir: Path, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = status_json(run_dir)
        if cond(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout}s: {json.dumps(st, indent=1)}")
        time.sleep(0.2)


def client_of(st: dict[str, Any]) -> dict[str, Any]:
    (t,) = st["targets"]
    return t["client"]  # type: ignore[no-any-return]


def test_status_and_metrics_follow_replication(lab: Lab) -> None:
    run = lab.tmp / "run"
    lab.images(src_random=True)
    prod = lab.make_producer()
    mport, cport = free_port(), free_port()
    srv = lab.server("--metrics-address", f"127.0.0.1:{mport}")
    srv.wait_log("listening on")
    # before any client: the server is listening, the (missing) client's target is not shown
    st = status_json(run)
    assert st["targets"] == [] and [s["state"] for s in st["servers"]] == ["listening"]
    # the client scans its way in (the replica starts empty), then streams
    cli = lab.client("--metrics-address", f"127.0.0.1:{cport}")
    st = wait_for("a resync or its end", lambda s: s["targets"] and client_of(s)["resync"]["scans"] >= 1, run)
    w = Writer(prod, 6000, seed=5, pace=0.0003)
    st = wait_for(
        "lag while writing, after the scan",
        lambda s: client_of(s)["lag"]["records"] > 0 and s["targets"][0]["state"] != "resyncing",
        run,
    )
    c = client_of(st)
    assert (
        st["targets"][0]["state"] == "replicating" and c["connected"] and c["server"].endswith(str(lab.port))
    )
    assert st["targets"][0]["name"] == "ring" and c["ring"]["slots"] == 1024
    w.join()
    lab.wait_drained()
    st = wait_for(
        "lag back to zero, and the server durable where the client says",
        lambda s: (
            client_of(s)["lag"] == {"records": 0, "bytes": 0, "seconds": 0.0}
            and client_of(s)["durable_seq"] == s["servers"][0]["durable_seq"]
        ),
        run,
    )
    c = client_of(st)
    (s,) = st["servers"]
    assert c["in_sync"] and c["state"] == "replicating" and c["durable_seq"] is not None
    assert s["state"] == "replicating" and s["consistent"] and s["peer"].startswith("127.0.0.1:")
    assert c["replicated"]["records"] == s["applied"]["records"] > 6000
    # the metrics endpoints show the same numbers (nothing moves once in sync)
    cm, sm = scrape(c["metrics_url"]), scrape(s["metrics_url"])
    assert cm["bdr_client_replicated_records_total"] == c["replicated"]["records"]
    assert cm["bdr_client_replicated_bytes_total"] == c["replicated"]["bytes"]
    assert cm["bdr_client_lag_records"] == 0 and cm["bdr_client_durable_seq"] == c["durable_seq"]
    assert cm['bdr_client_state{state="replicating"}'] == 1 and cm['bdr_client_state{state="resyncing"}'] == 0
    assert sm["bdr_server_applied_records_total"] == s["applied"]["records"]
    assert sm["bdr_server_durable_seq"] == s["durable_seq"] and sm["bdr_server_consistent"] == 1
    # the human table says the same
    res = bdr("status", run_dir=run)
    assert res.returncode == 0 and re.search(
        r"^ring\s+replicating\s+0/1024\s+0 rec 0 B 0s", res.stdout, re.M
    ), res.stdout
    assert "server 127.0.0.1:" in res.stdout and "consistent" in res.stdout
    # an overflow shows as overflow, then as a resync of the dirty regions, then in sync again
    assert cli.stop() == 0
    st = status_json(run)
    assert st["targets"] == [] and st["servers"][0]["state"] == "listening"
    for i in range(1100):  # more than the ring holds, while no client reads it
        prod.write((i * 8192) % DEV, b"\x5a" * 4096, block=False)
    cli = lab.client("--metrics-address", f"127.0.0.1:{cport}")
    cli.wait_log("dirty regions .* to resync|scan 1 ")
    lab.wait_drained()
    st = wait_for("in sync after the overflow", lambda s: client_of(s)["in_sync"], run)
    c = client_of(st)
    assert c["resync"]["scans"] == 1 and 0 < c["resync"]["last_scan_bytes"] < DEV // 4
    assert cli.stop() == 0 and srv.stop() == 0
    assert lab.identical()
    assert not list(run.glob("*.sock"))  # both daemons removed their sockets


def test_verify_reports_a_flipped_byte_and_nothing_on_a_healthy_pair(lab: Lab) -> None:
    run = lab.tmp / "run"
    lab.images(src_random=True)
    prod = lab.make_producer()
    srv = lab.server()
    srv.wait_log("listening on")
    cli = lab.client()
    w = Writer(prod, 2000, seed=9)
    w.join()
    lab.wait_drained()
    res = bdr("verify", "ring", run_dir=run)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{DEV // (1 << 20)}.0 MiB compared" in res.stdout and "identical" in res.stdout
    # a byte flipped on the replica behind the server's back, in the block at 5 MiB + 64 KiB
    at = 5 * (1 << 20) + 65536 + 1234
    with open(lab.replica, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))
    # writes keep going during the pass elsewhere: they are not reported
    w = Writer(prod, 3000, seed=10, pace=0.0005)
    res = bdr("verify", "ring", "--json", run_dir=run)
    w.join()
    assert res.returncode == 1, res.stdout + res.stderr
    out = json.loads(res.stdout)
    assert out["mismatch_ranges"] == [[5 * (1 << 20) + 65536, 65536]] and out["compared_bytes"] == DEV
    assert re.search(r"verify: source and replica differ at byte 5308416 \(\+65536\)", cli.log())
    res = bdr("verify", "nosuch", run_dir=run)
    assert res.returncode == 2 and "no client daemon found for 'nosuch'" in res.stderr
    assert cli.stop() == 0 and srv.stop() == 0
