"""bdr verify bookkeeping (bdr.verify) and the status snapshot's plumbing (bdr.status): no sockets to a peer."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest

from bdr import status
from bdr.scan import verify

B = 65536


def test_coalesce_merges_touching_and_overlapping_ranges() -> None:
    assert verify.coalesce([(3 * B, B), (0, B), (B, B), (10, 5), (6 * B, 2 * B), (7 * B, B)]) == [
        (0, 2 * B),
        (3 * B, B),
        (6 * B, 2 * B),
    ]
    assert verify.coalesce([]) == []


def test_windows_cover_the_device_once() -> None:
    job = verify.VerifyJob(20 * (1 << 20) + 512, B)
    seen = []
    while (item := job.next(0.0)) is not None:
        off, ln, look = item
        assert look == 0 and off % B == 0
        seen.append((off, ln))
        job.record(off, ln, look, [], [])
    assert sum(ln for _, ln in seen) == job.dev_size == job.compared and job.finished
    assert job.result()["ok"] and job.result()["mismatch_ranges"] == []


def test_a_block_is_reported_only_when_it_differs_twice_without_a_write() -> None:
    job = verify.VerifyJob(4 * B, B)
    off, ln, look = job.next(0.0) or (0, 0, 0)
    assert (off, ln, look) == (0, 4 * B, 0)
    # first look: block 1 differs (unwritten), block 2 differs but was written since the request
    job.record(0, 4 * B, 0, [(B, B), (2 * B, B)], [(2 * B + 512, 4096)])
    assert not job.mismatches and len(job.rechecks) == 2
    assert job.next(0.0) is None and not job.finished  # rechecks wait RECHECK_DELAY
    later = 1e12
    (o1, l1, k1), (o2, l2, k2) = job.next(later), job.next(later)  # type: ignore[misc]
    assert (o1, l1, k1) == (B, B, 1) and (o2, l2, k2) == (2 * B, B, 1)
    job.record(o1, l1, k1, [(B, B)], [])  # still differs, nothing written: a real mismatch
    job.record(o2, l2, k2, [], [])  # the write reached the replica meanwhile: fine
    assert job.finished and job.mismatches == [(B, B)] and job.compared == 4 * B
    res = job.result()
    assert not res["ok"] and res["mismatch_ranges"] == [[B, B]] and res["busy_ranges"] == []


def test_a_block_written_at_every_look_is_reported_busy() -> None:
    job = verify.VerifyJob(B, B)
    look = 0
    while (item := job.next(1e12)) is not None:
        off, ln, look = item
        job.record(off, ln, look, [(0, B)], [(0, 512)])
    assert look == verify.MAX_LOOKS - 1 and job.busy == [(0, B)] and not job.mismatches
    assert job.result()["ok"]  # busy is not a mismatch, but it is reported
    job.fail("connection lost")
    assert job.done.is_set() and not job.result()["ok"] and job.result()["error"] == "connection lost"


def test_parse_address() -> None:
    assert status.parse_address("127.0.0.1:9788") == ("127.0.0.1", 9788)
    assert status.parse_address("[::1]:9788") == ("::1", 9788)
    assert status.parse_address(":9788") == ("127.0.0.1", 9788)
    assert status.parse_address("0.0.0.0:0") == ("0.0.0.0", 0)  # any free port
    for bad in ("9788", "host:", "host:70000", "host:x"):
        with pytest.raises(ValueError, match="is not HOST:PORT"):
            status.parse_address(bad)


def test_lookup() -> None:
    snap = {"a": {"b": 3, "t": True}, "n": None, "s": "x"}
    assert status.lookup(snap, ("a", "b")) == 3.0 and status.lookup(snap, ("a", "t")) == 1.0
    assert status.lookup(snap, ("n",)) is None and status.lookup(snap, ("s",)) is None
    assert status.lookup(snap, ("a", "zz")) is None


def test_control_socket_status_handler_and_errors(tmp_path: Path) -> None:
    board = status.Board()
    board.publish({"state": "replicating", "lag": {"records": 5}})

    def long_request(progress):  # type: ignore[no-untyped-def]
        progress({"done": 1})
        progress({"done": 2})
        return {"ok": True}

    path = tmp_path / "run" / "client-x.sock"
    sock = status.ControlSocket(path, board, {"verify": long_request})
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        assert status.query(path) == {"state": "replicating", "lag": {"records": 5}}
        assert list(status.request(path, "verify")) == [
            {"progress": {"done": 1}},
            {"progress": {"done": 2}},
            {"result": {"ok": True}},
        ]
        (err,) = status.request(path, "reboot")
        assert "unknown request 'reboot'" in err["error"]
        # a second daemon cannot take a live socket; a dead one's socket is taken over
        with pytest.raises(OSError):
            status.ControlSocket(path, board)
    finally:
        sock.close()
    assert not path.exists()
    with pytest.raises(status.StatusUnavailable):
        status.query(path)


def test_metrics_endpoint_serves_the_snapshot(tmp_path: Path) -> None:
    board = status.Board()
    specs = [
        status.Spec("sent_bytes_total", "counter", "bytes", ("sent", "bytes")),
        status.Spec("lag_records", "gauge", "lag", ("lag",)),
        status.Spec("missing", "gauge", "not in the snapshot", ("nope",)),
    ]
    ep = status.MetricsEndpoint("127.0.0.1:0", board, specs, ("up", "down"), "bdr_t")
    try:
        board.publish({"sent": {"bytes": 123}, "lag": 7, "state": "down"})
        with urllib.request.urlopen(ep.url, timeout=10) as r:
            text = r.read().decode()
        assert "bdr_t_sent_bytes_total 123.0" in text and "bdr_t_lag_records 7.0" in text
        assert 'bdr_t_state{state="down"} 1.0' in text and 'bdr_t_state{state="up"} 0.0' in text
        assert "bdr_t_missing" not in text
    finally:
        ep.close()


def test_control_socket_close_joins_its_threads(tmp_path: Path) -> None:
    import threading

    board = status.Board()
    release = threading.Event()

    def slow(progress):  # type: ignore[no-untyped-def]
        release.wait(2)
        return {"ok": True}

    path = tmp_path / "c.sock"
    sock = status.ControlSocket(path, board, {"slow": slow})
    peer = threading.Thread(target=lambda: list(status.request(path, "slow")))
    peer.start()
    deadline = time.monotonic() + 5
    while not sock._answering and time.monotonic() < deadline:
        time.sleep(0.01)
    (answering,) = sock._answering
    threading.Timer(0.3, release.set).start()  # the answer comes while close() waits for it
    sock.close()
    assert not sock._thread.is_alive() and not answering.is_alive()
    peer.join(5)
