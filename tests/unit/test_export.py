"""A past moment read in place (history.view) and served over NBD (history.export, bdr export): every read
gives the moment's bytes while the server goes on writing, small writes and long runs (kept by the server's
reader process) alike; the view ends, and says why, when retention drops its point, or a gap or a rollback
comes after it; the NBD server speaks the protocol the kernel's client speaks, read-only."""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.unit.test_history import (
    SIZE,
    D,
    F,
    Rig,
    W,
    long_runs_batch,
    record,
    scattered_batch,
    track,
)

from bdr.history import At, PointRefused
from bdr.history import export as nbd
from bdr.history import view as view_mod
from bdr.history.restore import rollback
from bdr.history.undo import fill_undo, payload_room, undo_head
from bdr.history.view import PointView, ViewGone


def read_all(view: PointView, rnd: random.Random, between: Iterator[None] | None = None) -> bytes:
    """The whole device from ``view`` in reads of odd sizes at odd places; ``between`` runs between reads."""
    out = bytearray()
    while len(out) < view.size:
        n = min(view.size - len(out), rnd.choice([512, 4096, 3 * 4096 + 512, 65536, 300 << 10]))
        out += view.read(len(out), n)
        if between is not None:
            next(between, None)
    return bytes(out)


def test_a_view_gives_each_point_while_writes_go_on(tmp_path: Path) -> None:
    rig = Rig(tmp_path, size_limit=1 << 30, size=8 << 20)
    rnd = random.Random(3)
    model = bytearray(rig.replica_path.read_bytes())
    track(rig, model, [(0, 4096, W, 0), (0, 0, F, 0)])
    first = rig.seq - 1
    track(rig, model, long_runs_batch(rig))  # kept by the reader process, a run written twice
    middle = rig.seq - 1
    track(rig, model, [(8, 512, W, 0), (24, 8192, D, 0), (0, 0, F, 0)])
    last = rig.seq - 1
    views = {seq: PointView(rig.dir, At(seq=seq)) for seq in (first, middle, last)}
    assert views[first].point.seq == first and views[first].written == 5 << 20  # [0, 3 MiB) and [4, 6 MiB)
    assert views[last].written == 0

    def writes() -> Iterator[None]:  # the server goes on writing between the reads (every few)
        while True:
            track(rig, model, scattered_batch(rig, 300))
            yield from [None] * 8
            track(rig, model, long_runs_batch(rig))
            yield from [None] * 8

    try:
        for seq, view in views.items():
            assert read_all(view, rnd, writes()) == rig.states[seq], f"point {seq}"
        later = PointView(rig.dir, At(seq=middle))  # opened after those writes
        with later:
            assert read_all(later, rnd) == rig.states[middle]
        assert model != bytearray(rig.states[last])
    finally:
        for view in views.values():
            view.close()
        rig.close()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(record, min_size=1, max_size=40), min_size=1, max_size=8),
    st.integers(0, 7),
    st.sampled_from([0, 1 << 30]),
)
def test_every_point_reads_as_the_replica_held_it(tmp_path_factory, batches, first, insert_max) -> None:  # type: ignore[no-untyped-def]
    """Random batches (overlapping writes, 512-byte writes, discards, write-zeroes): a view of each point, opened
    before or after the writes that follow it, reads what the replica held then; its map built in one sweep or
    extent by extent."""
    rig = Rig(tmp_path_factory.mktemp("v"))
    saved, view_mod.INSERT_MAX = view_mod.INSERT_MAX, insert_max
    model = bytearray(rig.replica_path.read_bytes())
    rnd = random.Random(first)
    early: dict[int, PointView] = {}
    try:
        for k, b in enumerate([*batches, [(0, 0, F, 0)]]):
            track(rig, model, b)
            if k == first % (len(batches) + 1):
                early = {seq: PointView(rig.dir, At(seq=seq)) for seq in rig.states}
        for seq, want in rig.states.items():
            with PointView(rig.dir, At(seq=seq)) as view:
                assert read_all(view, rnd) == want, f"point {seq}"
        for seq, view in early.items():
            assert read_all(view, rnd) == rig.states[seq], f"point {seq}, its view opened earlier"
    finally:
        view_mod.INSERT_MAX = saved
        for view in early.values():
            view.close()
        rig.close()


