"""The server daemon's connection loop over a socketpair: DATA payloads spliced from the socket into the replica
(with a buffered prefix, replayed records, durability points), and the same bytes without splice."""

from __future__ import annotations

import argparse
import random
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from bdr import wire as p
from bdr.server import Server
from bdr.server.replica import Replica
from bdr.server.splice import Pipe, SpliceSource

DEV = 8 << 20
SRC = b"s" * 16
RING = b"r" * 16


def rec(seq: int, sector: int, ln: int, op: int = p.OP_WRITE, flags: int = 0) -> bytes:
    return struct.pack("<QQIHHQ", seq, sector, ln, op, flags, 0)


def data_frame(recs: list[tuple[int, int, int, int]], rnd: random.Random, image: bytearray) -> bytes:
    """DATA frame for (seq, sector, len, op) records; WRITE data is random and also applied to ``image``."""
    desc, data = b"", b""
    for seq, sector, ln, op in recs:
        desc += rec(seq, sector, ln, op)
        if op == p.OP_WRITE:
            chunk = rnd.randbytes(ln)
            data += chunk
            image[sector * 512 : sector * 512 + ln] = chunk
    return p.encode(p.Data(desc, data))


@pytest.mark.timeout(60)
def serve_one(server: Server, sock: socket.socket, peer: str) -> None:
    """One connection through the gate and into its session, as the daemon's loop does, without the listener."""
    server.gate.admit(sock, peer)
    for admitted in server.gate.take_admitted():
        server.serve(*admitted)


def streaming(
    tmp_path: Path,
) -> tuple[Path, Server, socket.socket, threading.Thread, p.Connection]:
    """A server on a zeroed replica file, serving one connection in a thread; the client's socket and protocol
    state once it is streaming (HELLO, WELCOME, STREAM asserting the replica is in sync)."""
    replica = tmp_path / "replica.img"
    replica.write_bytes(bytes(DEV))
    args = argparse.Namespace(
        address="127.0.0.1", port=0, target_device=str(replica), journal=str(tmp_path / "j"), benchmark=False
    )
    server = Server(args)
    server.listen()
    with socket.create_server(("127.0.0.1", 0)) as lst:
        a = socket.create_connection(lst.getsockname()[:2])
        b, _ = lst.accept()
    t = threading.Thread(target=serve_one, args=(server, b, "test"), daemon=True)
    t.start()
    c = p.Connection(p.Role.CLIENT)
    a.sendall(c.send(p.Hello(1, p.ALL_FEATURES, 512, DEV, SRC, RING)))
    while (ev := c.next_event()) is p.NEED_DATA:
        c.feed(a.recv(65536))
    assert isinstance(ev, p.Welcome)
    a.sendall(c.send(p.Stream(0, p.StreamFlag.ASSUME_IN_SYNC)))
    return replica, server, a, t, c


