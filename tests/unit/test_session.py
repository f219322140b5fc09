"""Client against server in memory: a socketpair joins a ClientSession and a ServerSession (threads, no TCP)."""

from __future__ import annotations

import argparse
import contextlib
import random
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from bdr import wire as p
from bdr.client import Client, ClientSession, Stopping
from bdr.generations import Generations
from bdr.journal import JFlag, Journal
from bdr.server import Applier, Replica, ServerSession, SessionClosed
from bdr.testing.ring_producer import RingProducer

DEV = 2 << 20
pytestmark = pytest.mark.timeout(60)


class MemServer:
    """A server (replica + journal + applier) that serves sockets handed to it, one at a time, in a thread."""

    def __init__(self, tmp: Path, size: int = DEV) -> None:
        self.img = tmp / "replica.img"
        if not self.img.exists():
            with open(self.img, "wb") as f:
                f.truncate(size)
        self.replica = Replica(self.img)
        self.journal = Journal(tmp / "journal")
        self.applier = Applier(self.replica, self.journal)
        self.closed_reason = ""
        _OPEN.append(self)

    def serve(self, sock: socket.socket) -> threading.Thread:
        def run() -> None:
            sess = ServerSession(self.replica, self.journal, self.applier)
            try:
                while True:
                    n = sock.recv_into(sess.conn.writable(1 << 20))
                    sess.conn.commit(n)
                    if n == 0:
                        self.closed_reason = "eof"
                        break
                    out = sess.receive()
                    if out:
                        sock.sendall(out)
            except SessionClosed as exc:
                self.closed_reason = exc.reason
                if exc.reply:
                    with contextlib.suppress(OSError):
                        sock.sendall(exc.reply)
            except OSError as exc:
                self.closed_reason = str(exc)
            finally:
                self.applier.sync()
                sock.close()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self.replica.close()
        self.journal.close()


def client_for(tmp: Path, metadata: Path | None = None, **flags: bool) -> Client:
    args = argparse.Namespace(
        metadata=str(metadata) if metadata is not None else None,
        address="memory",
        port=1,
        control_device=str(tmp / "ring"),
        source_device=str(tmp / "source.img"),
        full_scan=flags.get("full_scan", False),
        full_replication=flags.get("full_replication", False),
        no_replication=flags.get("no_replication", False),
        no_print=True,
        verbose=False,
        debug=False,
        benchmark=False,
    )
    client = Client(args)
    _OPEN.append(client)
    return client


class Run:
    """One client session over a socketpair, streaming in a thread until stopped."""

    def __init__(self, client: Client, server: MemServer) -> None:
        a, b = socket.socketpair()
        self.client = client
        self.server_thread = server.serve(b)
        self.sess = ClientSession(client, a)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.sess.start()
            self.sess.stream()
        except Stopping:
            self.sess.drain()
        except BaseException as exc:
            self.error = exc
        finally:
            self.sess.sock.close()

    def wait_streaming(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not self.sess.streaming:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, "session never started streaming"
            time.sleep(0.01)

    def stop(self) -> None:
        self.wait_streaming()
        self.client.stopping = True
        self.client.wakeup.poke()
        self.thread.join(20)
        self.server_thread.join(20)
        self.client.stopping = self.client.draining = False
        assert not self.thread.is_alive()


_OPEN: list[Client | MemServer] = []


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, RingProducer]:
    src = tmp_path / "source.img"
    src.write_bytes(random.Random(7).randbytes(DEV))
    prod = RingProducer(tmp_path / "ring", 64, DEV, source=src)
    yield tmp_path, prod
    prod.close()


@pytest.fixture(autouse=True)
def _close_all() -> None:
    yield
    while _OPEN:
        _OPEN.pop().close()


