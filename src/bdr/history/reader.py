"""The history writer's reader process: it keeps the before-images of a batch's writes, pieces of the batch
ahead of the server's writes to the replica.

Keeping a history costs the server a read of everything it overwrites and a write of it to the history.  For
scattered small writes that is one read syscall per write, each holding the interpreter between
microsecond-long calls: a thread of the server cannot run them alongside the writes (the two would only hand the
interpreter lock back and forth), a process can.  For long runs it is two more copies of every byte.

The reader maps the replica (undo.ReplicaMap) and copies small extents from the mapping rather than a read
syscall each.  When the server says no write touches a piece's extents until it is answered (STEADY: no two
runs of its batch overlap), the large extents are written to the history straight from the mapping, one copy
instead of two.  A failed read through the mapping is a SIGBUS that ends the process; the server sees it
(ReaderGone.read_failed), keeps that batch's before-images itself and starts a new reader with the next.

The server owns the history (its segments, retention, checkpoints); for each piece it reserves room in the
segment being written and sends the piece's extents, where its UNDO record goes and the segment's file (when it
changes).  The reader reads what the replica holds there, writes the record (header, extent table, the data
that is not zeros), makes it durable (fdatasync) and answers with the payload's length, or with the error of a
failed read or write.  It never writes to the replica.

The server runs it as ``python -c "from bdr.history.reader import main; main()" REPLICA_FD SOCKET_FD
BUFFER_SIZE``; it ends when the server closes its socket (or exits).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ..journal import ReplicaIOError
from .format import HEAD_SIZE
from .segments import HistoryIOError, write_at
from .undo import ReplicaMap, fill_undo, payload_room, undo_head

log = logging.getLogger("bdr.server")

EXTENTS_MAX = 256  # of one piece
# segment number, position of the record in it, its time, extents, flags; then the offsets (u64 each), lengths
# (u32 each)
_REQUEST = struct.Struct("<QQQII")
STEADY = 1  # a request's flag: no write to its extents until it is answered (fill_undo's ``steady``)
_REPLY = struct.Struct("<BiQ")  # what failed (OK, REPLICA, HISTORY), errno, payload length; then a message
OK, REPLICA, HISTORY = 0, 1, 2
REQUEST_MAX = _REQUEST.size + EXTENTS_MAX * 12
_RUN = "from bdr.history.reader import main; main()"
AFTER = (1 << 64) - 1  # a record's position: right after the record the reader wrote last


class ReaderGone(Exception):
    """The reader process is not there (it could not start, or it stopped).  ``read_failed``: it was ended by a
    failed read of the replica through its mapping (SIGBUS), not by a fault of its own."""

    def __init__(self, message: str, read_failed: bool = False) -> None:
        super().__init__(message)
        self.read_failed = read_failed


class Reader:
    """The server's side: a reader process for the replica ``replica_fd`` and the history ``directory``, for
    pieces of up to EXTENTS_MAX extents and ``piece_bytes`` bytes."""

    def __init__(self, replica_fd: int, piece_bytes: int, directory: Path) -> None:
        self.directory = directory
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            root = str(Path(__file__).resolve().parents[2])  # where the bdr package is: the reader imports it
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
            fds = (replica_fd, theirs.fileno())
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _RUN, *map(str, fds), str(payload_room(EXTENTS_MAX, piece_bytes))],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.segment = -1  # the segment whose file the reader has
        self.waiting = 0  # requests sent and not yet answered

    def submit(
        self,
        segment: int,
        seg_fd: int,
        pos: int,
        now: int,
        offsets: Sequence[int],
        lengths: Sequence[int],
        steady: bool = False,
    ) -> None:
        """Have the reader keep these extents' before-images: an UNDO record at ``pos`` of segment ``segment``
        (its file ``seg_fd``), or right after the reader's last record (AFTER), of time ``now``; room for it is
        reserved.  ``steady``: nothing writes to the extents until the request is answered.  Requests are
        answered in order."""
        n = len(offsets)
        msg = struct.pack(
            f"<QQQII{n}Q{n}I", segment, pos, now, n, STEADY if steady else 0, *offsets, *lengths
        )
        try:
            if segment != self.segment:
                socket.send_fds(self.sock, [msg], [seg_fd])
                self.segment = segment
            else:
                self.sock.send(msg)
        except OSError as exc:
            raise self._ended(f"cannot reach the reader process: {exc.strerror}") from exc
        self.waiting += 1

    def result(self) -> int:
        """The length of the oldest request's payload, its record durable.  ReplicaIOError if a read of the
        replica failed, HistoryIOError if the history could not be written."""
        try:
            reply = self.sock.recv(4096)
        except OSError as exc:
            raise self._ended(f"lost the reader process: {exc.strerror}") from exc
        if not reply:
            raise self._ended("the reader process closed its socket")
        self.waiting -= 1
        what, err, plen = _REPLY.unpack_from(reply)
        message = reply[_REPLY.size :].decode(errors="replace")
        if what == REPLICA:
            raise ReplicaIOError(err, message)
        if what == HISTORY:
            raise HistoryIOError(err, f"history {self.directory}: {message}")
        return int(plen)

    def _ended(self, what: str) -> ReaderGone:
        """The reader process is gone (``what`` the server saw of it): why, once it has exited."""
        try:
            code = self.proc.wait(5)  # its socket is closed as it exits
        except subprocess.TimeoutExpired:
            return ReaderGone(what)
        if code == -signal.SIGBUS:
            return ReaderGone(
                "the reader process was ended by SIGBUS: a read of the replica through its mapping failed (an "
                "I/O error of the disk, or an image file made shorter)",
                read_failed=True,
            )
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:  # a real-time signal
                name = f"signal {-code}"
            return ReaderGone(f"the reader process was ended by {name}")
        return ReaderGone(f"the reader process stopped (exit status {code})")

    def drain(self) -> list[int]:
        """Wait for the answers to the requests still in flight (after an error): the payload lengths of those
        whose records were written, in order."""
        written = []
        while self.waiting:
            with contextlib.suppress(ReplicaIOError, HistoryIOError):
                written.append(self.result())
        return written

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            log.warning("history: the reader process (pid %d) did not end; killing it", self.proc.pid)
            self.proc.kill()
            self.proc.wait()


def serve(replica_fd: int, sock: socket.socket, buf_size: int) -> None:
    """The reader process: answer the server's requests until it closes the socket."""
    view = memoryview(bytearray(buf_size))
    mapped = ReplicaMap(replica_fd)
    seg_fd = -1
    pos = 0  # where the next record goes
    head = _REQUEST.size
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, REQUEST_MAX, 1)
        except ConnectionResetError:
            return
        if not msg:
            return
        if fds:
            if seg_fd >= 0:
                os.close(seg_fd)
            seg_fd = fds[0]
        segment, at, now, n, flags = _REQUEST.unpack_from(msg)
        if at != AFTER:
            pos = at
        offsets = struct.unpack_from(f"<{n}Q", msg, head)
        lengths = struct.unpack_from(f"<{n}I", msg, head + 8 * n)
        parts: list[memoryview] = []
        try:
            parts, plen, digest = fill_undo(replica_fd, view, offsets, lengths, mapped, bool(flags & STEADY))
            rec_head = undo_head(segment, now, n, sum(lengths), plen, digest)
            write_at(seg_fd, pos, [rec_head, *parts])
            os.fdatasync(seg_fd)
            pos += HEAD_SIZE + plen
            reply = _REPLY.pack(OK, 0, plen)
        except ReplicaIOError as exc:
            reply = _REPLY.pack(REPLICA, exc.errno or errno.EIO, 0) + str(exc.strerror).encode()[:2048]
        except OSError as exc:
            if exc.errno == errno.EFAULT and len(parts) > 1:  # a page of the mapping could not be read again
                reply = _REPLY.pack(REPLICA, errno.EIO, 0) + b"replica: I/O error reading a before-image"
            else:
                text = f"write failed: {exc.strerror}".encode()
                reply = _REPLY.pack(HISTORY, exc.errno or errno.EIO, 0) + text
        parts.clear()  # the mapping's parts go before it may be made anew
        mapped.used(offsets, lengths)
        try:
            sock.send(reply)
        except OSError:  # the server is gone
            return


def main() -> None:
    # a Ctrl-C at the server's terminal, a stop of the service (a signal to each of its processes) or a hang-up
    # are the server's to handle: the reader ends when the server closes its socket or exits
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    replica_fd, sock_fd, buf_size = map(int, sys.argv[1:])
    serve(replica_fd, socket.socket(fileno=sock_fd), buf_size)
