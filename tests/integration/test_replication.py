"""Real daemons over loopback TCP: streaming, server crash, connection loss, flush durability, scan, bad input."""

from __future__ import annotations

import os
import random
import re
import time

import pytest

from .conftest import DEV, Daemon, Lab, Writer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_streaming_ends_identical(lab: Lab) -> None:
    lab.images(src_random=True)  # the replica starts empty: the start-up scan ships every block first
    prod = lab.make_producer()
    srv = lab.server()
    srv.wait_log("listening on")
    cli = lab.client()
    w = Writer(prod, 3000, seed=1)
    w.join()
    lab.wait_drained()
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert lab.identical()
    m = cli.wait_log(r"scan 1 done .*: (\d+) blocks compared, (\d+) differed")
    assert int(m.group(1)) == DEV // 4096
    assert "flush acknowledged" in cli.log()
    assert "client said goodbye" in srv.log()


def test_server_killed_and_restarted_mid_stream(lab: Lab) -> None:
    lab.images()
    prod = lab.make_producer()
    srv = lab.server()
    srv.wait_log("listening on")
    cli = lab.client()
    cli.wait_log("scan 1 done")
    w = Writer(prod, 4000, seed=2, pace=0.0002)
    while w.written < 1000:
        time.sleep(0.01)
    srv.kill()  # SIGKILL: no sync, no goodbye
    cli.wait_log(r"connection to .* lost: ")
    time.sleep(0.5)  # the ring keeps capturing meanwhile
    srv2 = lab.server()
    srv2.wait_log(r"journal .* \(existing, durable seq \d+\)")
    w.join()
    lab.wait_drained()
    assert cli.stop() == 0
    assert srv2.stop() == 0
    assert lab.identical()
    log = cli.log()
    assert re.search(r"quick resume at seq \d+", log), log  # resumed from the durable seq, no second scan
    assert "scan 2" not in log


def test_restart_after_a_scan_with_no_write_since_resumes_without_a_scan(lab: Lab) -> None:
    """A resync during which nothing was written names the next record's seq as the resume point: the replica
    knows where it stands in the ring before any record comes, so a restart resumes instead of scanning again."""
    lab.images(src_random=True)
    lab.make_producer()
    srv = lab.server()
    srv.wait_log("listening on")
    cli = lab.client()
    cli.wait_log("scan 1 done")
    srv.wait_log(r"scan 1 done in .* (committed and applied|resume at seq 0)")
    assert cli.stop() == 0
    cli = lab.client()
    cli.wait_log("quick resume at seq 0")
    assert cli.stop() == 0
    assert len(re.findall(r"scan \d+ \(hash\)", cli.log())) == 1, cli.log()  # the first start's only
    assert lab.identical()


def test_connection_cut_mid_stream(lab: Lab) -> None:
    lab.images()
    prod = lab.make_producer()
    srv = lab.server()
    srv.wait_log("listening on")
    px = lab.proxy()
    cli = lab.client(port=px.port)
    cli.wait_log("scan 1 done")
    w = Writer(prod, 4000, seed=3, pace=0.0002)
    for cuts in range(1, 4):
        while w.written < cuts * 900:
            time.sleep(0.01)
        px.cut()
        cli.wait_log("connection to .* lost", count=cuts)
        cli.wait_log("quick resume at seq", count=cuts)
    # and once the server cannot be reached at all for a while
    px.stop_listening()
    px.cut()
    cli.wait_log("not reachable", timeout=20)
    px.start()
    w.join()
    lab.wait_drained()
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert lab.identical()
    assert px.connections >= 5
    assert len(re.findall(r"quick resume at seq", cli.log())) >= 4


def test_flush_is_durable_on_the_replica_when_acknowledged(lab: Lab) -> None:
    lab.images()
    prod = lab.make_producer()
    srv = lab.server()
    srv.wait_log("listening on")
    cli = lab.client()
    cli.wait_log("scan 1 done")
    payload = random.Random(4).randbytes(8192)
    prod.write(1 << 20, payload)
    flush_seq = prod.next_seq
    prod.flush()
    m = cli.wait_log(r"flush acknowledged: replica durable up to seq (\d+)")
    assert int(m.group(1)) >= flush_seq
    # acknowledged durable: the record is released from the ring and the data is in the replica file
    assert prod.tail >= flush_seq + 1
    with open(lab.replica, "rb") as f:
        f.seek(1 << 20)
        assert f.read(8192) == payload
    assert cli.stop() == 0
    assert srv.stop() == 0
    # the server's metadata header recorded the durability point
    from bdr.journal import JFlag, Journal

    h = Journal(lab.journal).header
    assert h.durable_seq >= flush_seq
    assert h.flags & JFlag.CONSISTENT and h.flags & JFlag.SEQ_VALID


