"""The DATA fast path: the data section of a large DATA frame goes from the socket into the replica with
splice(2) through a pipe, one kernel copy and no userspace copy."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
from typing import TYPE_CHECKING

from .. import wire as p
from ..daemon.errors import ConnectionLost
from ..journal import StorageError
from .errors import Refusal, SessionClosed
from .replica import Replica

if TYPE_CHECKING:
    from .session import ServerSession

log = logging.getLogger("bdr.server")


F_SETPIPE_SZ = 1031
SPLICE_MIN = 256 * 1024  # DATA payloads from this size on go socket -> pipe -> replica
IO_TIMEOUT = 60.0


class SpliceSource:
    """The data section of a DATA frame still on the wire: the bytes already buffered are written from memory,
    the rest goes from the socket into the replica with splice(2) through a pipe, one kernel copy and no
    userspace copy.  Falls back to read + pwrite where the replica cannot be spliced into."""

    def __init__(
        self, sock: socket.socket, replica: Replica, pipe: Pipe, buffered: memoryview, total: int
    ) -> None:
        self.sock = sock
        self.replica = replica
        self.pipe = pipe
        self.buffered = buffered
        self.total = total
        self.pos = 0
        self.in_pipe = 0  # data bytes in the pipe already (prefetch), the next after the buffered ones

    def _from_socket(self, n: int) -> int:
        """Move up to n bytes from the socket into the pipe."""
        while True:
            try:
                k = os.splice(self.sock.fileno(), self.pipe.w, n)
            except BlockingIOError:
                if not select.select([self.sock], [], [], IO_TIMEOUT)[0]:
                    raise ConnectionLost(f"no data from the client for {IO_TIMEOUT:.0f}s") from None
                continue
            except OSError as exc:  # the socket's fault (reset, ...): not a replica error
                raise ConnectionLost(f"receive failed: {exc.strerror or exc}") from exc
            if k == 0:
                raise ConnectionLost("client closed the connection inside a DATA frame")
            return k

    def _to_replica(self, k: int, offset: int) -> None:
        done = 0
        while done < k:
            if self.pipe.splice_out:
                try:
                    done += os.splice(self.pipe.r, self.replica.fd, k - done, offset_dst=offset + done)
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise self.replica.error(exc, offset + done) from exc
                    self.pipe.splice_out = False
            data = os.read(self.pipe.r, k - done)
            self.replica.write(memoryview(data), offset + done)
            done += len(data)
        self.replica.note_written(k)

    def _take(self, length: int, offset: int | None) -> None:
        """Consume the next ``length`` data bytes: to the replica at ``offset``, or discarded (None)."""
        nbuf = len(self.buffered)
        if self.pos < nbuf:
            n = min(length, nbuf - self.pos)
            if offset is not None:
                self.replica.write(self.buffered[self.pos : self.pos + n], offset)
                offset += n
            self.pos += n
            length -= n
        while length > 0:
            if self.in_pipe:
                k = min(length, self.in_pipe)
                self.in_pipe -= k
            else:
                k = self._from_socket(min(length, self.pipe.size))
            if offset is not None:
                self._to_replica(k, offset)
                offset += k
            else:
                os.read(self.pipe.r, k)
            self.pos += k
            length -= k

    def prefetch(self, end: int) -> None:
        """Move data bytes up to ``end`` from the socket into the pipe, as many as it takes."""
        have = max(self.pos, len(self.buffered)) + self.in_pipe  # the pipe's bytes follow the buffered ones
        want = min(end - have, self.pipe.size - self.in_pipe)
        while want > 0:
            k = self._from_socket(want)
            self.in_pipe += k
            want -= k

    def write_runs(self, runs: list[tuple[int, int, int]]) -> None:
        for start, length, offset in runs:
            if start > self.pos:
                self._take(start - self.pos, None)
            self._take(length, offset)

    def finish(self) -> None:
        if self.total > self.pos:
            self._take(self.total - self.pos, None)


class Pipe:
    """A pipe for splice(2), as large as the system allows."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        self.size = 65536
        with contextlib.suppress(OSError):
            self.size = fcntl.fcntl(self.w, F_SETPIPE_SZ, 1 << 20)
        self.splice_out = True

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def _long_runs(f: p.RecordFields, min_avg: int = 32 * 1024) -> bool:
    """Whether the writes of a batch coalesce into runs of ``min_avg`` bytes on average (worth splicing)."""
    s, ln, n = f.sectors, f.lens, len(f.sectors)
    if n and s[-1] - s[0] == sum(ln[:-1]) // p.SECTOR and f.ops.count(p.OP_WRITE) == n:
        return True  # the common sequential case, without a loop
    runs = 1 + sum(1 for i in range(1, n) if s[i] != s[i - 1] + (ln[i - 1] >> 9))
    return sum(ln) >= runs * min_avg


