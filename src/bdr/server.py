"""bdr_server: receives ring records and scan blocks from bdr_client and applies them to the replica.

Layers, from the disk up:

* ``Replica``: the target block device or image file (pwritev, zeroing, fdatasync).
* ``Applier``: applies DATA batches strictly in sequence order (older records skipped, a gap refused),
  coalesces contiguous writes into one write, and makes durability points durable (replica fdatasync, then the
  metadata header on the journal, then the acknowledgement).
* ``ServerSession``: one client connection as a protocol state machine: handshake checks, streaming, scans.
  Bytes in, bytes out; no sockets, so tests drive it in memory.
* ``Server``: the daemon: listening socket, one client at a time, signals as events on the poll loop; TLS
  and shared-secret authentication before anything reaches the session (``bdr.tls``, ``bdr.auth``).

A replica or journal I/O error is not a protocol event: the server marks the replica inconsistent in its
metadata (the next client start rescans the whole device), tells the client, and stops with exit status 4.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import logging
import os
import queue
import select
import signal
import socket
import ssl
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import __version__, auth, config, replica_state, scan, status, tls
from . import protocol as p
from .journal import Journal, JournalError, ReplicaIOError, StorageError
from .journal_records import JournalFull, RecordArea, StagingTarget
from .log import BenchClock, setup_logging
from .seq import prev_seq, seq_after, seq_distance, seq_le

log = logging.getLogger("bdr.server")

DEFAULT_PORT = 7788
BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
ZERO_CHUNK = 1 << 20
BLKDISCARD = 0x1277
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """fallocate(PUNCH_HOLE | KEEP_SIZE): the range reads as zeros and its space is freed (a file's blocks; on a
    block device, a write-zeroes that may unmap, never a fallback to writing zeros).  False: not supported."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
        return False
    raise OSError(err, os.strerror(err))


F_SETPIPE_SZ = 1031
SPLICE_MIN = 256 * 1024  # DATA payloads from this size on go socket -> pipe -> replica
IO_TIMEOUT = 60.0
# Time from accept to a finished handshake (TLS, authentication, HELLO/WELCOME): a few round trips, even over
# a lossy long-distance link; a peer that has not finished by then is dropped.
HANDSHAKE_TIMEOUT = 30.0
# A frame started but not finished: no byte for this long means a stalled peer (a live TCP connection keeps
# delivering retransmissions well within this, even at 5% loss).
FRAME_TIMEOUT = 60.0
# Connections are authenticated (TLS handshake, shared secret) on threads of their own, before they may become
# the session: a peer that connects and stalls holds no slot the real client needs.  At most this many at once,
# and this many from one host; more are closed at once.
MAX_PENDING = 16
MAX_PENDING_PER_HOST = 4
EXIT_USAGE, EXIT_STORAGE = 2, 4
ACK_EVERY = 32 << 20  # applied bytes after which an ACK goes out even while more input is waiting


class ServerError(Exception):
    """Configuration problem the operator must fix (paths, sizes): the daemon exits with a message."""


# --------------------------------------------------------------------------------------------------------------
# Replica
# --------------------------------------------------------------------------------------------------------------


class Target(Protocol):
    """What the applier needs from the replica."""

    def write_runs(self, runs: list[tuple[memoryview, int]]) -> None: ...
    def write_zeroes(self, offset: int, length: int) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def sync(self) -> None: ...


