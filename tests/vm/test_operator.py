"""The operator's view in the 6.12 guest: bdr status --json and the daemons' Prometheus endpoints during
replication, after a forced overflow and its resync; bdr verify on a healthy pair and after a byte was flipped
directly on the replica device."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vm.lab import Guest
from tests.vm.pair import BIN, Pair

VM_DISKS = {"src": "128M", "dst": "128M", "jnl": "32M"}
VM_MEMORY = "2048M"
CLIENT_METRICS, SERVER_METRICS = 9788, 9789


@pytest.fixture(scope="module")
def pair(guest: Guest, bdr_ko: Path) -> Iterator[Pair]:
    guest.run(f"modprobe dm-mod && insmod {bdr_ko}")
    # a 2 MiB ring (508 writes): easy to overflow on purpose
    p = Pair(
        guest,
        guest.disk("src"),
        guest.disk("dst"),
        guest.disk("jnl"),
        buffer="2M",
        server_args=f"--metrics-address 127.0.0.1:{SERVER_METRICS}",
        client_args=f"--metrics-address 127.0.0.1:{CLIENT_METRICS}",
    )
    p.setup()
    p.start_server()
    p.start_client()
    yield p
    p.remove()
    guest.run("rmmod bdr")


def status(g: Guest) -> dict[str, Any]:
    return json.loads(g.run(f"{BIN}/bdr status --json").output)  # type: ignore[no-any-return]


def target(st: dict[str, Any]) -> dict[str, Any]:
    (t,) = st["targets"]
    return t  # type: ignore[no-any-return]


def wait_status(g: Guest, what: str, cond: Any, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = status(g)
        if cond(st):
            return st
        time.sleep(1)
    raise AssertionError(f"bdr status never showed {what}: {json.dumps(st, indent=1)}")


def scrape(g: Guest, port: int) -> dict[str, float]:
    text = g.run(
        f"{BIN}/python -c 'import urllib.request,sys; "
        f'sys.stdout.write(urllib.request.urlopen("http://127.0.0.1:{port}/metrics", timeout=10).read().decode())\''
    ).output
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^(bdr_\w+(?:\{state="\w+"\})?) (\S+)$', text, re.M)
    }


def in_sync(st: dict[str, Any]) -> bool:
    t = target(st)
    c = t["client"] or {}
    return (
        bool(c.get("in_sync"))
        and c["lag"]["records"] == 0
        and c["durable_seq"] == st["servers"][0]["durable_seq"]
    )


def test_status_and_metrics_during_replication_and_after_an_overflow(pair: Pair) -> None:
    g = pair.g
    st = wait_status(g, "the pair in sync", in_sync)
    t = target(st)
    assert t["name"] == "rep" and t["kernel"]["chardev"] == "bdr_rep" and t["kernel"]["device"] == pair.src
    assert t["state"] == "replicating" and t["client"]["server"] == "127.0.0.1:8000"
    # the server stalls (SIGSTOP) while 100 writes are made: they wait in the ring, and the lag says so
    g.run(f"pkill -STOP -f 'bin/bdr_server .*{pair.port}'")
    try:
        g.run(f"dd if=/dev/urandom of={pair.mapper} bs=4K count=100 seek=1000 oflag=direct status=none")
        lagging = wait_status(
            g,
            "a lag",
            lambda s: (
                target(s)["client"]["lag"]["records"] >= 100 and target(s)["client"]["lag"]["seconds"] > 0
            ),
        )
    finally:
        g.run(f"pkill -CONT -f 'bin/bdr_server .*{pair.port}'")
    c = target(lagging)["client"]
    assert target(lagging)["state"] == "replicating" and not c["in_sync"] and c["lag"]["bytes"] >= 100 * 4096
    # and returns to zero once the server runs again
    st = wait_status(g, "the lag back to zero", in_sync)
    c, s = target(st)["client"], st["servers"][0]
    assert c["lag"] == {"records": 0, "bytes": 0, "seconds": 0.0}
    assert (
        s["state"] == "replicating"
        and s["consistent"]
        and c["replicated"]["records"] == s["applied"]["records"]
    )
    # the metrics endpoints, scraped over the guest's loopback, show the same numbers
    cm, sm = scrape(g, CLIENT_METRICS), scrape(g, SERVER_METRICS)
    assert cm["bdr_client_replicated_records_total"] == c["replicated"]["records"]
    assert cm["bdr_client_durable_seq"] == c["durable_seq"] == sm["bdr_server_durable_seq"]
    assert cm["bdr_client_lag_records"] == 0 and cm['bdr_client_state{state="replicating"}'] == 1
    assert (
        sm["bdr_server_applied_records_total"] == s["applied"]["records"] and sm["bdr_server_connected"] == 1
    )
    # a forced overflow: no client while 16 MiB is written through a 2 MiB ring
    pair.stop_client()
    g.run(f"dd if=/dev/urandom of={pair.mapper} bs=64K count=256 seek=300 oflag=direct status=none")
    st = status(g)
    t = target(st)
    assert t["state"] == "overflow" and t["kernel"]["state"] == "overflow" and t["client"] is None
    assert t["kernel"]["dirty_regions"] > 0
    table = g.run(f"{BIN}/bdr status").output
    assert re.search(r"^rep\s+overflow\s", table, re.M), table
    pair.start_client(wait_scan=False)
    pair.wait_log(pair.client_log, r"scan [0-9]+ done", 180)
    st = wait_status(g, "in sync after the resync", in_sync)
    c = target(st)["client"]
    assert target(st)["state"] == "replicating" and target(st)["kernel"]["state"] == "capturing"
    # only the dirty regions were scanned: what did not fit in the ring of the 16 MiB written, not the device
    assert c["resync"]["scans"] == 1 and 4 << 20 <= c["resync"]["last_scan_bytes"] <= 16 << 20, c["resync"]
    assert scrape(g, CLIENT_METRICS)["bdr_client_scans_total"] == 1
    assert pair.identical()


def test_verify_finds_a_byte_flipped_on_the_replica(pair: Pair) -> None:
    g = pair.g
    wait_status(g, "the pair in sync", in_sync)
    res = g.run(f"{BIN}/bdr verify rep", timeout=300)
    assert "identical" in res.output and "128.0 MiB compared" in res.output, res.output
    # flip one byte of the replica device behind the server's back (sector 40000 = byte 20480000)
    g.run(
        f'{BIN}/python -c \'import os; fd = os.open("{pair.dst}", os.O_RDWR); at = 20480000; '
        "b = os.pread(fd, 1, at); os.pwrite(fd, bytes([b[0] ^ 255]), at); os.fsync(fd)'"
    )
    res = g.run(f"{BIN}/bdr verify rep --json", timeout=300, check=False)
    assert res.rc == 1, res.output
    out = json.loads(res.output)
    block = 20480000 // 65536 * 65536
    assert out["mismatch_ranges"] == [[block, 65536]] and out["compared_bytes"] == 128 << 20, out
    assert f"differ at byte {block}" in pair.tail(pair.client_log)
