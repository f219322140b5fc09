"""Storage faults in memory: a replica that fails writes or fdatasync, a journal that cannot be written or
allocated, a source that fails reads during a scan.  The server must stop with a clear error and the replica
marked inconsistent on disk (never diverge silently); the client must report the source error."""

from __future__ import annotations

import errno
import os
import random
import struct
import time
from pathlib import Path

import pytest
from test_session import DEV, MemServer, Run, client_for

from bdr import client as client_mod
from bdr import scan
from bdr import wire as p
from bdr.journal import JFlag, Journal, JournalError, JournalIOError
from bdr.server import Applier, Replica, ServerSession, SessionClosed
from bdr.testing.ring_producer import RingProducer

pytestmark = pytest.mark.timeout(60)


class FailingReplica(Replica):
    """A replica whose writes (or fdatasync) fail with EIO after ``good`` successful writes."""

    def __init__(self, path: Path, good: int = 0, fail_sync: bool = False) -> None:
        super().__init__(path)
        self.good = good
        self.fail_sync = fail_sync

    def _io(self) -> None:
        if self.good <= 0:  # an EIO of the device, as the replica reports it
            raise self.error(OSError(errno.EIO, os.strerror(errno.EIO)))
        self.good -= 1

    def write(self, data: memoryview, offset: int) -> None:
        self._io()
        super().write(data, offset)

    def write_runs(self, runs: list[tuple[memoryview, int]]) -> None:
        self._io()
        super().write_runs(runs)

    def sync(self) -> None:
        if self.fail_sync:
            raise self.error(OSError(errno.EIO, os.strerror(errno.EIO)))
        super().sync()


def hello() -> p.Hello:
    return p.Hello(1, p.ALL_FEATURES, 512, DEV, b"s" * 16, b"r" * 16)


def records(first: int, n: int) -> p.Data:
    desc = b"".join(struct.pack("<QQIHHQ", first + i, i * 8, 4096, p.OP_WRITE, 0, 0) for i in range(n))
    return p.Data(desc, b"\x77" * (4096 * n))


def streaming_session(tmp_path: Path, replica: Replica) -> tuple[ServerSession, p.Connection, Journal]:
    journal = Journal(tmp_path / "journal")
    sess = ServerSession(replica, journal, Applier(replica, journal))
    c = p.Connection(p.Role.CLIENT)
    for msg in (hello(), p.Stream(0, p.StreamFlag.ASSUME_IN_SYNC)):
        sess.conn.feed(c.send(msg))
        c.feed(sess.receive())
        while c.next_event() is not p.NEED_DATA:
            pass
    assert journal.header.flags & JFlag.CONSISTENT
    return sess, c, journal


def error_in(reply: bytes) -> p.Error:
    dec = p.FrameDecoder()
    dec.feed(reply)
    while (fr := dec.next_frame()) is not p.NEED_DATA:
        assert isinstance(fr, p.Frame)
        msg = p.parse_payload(fr.type, fr.flags, fr.payload)
        if isinstance(msg, p.Error):
            return msg
    raise AssertionError("no ERROR in the reply")


@pytest.mark.parametrize("fail_sync", [False, True], ids=["write EIO", "fdatasync EIO"])
def test_replica_io_error_stops_and_marks_the_replica_inconsistent(tmp_path: Path, fail_sync: bool) -> None:
    img = tmp_path / "replica.img"
    img.write_bytes(bytes(DEV))
    replica = FailingReplica(img, good=1 if not fail_sync else 100, fail_sync=fail_sync)
    sess, c, journal = streaming_session(tmp_path, replica)
    sess.conn.feed(c.send(records(0, 4)))  # the first batch applies
    sess.conn.feed(c.send(p.Data(records(4, 4).records, records(4, 4).data, sync=True)))
    with pytest.raises(SessionClosed) as ei:
        sess.receive()
    exc = ei.value
    assert exc.fatal and "Input/output error" in exc.reason and str(img) in exc.reason
    assert error_in(exc.reply).code is p.ErrorCode.IO_ERROR
    # on disk: inconsistent, a whole-device rescan is due, and why
    h = Journal(tmp_path / "journal").header
    assert h.flags & JFlag.SCANNING and h.flags & JFlag.IO_ERROR and not h.flags & JFlag.CONSISTENT
    # after a restart the next client is told: no quick resume, a whole-device scan
    replica.close()
    journal.close()
    replica2, journal2 = Replica(img), Journal(tmp_path / "journal")
    sess2 = ServerSession(replica2, journal2, Applier(replica2, journal2))
    c2 = p.Connection(p.Role.CLIENT)
    sess2.conn.feed(c2.send(hello()))
    c2.feed(sess2.receive())
    w = c2.next_event()
    assert isinstance(w, p.Welcome) and w.flags & p.WelcomeFlag.SCANNING
    replica2.close()
    journal2.close()


class FullJournal(Journal):
    """A journal whose commits fail as on a full file system."""

    full = False

    def store(self, header):  # type: ignore[no-untyped-def]
        if self.full:
            raise JournalIOError(errno.ENOSPC, f"journal {self.path}: I/O error: No space left on device")
        return super().store(header)


def test_journal_write_error_is_fatal_and_named(tmp_path: Path) -> None:
    img = tmp_path / "replica.img"
    img.write_bytes(bytes(DEV))
    replica = Replica(img)
    journal = FullJournal(tmp_path / "journal")
    sess = ServerSession(replica, journal, Applier(replica, journal))
    c = p.Connection(p.Role.CLIENT)
    sess.conn.feed(c.send(hello()))
    c.feed(sess.receive())
    assert isinstance(c.next_event(), p.Welcome)
    journal.full = True
    sess.conn.feed(c.send(p.Stream(0, p.StreamFlag.ASSUME_IN_SYNC)))
    with pytest.raises(SessionClosed) as ei:
        sess.receive()
    assert ei.value.fatal and "No space left on device" in ei.value.reason and "journal" in ei.value.reason
    replica.close()
    journal.close()


def test_journal_on_a_full_file_system_is_a_start_up_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(JournalError, match=r"cannot allocate journal .*No space left on device"):
        Journal(tmp_path / "journal")


def test_source_read_error_during_a_scan_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "source.img"
    src.write_bytes(random.Random(3).randbytes(DEV))
    prod = RingProducer(tmp_path / "ring", 64, DEV, source=src)
    real = scan.read_exact
    source_fds: list[int] = []  # only the client's reads of the source fail, not the server's of the replica

    def failing(fd: int, buf: memoryview, offset: int) -> None:
        if fd in source_fds and offset <= DEV // 2 < offset + len(buf):  # a bad sector in the source
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd, buf, offset)

    monkeypatch.setattr(scan, "read_exact", failing)
    server = MemServer(tmp_path)
    client = client_for(tmp_path)
    source_fds += [client.source.fd, client.source.direct_fd]  # cached and O_DIRECT reads
    run = Run(client, server)
    run.thread.join(20)
    assert isinstance(run.error, client_mod.SourceError), run.error
    assert f"cannot read source device {src} at byte " in str(run.error)
    assert "Input/output error" in str(run.error)
    deadline = time.monotonic() + 5
    while server.closed_reason == "" and time.monotonic() < deadline:
        time.sleep(0.01)
    h = Journal(tmp_path / "journal").header
    assert h.flags & JFlag.SCANNING and not h.flags & JFlag.CONSISTENT  # the interrupted scan stays visible
    prod.close()