class Replica:
    """The target device or image file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise ServerError(f"cannot open target device {self.path}: {exc.strerror}") from exc
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        if not (self.is_block or stat.S_ISREG(st.st_mode)):
            os.close(self.fd)
            raise ServerError(f"target device {self.path} is neither a block device nor a regular file")
        if self.is_block:
            buf = bytearray(8)
            fcntl.ioctl(self.fd, BLKGETSIZE64, buf, True)
            self.size = struct.unpack("<Q", buf)[0]
            bs = bytearray(4)
            fcntl.ioctl(self.fd, BLKSSZGET, bs, True)
            self.block_size = struct.unpack("<I", bs)[0]
        else:
            self.size = st.st_size
            self.block_size = 512
        # a regular file without a single allocated block reads as zeros everywhere
        self.known_zero = not self.is_block and st.st_blocks == 0
        self._zeros = memoryview(bytes(ZERO_CHUNK))
        self.bytes_written = 0
        self.bytes_discarded = 0
        self.can_punch = True  # fallocate(PUNCH_HOLE) works here until it fails once
        self.can_blkdiscard = True

    def error(self, exc: OSError, offset: int | None = None) -> ReplicaIOError:
        """The replica's I/O error, with its path (the byte it happened at goes to the debug log)."""
        if isinstance(exc, ReplicaIOError):
            return exc
        if offset is not None:
            log.debug("replica %s: I/O error at byte %d", self.path, offset)
        return ReplicaIOError(
            exc.errno, f"replica {self.path}: I/O error: {exc.strerror or exc}", str(self.path)
        )

    def write(self, data: memoryview, offset: int) -> None:
        done = 0
        try:
            while done < len(data):
                n = os.pwritev(self.fd, [data[done:]], offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                done += n
        except OSError as exc:
            raise self.error(exc, offset + done) from exc
        self.bytes_written += done
        self.known_zero = False

    def write_runs(self, runs: list[tuple[memoryview, int]]) -> None:
        """Write each (data, offset), in order: one pwrite per run in a tight loop."""
        fd, pwrite = self.fd, os.pwrite
        total = 0
        for data, offset in runs:
            try:
                n = pwrite(fd, data, offset)
            except OSError as exc:
                raise self.error(exc, offset) from exc
            total += n
            if n != len(data):
                self.write(data[n:], offset + n)
        self.bytes_written += total
        self.known_zero = False

    def read(self, view: memoryview, offset: int) -> None:
        try:
            scan.read_exact(self.fd, view, offset)
        except OSError as exc:
            raise self.error(exc, offset) from exc

    def note_written(self, n: int) -> None:
        """Bytes written behind our back (splice)."""
        self.bytes_written += n
        self.known_zero = False

    def write_zeroes(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(ZERO_CHUNK, end - offset)
            self.write(self._zeros[:n], offset)
            offset += n

    def discard(self, offset: int, length: int) -> None:
        """Make [offset, +length) read as zeros, giving the space back where the device can (a thin or sparse
        replica): zero-with-unmap (fallocate PUNCH_HOLE), else a discard checked by reading it back, else
        zeros written."""
        try:
            punched = self.can_punch and _punch_hole(self.fd, offset, length)
        except OSError as exc:
            raise self.error(exc, offset) from exc
        if not punched:
            self.can_punch = False
            if not self.is_block or not self._discard_checked(offset, length):
                self.write_zeroes(offset, length)
                return
        self.bytes_discarded += length

    def _discard_checked(self, offset: int, length: int) -> bool:
        """BLKDISCARD, then read the range back and write zeros where the device did not zero it."""
        if self.can_blkdiscard:
            try:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY):
                    raise self.error(exc, offset) from exc
                self.can_blkdiscard = exc.errno == errno.EINVAL  # misaligned: try the next one
                return False
        else:
            return False
        buf = memoryview(bytearray(min(ZERO_CHUNK, length)))
        end = offset + length
        while offset < end:
            n = min(len(buf), end - offset)
            self.read(buf[:n], offset)
            if buf[:n] != self._zeros[:n]:
                self.write(self._zeros[:n], offset)
            offset += n
        return True

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise self.error(exc) from exc

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --------------------------------------------------------------------------------------------------------------
# Applier
# --------------------------------------------------------------------------------------------------------------


class DataSource(Protocol):
    """The data section of one DATA batch, consumed in increasing order."""

    def write_runs(self, runs: list[tuple[int, int, int]]) -> None:
        """For each (start, length, offset): data bytes [start, start + length) of the batch go to the replica
        at ``offset``.  Starts increase."""

    def finish(self) -> None:
        """The batch is applied: consume whatever data is left (records skipped as replays)."""


class BufferSource:
    """Data already in memory (the receive buffer), written to the applier's target at the time of each write: a
    durability point inside the batch may commit a staged resync, after which the rest goes to the replica."""

    def __init__(self, applier: Applier, data: memoryview) -> None:
        self.applier = applier
        self.data = data

    def write_runs(self, runs: list[tuple[int, int, int]]) -> None:
        data = self.data
        self.applier.target.write_runs([(data[s : s + n], off) for s, n, off in runs])

    def finish(self) -> None:
        pass


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

    def _from_socket(self, n: int) -> int:
        """Move up to n bytes from the socket into the pipe."""
        while True:
            try:
                k = os.splice(self.sock.fileno(), self.pipe.w, n)
            except BlockingIOError:
                if not select.select([self.sock], [], [], IO_TIMEOUT)[0]:
                    raise p.ConnectionLost(f"no data from the client for {IO_TIMEOUT:.0f}s") from None
                continue
            except OSError as exc:  # the socket's fault (reset, ...): not a replica error
                raise p.ConnectionLost(f"receive failed: {exc.strerror or exc}") from exc
            if k == 0:
                raise p.ConnectionLost("client closed the connection inside a DATA frame")
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
            k = self._from_socket(min(length, self.pipe.size))
            if offset is not None:
                self._to_replica(k, offset)
                offset += k
            else:
                os.read(self.pipe.r, k)
            self.pos += k
            length -= k

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


@dataclass(slots=True)
class ApplyStats:
    records: int = 0
    bytes: int = 0
    writes: int = 0  # pwrite calls after coalescing
    skipped: int = 0  # replayed records older than what was applied
    syncs: int = 0
    sync_seconds: float = 0.0


class Applier:
    """Applies ring records in sequence order and keeps the durability metadata.

    ``applied`` / ``durable`` are the last applied / durable sequence numbers (``NO_SEQ``: none).  ``expect`` is
    the next sequence number to apply, or None when the next DATA record sets it (after a scan that could not
    name its resume point).
    """

    def __init__(self, target: Target, journal: Journal, area: RecordArea | None = None) -> None:
        self.target = target
        self.replica_target = target
        self.journal = journal
        # journal scans: the resync is staged in ``area`` (``target`` is a StagingTarget meanwhile) and committed
        # once the scan ended (``commit_ready``) and the records up to ``commit_at`` are staged
        self.area = area
        self.staging = False
        self.commit_ready = False
        self.commit_at: int | None = None
        resume = replica_state.resume_point(journal.header)
        self.durable = p.NO_SEQ if resume is None else resume
        self.applied = self.durable
        self.expect: int | None = None if resume is None else p.next_seq(resume)
        self.stats = ApplyStats()
        self._dirty = False  # applied but not yet synced

    # -- sequence -------------------------------------------------------------------------------------------

    def restart_at(self, seq: int | None) -> None:
        """Streaming (re)starts at seq (None: at the first record that arrives)."""
        self.expect = seq
        if seq is not None:
            self.applied = self.durable = prev_seq(seq)

    def apply(self, msg: p.Data) -> None:
        self.apply_from(msg.fields(), BufferSource(self, memoryview(msg.data)), msg.sync)

    def apply_from(self, f: p.RecordFields, src: DataSource, sync: bool) -> None:
        """Apply a batch whose data comes from ``src`` (consumed in order, to its end)."""
        if f.seqs:
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "batch seq %d..%d: %d records via %s%s",
                    f.seqs[0],
                    f.seqs[-1],
                    len(f.seqs),
                    type(src).__name__,
                    ", sync requested" if sync else "",
                )
            self._apply_records(f, src)
        src.finish()
        if sync:
            self.sync()

    def _apply_records(self, f: p.RecordFields, src: DataSource) -> None:
        n = len(f.seqs)
        first = f.seqs[0]
        if self.expect is None:
            self.expect = first
            self.applied = prev_seq(first)
        d = seq_distance(first, self.expect)
        if d >= 1 << 63:
            raise p.RemoteProtocolError(
                p.ErrorCode.SEQ_GAP,
                f"records start at seq {first} but seq {self.expect} is next: records lost",
            )
        skip = min(d, n)
        self.stats.skipped += skip
        if skip == n:
            return
        sd = 4096
        # fast path: full 4 KiB writes to consecutive sectors without flags form a single write
        if (
            skip == 0
            and f.ops.count(p.OP_WRITE) == n
            and f.lens.count(sd) == n
            and not any(f.flags)
            and f.sectors[-1] - f.sectors[0] == (n - 1) * 8
            and (n < 3 or f.sectors == list(range(f.sectors[0], f.sectors[0] + n * 8, 8)))
        ):
            self._write_runs(src, [(0, n * sd, f.sectors[0] * p.SECTOR)])
            self._done(f.seqs[-1], n, n * sd)
            return
        self._apply_general(f, src, skip)

    def _apply_general(self, f: p.RecordFields, src: DataSource, skip: int) -> None:
        ops, lens, sectors, seqs = f.ops, f.lens, f.sectors, f.seqs
        n = len(seqs)
        # the last durability point in the batch: sync once there (it covers the earlier ones)
        last_point = -1
        for i in range(n - 1, skip - 1, -1):
            if ops[i] == p.OP_FLUSH or (ops[i] == p.OP_WRITE and f.flags[i] & p.REC_FUA):
                last_point = i
                break
        write, sector = p.OP_WRITE, p.SECTOR
        runs: list[tuple[int, int, int]] = []  # coalesced writes: (data offset, length, disk offset)
        dpos = 0
        run_off = run_start = run_len = 0  # the run being extended
        nbytes = 0
        for i in range(n):
            op, ln = ops[i], lens[i]
            if op == write:
                if i >= skip:
                    off = sectors[i] * sector
                    if run_len and run_off + run_len == off and run_start + run_len == dpos:
                        run_len += ln
                    else:
                        if run_len:
                            runs.append((run_start, run_len, run_off))
                        run_off, run_start, run_len = off, dpos, ln
                    nbytes += ln
                dpos += ln
            elif i >= skip:
                if run_len:
                    runs.append((run_start, run_len, run_off))
                    run_len = 0
                if runs:
                    self._write_runs(src, runs)
                    runs = []
                if op == p.OP_DISCARD:
                    # the client checked that the source reads zeros there: so does the replica, and it may
                    # give the space back; UNZEROED: the source kept data there, the client resyncs the range
                    if not f.flags[i] & p.REC_UNZEROED:
                        self.target.discard(sectors[i] * sector, ln)
                elif op == p.OP_WRITE_ZEROES:
                    self.target.write_zeroes(sectors[i] * sector, ln)
            if i == last_point:
                if run_len:
                    runs.append((run_start, run_len, run_off))
                    run_len = 0
                if runs:
                    self._write_runs(src, runs)
                    runs = []
                self._done(seqs[i], i + 1 - skip, nbytes)
                skip, nbytes = i + 1, 0
                self.sync()
        if run_len:
            runs.append((run_start, run_len, run_off))
        if runs:
            self._write_runs(src, runs)
        if skip < n:
            self._done(seqs[-1], n - skip, nbytes)

    def _write_runs(self, src: DataSource, runs: list[tuple[int, int, int]]) -> None:
        src.write_runs(runs)
        self.stats.writes += len(runs)

    def _done(self, last_seq: int, records: int, nbytes: int) -> None:
        self.applied = last_seq
        self.expect = p.next_seq(last_seq)
        self.stats.records += records
        self.stats.bytes += nbytes
        self._dirty = True

    # -- durability ---------------------------------------------------------------------------------------------

    def begin_staging(self) -> None:
        """A journal scan starts: from now on scan blocks and ring writes are staged in the journal."""
        assert self.area is not None
        self.area.begin()
        self.target = StagingTarget(self.area)
        self.staging = True
        self.commit_ready = False
        self.commit_at = None

    def abort_staging(self) -> None:
        """Forget an uncommitted resync (the replica was not touched; the header still says SCANNING)."""
        if self.staging:
            assert self.area is not None
            self.area.discard()
            self.target = self.replica_target
            self.staging = False

    def _commit_staged(self) -> None:
        """Commit the staged resync, record the new consistent state in the header, apply it to the replica."""
        assert self.area is not None
        self.area.commit()
        self.journal.store(
            replica_state.staged_resync_committed(self.journal.header, self.applied, self.expect is not None)
        )
        self.target = self.replica_target
        self.staging = False
        n = self.area.apply(self.replica_target)
        self.durable = self.applied
        self._dirty = False
        self.stats.syncs += 1
        log.info("journal resync applied (%d records); replica consistent at seq %d", n, self.applied)

    def sync(self) -> None:
        """Make everything applied durable: replica fdatasync, then the metadata header, then (caller) ACK."""
        if (
            self.staging
            and self.commit_ready
            and (self.commit_at is None or (self.expect is not None and seq_le(self.commit_at, self.applied)))
        ):
            self.target.sync()
            self._commit_staged()
            return
        if not self._dirty and self.durable == self.applied:
            return
        t0 = time.monotonic()
        self.target.sync()
        was = self.journal.header
        now = self.journal.store(replica_state.durable_point(was, self.applied, self.expect is not None))
        if replica_state.is_consistent(now) and not replica_state.is_consistent(was):
            log.info("replica is consistent again at seq %d", self.applied)
        self.durable = self.applied
        self._dirty = False
        self.stats.syncs += 1
        took = time.monotonic() - t0
        self.stats.sync_seconds += took
        log.debug("durable up to seq %d (replica fdatasync + metadata in %.1f ms)", self.durable, took * 1000)

    def ack(self) -> p.Ack:
        return p.Ack(self.applied, self.durable)