@pytest.mark.parametrize("splice", [True, False])
def test_daemon_loop_applies_large_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, splice: bool
) -> None:
    if not splice:
        monkeypatch.setenv("BDR_NO_SPLICE", "1")
    replica, server, a, t, c = streaming(tmp_path)
    image = bytearray(DEV)
    rnd = random.Random(1)
    seq = 0
    frames = []
    # sequential 4 KiB runs (fast path), scattered writes with a flush and a discard (general path)
    for k in range(6):
        frames.append(
            data_frame([(seq + i, k * 1024 + i * 8, 4096, p.OP_WRITE) for i in range(128)], rnd, image)
        )
        seq += 128
    scattered = []
    for i in range(200):
        if i == 100:
            scattered.append((seq + i, 0, 0, p.OP_FLUSH))
        elif i == 150:
            scattered.append((seq + i, 9000, 8192, p.OP_DISCARD))
            image[9000 * 512 : 9000 * 512 + 8192] = bytes(8192)
        else:
            scattered.append(
                (seq + i, rnd.randrange(0, DEV // 512 - 8), rnd.choice([512, 1024, 4096]), p.OP_WRITE)
            )
    frames.append(data_frame(scattered, rnd, image))
    seq += 200
    # a replay larger than one read: its first 400 records were applied already and must be skipped (their
    # data taken off the socket and dropped), not rewritten
    old = [(seq - 400 + i, 10000 + i * 8, 4096, p.OP_WRITE) for i in range(400)]
    new = [(seq + i, 4000 + i * 8, 4096, p.OP_WRITE) for i in range(64)]
    before = bytes(image[10000 * 512 : 10000 * 512 + 400 * 4096])
    frames.append(data_frame(old + new, rnd, image))
    image[10000 * 512 : 10000 * 512 + 400 * 4096] = before
    seq += 64
    # a batch replayed entirely: all of its data is drained from the socket, the next frame parses cleanly
    old = [(seq - 300 + i, 10000 + i * 8, 4096, p.OP_WRITE) for i in range(300)]
    before = bytes(image[10000 * 512 : 10000 * 512 + 300 * 4096])
    frames.append(data_frame(old, rnd, image))
    image[10000 * 512 : 10000 * 512 + 300 * 4096] = before
    frames.append(data_frame([(seq, 100, 4096, p.OP_WRITE)], rnd, image))
    seq += 1
    for fr in frames:
        for i in range(0, len(fr), 100_000):  # dribble: headers and descriptors arrive in pieces
            a.sendall(fr[i : i + 100_000])
    a.sendall(c.send(p.Sync()))
    acks: list[p.Ack] = []
    while not acks or acks[-1].durable_seq != seq - 1:
        chunk = a.recv(65536)
        assert chunk, "server closed the connection"
        c.feed(chunk)
        while (ev := c.next_event()) is not p.NEED_DATA:
            if isinstance(ev, p.Ack):
                acks.append(ev)
    a.sendall(c.send(p.Goodbye(p.GoodbyeReason.SHUTDOWN)))
    t.join(10)
    a.close()
    assert replica.read_bytes() == bytes(image)
    assert server.applier.stats.skipped == 700
    assert (server.spliced_frames > 0) is splice
    server.close()


@pytest.mark.parametrize(
    ("what", "code"),
    [("past the end", p.ErrorCode.OUT_OF_RANGE), ("seq gap", p.ErrorCode.BAD_RECORD)],
)
@pytest.mark.timeout(60)
def test_a_large_frame_with_bad_descriptors_is_refused_before_its_data_is_spliced(
    tmp_path: Path, what: str, code: p.ErrorCode
) -> None:
    """A frame large enough to be spliced whose writes still form one run: its descriptors are checked
    before a byte of its data reaches the replica."""
    replica, server, a, t, c = streaming(tmp_path)
    n = 128  # 512 KiB of data: spliced
    first = DEV // 512 - (n - 4) * 8 if what == "past the end" else 64
    recs = [
        (i + (1 if what == "seq gap" and i >= n // 2 else 0), first + i * 8, 4096, p.OP_WRITE)
        for i in range(n)
    ]
    frame = data_frame(recs, random.Random(2), bytearray(DEV + n * 4096))
    a.settimeout(10)
    a.sendall(frame[:4096])  # the head and most descriptors first: the data is still on the wire
    time.sleep(0.3)
    with pytest.raises(p.PeerError) as err:
        a.sendall(frame[4096:])
        while True:
            chunk = a.recv(65536)
            assert chunk, "server closed the connection without an ERROR"
            c.feed(chunk)
            while c.next_event() is not p.NEED_DATA:
                pass
    t.join(10)
    a.close()
    assert err.value.code is code, err.value
    assert replica.read_bytes() == bytes(DEV)
    assert server.spliced_frames == 1  # it went the splice way, and was refused there
    server.close()


@pytest.mark.timeout(60)
def test_data_taken_ahead_into_the_pipe_is_written_where_its_runs_say(tmp_path: Path) -> None:
    """prefetch (used while a piece's before-images are kept) moves data from the socket into the pipe ahead
    of the writes: after the buffered bytes, as much as the pipe holds, never past what is asked; the writes
    and the skipped records that follow take it from the pipe in order."""
    path = tmp_path / "replica.img"
    path.write_bytes(bytes(DEV))
    replica = Replica(path)
    pipe = Pipe()
    rnd = random.Random(3)
    data = rnd.randbytes(3 * pipe.size + 12345)
    buffered = memoryview(data[:5000])
    a, b = socket.socketpair()
    sender = threading.Thread(target=a.sendall, args=(data[5000:],), daemon=True)
    sender.start()
    src = SpliceSource(b, replica, pipe, buffered, len(data))
    image = bytearray(DEV)

    def write(runs: list[tuple[int, int, int]]) -> None:
        src.write_runs(runs)
        for start, n, off in runs:
            image[off : off + n] = data[start : start + n]

    src.prefetch(3000)  # within the buffered bytes: nothing to take
    assert src.in_pipe == 0
    src.prefetch(9000)  # the buffered bytes, then 4000 from the socket
    assert src.in_pipe == 4000
    write([(0, 1000, 1 << 20), (1000, 7000, 0)])  # from memory, then 3000 from the pipe
    assert src.in_pipe == 1000
    src.prefetch(len(data))  # as much as the pipe holds
    assert src.in_pipe == pipe.size
    write([(8000, 2000, 3 << 20)])
    src.prefetch(len(data))
    assert src.in_pipe == pipe.size
    # a skipped record's data (10000..20000) is dropped from the pipe, then a run longer than the pipe
    write([(20000, pipe.size + 5000, 4 << 20)])
    src.prefetch(20000 + pipe.size + 5000)  # what is asked is taken already
    write([(20000 + pipe.size + 5000, 100, 5000)])
    src.finish()  # the rest of the data is dropped
    assert src.pos == len(data)
    assert src.in_pipe == 0
    sender.join(10)
    with pytest.raises(BlockingIOError):  # nothing was taken off the socket beyond the frame's data
        b.recv(1, socket.MSG_DONTWAIT)
    replica.close()
    pipe.close()
    a.close()
    b.close()
    assert path.read_bytes() == bytes(image)