class SpliceReceiver:
    """Decides, frame by frame, whether a DATA frame takes the splice path, and owns the pipe it goes through.
    BDR_NO_SPLICE=1 in the environment turns the fast path off."""

    def __init__(self) -> None:
        self.pipe: Pipe | None = None
        self.frames = 0  # DATA frames received by splice
        self._no_splice = -1  # decoder frame number that goes the ordinary way
        if hasattr(os, "splice") and os.environ.get("BDR_NO_SPLICE") != "1":
            with contextlib.suppress(OSError):
                self.pipe = Pipe()

    def receive(self, sess: ServerSession, sock: socket.socket) -> bool:
        """Large DATA frames: read only up to the end of the descriptors, then let the session splice the data
        section from the socket into the replica.  False: use the ordinary receive path."""
        if self.pipe is None or sess.conn.phase is not p.Phase.STREAMING or sess.applier.staging:
            return False
        start = sess.conn.frame_start()
        if start is None or start.type != p.MsgType.DATA or not SPLICE_MIN <= start.length <= p.MAX_PAYLOAD:
            return False
        if start.complete:
            return False  # the whole frame is buffered already
        need = p.data_head_size(start.prefix) or p.DATA_HEAD.size
        if need > start.length or self._no_splice == start.number:
            return False  # malformed (the ordinary path rejects it), or received the ordinary way
        if len(start.prefix) < need:
            want = need - len(start.prefix)
            view = sess.conn.writable(want)
            n = sock.recv_into(view[:want])
            sess.conn.commit(n)
            if n == 0:
                raise SessionClosed("connection lost: client closed the connection without GOODBYE")
            start = sess.conn.frame_start()
            assert start is not None
            if len(start.prefix) < need or p.data_head_size(start.prefix) != need:
                return True  # more to read (or the count just became known): come back
        cols = p.record_fields(start.prefix[p.DATA_HEAD.size : need])
        if not _long_runs(cols):
            self._no_splice = start.number  # small scattered writes: recv + pwrite beat two splices per run
            return False
        more = bool(select.select([sock], [], [], 0)[0])
        self.frames += 1
        reply = self._receive_spliced(sess, sock, self.pipe, cols, idle=not more)
        if reply:
            sock.sendall(reply)
        return True

    def _receive_spliced(
        self, sess: ServerSession, sock: socket.socket, pipe: Pipe, cols: p.RecordFields, idle: bool
    ) -> bytes:
        """Apply the DATA frame whose head and descriptors (split into ``cols``) are buffered in ``conn`` while
        its data is still on the wire: validate the descriptors, then splice the data into the replica, and
        tell the connection how much of the body was taken off the socket.  Returns what to send."""
        start = sess.conn.frame_start()
        assert start is not None
        flags, length, prefix = start.flags, start.length, start.prefix
        try:
            if flags & ~int(p.FrameFlag.SYNC):
                raise p.RemoteProtocolError(p.ErrorCode.BAD_FIELD, f"frame flags {flags:#x} has unknown bits")
            sess.conn.expect_data()
            _, cols, data_len = p.parse_data_head(prefix, length, sess.conn.device_size, cols)
            buffered = prefix[length - data_len :]
            src = SpliceSource(sock, sess.replica, pipe, buffered, data_len)
            sess.applier.apply_from(cols, src, bool(flags & p.FrameFlag.SYNC))
            taken = length - len(prefix)
        except ConnectionLost as exc:
            raise SessionClosed(f"connection lost: {exc.message}") from exc
        except p.RemoteProtocolError as exc:
            raise SessionClosed(
                f"protocol error from client: {exc}", p.encode(p.Error(exc.code, exc.message))
            ) from exc
        except (Refusal, p.LocalProtocolError) as exc:
            raise SessionClosed(f"refused: {exc.message}", p.encode(p.Error(exc.code, exc.message))) from exc
        except StorageError as exc:
            raise sess.storage_failed(exc) from exc
        sess.conn.body_taken(taken)
        sess.ack_pending = True
        return sess.receive(idle)

    def reset(self) -> None:
        """A new pipe (after a session: a frame cut short may have left bytes in the old one)."""
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None
            with contextlib.suppress(OSError):
                self.pipe = Pipe()

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None
