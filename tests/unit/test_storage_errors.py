"""Storage errors carry their device and role: an I/O error of the journal is reported as the journal's and one
of the replica as the replica's, whatever code path meets it (streaming, a staged resync, its commit, a hash
request).  The faults are injected at the system-call level, on one file descriptor."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_server_staging import W, batch, make, talk

from bdr import wire as p
from bdr.journal import JFlag, Journal, JournalIOError, ReplicaIOError, StorageError
from bdr.server import ServerSession, SessionClosed

pytestmark = pytest.mark.timeout(60)


class Faults:
    """Fail the write, read and fdatasync calls of chosen file descriptors with EIO."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fds: set[int] = set()
        for name in ("pwrite", "pwritev", "preadv", "pread", "fdatasync"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._wrap(real))

    def _wrap(self, real: Callable[..., object]) -> Callable[..., object]:
        def call(fd: int, *args: object, **kw: object) -> object:
            if fd in self.fds:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real(fd, *args, **kw)

        return call


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Iterator[Faults]:
    yield Faults(monkeypatch)


def closed(sess: ServerSession, c: p.Connection, msg: p.Message) -> SessionClosed:
    sess.conn.feed(c.send(msg))
    with pytest.raises(SessionClosed) as ei:
        sess.receive()
    assert ei.value.fatal
    return ei.value


def staged_resync(tmp: Path) -> tuple[ServerSession, p.Connection, Journal]:
    """A session in a journal resync whose block is staged, waiting for ring record 10 to commit."""
    sess, c, journal, _ = make(tmp)
    talk(sess, c, p.ScanBegin(1, p.ScanMode.HASH, p.ScanFlag.WHOLE_DEVICE, 65536))
    talk(sess, c, p.ScanData(1, ((65536, 512, 0),), b"\x07" * 512))
    flags = p.ScanEndFlag.HAS_RESUME_SEQ | p.ScanEndFlag.HAS_CONSISTENT_SEQ
    talk(sess, c, p.ScanEnd(1, flags, 10, 10))
    return sess, c, journal


def assert_named(exc: SessionClosed, tmp: Path, role: str) -> None:
    other = {"journal": "replica.img", "replica": "journal"}[role]
    mine = {"journal": "journal", "replica": "replica.img"}[role]
    assert f"{role} {tmp / mine}" in exc.reason, exc.reason
    assert str(tmp / other) not in exc.reason, exc.reason
    assert "Input/output error" in exc.reason


def test_a_journal_error_while_staging_is_the_journals(tmp_path: Path, faults: Faults) -> None:
    sess, c, _journal, area = make(tmp_path)
    talk(sess, c, p.ScanBegin(1, p.ScanMode.HASH, p.ScanFlag.WHOLE_DEVICE, 65536))
    faults.fds.add(area.fd)
    exc = closed(sess, c, p.ScanData(1, ((65536, 512, 0),), b"\x07" * 512))
    assert_named(exc, tmp_path, "journal")


def test_a_journal_error_at_the_commit_is_the_journals(tmp_path: Path, faults: Faults) -> None:
    sess, c, _journal = staged_resync(tmp_path)
    assert sess.applier.area is not None
    faults.fds.add(sess.applier.area.fd)
    exc = closed(sess, c, batch([(10, 256, 4096, W, 0)], sync=True))
    assert_named(exc, tmp_path, "journal")


def test_a_replica_error_while_applying_a_committed_resync_is_the_replicas(
    tmp_path: Path, faults: Faults
) -> None:
    sess, c, _journal = staged_resync(tmp_path)
    faults.fds.add(sess.replica.fd)
    exc = closed(sess, c, batch([(10, 256, 4096, W, 0)], sync=True))
    assert_named(exc, tmp_path, "replica")


def test_a_replica_error_while_streaming_is_the_replicas(tmp_path: Path, faults: Faults) -> None:
    sess, c, journal, _ = make(tmp_path)
    talk(sess, c, p.Stream(0, p.StreamFlag.ASSUME_IN_SYNC))
    faults.fds.add(sess.replica.fd)
    exc = closed(sess, c, batch([(0, 0, 4096, W, 0)], sync=True))
    assert_named(exc, tmp_path, "replica")
    assert journal.header.flags & JFlag.IO_ERROR  # and the journal, which works, says so


def test_a_replica_read_error_of_a_hash_request_is_the_replicas(tmp_path: Path, faults: Faults) -> None:
    sess, c, _journal, _ = make(tmp_path)
    talk(sess, c, p.ScanBegin(1, p.ScanMode.HASH, p.ScanFlag.WHOLE_DEVICE, 65536))
    faults.fds.add(sess.replica.fd)
    exc = closed(sess, c, p.ScanRequest(1, 0, 65536))
    assert_named(exc, tmp_path, "replica")


def test_a_journal_header_error_is_the_journals(tmp_path: Path, faults: Faults) -> None:
    sess, c, journal, _ = make(tmp_path)
    talk(sess, c, p.Stream(0, p.StreamFlag.ASSUME_IN_SYNC))
    talk(sess, c, batch([(0, 0, 4096, W, 0)]))
    journal_fd = journal._fd
    faults.fds.add(journal_fd)
    exc = closed(sess, c, batch([(1, 8, 4096, W, 0)], sync=True))
    assert_named(exc, tmp_path, "journal")
    assert (tmp_path / "replica.img").read_bytes()[:4096] == bytes([0]) * 4096  # seq 0's data is its low byte


@pytest.mark.parametrize(("cls", "role"), [(JournalIOError, "journal"), (ReplicaIOError, "replica")])
def test_the_error_types_carry_their_role(cls: type[StorageError], role: str) -> None:
    e = cls(errno.EIO, "x: I/O error", "/dev/x")
    assert e.role == role and e.device == "/dev/x" and isinstance(e, StorageError) and e.errno == errno.EIO