def test_a_view_ends_when_retention_drops_its_point(tmp_path: Path) -> None:
    rig = Rig(tmp_path, size_limit=16 << 20, size=4 << 20)
    model = bytearray(rig.replica_path.read_bytes())
    track(rig, model, [(0, 1 << 20, W, 0), (0, 0, F, 0)])
    view = PointView(rig.dir, At(seq=rig.seq - 1))
    want = rig.states[rig.seq - 1]
    try:
        assert view.read(0, 1 << 20) == want[: 1 << 20]
        for k in range(24):  # 24 MiB more: the point's segment is dropped, its file reused
            track(rig, model, [((k % 4) * 2048, 1 << 20, W, 0), (0, 0, F, 0)])
        with pytest.raises(ViewGone, match="retention"):
            view.read(0, 1 << 20)
        with pytest.raises(ViewGone, match="retention"):  # and it stays so
            view.read((4 << 20) - 4096, 4096)
        with pytest.raises(PointRefused, match="older than the history holds"):
            PointView(rig.dir, At(seq=1))
    finally:
        view.close()
        rig.close()


def test_a_view_ends_when_retention_drops_a_before_image_it_still_needs(tmp_path: Path) -> None:
    """The oldest segments go, the point's among them, while the newest record the view knows stays: the view
    ends at its next read, of any range (the point is no longer offered)."""
    rig = Rig(tmp_path, size_limit=16 << 20, size=8 << 20)
    model = bytearray(rig.replica_path.read_bytes())
    track(rig, model, [(0, 4096, W, 0), (0, 0, F, 0)])
    view = PointView(rig.dir, At(seq=rig.seq - 1))
    want = rig.states[rig.seq - 1]
    try:
        track(rig, model, [(0, 1 << 20, W, 0), (0, 0, F, 0)])  # its before-image: in the first segment
        for k in range(3):
            track(rig, model, [((k + 1) * 2048, 1 << 20, W, 0), (0, 0, F, 0)])
        assert view.read(0, 1 << 20) == want[: 1 << 20]  # the view knows the records up to here
        for k in range(11):  # the first segments go; the newest the view knows stays
            track(rig, model, [((k % 3 + 5) * 2048, 1 << 20, W, 0), (0, 0, F, 0)])
        assert not (rig.dir / "0000000000000001.seg").exists()
        with pytest.raises(ViewGone, match="retention"):
            view.read((8 << 20) - 4096, 4096)  # nothing overwrote it, but the point is gone
        with pytest.raises(ViewGone, match="retention"):
            view.read(4096, 4096)
    finally:
        view.close()
        rig.close()


def test_a_write_applied_while_a_view_reads_is_not_taken_for_the_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server writes the replica just after the view read the history's records: the view read the
    replica before them, so it has the moment's bytes."""
    rig = Rig(tmp_path)
    model = bytearray(rig.replica_path.read_bytes())
    track(rig, model, [(0, 4096, W, 0), (0, 0, F, 0)])
    view = PointView(rig.dir, At(seq=rig.seq - 1))
    want = rig.states[rig.seq - 1]
    real = view.history.refresh
    writes = [[(0, 65536, W, 0), (0, 0, F, 0)]]

    def refresh_then_write() -> None:
        real()
        if writes:
            track(rig, model, writes.pop())

    monkeypatch.setattr(view.history, "refresh", refresh_then_write)
    try:
        assert view.read(0, 65536) == want[:65536]
        assert not writes and model[:65536] != bytearray(want[:65536])
        assert view.read(0, 65536) == want[:65536]
    finally:
        view.close()
        rig.close()


def test_a_view_ends_at_a_gap_or_a_rollback_after_its_point(tmp_path: Path) -> None:
    rig = Rig(tmp_path, size_limit=16 << 20, size=16 << 20)
    model = bytearray(rig.replica_path.read_bytes())
    track(rig, model, [(0, 4096, W, 0), (0, 0, F, 0)])
    view = PointView(rig.dir, At(seq=rig.seq - 1))
    track(rig, model, [(0, 8 << 20, D, 0), (0, 0, F, 0)])  # mkfs's discard: a gap
    with pytest.raises(ViewGone, match=r"rewritten without history.*a discard of 8388608 bytes"):
        view.read(0, 4096)
    view.close()

    track(rig, model, [(0, 4096, W, 0), (0, 0, F, 0)])
    first = rig.seq - 1
    track(rig, model, [(0, 4096, W, 0), (0, 0, F, 0)])
    point = rig.seq - 1
    track(rig, model, [(8, 4096, W, 0), (0, 0, F, 0)])
    view = PointView(rig.dir, At(seq=rig.seq - 1))
    assert view.read(0, 8192) == rig.states[rig.seq - 1][:8192]
    rig.history.close()  # the server stops; the replica is rolled back to an older point
    rollback(rig.dir, At(seq=point), quiet=True)
    with pytest.raises(ViewGone, match="rolled back"):
        view.read(0, 8192)
    view.close()
    with PointView(rig.dir, At(seq=first)) as older:  # a point before the rollback's is still given
        assert older.read(0, 8192) == rig.states[first][:8192]
    rig.replica.close()
    rig.journal.close()