def random_writes(prod: RingProducer, n: int, seed: int, block: bool = True) -> None:
    rnd = random.Random(seed)
    for i in range(n):
        size = rnd.choice([512, 4096, 4096, 16384])
        off = rnd.randrange(0, (DEV - size) // 512) * 512
        prod.write(off, rnd.randbytes(size), block=block)
        if i % 50 == 49:
            prod.flush(block=block)


def wait_released(prod: RingProducer, run: Run, timeout: float = 20) -> None:
    """Every record released (durable on the server), no resync pending, the client idle and in sync."""
    deadline = time.monotonic() + timeout
    while prod.tail != prod.head or prod.state or not run.sess.in_sync:
        assert run.error is None, run.error
        assert time.monotonic() < deadline, f"ring not drained: tail {prod.tail} head {prod.head}"
        time.sleep(0.01)


def same(tmp: Path) -> bool:
    return (tmp / "source.img").read_bytes() == (tmp / "replica.img").read_bytes()


def test_scan_then_stream_then_quick_resume(setup: tuple[Path, RingProducer]) -> None:
    tmp, prod = setup
    server = MemServer(tmp)
    client = client_for(tmp)
    run = Run(client, server)
    random_writes(prod, 300, seed=1)
    wait_released(prod, run)
    run.stop()
    assert run.error is None, run.error
    assert same(tmp)
    assert [s.mode for s in client.stats.scans] == ["hash"]
    first = client.stats.scans[0]
    assert first.blocks == DEV // 4096 and 0 < first.sent_blocks <= first.blocks

    # reconnect: the server is durable where the ring continues, so no scan, only the new records
    random_writes(prod, 10, seed=2)
    run = Run(client, server)
    random_writes(prod, 100, seed=3)
    wait_released(prod, run)
    run.stop()
    assert run.error is None, run.error
    assert len(client.stats.scans) == 1
    assert same(tmp)


def test_overflow_while_disconnected_is_resynced_from_the_bitmap(setup: tuple[Path, RingProducer]) -> None:
    tmp, prod = setup
    server = MemServer(tmp)
    client = client_for(tmp)
    run = Run(client, server)
    random_writes(prod, 50, seed=3)
    wait_released(prod, run)
    run.stop()
    # disconnected: the 64 slots fill up, the rest goes to the dirty bitmap (regions 5 and 9 of 32)
    rnd = random.Random(4)
    for i in range(64):
        assert prod.write(4096 * (i % 16), rnd.randbytes(4096))
    for off in (5 * 65536, 5 * 65536 + 4096, 9 * 65536 + 512):
        assert not prod.write(off, rnd.randbytes(4096))
    assert prod.dropped == 3
    run = Run(client, server)
    wait_released(prod, run)
    random_writes(prod, 20, seed=5)  # streaming goes on after the resync
    wait_released(prod, run)
    run.stop()
    assert run.error is None, run.error
    assert same(tmp)
    # the whole device at start, then only the dirty regions, in 4 KiB blocks: only the pages written travel
    # (two in region 5, and the write at 9 * 64 KiB + 512 covers two)
    assert [(s.mode, s.blocks) for s in client.stats.scans] == [("hash", DEV // 4096), ("hash", 2 * 16)]
    assert client.stats.scans[1].extents == [(5 * 65536, 65536), (9 * 65536, 65536)]
    assert client.stats.scans[1].sent_blocks == 4


def test_full_replication_sends_every_block(setup: tuple[Path, RingProducer]) -> None:
    tmp, prod = setup
    server = MemServer(tmp)
    client = client_for(tmp, full_replication=True)
    run = Run(client, server)
    wait_released(prod, run)
    run.stop()
    assert run.error is None, run.error
    assert same(tmp)
    st = client.stats.scans[0]
    assert st.mode == "full" and st.sent_blocks == DEV // 4096  # random source: no zero block


def test_replica_smaller_than_source_is_refused(setup: tuple[Path, RingProducer]) -> None:
    tmp, _ = setup
    server = MemServer(tmp, size=DEV // 2)
    client = client_for(tmp)
    run = Run(client, server)
    run.thread.join(10)
    assert isinstance(run.error, p.PeerError)
    assert run.error.code is p.ErrorCode.SIZE_MISMATCH
    assert "smaller than the source" in run.error.message


# -- server session, pure bytes ----------------------------------------------------------------------------------


def hello(size: int = DEV, src: bytes = b"s" * 16) -> p.Hello:
    return p.Hello(1, p.ALL_FEATURES, 512, size, src, b"r" * 16)


def talk(sess: ServerSession, c: p.Connection, msg: p.Message) -> list[p.Message]:
    sess.conn.feed(c.send(msg))
    out = sess.receive()
    c.feed(out)
    got = []
    while (ev := c.next_event()) is not p.NEED_DATA:
        assert not isinstance(ev, p.NeedData)
        got.append(ev)
    return got


def test_server_refuses_resume_and_partial_scan_for_an_unknown_source(tmp_path: Path) -> None:
    server = MemServer(tmp_path)
    sess = ServerSession(server.replica, server.journal, server.applier)
    c = p.Connection(p.Role.CLIENT)
    (w,) = talk(sess, c, hello())
    assert isinstance(w, p.Welcome)
    assert w.flags & p.WelcomeFlag.FRESH and w.flags & p.WelcomeFlag.KNOWN_ZERO
    with pytest.raises(SessionClosed) as ei:
        talk(sess, c, p.Stream(0))
    assert b"RESUME_IMPOSSIBLE" not in ei.value.reply  # the code is binary, the text explains
    c2 = p.Connection(p.Role.CLIENT)
    c2.feed(ei.value.reply)
    with pytest.raises(p.PeerError) as pe:
        c2.next_event()
    assert pe.value.code is p.ErrorCode.RESUME_IMPOSSIBLE

    sess = ServerSession(server.replica, server.journal, server.applier)
    c = p.Connection(p.Role.CLIENT)
    talk(sess, c, hello())
    with pytest.raises(SessionClosed) as ei:
        talk(sess, c, p.ScanBegin(1, p.ScanMode.HASH, p.ScanFlag.NONE, 65536))
    assert "whole device" in ei.value.reason


def test_server_scan_protocol_in_memory(tmp_path: Path) -> None:
    server = MemServer(tmp_path)
    sess = ServerSession(server.replica, server.journal, server.applier)
    c = p.Connection(p.Role.CLIENT)
    talk(sess, c, hello())
    assert talk(sess, c, p.ScanBegin(1, p.ScanMode.HASH, p.ScanFlag.WHOLE_DEVICE, 65536)) == []
    (h,) = talk(sess, c, p.ScanRequest(1, 0, 3 * 65536))
    assert isinstance(h, p.ScanHashes) and h.count == 3
    from bdr import scan

    assert h.digest(0) == scan.zero_digest(65536)
    assert talk(sess, c, p.ScanData(1, ((65536, 512, 0),), b"\x07" * 512)) == []
    with pytest.raises(SessionClosed):  # a scan request beyond the source is refused
        talk(sess, c, p.ScanRequest(1, DEV, 65536))
    assert server.img.read_bytes()[65536:66048] == b"\x07" * 512


@pytest.mark.parametrize("replica_has_data", [False, True])
def test_full_replication_of_zero_blocks(tmp_path: Path, replica_has_data: bool) -> None:
    src = tmp_path / "source.img"
    data = bytearray(DEV)
    data[65536 * 3 : 65536 * 3 + 10] = b"x" * 10  # one non-zero block
    src.write_bytes(bytes(data))
    prod = RingProducer(tmp_path / "ring", 64, DEV, source=src)
    if replica_has_data:
        (tmp_path / "replica.img").write_bytes(random.Random(9).randbytes(DEV))
    server = MemServer(tmp_path)  # a new sparse file otherwise: known to read as zeros
    client = client_for(tmp_path, full_replication=True)
    run = Run(client, server)
    wait_released(prod, run)
    run.stop()
    prod.close()
    assert run.error is None, run.error
    assert same(tmp_path)
    st = client.stats.scans[0]
    assert (st.sent_blocks, st.zero_blocks) == (1, DEV // 4096 - 1)
    # zero blocks: skipped on a known-zero replica, sent as ZERO markers (written as zeros) otherwise
    assert st.bytes_sent == 4096
    assert (server.replica.bytes_written == 4096) is (not replica_has_data)


def test_resync_pending_is_on_disk_before_the_bitmap_is_taken(tmp_path: Path) -> None:
    server = MemServer(tmp_path)
    sess = ServerSession(server.replica, server.journal, server.applier)
    c = p.Connection(p.Role.CLIENT)
    talk(sess, c, hello())
    talk(sess, c, p.ScanBegin(1, p.ScanMode.HASH, p.ScanFlag.WHOLE_DEVICE, 65536))
    talk(sess, c, p.ScanEnd(1, p.ScanEndFlag.NONE, 0, 0))
    (ack,) = talk(sess, c, p.ResyncPending())
    assert isinstance(ack, p.Ack)
    assert Journal(tmp_path / "journal").header.flags & JFlag.SCANNING  # durable before the ACK
    # the same connection may scan just the dirty regions
    assert talk(sess, c, p.ScanBegin(2, p.ScanMode.HASH, p.ScanFlag.NONE, 65536)) == []
    # a connection that comes after a lost one sees an interrupted resync: no quick resume, no partial scan
    sess2 = ServerSession(server.replica, server.journal, server.applier)
    c2 = p.Connection(p.Role.CLIENT)
    (w,) = talk(sess2, c2, hello())
    assert isinstance(w, p.Welcome) and w.flags & p.WelcomeFlag.SCANNING
    with pytest.raises(SessionClosed):
        talk(sess2, c2, p.ScanBegin(3, p.ScanMode.HASH, p.ScanFlag.NONE, 65536))


def test_a_server_older_than_the_written_counts_gets_the_history_without_them(
    setup: tuple[Path, RingProducer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bdr_server that knows generations but not their written counts refuses a HELLO carrying them
    (BAD_LENGTH): the client then sends the history without them, and replication goes on."""
    tmp, prod = setup

    def older(data: bytes | memoryview) -> int:  # the history's size as such a server reads it
        count: int = struct.unpack_from("<H", data)[0]
        return 12 + 16 * count

    monkeypatch.setattr(Generations, "encoded_size", staticmethod(older))
    server = MemServer(tmp)
    client = client_for(tmp, metadata=tmp / "source.meta")
    assert client.hello_counts
    refused = Run(client, server)
    refused.thread.join(20)
    assert isinstance(refused.error, p.PeerError) and refused.error.code is p.ErrorCode.BAD_LENGTH
    assert not client.hello_counts
    run = Run(client, server)
    run.wait_streaming()
    random_writes(prod, 20, seed=3)
    run.stop()
    assert run.error is None
    assert same(tmp)