def test_scan_fixes_a_differing_replica_sending_only_changed_blocks(lab: Lab) -> None:
    lab.images(src_random=True, seed=5)
    data = bytearray(lab.src.read_bytes())
    changed = [3 * 16, 100 * 16, 100 * 16 + 1, 400 * 16 + 15]  # 4 KiB blocks that differ on the replica
    for b in changed:
        data[b * 4096 + 100 : b * 4096 + 200] = os.urandom(100)
    lab.replica.write_bytes(bytes(data))
    lab.make_producer()
    srv = lab.server()
    srv.wait_log("listening on")
    cli = lab.client()
    m = cli.wait_log(
        r"scan 1 done .*: (\d+) blocks compared, (\d+) differed, (\d+) sent with data \((\d+) bytes\)"
    )
    assert int(m.group(1)) == DEV // 4096
    assert int(m.group(2)) == len(changed)
    assert int(m.group(4)) == len(changed) * 4096  # only the changed pages crossed the wire
    lab.wait_drained()
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert lab.identical()


def test_replica_smaller_than_source_is_refused(lab: Lab) -> None:
    lab.images(replica_size=DEV // 2)
    lab.make_producer()
    srv = lab.server()
    srv.wait_log("listening on")
    cli = lab.client()
    assert cli.wait() == 3
    assert re.search(r"ERROR: server .* refused us: replica .* smaller than the source", cli.log()), cli.log()
    assert "smaller than the source" in srv.log()
    with open(lab.replica, "rb") as f:
        assert f.read() == bytes(DEV // 2)  # nothing written
    assert srv.stop() == 0


def test_bad_paths_are_clear_errors(lab: Lab) -> None:
    lab.images()
    lab.make_producer()
    cases = [
        (lab.server, ("--target-device", str(lab.tmp / "nope.img")), "cannot open target device"),
        (lab.server, ("--journal", str(lab.tmp / "no-dir" / "j")), "cannot create journal"),
        (lab.client, ("--source-device", str(lab.tmp / "nope.img")), "cannot open source device"),
        (lab.client, ("--control-device", str(lab.tmp / "nope")), "cannot open control device"),
        (lab.client, ("--control-device", str(lab.src)), "not a bdr ring"),
        (lab.client, ("--port", "0"), "is not a TCP port"),
    ]
    conf = lab.tmp / "server.toml"
    conf.write_text("verbose = true\nbogus = 1\n")
    cases.append((lab.server, ("--config", str(conf)), "unknown key 'bogus'"))
    for start, extra, message in cases:
        d = start(*extra)  # later flags win in argparse
        assert d.wait() == 2, (extra, d.log())
        assert message in d.log(), (extra, d.log())
        d.log_path.unlink()


def test_client_retries_until_the_server_appears_then_stops_cleanly(lab: Lab) -> None:
    lab.images()
    lab.make_producer()
    cli = lab.client()
    cli.wait_log(r"server 127\.0\.0\.1:\d+ not reachable \(Connection refused\); retrying in", count=3)
    srv = lab.server()
    cli.wait_log("scan 1 done", timeout=30)
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert "stopped" in cli.log()


def test_ring_overflow_mid_stream_is_resynced_from_the_dirty_bitmap(lab: Lab) -> None:
    lab.images()
    prod = lab.make_producer(slots=64)
    srv = lab.server()
    srv.wait_log("listening on")
    cli = lab.client()
    cli.wait_log("scan 1 done")
    rnd = random.Random(6)
    for i in range(3000):  # much faster than the client drains 64 slots: the ring overflows again and again
        size = rnd.choice([4096, 16384, 65536])
        prod.write(rnd.randrange(0, (DEV - size) // 4096) * 4096, rnd.randbytes(size))
        if i % 100 == 99:
            prod.flush()
    assert prod.dropped > 0
    lab.wait_drained()
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert lab.identical()
    log = cli.log()
    assert re.search(r"ring overflowed: \d+ dirty regions", log), log
    assert re.search(r"scan \d+ \(hash\) of \d+ dirty extents", log), log


def test_server_sigterm_mid_stream_syncs_and_client_resumes(lab: Lab) -> None:
    lab.images()
    prod = lab.make_producer()
    srv = lab.server()
    srv.wait_log("listening on")
    cli = lab.client()
    cli.wait_log("scan 1 done")
    w = Writer(prod, 3000, seed=7, pace=0.0002)
    while w.written < 800:
        time.sleep(0.01)
    assert srv.stop() == 0  # clean stop: finishes the batch in hand, syncs, says goodbye
    m = srv.wait_log(r"bdr_server stopped \(durable seq (\d+)\)")
    from bdr.journal import Journal

    assert Journal(lab.journal).header.durable_seq == int(m.group(1))
    cli.wait_log("server is shutting down")
    srv2 = lab.server()
    w.join()
    lab.wait_drained()
    assert cli.stop() == 0
    assert srv2.stop() == 0
    assert lab.identical()
    assert "quick resume at seq" in cli.log()


def test_help_explains_every_flag_and_no_print_silences_stdout(lab: Lab) -> None:
    import signal
    import socket
    import subprocess
    import sys

    common = ["--address", "--port", "--no-print", "--verbose", "--debug", "--benchmark"]
    flags = {
        "bdr.server": [*common, "--target-device", "--journal", "default 7788"],
        "bdr.client": [*common, "--control-device", "--source-device", "--full-scan", "--full-replication"],
    }
    for mod, names in flags.items():
        out = subprocess.run(
            [sys.executable, "-m", mod, "--help"], capture_output=True, text=True, check=True
        )
        for name in names:
            assert name in out.stdout, (mod, name)
    lab.images()
    argv = ["--address", "127.0.0.1", "--port", str(lab.port), "--target-device", str(lab.replica)]
    argv += ["--journal", str(lab.journal), "--verbose", "--no-print"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bdr.server", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 20
    while True:  # listening means the signal handlers are installed
        try:
            socket.create_connection(("127.0.0.1", lab.port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "server never listened"
            time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert out == b"" and err == b""


def test_client_killed_and_restarted_resumes_from_the_ring(lab: Lab) -> None:
    lab.images()
    prod = lab.make_producer()
    srv = lab.server()
    srv.wait_log("listening on")
    cli = lab.client()
    cli.wait_log("scan 1 done")
    w = Writer(prod, 3000, seed=8, pace=0.0002)
    while w.written < 800:
        time.sleep(0.01)
    cli.kill()  # the ring (and its unreleased records) outlives the client
    srv.wait_log("connection lost")
    time.sleep(0.3)
    cli2 = lab.client()
    w.join()
    lab.wait_drained()
    assert cli2.stop() == 0
    assert srv.stop() == 0
    assert lab.identical()
    log = cli2.log()
    assert re.search(r"quick resume at seq \d+", log), log
    assert "scan 2" not in log and log.count("scan 1 (") == 1  # no scan after the restart


def test_a_burst_that_overflows_the_ring_is_resynced_by_scanning_only_its_regions(lab: Lab) -> None:
    lab.images(src_random=True)
    prod = lab.make_producer(slots=64)
    srv = lab.server()
    srv.wait_log("listening on")
    cli = lab.client()
    cli.wait_log("in sync at ring position")
    rnd = random.Random(8)
    burst = (8 << 20, 2 << 20)  # 2 MiB of the 32 MiB device, written much faster than 64 slots drain
    for _ in range(1500):
        off = burst[0] + rnd.randrange(0, burst[1] // 4096) * 4096
        prod.write(off, rnd.randbytes(4096))
    assert prod.dropped > 0
    lab.wait_drained()
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert lab.identical()
    scans = [
        (int(m.group(1)), int(m.group(2)))
        for m in re.finditer(r"scan (\d+) \(hash\) of .*\((\d+) bytes\)", cli.log())
    ]
    assert scans[0] == (1, DEV), scans  # the start-up scan: the whole device
    # then each overflow (there may be several) rescans only the burst's dirty regions, never the device
    assert scans[1:] and all(n <= burst[1] for _, n in scans[1:]), scans


def test_both_daemons_started_from_config_files_only(lab: Lab) -> None:
    lab.images(src_random=True)
    prod = lab.make_producer()
    sconf, cconf = lab.tmp / "server.toml", lab.tmp / "client.toml"
    sconf.write_text(
        f'address = "127.0.0.1"\nport = {lab.port}\ntarget-device = "{lab.replica}"\njournal = "{lab.journal}"\n'
        "verbose = true\n"
    )
    cconf.write_text(
        f'address = "127.0.0.1"\nport = {lab.port}\ncontrol-device = "{lab.ring}"\nsource-device = "{lab.src}"\n'
        "verbose = true\n"
    )
    srv = Daemon("server", ["bdr.server", "--config", str(sconf)], lab.tmp).start()
    cli = Daemon("client", ["bdr.client", "--config", str(cconf)], lab.tmp).start()
    lab.daemons += [srv, cli]
    srv.wait_log("listening on 127.0.0.1")
    Writer(prod, 1000, seed=11).join()
    lab.wait_drained()
    assert cli.stop() == 0 and srv.stop() == 0
    assert lab.identical()
    # an invalid config names the file, the key and why
    bad = lab.tmp / "bad.toml"
    bad.write_text('address = "127.0.0.1"\nport = "seven"\n')
    d = Daemon("server-bad", ["bdr.server", "--config", str(bad)], lab.tmp).start()
    assert d.wait() == 2
    assert re.search(rf"{re.escape(str(bad))}: .*port.*", d.log()), d.log()
