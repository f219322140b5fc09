"""Storage faults with real daemons: a replica on a file system too small for it, a journal on a full one, a
source that cannot be read during a scan.  Clear errors, the replica marked inconsistent on disk, no crash loop,
and recovery once the operator fixed the cause.

The tiny file systems are tmpfs mounts (root with CAP_SYS_ADMIN, as on the development machines and CI); the
tests skip where mounting is not allowed."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bdr.journal import JFlag, Journal

from .conftest import DEV, Lab

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@contextlib.contextmanager
def tiny_fs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_replica_on_a_full_file_system_stops_the_server_and_marks_it_inconsistent(lab: Lab) -> None:
    lab.images(src_random=True, seed=21)
    lab.make_producer()
    with tiny_fs(lab.tmp / "small", "2m") as small:
        lab.replica = small / "replica.img"  # 32 MiB, sparse, on a 2 MiB file system
        with open(lab.replica, "wb") as f:
            f.truncate(DEV)
        srv = lab.server()
        srv.wait_log("listening on")
        cli = lab.client("--full-scan")
        assert srv.wait(30) == 4
        log = srv.log()
        assert "I/O error: No space left on device; the replica is marked inconsistent" in log, log
        assert "bdr_server stopped on a storage error" in log
        h = Journal(lab.journal).header
        assert h.flags & JFlag.SCANNING and h.flags & JFlag.IO_ERROR and not h.flags & JFlag.CONSISTENT
        # the client is told, then waits for the server without spinning: no crash, no tight loop
        cli.wait_log(r"server .* closed the session: replica .* No space left on device on the server")
        cli.wait_log("not reachable", count=3)
        assert cli.proc is not None and cli.proc.poll() is None
        # the operator moves the replica to a large enough file system and starts the server again
        big = lab.tmp / "replica.img"
        shutil.copyfile(lab.replica, big)
        lab.replica = big
    srv2 = lab.server()
    srv2.wait_log("the replica is inconsistent: the server stopped on an I/O error")
    cli.wait_log(r"scan 2 \(hash\) of the whole device .*: a previous resync was interrupted", timeout=30)
    lab.wait_drained()
    assert cli.stop() == 0
    assert srv2.stop() == 0
    assert lab.identical()
    h = Journal(lab.journal).header
    assert h.flags & JFlag.CONSISTENT and not h.flags & (JFlag.SCANNING | JFlag.IO_ERROR)


def test_journal_on_a_full_file_system_is_refused_at_start(lab: Lab) -> None:
    lab.images()
    with tiny_fs(lab.tmp / "full", "64k") as full:
        with contextlib.suppress(OSError), open(full / "filler", "wb") as f:
            f.write(b"x" * (64 << 10))
        lab.journal = full / "journal"
        srv = lab.server()
        assert srv.wait(20) == 2
        assert "cannot allocate journal" in srv.log() and "No space left on device" in srv.log(), srv.log()


def test_journal_file_system_filling_up_during_a_journal_scan_is_a_journal_condition(lab: Lab) -> None:
    """ENOSPC while staging a resync in a file journal: the resync does not fit the journal (JOURNAL_FULL, the
    client resyncs with direct writes), never a replica failure (no IO_ERROR mark, no exit 4)."""
    lab.images(src_random=True, seed=23)
    data = bytearray(lab.src.read_bytes())
    for b in range(0, DEV // 65536, 4):  # 8 MiB of differing blocks
        data[b * 65536 : (b + 1) * 65536] = os.urandom(65536)
    lab.replica.write_bytes(bytes(data))
    lab.make_producer()
    with tiny_fs(lab.tmp / "small", "5m") as small:
        lab.journal = small / "journal"  # grows as needed, until the file system is full
        srv = lab.server()
        srv.wait_log("listening on")
        cli = lab.client()
        cli.wait_log("cannot stage this resync in its journal: .*too small for this resync")
        lab.wait_drained()
        log = srv.log()
        assert "No space left on device while staging" in log, log
        assert "marked inconsistent" not in log and "storage error" not in log, log
        assert srv.proc is not None and srv.proc.poll() is None
        assert cli.stop() == 0
        assert srv.stop() == 0
        h = Journal(lab.journal).header
        assert not h.flags & JFlag.IO_ERROR and h.flags & JFlag.CONSISTENT
    assert lab.identical()


def test_source_read_error_during_a_scan_is_reported_and_stops_the_client(lab: Lab) -> None:
    lab.images(src_random=True, seed=22)
    lab.make_producer()
    before = lab.replica.read_bytes()
    cli = lab.client()  # no server yet: the client has opened the source and waits
    cli.wait_log("not reachable")
    os.truncate(lab.src, DEV // 2)  # the second half of the source can no longer be read
    srv = lab.server()
    assert cli.wait(30) == 4
    log = cli.log()
    assert f"cannot read source device {lab.src} at byte {DEV // 2}" in log, log
    assert "the scan cannot complete and the replica stays marked inconsistent" in log
    srv.wait_log(r"client reported IO_ERROR: client: cannot read source device")
    h = Journal(lab.journal).header
    assert h.flags & JFlag.SCANNING and not h.flags & JFlag.CONSISTENT
    assert srv.proc is not None and srv.proc.poll() is None  # the server survives the client's failure
    assert srv.stop() == 0
    assert lab.replica.read_bytes()[DEV // 2 :] == before[DEV // 2 :]