# --------------------------------------------------------------------------------------------------------------
# Session: one client connection, no sockets
# --------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class ScanState:
    scan_id: int
    mode: p.ScanMode
    block_size: int
    blocks: int = 0
    bytes: int = 0
    hashed: int = 0
    started: float = 0.0


class SessionClosed(Exception):
    """The session is over; ``reply`` holds the last bytes to send (an ERROR or GOODBYE) before closing.
    ``fatal``: the replica or the journal failed, the daemon must stop."""

    def __init__(self, reason: str, reply: bytes = b"", clean: bool = False, fatal: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply
        self.clean = clean
        self.fatal = fatal


class ServerSession:
    """The protocol state machine of one client connection on the server side."""

    def __init__(
        self,
        replica: Replica,
        journal: Journal,
        applier: Applier,
        peer: str = "memory",
        auth: auth.ServerAuth | None = None,
    ) -> None:
        self.replica = replica
        self.journal = journal
        self.applier = applier
        self.peer = peer
        self.auth = auth
        self.conn = p.Connection(p.Role.SERVER, auth=auth is not None)
        self.hello: p.Hello | None = None
        self.scan: ScanState | None = None
        self._hash_buf = memoryview(bytearray(scan.WINDOW))
        self.ids_match = False
        self.ack_pending = False
        self.resync_owned = False  # SCANNING was set by this connection (RESYNC_PENDING), not inherited
        self.verified = 0  # bytes hashed for online verify requests (bdr verify)
        self._acked_durable = applier.durable
        self._acked_bytes = applier.stats.bytes

    # -- input ------------------------------------------------------------------------------------------------

    def receive(self, idle: bool = True, authenticating: bool = False) -> bytes:
        """Process every complete frame buffered in ``conn``; return the bytes to send back.  ``authenticating``:
        stop once the shared-secret exchange is over (what follows is for the session, not the gate).

        ACK policy: at once when the durable sequence number moved (the client waits for it to release ring
        slots) or after ACK_EVERY bytes; otherwise only once the input is ``idle`` (the caller saw no more bytes
        waiting), so a busy stream is not slowed down by one ACK per frame.
        Raises SessionClosed when the conversation is over (its reply must still be sent)."""
        out: list[bytes] = []
        while not (authenticating and self.conn.phase is not p.Phase.AUTH):
            try:
                ev = self.conn.next_event()
                if ev is p.NEED_DATA:
                    break
                assert not isinstance(ev, p.NeedData)
                reply = self.handle(ev)
            except p.PeerError as exc:
                raise SessionClosed(f"client reported {exc.code.name}: {exc.message}", b"".join(out)) from exc
            except p.RemoteProtocolError as exc:
                err = p.encode(p.Error(exc.code, exc.message))
                raise SessionClosed(self._refusal(exc), b"".join(out) + err) from exc
            except p.LocalProtocolError as exc:
                err = p.encode(p.Error(exc.code, exc.message))
                raise SessionClosed(f"refused: {exc.message}", b"".join(out) + err) from exc
            except OSError as exc:
                raise self.storage_failed(exc, b"".join(out)) from exc
            if reply is None:
                self.ack_pending = True
            else:
                out.append(reply)
                if isinstance(ev, p.Goodbye):
                    raise SessionClosed("client said goodbye", b"".join(out), clean=True)
        a = self.applier
        if self.ack_pending and (
            idle or a.durable != self._acked_durable or a.stats.bytes - self._acked_bytes >= ACK_EVERY
        ):
            out.append(self.take_ack())
        return b"".join(out)

    def receive_spliced(self, sock: socket.socket, pipe: Pipe, idle: bool) -> bytes:
        """Apply the DATA frame whose head and descriptors are buffered in ``conn`` while its data is still
        on the wire: validate the descriptors, then splice the data into the replica.  Returns what to send."""
        dec = self.conn.decoder
        hdr = dec.peek_header()
        assert hdr is not None
        _, flags, length = hdr
        try:
            if flags & ~int(p.FrameFlag.SYNC):
                raise p.RemoteProtocolError(p.ErrorCode.BAD_FIELD, f"frame flags {flags:#x} has unknown bits")
            self.conn.expect_data()
            prefix = dec.current_payload()
            _, cols, data_len = p.parse_data_head(prefix, length, self.conn.device_size)
            buffered = prefix[length - data_len :]
            src = SpliceSource(sock, self.replica, pipe, buffered, data_len)
            self.applier.apply_from(cols, src, bool(flags & p.FrameFlag.SYNC))
        except p.RemoteProtocolError as exc:
            if isinstance(exc, p.ConnectionLost):
                raise SessionClosed(f"connection lost: {exc.message}") from exc
            raise SessionClosed(
                f"protocol error from client: {exc}", p.encode(p.Error(exc.code, exc.message))
            ) from exc
        except p.LocalProtocolError as exc:
            raise SessionClosed(f"refused: {exc.message}", p.encode(p.Error(exc.code, exc.message))) from exc
        except OSError as exc:
            raise self.storage_failed(exc) from exc
        dec.drop_current()
        self.ack_pending = True
        return self.receive(idle)

    def _refusal(self, exc: p.RemoteProtocolError) -> str:
        """Why the client's input was refused, in words for the log."""
        if exc.code in (p.ErrorCode.AUTH_FAILED, p.ErrorCode.AUTH_REQUIRED):
            return f"authentication failed: {exc.message}"
        dec = self.conn.decoder
        hdr = dec.peek_header()
        if dec.frames == 0 and hdr is not None and hdr[2] & 0xFFFF == 0x0316:  # 16 03: a TLS record
            return "the client speaks TLS, this server has no --tls-cert / --tls-key"
        return f"protocol error from client: {exc}"

    def storage_failed(self, exc: OSError, reply: bytes = b"") -> SessionClosed:
        """The replica or the journal failed: mark the replica inconsistent on disk (the next client start
        rescans the whole device) and end the session with an IO_ERROR the daemon treats as fatal."""
        if isinstance(exc, StorageError):
            msg = exc.strerror or str(exc)
        else:  # the journal's errors are all JournalIOError (or JournalFull, not a failure): the replica's
            msg = self.replica.error(exc).strerror or str(exc)
        try:
            self.journal.store(replica_state.storage_failed(self.journal.header))
            marked = "the replica is marked inconsistent"
        except OSError as exc2:
            marked = f"and the journal cannot record it ({exc2.strerror or exc2})"
        log.error("%s; %s", msg, marked)
        err = p.encode(p.Error(p.ErrorCode.IO_ERROR, f"{msg} on the server"))
        return SessionClosed(msg, reply + err, fatal=True)

    def take_ack(self) -> bytes:
        self.ack_pending = False
        self._acked_durable = self.applier.durable
        self._acked_bytes = self.applier.stats.bytes
        return p.encode(self.applier.ack())

    def handle(self, msg: p.Message) -> bytes | None:
        """One message in; the reply frame out (None: answered by the ACK sent after the whole read)."""
        try:
            return self._handle(msg)
        except JournalFull as exc:
            self.applier.abort_staging()
            log.warning(
                "journal resync from %s dropped, the replica is untouched: %s (peak %d bytes staged)",
                self.peer,
                exc,
                exc.needed,
            )
            raise p.LocalProtocolError(
                p.ErrorCode.JOURNAL_FULL,
                f"{exc}. Give the server a larger --journal / --journal-size (the range a resync covers plus "
                "2 %), or resync with direct writes (bdr_client --journal-full direct, or --full-scan once: the "
                "replica is inconsistent until it completes)",
            ) from exc

    def _handle(self, msg: p.Message) -> bytes | None:
        if isinstance(msg, p.AuthBegin | p.AuthProof):
            return self._auth(msg)
        if isinstance(msg, p.Data):
            self.applier.apply(msg)
            return None
        if isinstance(msg, p.Sync):
            self.applier.sync()
            return None
        if isinstance(msg, p.Hello):
            return self._hello(msg)
        if isinstance(msg, p.Stream):
            return self._stream(msg)
        if isinstance(msg, p.ScanBegin):
            return self._scan_begin(msg)
        if isinstance(msg, p.ScanRequest):
            return self._scan_request(msg)
        if isinstance(msg, p.ScanData):
            return self._scan_data(msg)
        if isinstance(msg, p.ScanEnd):
            return self._scan_end(msg)
        if isinstance(msg, p.ResyncPending):
            self.applier.sync()
            self.journal.store(replica_state.writes_lost(self.journal.header))
            self.resync_owned = True
            log.info("client %s: the ring lost writes; replica marked for resync", self.peer)
            return self.take_ack()
        if isinstance(msg, p.Goodbye):
            self.applier.sync()
            return p.encode(self.applier.ack())
        raise p.RemoteProtocolError(p.ErrorCode.UNEXPECTED, f"client sent {msg.TYPE.name}")

    # -- handshake -----------------------------------------------------------------------------------------------

    def _auth(self, msg: p.AuthBegin | p.AuthProof) -> bytes:
        assert self.auth is not None  # without a secret the Connection refuses AUTH_* (AUTH_FAILED)
        if isinstance(msg, p.AuthBegin):
            return self.conn.send(self.auth.on_begin(msg))
        ok = self.auth.on_proof(msg)
        log.info(
            "client %s authenticated (shared secret%s)", self.peer, ", TLS-bound" if self.auth.binding else ""
        )
        return self.conn.send(ok)

    def _hello(self, h: p.Hello) -> bytes:
        if h.device_size > self.replica.size:
            raise p.LocalProtocolError(
                p.ErrorCode.SIZE_MISMATCH,
                f"replica {self.replica.path} has {self.replica.size} bytes, smaller than the source "
                f"({h.device_size} bytes)",
            )
        if h.device_size < self.replica.size:
            log.warning(
                "replica is larger than the source (%d > %d bytes): only the first %d bytes are mirrored",
                self.replica.size,
                h.device_size,
                h.device_size,
            )
        self.hello = h
        jh = self.journal.header
        self.ids_match = replica_state.mirrors(jh, self._source())
        flags = replica_state.welcome_flags(jh, self.replica.known_zero)
        durable = self.applier.durable
        log.info(
            "client %s: source %s size %d, replica %s, durable seq %s%s",
            self.peer,
            h.source_id.hex()[:12],
            h.device_size,
            "same source" if self.ids_match else "different or unknown source",
            "none" if durable == p.NO_SEQ else durable,
            ", interrupted scan" if replica_state.resync_interrupted(jh) else "",
        )
        return self.conn.send(
            p.Welcome(
                p.PROTOCOL_VERSION,
                flags,
                h.features & p.ALL_FEATURES,
                self.replica.block_size,
                self.replica.size,
                jh.source_id,
                jh.ring_id,
                durable,
            )
        )

    def _source(self) -> replica_state.Source:
        """The source the client announced, and this replica's size."""
        assert self.hello is not None
        h = self.hello
        return replica_state.Source(h.source_id, h.ring_id, h.device_size, self.replica.size)

    def _adopt_source(self, new: replica_state.Header) -> None:
        """Store a transition that makes the replica mirror the client's source."""
        self.journal.store(new)
        self.ids_match = True

    def _stream(self, s: p.Stream) -> bytes | None:
        if s.flags & p.StreamFlag.ASSUME_IN_SYNC:
            log.warning(
                "client asserts the replica is in sync (--no-replication): streaming from seq %d", s.from_seq
            )
            self.applier.abort_staging()  # an unfinished journal resync is moot: the operator vouches for the replica
            self.applier.sync()
            self._adopt_source(replica_state.assumed_in_sync(self.journal.header, self._source(), s.from_seq))
            self.applier.restart_at(s.from_seq)
            return None
        jh = self.journal.header
        why = None
        if not self.ids_match:
            why = "the replica mirrors a different source or capture ring"
        elif replica_state.resync_interrupted(jh):
            why = "a resync was interrupted"
        elif self.applier.expect is None:
            why = "the replica has no resume point"
        elif seq_after(s.from_seq, self.applier.expect):
            why = f"records {self.applier.expect}..{s.from_seq - 1} would be missing"
        if why:
            raise p.LocalProtocolError(
                p.ErrorCode.RESUME_IMPOSSIBLE, f"cannot resume at seq {s.from_seq}: {why}"
            )
        log.info("client %s resumes streaming at seq %d", self.peer, s.from_seq)
        return None

    # -- scans -----------------------------------------------------------------------------------------------

    def _scan_begin(self, b: p.ScanBegin) -> bytes | None:
        assert self.hello is not None
        whole = bool(b.flags & p.ScanFlag.WHOLE_DEVICE)
        jh, h = self.journal.header, self.hello
        if replica_state.mirrors_another_source(jh, self._source()) and not (
            b.mode is p.ScanMode.FULL or b.flags & p.ScanFlag.DIRECT
        ):
            raise p.LocalProtocolError(
                p.ErrorCode.WRONG_SOURCE,
                f"replica {self.replica.path} mirrors another source ({jh.source_id.hex()[:12]}, "
                f"{jh.source_size} bytes), not this one ({h.source_id.hex()[:12]}, {h.device_size} bytes): "
                "refusing to turn it into a copy of this source; to replace it on purpose, start bdr_client "
                "with --full-scan or --full-replication",
            )
        interrupted = replica_state.resync_interrupted(self.journal.header) and not self.resync_owned
        if not whole and (not self.ids_match or interrupted):
            raise p.LocalProtocolError(
                p.ErrorCode.IDENTITY_MISMATCH,
                "a partial scan needs a replica of the same source with no interrupted resync; scan the whole device",
            )
        journaled = (
            b.mode is p.ScanMode.HASH and not b.flags & p.ScanFlag.DIRECT and self.applier.area is not None
        )
        self.applier.sync()  # everything streamed before the scan is durable before the resync starts
        if journaled:
            # the replica is not touched until the commit: it stays what it was (consistent if it was, and
            # if it mirrors this source); SCANNING makes an interrupted resync end in a new scan
            if whole or not self.applier.staging:
                self.applier.begin_staging()
            self.applier.commit_ready = False
            self._adopt_source(replica_state.staged_resync_begun(self.journal.header, self._source()))
        else:
            self.applier.abort_staging()
            self._adopt_source(replica_state.direct_resync_begun(self.journal.header, self._source()))
            log.warning(
                "scan %d writes the replica directly: the replica is inconsistent until it completes",
                b.scan_id,
            )
        self.scan = ScanState(b.scan_id, b.mode, b.block_size, started=time.monotonic())
        log.info(
            "scan %d started (%s, %s, %d-byte blocks, %s)",
            b.scan_id,
            b.mode.name.lower(),
            "whole device" if whole else "dirty regions",
            b.block_size,
            "staged in the journal" if journaled else "direct",
        )
        return b""

    def _check_scan(self, scan_id: int) -> ScanState:
        if self.scan is None or self.scan.scan_id != scan_id:
            raise p.RemoteProtocolError(p.ErrorCode.BAD_FIELD, f"scan id {scan_id} is not the running scan")
        return self.scan

    def _scan_request(self, r: p.ScanRequest) -> bytes:
        verify = r.scan_id == p.VERIFY_SCAN_ID and self.scan is None and self.conn.phase is p.Phase.STREAMING
        sc = None if verify else self._check_scan(r.scan_id)  # None: an online verify request (bdr verify)
        block_size = p.VERIFY_BLOCK_SIZE if sc is None else sc.block_size
        assert self.hello is not None
        if r.offset % block_size or r.offset + r.length > self.hello.device_size:
            raise p.RemoteProtocolError(
                p.ErrorCode.OUT_OF_RANGE, f"scan range [{r.offset}, +{r.length}) invalid"
            )
        if r.length > len(self._hash_buf):
            if r.length > 16 * scan.WINDOW:
                raise p.RemoteProtocolError(
                    p.ErrorCode.BAD_LENGTH, f"scan window of {r.length} bytes too large"
                )
            self._hash_buf = memoryview(bytearray(r.length))
        view = self._hash_buf[: r.length]
        self.replica.read(view, r.offset)
        if self.applier.staging:
            assert self.applier.area is not None
            self.applier.area.overlay(view, r.offset)  # hash what the replica will be after the commit
        digests = scan.hash_window(view, r.offset, block_size)
        if sc is None:
            self.verified += r.length
        else:
            sc.hashed += r.length
        return self.conn.send(p.ScanHashes(r.scan_id, r.offset, digests))

    def _scan_data(self, d: p.ScanData) -> bytes:
        sc = self._check_scan(d.scan_id)
        mv = memoryview(d.data)
        pos = 0
        area = self.applier.area if self.applier.staging else None
        for offset, length, bflags in d.blocks:
            if bflags & p.BlockFlag.ZERO:
                if area is not None:
                    area.stage_zeroes(offset, length)
                else:
                    self.replica.write_zeroes(offset, length)
            else:
                if area is not None:
                    area.stage_write(mv[pos : pos + length], offset)
                else:
                    self.replica.write(mv[pos : pos + length], offset)
                pos += length
            sc.blocks += 1
            sc.bytes += length
        return b""

    def _scan_end(self, e: p.ScanEnd) -> bytes:
        sc = self._check_scan(e.scan_id)
        if self.applier.staging:
            return self._scan_end_staged(sc, e)
        self.replica.sync()
        resume = e.resume_seq if e.flags & p.ScanEndFlag.HAS_RESUME_SEQ else None
        consistent_seq = e.consistent_seq if e.flags & p.ScanEndFlag.HAS_CONSISTENT_SEQ else None
        more = bool(e.flags & p.ScanEndFlag.MORE_TO_COME)
        self.journal.store(
            replica_state.direct_resync_ended(self.journal.header, resume, consistent_seq, more)
        )
        self.applier.restart_at(resume)
        took = time.monotonic() - sc.started
        log.info(
            "scan %d done in %.1fs: %d blocks (%d bytes) written, %d bytes hashed; ring records resume at %s",
            sc.scan_id,
            took,
            sc.blocks,
            sc.bytes,
            sc.hashed,
            "the next record" if resume is None else f"seq {resume}",
        )
        self.scan = None
        return self.conn.send(p.ScanDone(e.scan_id, sc.blocks, sc.bytes))

    def _scan_end_staged(self, sc: ScanState, e: p.ScanEnd) -> bytes:
        """The end of a journal scan: the blocks are staged; the ring records captured meanwhile follow (staged
        too) up to the consistent sequence number, then the whole resync is committed and applied."""
        assert self.applier.area is not None
        self.applier.area.sync()
        resume = e.resume_seq if e.flags & p.ScanEndFlag.HAS_RESUME_SEQ else None
        self.journal.store(replica_state.staged_scan_ended(self.journal.header, resume))
        self.applier.restart_at(resume)
        more = bool(e.flags & p.ScanEndFlag.MORE_TO_COME)
        self.applier.commit_at = e.consistent_seq if e.flags & p.ScanEndFlag.HAS_CONSISTENT_SEQ else None
        self.applier.commit_ready = not more
        if not more and self.applier.commit_at is None:
            self.applier.sync()  # nothing to wait for: commit and apply now
        took = time.monotonic() - sc.started
        log.info(
            "scan %d done in %.1fs: %d blocks (%d bytes) staged, %d bytes hashed; %s",
            sc.scan_id,
            took,
            sc.blocks,
            sc.bytes,
            sc.hashed,
            "another resync follows"
            if more
            else "committed and applied"
            if self.applier.commit_at is None
            else f"commit after seq {self.applier.commit_at}",
        )
        self.scan = None
        return self.conn.send(p.ScanDone(e.scan_id, sc.blocks, sc.bytes))

    def goodbye(self) -> bytes:
        """Our side closes the conversation cleanly (server shutdown): final ACK and GOODBYE."""
        try:
            self.applier.sync()
        except OSError as exc:
            raise self.storage_failed(exc) from exc
        if self.conn.phase in (p.Phase.HANDSHAKE, p.Phase.CLOSED):
            return b""
        return p.encode(self.applier.ack()) + self.conn.send(p.Goodbye(p.GoodbyeReason.SHUTDOWN))


# --------------------------------------------------------------------------------------------------------------
# Daemon
# --------------------------------------------------------------------------------------------------------------


PUBLISH_INTERVAL = 0.25  # seconds between status snapshots (bdr status, metrics)
STATES = ("listening", "replicating", "resyncing", "stopping", "failed")
# Prometheus metrics of the server: each is a value of the status snapshot (bdr.status)
METRICS = [
    status.Spec("applied_bytes_total", "counter", "write data applied to the replica", ("applied", "bytes")),
    status.Spec(
        "applied_records_total", "counter", "ring records applied to the replica", ("applied", "records")
    ),
    status.Spec(
        "syncs_total", "counter", "fdatasync calls of the replica (durability points)", ("applied", "syncs")
    ),
    status.Spec("applied_seq", "gauge", "last sequence number applied", ("applied_seq",)),
    status.Spec("durable_seq", "gauge", "last sequence number durable on the replica", ("durable_seq",)),
    status.Spec(
        "consistent",
        "gauge",
        "1 while the replica is a prefix-consistent copy of the source",
        ("consistent",),
    ),
    status.Spec("connected", "gauge", "1 while a client is connected", ("connected",)),
    status.Spec(
        "resync_hashed_bytes", "gauge", "replica bytes hashed by the running scan", ("resync", "hashed_bytes")
    ),
    status.Spec(
        "resync_received_bytes", "gauge", "bytes received by the running scan", ("resync", "received_bytes")
    ),
    status.Spec("connections_total", "counter", "client connections served", ("connections",)),
    status.Spec("errors_total", "counter", "connections that ended with an error", ("errors",)),
]


class Throttle:
    """One log line per ``interval`` seconds for an event that may come in a flood; the others are counted."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last = -1e9
        self._quiet = 0

    def due(self) -> int | None:
        """None: stay quiet; otherwise log now, with this many events kept quiet since the last line."""
        now = time.monotonic()
        if now - self._last < self.interval:
            self._quiet += 1
            return None
        quiet, self._last, self._quiet = self._quiet, now, 0
        return quiet


class Server:
    """Listens, serves one client at a time, turns SIGTERM / SIGINT into a clean stop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        # security first: a server that must not start touches neither the replica nor the journal
        self.tls_ctx, self.secret, self.binding = load_security(args)
        self.replica = Replica(args.target_device)
        try:
            self.journal = Journal(args.journal)
        except JournalError as exc:
            raise ServerError(str(exc)) from exc
        if os.path.samefile(args.journal, args.target_device):
            raise ServerError("the journal and the target device must be different")
        self.area = open_record_area(self.journal, self.replica, getattr(args, "journal_size", None))
        self.applier = Applier(self.replica, self.journal, self.area)
        self.stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.bench = BenchClock() if args.benchmark else None
        self.listener: socket.socket | None = None
        self.pipe: Pipe | None = None
        self.spliced_frames = 0
        self._no_splice = -1  # decoder frame number that goes the ordinary way
        self.failed: str | None = None  # the storage error the daemon stops on
        # what bdr status and the metrics show (bdr.status), published by the main loop
        self.board = status.Board()
        self.session: ServerSession | None = None
        self.connections = self.errors = 0
        self.last_error: str | None = None
        self._published = 0.0
        self.control: status.ControlSocket | None = None
        self.metrics: status.MetricsEndpoint | None = None
        self._busy_log = Throttle()  # a flood of connections does not flood the log
        # the gate: connections in their handshake by host, and those through it, waiting for the session slot
        self._gate_lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._full_log = Throttle()
        self._admitted: queue.SimpleQueue[tuple[socket.socket | tls.ServerTls, ServerSession, str, float]] = (
            queue.SimpleQueue()
        )
        if hasattr(os, "splice") and os.environ.get("BDR_NO_SPLICE") != "1":
            with contextlib.suppress(OSError):
                self.pipe = Pipe()

    # -- signals ----------------------------------------------------------------------------------------------

    def install_signals(self) -> None:
        def on_signal(signum: int, frame: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

    def _drain_wakeup(self) -> None:
        try:
            while self._wake_r.recv(512):
                pass
        except BlockingIOError:
            pass

    # -- status and metrics (bdr.status) ---------------------------------------------------------------------------

    def open_status(self) -> None:
        """The control socket (bdr status) and, with --metrics-address, the Prometheus endpoint."""
        assert self.listener is not None
        self.publish(force=True)
        port = self.listener.getsockname()[1]
        self.control = status.open_control(
            getattr(self.args, "status_socket", None), status.RUN_DIR / f"server-{port}.sock", self.board, {}
        )
        address = getattr(self.args, "metrics_address", None)
        if address:
            try:
                self.metrics = status.MetricsEndpoint(address, self.board, METRICS, STATES, "bdr_server")
            except (OSError, ValueError) as exc:
                raise ServerError(f"--metrics-address {address}: {exc}") from exc

    def publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._published < PUBLISH_INTERVAL:
            return
        self._published = now
        sess, ap, jh = self.session, self.applier, self.journal.header
        sc = sess.scan if sess is not None else None
        if self.failed is not None:
            state = "failed"
        elif self.stopping:
            state = "stopping"
        elif sess is None:
            state = "listening"
        elif sc is not None or ap.staging:
            state = "resyncing"
        else:
            state = "replicating"
        listen = self.listener.getsockname()[:2] if self.listener is not None else None
        self.board.publish(
            {
                "role": "server",
                "version": __version__,
                "pid": os.getpid(),
                "state": state,
                "listen": f"{listen[0]}:{listen[1]}" if listen else None,
                "peer": sess.peer if sess is not None else None,
                "connected": sess is not None,
                "replica": str(self.replica.path),
                "replica_bytes": self.replica.size,
                "journal": str(self.journal.path),
                "consistent": replica_state.is_consistent(jh),
                "applied_seq": None if ap.applied == p.NO_SEQ else ap.applied,
                "durable_seq": None if ap.durable == p.NO_SEQ else ap.durable,
                "applied": {"bytes": ap.stats.bytes, "records": ap.stats.records, "syncs": ap.stats.syncs},
                "resync": {
                    "active": sc is not None,
                    "hashed_bytes": sc.hashed if sc is not None else 0,
                    "received_bytes": sc.bytes if sc is not None else 0,
                },
                "verified_bytes": sess.verified if sess is not None else 0,
                "metrics_url": self.metrics.url if self.metrics is not None else None,
                "connections": self.connections,
                "errors": self.errors,
                "last_error": self.last_error,
            }
        )

    # -- main loop ----------------------------------------------------------------------------------------------

    def listen(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.args.address else socket.AF_INET
        try:
            self.listener = socket.create_server(
                (self.args.address, self.args.port), family=family, backlog=4
            )
        except OSError as exc:
            raise ServerError(
                f"cannot listen on {self.args.address}:{self.args.port}: {exc.strerror}"
            ) from exc
        self.listener.setblocking(False)
        return self.listener

    def run(self) -> int:
        lst = self.listener or self.listen()
        host, port = lst.getsockname()[:2]
        jh = self.journal.header
        log.warning(
            "bdr_server %s listening on %s:%d, replica %s (%d bytes), journal %s (%s, durable seq %s)",
            __version__,
            host,
            port,
            self.replica.path,
            self.replica.size,
            self.journal.path,
            "new" if self.journal.created or self.journal.fresh else "existing",
            "none" if self.applier.durable == p.NO_SEQ else self.applier.durable,
        )
        log.warning("security: %s", self.security_text())
        cond = replica_state.condition(jh)
        if cond is replica_state.Condition.IO_ERROR:
            log.warning(
                "the replica is inconsistent: the server stopped on an I/O error; the next client start "
                "rescans the whole device"
            )
        elif cond is replica_state.Condition.RESYNCING:
            log.warning(
                "the replica is inconsistent: a resync was interrupted; the next client start rescans"
            )
        poller = select.poll()
        poller.register(lst, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self.stopping:
            self.publish()
            for fd, _ in poller.poll(1000):
                if fd == self._wake_r.fileno():
                    self._drain_wakeup()
                elif fd == lst.fileno():
                    self._accept()
            for admitted in self._take_admitted():
                if self.stopping:  # through the gate as we stop
                    admitted[0].close()
                else:
                    self._serve(*admitted)
        for admitted in self._take_admitted():
            admitted[0].close()
        if self.failed is not None:
            log.error(
                "bdr_server stopped on a storage error (%s): fix the device, then start the server again; "
                "the replica is marked inconsistent and the next client start rescans the whole device",
                self.failed,
            )
            return EXIT_STORAGE
        self.applier.sync()
        self._report_bench(final=True)
        log.warning("bdr_server stopped (durable seq %s)", self._seq_text(self.applier.durable))
        return 0

    def security_text(self) -> str:
        parts = []
        if self.tls_ctx is not None:
            ca = self.args.tls_ca
            parts.append(
                f"TLS, client certificates checked against {ca}" if ca else "TLS without client certificates"
            )
        if self.secret is not None:
            parts.append("shared secret")
        if not parts:
            return "none (plaintext, unauthenticated)" + (", --insecure" if self.args.insecure else "")
        return " + ".join(parts)

    @staticmethod
    def _seq_text(seq: int) -> str:
        return "none" if seq == p.NO_SEQ else str(seq)

    # -- the gate: authentication before a connection may become the session -------------------------------------

    def _accept(self) -> None:
        """A new connection: authenticated on a thread of its own (bounded in number, in total and per host)."""
        assert self.listener is not None
        try:
            raw, addr = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:  # out of file descriptors or memory: retry later
            log.error("accept failed: %s", exc)
            time.sleep(0.1)
            return
        host, peer = addr[0], f"{addr[0]}:{addr[1]}"
        with self._gate_lock:
            total, mine = sum(self._pending.values()), self._pending.get(host, 0)
            full = total >= MAX_PENDING or mine >= MAX_PENDING_PER_HOST
            if not full:
                self._pending[host] = mine + 1
            elif (quiet := self._full_log.due()) is not None:
                log.warning(
                    "refusing connection from %s: %d connections already authenticating (%d from %s)%s",
                    peer,
                    total,
                    mine,
                    host,
                    f"; {quiet} more refused since the last report" if quiet else "",
                )
        if full:
            raw.close()
            return
        threading.Thread(
            target=self._gate, args=(raw, host, peer), name=f"bdr-gate-{peer}", daemon=True
        ).start()

    def handle(self, raw: socket.socket, peer: str) -> None:
        """One connection from start to end on the calling thread: the gate, then the session if it gets
        through (what the daemon does with each connection, without the listener)."""
        self._admit(raw, peer)
        for admitted in self._take_admitted():
            self._serve(*admitted)

    def _take_admitted(self) -> Iterator[tuple[socket.socket | tls.ServerTls, ServerSession, str, float]]:
        """The connections through the gate, waiting for the main loop, until there are none."""
        while True:
            try:
                yield self._admitted.get_nowait()
            except queue.Empty:
                return

    def _refused(self, peer: str, reason: str) -> None:
        """A connection the gate let not through: logged, and counted in the status (errors, last error)."""
        log.warning("client %s: %s", peer, reason)
        with self._gate_lock:
            self.errors += 1
            self.last_error = f"client {peer}: {reason}"

    def _gate(self, raw: socket.socket, host: str, peer: str) -> None:
        try:
            self._admit(raw, peer)
        finally:
            with self._gate_lock:
                self._pending[host] -= 1
                if not self._pending[host]:
                    del self._pending[host]

    def _admit(self, raw: socket.socket, peer: str) -> None:
        """TLS handshake and shared-secret proof within HANDSHAKE_TIMEOUT; then the connection waits for the
        main loop, which makes it the session or refuses it as busy."""
        try:
            log.warning("client %s connected", peer)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _keepalive(raw)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    raw.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT
            sock = self._secure(raw, peer, deadline)
            if sock is None:
                raw.close()
                return
            server_auth = auth.ServerAuth(self.secret, self.binding) if self.secret is not None else None
            sess = ServerSession(self.replica, self.journal, self.applier, peer, server_auth)
            if server_auth is not None and not self._authenticate(sock, sess, peer, deadline):
                return
            if self.session is not None:
                self._refuse_busy(sock, peer)
                return
            self._admitted.put((sock, sess, peer, deadline))
            with contextlib.suppress(OSError):
                self._wake_w.send(b"a")
        except Exception:  # a thread's death must not go unnoticed
            log.exception("client %s: unexpected error while authenticating", peer)
            raw.close()

    def _authenticate(
        self, sock: socket.socket | tls.ServerTls, sess: ServerSession, peer: str, deadline: float
    ) -> bool:
        """The shared-secret exchange (AUTH_BEGIN ... AUTH_OK); False when refused (logged, closed)."""
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        try:
            while sess.conn.phase is p.Phase.AUTH:
                left = deadline - time.monotonic()
                if left <= 0:
                    msg = f"no complete handshake within {HANDSHAKE_TIMEOUT:.0f}s"
                    raise SessionClosed(f"refused: {msg}", p.encode(p.Error(p.ErrorCode.UNEXPECTED, msg)))
                if self.stopping:
                    raise SessionClosed("server shutting down")
                if not tls.pending(sock) and not poller.poll(int(min(left, 0.2) * 1000) + 1):
                    continue
                sock.settimeout(max(left, 0.1))
                n = sock.recv_into(sess.conn.writable(65536))
                sess.conn.commit(n)
                if n == 0:
                    raise SessionClosed("connection lost: closed by the client during authentication")
                reply = sess.receive(authenticating=True)
                if reply:
                    sock.sendall(reply)
            return True
        except SessionClosed as exc:
            self._refused(peer, exc.reason)
            if exc.reply:
                with contextlib.suppress(OSError):
                    sock.settimeout(1.0)
                    sock.sendall(exc.reply)
                _close_gently(sock)
            else:
                sock.close()
        except (OSError, p.RemoteProtocolError) as exc:
            reason = tls.describe(exc) if isinstance(exc, ssl.SSLError) else str(exc)
            self._refused(peer, f"connection lost during authentication: {reason}")
            sock.close()
        return False

    def _refuse_busy(self, sock: socket.socket | tls.ServerTls, peer: str) -> None:
        """An authenticated client while another is served: ERROR BUSY, then the close."""
        current = self.session.peer if self.session is not None else "another client"
        with self._gate_lock:
            if (quiet := self._busy_log.due()) is not None:
                more = f" ({quiet} more refused since the last report)" if quiet else ""
                log.warning("refusing connection from %s: already serving %s%s", peer, current, more)
        with contextlib.suppress(OSError):
            sock.settimeout(1.0)
            sock.sendall(p.encode(p.Error(p.ErrorCode.BUSY, f"server already serves a client ({current})")))
        _close_gently(sock)

    def _refuse_admitted(self) -> None:
        """Connections through the gate while a session runs: refused as busy, each on a thread (the close
        lingers a moment)."""
        for sock, _, peer, _ in self._take_admitted():
            threading.Thread(target=self._refuse_busy, args=(sock, peer), daemon=True).start()

    def _serve(
        self, sock: socket.socket | tls.ServerTls, sess: ServerSession, peer: str, deadline: float
    ) -> None:
        """One session, from the HELLO (the gate has authenticated the client) to the close."""
        sock.settimeout(60.0)
        self.session = sess
        self.connections += 1
        self.publish(force=True)
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        assert self.listener is not None
        poller.register(self.listener, select.POLLIN)
        reason = "?"
        fatal = gentle = False
        clean = False  # the session ended as agreed (GOODBYE, or our shutdown)
        last_rx = time.monotonic()
        try:
            # frames that came in with the authentication (a HELLO sent right after it)
            reply = sess.receive()
            if reply:
                sock.sendall(reply)
            while True:
                self._refuse_admitted()
                if self.stopping:
                    reason = "server shutting down"
                    clean = True
                    sock.sendall(sess.goodbye())
                    break
                buffered = tls.pending(sock)  # decrypted bytes poll() cannot see
                events = poller.poll(0 if buffered else 1000)
                if buffered and not any(fd == sock.fileno() for fd, _ in events):
                    events.append((sock.fileno(), select.POLLIN))
                if not any(fd == sock.fileno() for fd, _ in events):
                    self._check_timeouts(sess, deadline, last_rx)
                self.publish()
                if not events:
                    self._report_bench()
                    continue
                for fd, _ in events:
                    if fd == self._wake_r.fileno():
                        self._drain_wakeup()
                    elif fd == self.listener.fileno():
                        self._accept()
                    elif fd == sock.fileno():
                        last_rx = time.monotonic()
                        if isinstance(sock, socket.socket) and self._splice(sess, sock):
                            continue
                        n = sock.recv_into(sess.conn.writable(1 << 20))
                        sess.conn.commit(n)
                        if n == 0:
                            raise SessionClosed(
                                "connection lost: client closed the connection without GOODBYE"
                            )
                        more = bool(tls.pending(sock) or select.select([sock], [], [], 0)[0])
                        reply = sess.receive(idle=not more)
                        if reply:
                            sock.sendall(reply)
                self._report_bench()
        except SessionClosed as exc:
            reason = exc.reason
            fatal = exc.fatal
            clean = exc.clean
            if exc.reply:
                with contextlib.suppress(OSError):
                    sock.sendall(exc.reply)
                gentle = not exc.clean  # a refusal: let the client read why before the connection goes
            level = logging.INFO if exc.clean else logging.ERROR if exc.fatal else logging.WARNING
            log.log(level, "client %s: %s", peer, reason)
        except p.RemoteProtocolError as exc:
            reason = f"connection lost: {exc.message}"
            log.warning("client %s: %s", peer, reason)
        except (ConnectionError, TimeoutError, OSError) as exc:
            reason = f"connection lost: {tls.describe(exc) if isinstance(exc, ssl.SSLError) else exc}"
            log.warning("client %s: %s", peer, reason)
        finally:
            if not fatal:
                try:
                    self.applier.sync()
                except OSError as exc:
                    sess.storage_failed(exc)
                    fatal = True
            if fatal:
                self.failed = reason
                self.stopping = True
            if not clean:
                self.errors += 1
                self.last_error = reason
            self.session = None
            self.publish(force=True)
            if gentle:
                _close_gently(sock, linger=1.0)
            else:
                sock.close()
            if self.pipe is not None:  # a frame cut short may have left bytes in it: never reuse them
                self.pipe.close()
                self.pipe = None
                with contextlib.suppress(OSError):
                    self.pipe = Pipe()
            log.warning(
                "client %s disconnected (%s); applied seq %s, durable seq %s",
                peer,
                reason,
                self._seq_text(self.applier.applied),
                self._seq_text(self.applier.durable),
            )

    @staticmethod
    def _check_timeouts(sess: ServerSession, deadline: float, last_rx: float) -> None:
        """Called when the client sent nothing: end a handshake that takes too long, or a frame left unfinished."""
        now = time.monotonic()
        if sess.conn.phase in (p.Phase.AUTH, p.Phase.HANDSHAKE) and now > deadline:
            msg = f"no complete handshake within {HANDSHAKE_TIMEOUT:.0f}s"
            raise SessionClosed(f"refused: {msg}", p.encode(p.Error(p.ErrorCode.UNEXPECTED, msg)))
        if sess.conn.decoder.buffered and now - last_rx > FRAME_TIMEOUT:
            msg = f"stalled in the middle of a frame: no data for {FRAME_TIMEOUT:.0f}s"
            raise SessionClosed(f"refused: {msg}", p.encode(p.Error(p.ErrorCode.TRUNCATED, msg)))

    def _secure(self, raw: socket.socket, peer: str, deadline: float) -> socket.socket | tls.ServerTls | None:
        """The TLS handshake of a new connection (the plain socket without TLS); None when refused (logged)."""
        if self.tls_ctx is None:
            return raw
        ssock: tls.ServerTls | None = None
        try:
            first = self._peek(raw, deadline)
            if first is None:
                log.warning("client %s: closed the connection before the TLS handshake", peer)
                return None
            if first[:1] != b"\x16":  # not a TLS handshake record
                if len(first) >= 5 and first[4] in (p.MsgType.HELLO, p.MsgType.AUTH_BEGIN):
                    msg = "this server requires TLS: give the client --tls-ca (and --tls-cert, --tls-key)"
                    with contextlib.suppress(OSError):
                        raw.settimeout(1.0)
                        raw.sendall(p.encode(p.Error(p.ErrorCode.AUTH_REQUIRED, msg)))
                self._refused(peer, "refused: a plaintext connection to a TLS server")
                _close_gently(raw)
                return None
            ssock = tls.ServerTls(raw, self.tls_ctx)
            ssock.handshake(max(0.0, deadline - time.monotonic()), lambda: self.stopping)
        except InterruptedError:
            return None
        except (OSError, ssl.SSLError) as exc:
            self._refused(peer, f"refused: TLS handshake failed: {tls.describe(exc)}")
            if ssock is not None and not isinstance(exc, TimeoutError):
                _close_gently(ssock)  # the TLS alert reaches the client before the close
            return None
        who = tls.peer_subject(ssock)
        log.info(
            "client %s: TLS %s, %s",
            peer,
            ssock.version(),
            f"client certificate {who!r}" if who else "no client certificate",
        )
        return ssock

    def _peek(self, raw: socket.socket, deadline: float) -> bytes | None:
        """The first bytes the client sends (left in the socket), None if it closes first."""
        poller = select.poll()
        poller.register(raw, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"nothing received within {HANDSHAKE_TIMEOUT:.0f}s")
            if self.stopping:
                raise InterruptedError("stopping")
            if poller.poll(int(min(left, 0.2) * 1000) + 1):
                data = raw.recv(8, socket.MSG_PEEK)
                return data or None

    def _splice(self, sess: ServerSession, sock: socket.socket) -> bool:
        """Large DATA frames: read only up to the end of the descriptors, then let the session splice the data
        section from the socket into the replica.  False: use the ordinary receive path."""
        if self.pipe is None or sess.conn.phase is not p.Phase.STREAMING or self.applier.staging:
            return False
        dec = sess.conn.decoder
        hdr = dec.peek_header()
        if hdr is None or hdr[0] != p.MsgType.DATA or not SPLICE_MIN <= hdr[2] <= dec.max_payload:
            return False
        prefix = dec.current_payload()
        if len(prefix) >= hdr[2]:
            return False  # the whole frame is buffered already
        need = p.data_head_size(prefix) or p.DATA_HEAD.size
        if need > hdr[2] or self._no_splice == dec.frames:
            return False  # malformed (the ordinary path rejects it), or received the ordinary way
        if len(prefix) < need:
            view = sess.conn.writable(need - len(prefix))
            n = sock.recv_into(view[: need - len(prefix)])
            sess.conn.commit(n)
            if n == 0:
                raise SessionClosed("connection lost: client closed the connection without GOODBYE")
            if len(prefix) + n < need or p.data_head_size(dec.current_payload()) != need:
                return True  # more to read (or the count just became known): come back
        if not _long_runs(p.record_fields(dec.current_payload()[p.DATA_HEAD.size : need])):
            self._no_splice = dec.frames  # small scattered writes: recv + pwrite beat two splices per run
            return False
        more = bool(select.select([sock], [], [], 0)[0])
        self.spliced_frames += 1
        reply = sess.receive_spliced(sock, self.pipe, idle=not more)
        if reply:
            sock.sendall(reply)
        return True

    def _report_bench(self, final: bool = False) -> None:
        if self.bench is None:
            return
        st = self.applier.stats
        line = self.bench.report(st.bytes, st.records, final)
        if line:
            print(
                f"bench server: {line} writes={st.writes} syncs={st.syncs} sync_s={st.sync_seconds:.3f} "
                f"skipped={st.skipped}",
                flush=True,
            )

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.listener is not None:
            self.listener.close()
        self.replica.close()
        self.area.close()
        self.journal.close()
        self._wake_r.close()
        self._wake_w.close()
        if self.pipe is not None:
            self.pipe.close()


def open_record_area(journal: Journal, replica: Replica, limit: int | None) -> RecordArea:
    """The journal's record area, after replaying a committed resync or discarding an uncommitted one."""
    try:
        fd = os.open(journal.path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ServerError(f"cannot open journal {journal.path}: {exc.strerror}") from exc
    if journal.is_block:
        size = os.lseek(fd, 0, os.SEEK_END)
        limit = size if limit is None else min(size, limit)
    try:
        area = RecordArea(fd, str(journal.path), limit)
        done = area.recover(replica, replica.size)
    except JournalError as exc:
        os.close(fd)
        raise ServerError(str(exc)) from exc
    if done:
        log.warning("journal %s: %s", journal.path, done)
    return area


def _long_runs(f: p.RecordFields, min_avg: int = 32 * 1024) -> bool:
    """Whether the writes of a batch coalesce into runs of ``min_avg`` bytes on average (worth splicing)."""
    s, ln, n = f.sectors, f.lens, len(f.sectors)
    if n and s[-1] - s[0] == sum(ln[:-1]) // p.SECTOR and f.ops.count(p.OP_WRITE) == n:
        return True  # the common sequential case, without a loop
    runs = 1 + sum(1 for i in range(1, n) if s[i] != s[i - 1] + (ln[i - 1] >> 9))
    return sum(ln) >= runs * min_avg


def is_loopback(address: str) -> bool:
    """Whether every address ``address`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(address, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    try:
        return bool(infos) and all(
            ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos
        )
    except ValueError:
        return False


def load_security(args: argparse.Namespace) -> tuple[ssl.SSLContext | None, bytes | None, bytes]:
    """The TLS context, the shared secret and the TLS channel binding from the flags; ServerError if they do
    not fit together or if the server would accept unauthenticated clients on a non-loopback address."""
    for name in ("tls_cert", "tls_key", "tls_ca", "secret_file", "insecure"):  # callers that build args
        if not hasattr(args, name):
            setattr(args, name, False if name == "insecure" else None)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ServerError("--tls-cert and --tls-key go together")
    if args.tls_ca and not args.tls_cert:
        raise ServerError("--tls-ca (check client certificates) needs TLS: give --tls-cert and --tls-key too")
    ctx = None
    binding = b""
    try:
        if args.tls_cert:
            ctx = tls.server_context(args.tls_cert, args.tls_key, args.tls_ca)
            binding = auth.server_end_point(tls.first_cert_der(args.tls_cert))
    except tls.TlsError as exc:
        raise ServerError(str(exc)) from exc
    secret = None
    if args.secret_file:
        try:
            secret, warning = auth.load_secret(args.secret_file)
        except auth.SecretError as exc:
            raise ServerError(str(exc)) from exc
        if warning:
            log.warning("%s", warning)
    authenticated = bool(args.tls_ca) or secret is not None
    if not authenticated and not is_loopback(args.address):
        if not args.insecure:
            raise ServerError(
                f"refusing to listen on {args.address} without client authentication: anyone who reaches this "
                "port could overwrite the replica. Give --tls-cert, --tls-key and --tls-ca (mutual TLS; "
                "'bdr certs' creates the files) and/or --secret-file (shared secret; 'bdr secret' creates one), "
                "or --insecure on a network you fully trust."
            )
        log.warning(
            "--insecure: accepting unauthenticated clients on %s; anyone who reaches this port can "
            "overwrite the replica",
            args.address,
        )
    if secret is not None and ctx is None and not is_loopback(args.address):
        log.warning(
            "shared secret without TLS: clients are authenticated, but the data crosses the network "
            "unencrypted and unprotected after the handshake (add --tls-cert/--tls-key)"
        )
    return ctx, secret, binding


def _close_gently(sock: socket.socket | tls.ServerTls, linger: float = 0.5) -> None:
    """Close a refused connection so that what we sent last (an ERROR, a TLS alert) reaches the peer: FIN
    first, then read what the peer still sends for a moment (closing with unread bytes would send a reset,
    and a reset can overtake the last bytes)."""
    raw = sock.raw if isinstance(sock, tls.ServerTls) else sock
    try:
        raw.shutdown(socket.SHUT_WR)
        raw.settimeout(linger)
        deadline = time.monotonic() + linger
        while time.monotonic() < deadline and raw.recv(65536):
            pass
    except OSError:
        pass
    finally:
        raw.close()


def _keepalive(sock: socket.socket) -> None:
    """Notice a dead peer within ~15 s even when no data flows."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 5)):
        opt = getattr(socket, name, None)
        if opt is not None:
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bdr_server",
        description="BDR server daemon: receives the writes captured on the source and applies them to a replica "
        "device, keeping the replica a crash-consistent copy of the source.",
        epilog="Exit status: 0 after a clean stop (SIGTERM / SIGINT), 2 for a usage or configuration error "
        "(including a refused insecure set-up), 4 after a replica or journal I/O error (the replica is marked "
        "inconsistent; fix the device, then start again).",
    )
    ap.add_argument("--address", required=True, help="IP address to listen on (required), e.g. 0.0.0.0 or ::")
    ap.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"TCP port to listen on (default {DEFAULT_PORT})"
    )
    ap.add_argument(
        "--target-device",
        required=True,
        help="replica: block device or image file the writes are applied to (required); it must be at least as "
        "large as the source",
    )
    ap.add_argument(
        "--journal",
        required=True,
        help="journal: block device or file holding the replica metadata (source identity, last durable "
        "sequence number, consistency); a missing file is created (required)",
    )
    ap.add_argument(
        "--journal-size",
        type=int,
        default=None,
        metavar="BYTES",
        help="largest size of a journal file (headers and the staged records of a resync; default: the file "
        "grows as needed; a journal device is as large as the device)",
    )
    ap.add_argument(
        "--no-print", action="store_true", help="disable standard output (errors still go to stderr)"
    )
    ap.add_argument(
        "--verbose", action="store_true", help="log connections, scans and resyncs, one line each"
    )
    ap.add_argument("--debug", action="store_true", help="log every frame and durability point (very chatty)")
    ap.add_argument(
        "--benchmark",
        action="store_true",
        help="print applied throughput, record rate and sync figures every second",
    )
    sec = ap.add_argument_group(
        "security",
        "A server on a non-loopback address must authenticate its clients: mutual TLS (--tls-cert, --tls-key, "
        "--tls-ca) and/or a shared secret (--secret-file); otherwise it refuses to start unless --insecure.",
    )
    sec.add_argument(
        "--tls-cert", metavar="FILE", help="TLS: this server's certificate (PEM, may hold the chain)"
    )
    sec.add_argument("--tls-key", metavar="FILE", help="TLS: the private key of --tls-cert (PEM)")
    sec.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="TLS: accept only clients whose certificate this CA issued (PEM; mutual TLS)",
    )
    sec.add_argument(
        "--secret-file",
        metavar="FILE",
        help="shared secret (at least 16 bytes; 'bdr secret FILE' makes one): clients must prove they know it "
        "and the server proves it too; the secret never crosses the network",
    )
    sec.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --address without client authentication (trusted, isolated networks only)",
    )
    ap.add_argument(
        "--status-socket",
        metavar="PATH",
        help=f"control socket for bdr status (default {status.RUN_DIR}/server-<port>.sock)",
    )
    ap.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (for example 127.0.0.1:9789)",
    )
    ap.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file with any of these options (keys are the long flag names); flags given here override it",
    )
    ap.add_argument("--version", action="version", version=f"bdr_server {__version__}")
    return ap


def main(argv: list[str] | None = None, ready: Callable[[Server], None] | None = None) -> int:
    args = config.parse_args(build_parser(), argv)
    setup_logging("bdr_server", args.verbose, args.debug, args.no_print)
    if not 0 < args.port < 65536:
        log.error("--port %d is not a TCP port", args.port)
        return 2
    try:
        server = Server(args)
    except ServerError as exc:
        log.error("%s", exc)
        return 2
    try:
        server.install_signals()  # before listening: whoever can connect can also stop us cleanly
        server.listen()
        server.open_status()
        if ready is not None:
            ready(server)
        return server.run()
    except ServerError as exc:
        log.error("%s", exc)
        return 2
    finally:
        server.close()


if __name__ == "__main__":
    sys.exit(main())