def test_a_record_whose_payload_is_not_all_written_yet_is_read_again_later(tmp_path: Path) -> None:
    """The newest record's header is in the segment before its payload (a reused file holds old bytes there):
    the replica write it precedes has not begun, so the view reads on, and maps the record once it is whole."""
    rig = Rig(tmp_path)
    model = bytearray(rig.replica_path.read_bytes())
    track(rig, model, [(0, 4096, W, 0), (0, 0, F, 0)])
    want = rig.states[rig.seq - 1]
    view = PointView(rig.dir, At(seq=rig.seq - 1))
    files = rig.history.files
    mem = memoryview(bytearray(payload_room(1, 4096)))
    _, plen, digest = fill_undo(rig.replica.fd, mem, [0], [4096])
    head = undo_head(files.number, time.time_ns(), 1, 4096, plen, digest)
    try:
        os.pwrite(files.fd, head + bytes(plen), files.pos)  # the header, and old bytes where the payload goes
        assert view.read(0, 8192) == want[:8192]
        os.pwrite(files.fd, mem[:plen], files.pos + len(head))  # the payload, then the replica write
        os.pwrite(rig.replica.fd, b"x" * 4096, 0)
        assert view.read(0, 8192) == want[:8192]
        assert view.written == 4096
    finally:
        view.close()
        rig.close()


# -- the NBD server -------------------------------------------------------------------------------------------


class Client:
    """The client side of NBD's fixed newstyle handshake and simple replies, as the kernel's client uses."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (nbd.NBDMAGIC, nbd.IHAVEOPT) and flags & nbd.FLAG_FIXED_NEWSTYLE
        self.sock.sendall(struct.pack(">I", nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))
        self.handle = 0

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            got = self.sock.recv(n - len(buf))
            assert got, "the server closed the connection"
            buf += got
        return buf

    def option(self, opt: int, data: bytes) -> None:
        self.sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, opt, len(data)) + data)

    def replies(self, opt: int) -> list[tuple[int, bytes]]:
        out = []
        while True:
            magic, o, kind, n = struct.unpack(">QIII", self.recv(20))
            assert magic == nbd.OPT_REPLY_MAGIC and o == opt
            out.append((kind, self.recv(n)))
            if kind != nbd.REP_INFO and kind != nbd.REP_SERVER:
                return out

    def go(self, name: str, infos: tuple[int, ...] = (), opt: int = nbd.OPT_GO) -> tuple[int, int, bytes]:
        """NBD_OPT_GO (or INFO) asking for ``infos``: the export's size, transmission flags and the
        NBD_INFO_BLOCK_SIZE reply (b"" if none)."""
        asked = struct.pack(f">H{len(infos)}H", len(infos), *infos)
        self.option(opt, struct.pack(">I", len(name)) + name.encode() + asked)
        got = self.replies(opt)
        assert got[-1][0] == nbd.REP_ACK, got
        info = next(d for k, d in got if k == nbd.REP_INFO and d[:2] == b"\0\0")
        _, size, flags = struct.unpack(">HQH", info)
        sizes = next((d for k, d in got if k == nbd.REP_INFO and d[:2] == b"\0\3"), b"")
        return size, flags, sizes

    def request(self, cmd: int, offset: int, length: int, data: bytes = b"") -> tuple[int, bytes]:
        self.handle += 1
        self.sock.sendall(
            struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, cmd, self.handle, offset, length) + data
        )
        magic, err, handle = struct.unpack(">IIQ", self.recv(16))
        assert magic == nbd.SIMPLE_REPLY_MAGIC and handle == self.handle
        return err, self.recv(length) if cmd == nbd.CMD_READ and not err else b""


def test_the_nbd_server_serves_the_point_read_only(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    model = bytearray(rig.replica_path.read_bytes())
    track(rig, model, [(0, 8192, W, 0), (64, 4096, W, 0), (0, 0, F, 0)])
    point = rig.seq - 1
    track(rig, model, [(0, 4096, W, 0), (128, 4096, W, 0), (0, 0, F, 0)])
    path = str(tmp_path / "nbd.sock")
    view = PointView(rig.dir, At(seq=point))
    server = nbd.make_server(nbd.Export(view, "then"), path)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        c = Client(path)
        c.option(nbd.OPT_LIST, b"")
        assert c.replies(nbd.OPT_LIST) == [(nbd.REP_SERVER, b"\0\0\0\x04then"), (nbd.REP_ACK, b"")]
        c.option(nbd.OPT_GO, struct.pack(">I", 5) + b"other" + struct.pack(">H", 0))
        assert c.replies(nbd.OPT_GO)[0][0] == nbd.REP_ERR_UNKNOWN
        c.option(99, b"")
        assert c.replies(99) == [(nbd.REP_ERR_UNSUP, b"")]
        assert c.go("then", opt=nbd.OPT_INFO)[2] == b""  # block sizes only when asked for
        size, flags, sizes = c.go("then", (nbd.INFO_BLOCK_SIZE,))
        assert size == SIZE and flags & nbd.TFLAG_READ_ONLY
        assert struct.unpack(">HIII", sizes) == (nbd.INFO_BLOCK_SIZE, 1, 4096, nbd.READ_MAX)
        got = b"".join(c.request(nbd.CMD_READ, off, 16384)[1] for off in range(0, SIZE, 16384))
        assert got == rig.states[point] != bytes(model)
        assert c.request(nbd.CMD_READ, 4096 + 512, 1000) == (0, rig.states[point][4608:5608])
        assert c.request(nbd.CMD_WRITE, 0, 512, bytes(512))[0] == errno.EPERM
        assert c.request(nbd.CMD_TRIM, 0, 4096)[0] == errno.EPERM
        assert c.request(nbd.CMD_READ, SIZE - 512, 1024)[0] == errno.EINVAL
        assert c.request(nbd.CMD_READ, 0, 4096) == (0, rig.states[point][:4096])  # still served
        c.sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 0, 0, 0))
        c.sock.close()
        old = Client(path)  # the oldest handshake: NBD_OPT_EXPORT_NAME, with the default name
        old.option(nbd.OPT_EXPORT_NAME, b"")
        assert struct.unpack(">QH", old.recv(10)) == (SIZE, nbd.TRANSMISSION_FLAGS)
        assert old.request(nbd.CMD_READ, 0, 8192) == (0, rig.states[point][:8192])
        old.sock.close()
    finally:
        server.shutdown()
        server.server_close()
        view.close()
        rig.close()


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_bdr_export_serves_until_stopped_and_refuses_a_moment_it_cannot_give(
    tmp_path: Path, free_port: int
) -> None:
    rig = Rig(tmp_path)
    model = bytearray(rig.replica_path.read_bytes())
    track(rig, model, [(0, 4096, W, 0), (0, 0, F, 0)])
    point = rig.seq - 1
    track(rig, model, [(0, 8192, W, 0), (0, 0, F, 0)])
    bdr = [sys.executable, "-m", "bdr.cli"]
    refused = subprocess.run([*bdr, "export", str(rig.dir), "--at", "@1"], capture_output=True, text=True)
    assert refused.returncode == 1
    assert "cannot export" in refused.stderr and "the oldest point offered is" in refused.stderr
    bad = subprocess.run(
        [*bdr, "export", str(rig.dir), "--at", str(point), "--listen", "nowhere"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "HOST:PORT" in bad.stderr
    proc = subprocess.Popen(
        [*bdr, "export", str(rig.dir), "--at", str(point), "--listen", f"127.0.0.1:{free_port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline() + proc.stdout.readline()
        assert f"read-only over NBD on 127.0.0.1:{free_port}" in banner, banner
        assert f"nbd-client -N bdr 127.0.0.1 {free_port} /dev/nbd0" in banner, banner
        sock = socket.create_connection(("127.0.0.1", free_port))
        c = Client.__new__(Client)
        c.sock, c.handle = sock, 0
        assert struct.unpack(">QQH", c.recv(18))[:2] == (nbd.NBDMAGIC, nbd.IHAVEOPT)
        sock.sendall(struct.pack(">I", nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))
        assert c.go("bdr")[0] == SIZE
        assert c.request(nbd.CMD_READ, 0, SIZE) == (0, rig.states[point])
        sock.close()
        time.sleep(0.2)
        proc.terminate()
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "stopped" in out and "connected" in err
    finally:
        if proc.poll() is None:
            proc.kill()
        rig.close()
    assert os.path.exists(rig.replica_path)
