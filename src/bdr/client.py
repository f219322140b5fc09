"""bdr_client: ships the writes captured in the ring to bdr_server, and resyncs with scans when it must.

* ``Client``: the daemon: source device, ring, signals, connect / reconnect with capped backoff.
* ``ClientSession``: one connection: handshake, then quick resume (STREAM) or a scan, then streaming.

Streaming sends batches of ring records as DATA frames with ``sendmsg`` over views of the ring mapping (frame
header + descriptor array + data runs; no copy of the data in Python).  A record's slot is released (ring
tail advanced) only when the server acknowledged it as durable, so after a disconnect or a server crash the
client resends from the server's last durable sequence number.  When the ring cannot provide what the server
needs (overflow, records already gone, a different source or ring, an interrupted scan) the client resyncs
with a scan instead of losing writes; records captured after the scan started are applied after the scan.

With ``--tls-ca`` the connection is TLS 1.3 (the server's certificate and name are verified, ``--tls-cert`` /
``--tls-key`` is our client certificate); with ``--secret-file`` the client and the server prove to each other
that they know the shared secret (``bdr.auth``) before HELLO.  A refused authentication is logged as an error
and retried slowly (``AUTH_BACKOFF``): the operator fixes one side, the client comes back by itself.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import errno
import fcntl
import functools
import logging
import mmap
import os
import select
import signal
import socket
import ssl
import stat
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from . import __version__, abi, auth, config, scan, status, tls
from . import protocol as p
from .log import BenchClock, setup_logging
from .oneshot import NoRing, oneshot_ring_identity
from .progress import Progress
from .ring import Batch, DirtyMap, RingConsumer, RingError
from .scan import pipeline
from .scan.verify import VerifyJob

log = logging.getLogger("bdr.client")

DEFAULT_PORT = 7788
BATCH_RECORDS = 2048  # records per DATA frame (8 MiB of 4 KiB writes)
IOV_MAX = 1024
CONNECT_TIMEOUT = 10.0  # a few SYN retransmissions on a lossy link
IO_TIMEOUT = 30.0
BACKOFF_MIN, BACKOFF_MAX = 0.25, 5.0
AUTH_BACKOFF = 30.0  # after a refused TLS handshake or authentication: a configuration problem, retry slowly
AUTH_CODES = frozenset({p.ErrorCode.AUTH_REQUIRED, p.ErrorCode.AUTH_FAILED})
DRAIN_SECONDS = 5.0
SCAN_INFLIGHT = 4  # SCAN_REQUEST windows in flight
BLKGETSIZE64 = 0x80081272
DISCARD_BLOCK = 512  # granularity of the check of a discarded range that does not read as zeros (a sector)
FATAL_CODES = frozenset({p.ErrorCode.SIZE_MISMATCH, p.ErrorCode.BAD_VERSION, p.ErrorCode.WRONG_SOURCE})

PUBLISH_INTERVAL = 0.25  # seconds between status snapshots (bdr status, metrics)
VERIFY_STEP_EVERY = 0.05  # while records wait to be sent, a verify window at most this often
STATES = ("connecting", "disconnected", "resyncing", "overflow", "replicating", "stopping")

EXIT_OK, EXIT_USAGE, EXIT_REFUSED, EXIT_SOURCE = 0, 2, 3, 4

# Prometheus metrics of the client: each is a value of the status snapshot (bdr.status)
METRICS = [
    status.Spec(
        "replicated_bytes_total", "counter", "write data sent to the server", ("replicated", "bytes")
    ),
    status.Spec(
        "replicated_records_total", "counter", "ring records sent to the server", ("replicated", "records")
    ),
    status.Spec(
        "lag_records", "gauge", "records captured but not yet durable on the replica", ("lag", "records")
    ),
    status.Spec(
        "lag_bytes", "gauge", "write data captured but not yet durable on the replica", ("lag", "bytes")
    ),
    status.Spec(
        "lag_seconds", "gauge", "age of the oldest record not yet durable on the replica", ("lag", "seconds")
    ),
    status.Spec("ring_used_slots", "gauge", "ring slots holding records", ("ring", "used")),
    status.Spec("ring_slots", "gauge", "ring size in slots", ("ring", "slots")),
    status.Spec(
        "durable_seq", "gauge", "last sequence number the server acknowledged durable", ("durable_seq",)
    ),
    status.Spec(
        "throughput_bytes_per_second", "gauge", "write data sent per second", ("throughput_bytes_per_s",)
    ),
    status.Spec("resync_done_bytes", "gauge", "bytes of the running scan done", ("resync", "done_bytes")),
    status.Spec("resync_total_bytes", "gauge", "bytes the running scan covers", ("resync", "total_bytes")),
    status.Spec("scans_total", "counter", "scans (resyncs) started", ("resync", "scans")),
    status.Spec(
        "resync_direct",
        "gauge",
        "1 while a resync writes the replica directly (inconsistent until it ends), e.g. the journal is too small",
        ("resync", "direct"),
    ),
    status.Spec(
        "dirty_regions", "gauge", "dirty regions taken from the ring, not yet resynced", ("dirty_regions",)
    ),
    status.Spec("connected", "gauge", "1 while connected to the server", ("connected",)),
    status.Spec("in_sync", "gauge", "1 while everything captured is durable on the replica", ("in_sync",)),
    status.Spec("reconnects_total", "counter", "connections to the server after the first", ("reconnects",)),
    status.Spec("errors_total", "counter", "connections that ended with an error", ("errors",)),
]


class ClientError(Exception):
    """A configuration problem the operator must fix: the daemon exits with a message."""


class Stopping(Exception):
    """SIGTERM / SIGINT arrived while waiting."""


class SourceError(Exception):
    """Reading the source device failed (a scan cannot complete)."""


# --------------------------------------------------------------------------------------------------------------
# Source and identities
# --------------------------------------------------------------------------------------------------------------


def device_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = bytearray(8)
        fcntl.ioctl(fd, BLKGETSIZE64, buf, True)
        return int(struct.unpack("<Q", buf)[0])
    return st.st_size


def source_identity(path: Path, size: int) -> bytes:
    """Stable identity of the source device: its path as given and its size."""
    return xxhash.xxh3_128_digest(
        b"bdr-source\0" + str(path.absolute()).encode() + size.to_bytes(8, "little")
    )


def ring_identity(ring: RingConsumer) -> bytes:
    """Identity of the capture ring whose sequence numbers we send (they restart with a new target).

    For the chardev: this boot, the ring's random instance number (a new target gets a new one, a table reload
    keeps it), the chardev name and the device size.  For a ring file: the file itself."""
    if ring.is_chardev:
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_bytes().strip()
        except OSError:
            boot = b""
        g = ring.geometry
        return xxhash.xxh3_128_digest(
            b"bdr-ring\0"
            + boot
            + b"\0"
            + g.instance.to_bytes(8, "little")
            + g.name.encode()
            + (g.dev_sectors or 0).to_bytes(8, "little")
        )
    st = os.stat(ring.path)
    return xxhash.xxh3_128_digest(
        b"bdr-ringfile\0"
        + str(ring.path.absolute()).encode()
        + st.st_dev.to_bytes(8, "little")
        + st.st_ino.to_bytes(8, "little")
    )


# --------------------------------------------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Inflight:
    end: int  # ring position after the batch
    last_seq: int
    durability_point: bool
    sent_at: float  # monotonic time the batch was handed to the socket


@dataclass(slots=True)
class ClientStats:
    records: int = 0
    bytes: int = 0
    frames: int = 0
    discarded: int = 0  # bytes of DISCARD records
    # sent -> acknowledged durable, per batch, since the last --benchmark line
    lag_sum: float = 0.0
    lag_n: int = 0
    lag_max: float = 0.0
    scans: list[scan.ScanStats] = field(default_factory=list)


class _Extents:
    """Byte extents merged for containment look-ups."""

    def __init__(self, extents: list[tuple[int, int]]) -> None:
        merged: list[list[int]] = []
        for off, n in sorted(extents):
            if merged and off <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], off + n)
            else:
                merged.append([off, off + n])
        self.starts = [a for a, _ in merged]
        self.ends = [e for _, e in merged]

    def covers(self, off: int, n: int) -> bool:
        i = bisect.bisect_right(self.starts, off) - 1
        return i >= 0 and self.ends[i] >= off + n


class ClientSession:
    """One connection to the server."""

    def __init__(self, client: Client, sock: socket.socket | tls.TlsStream, binding: bytes = b"") -> None:
        self.client = client
        self.ring = client.ring
        self.sock = sock
        secret = client.secret
        self.auth = auth.ClientAuth(secret, binding) if secret is not None else None
        self.conn = p.Connection(p.Role.CLIENT, auth=self.auth is not None)
        self.auth_reply: p.AuthChallenge | p.AuthOk | None = None
        self.rx_bytes = 0  # received so far: progress for wait_for
        self.welcome: p.Welcome | None = None
        self.sent = self.ring.tail  # ring position of the next record to send
        self.inflight: collections.deque[Inflight] = collections.deque()
        self.sync_pending: int | None = None  # seq a SYNC (or DATA+SYNC) asked to make durable
        self.server_applied = p.NO_SEQ
        self.server_durable = p.NO_SEQ
        self.acks = 0
        self.scan_replies: collections.deque[p.ScanHashes] = collections.deque()
        self.scan_done: p.ScanDone | None = None
        self.goodbye = False
        self.streaming = False  # handshake and start-up resync done
        self.in_sync = False  # everything captured is durable on the replica (logged once per transition)
        self._verify_t = 0.0
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._poll.register(client.wake_fd, select.POLLIN)
        self._ring_poll = select.poll()
        self._ring_poll.register(sock, select.POLLIN)
        self._ring_poll.register(client.wake_fd, select.POLLIN)
        if self.ring.is_chardev:
            self._ring_poll.register(self.ring.fileno(), select.POLLIN)

    # -- I/O ------------------------------------------------------------------------------------------------------

    def _sendv(self, views: list[memoryview | bytes]) -> None:
        """Send all views with sendmsg (gathered, no copies), handling partial sends."""
        bufs = [memoryview(v) if isinstance(v, bytes) else v for v in views]
        i = 0
        while i < len(bufs):
            try:
                n = self.sock.sendmsg(bufs[i : i + IOV_MAX])
            except (TimeoutError, BlockingIOError) as exc:
                raise p.ConnectionLost(f"server did not take data for {IO_TIMEOUT:.0f}s") from exc
            except OSError as exc:
                self._peer_error()  # the server may have said why before it closed
                raise p.ConnectionLost(f"send failed: {exc.strerror or exc}") from exc
            while n:
                ln = len(bufs[i])
                if n >= ln:
                    n -= ln
                    i += 1
                else:
                    bufs[i] = bufs[i][n:]
                    n = 0

    def _peer_error(self) -> None:
        """Raise the ERROR the server sent, if one is waiting (PeerError); otherwise return."""
        with contextlib.suppress(OSError, p.ConnectionLost, BlockingIOError):
            while True:
                n = self.sock.recv_into(self.conn.writable(65536), 0, socket.MSG_DONTWAIT)
                if n <= 0:
                    break
                self.conn.commit(n)
                with contextlib.suppress(p.LocalProtocolError):
                    self._events()

    def _send(self, data: bytes) -> None:
        self._sendv([data])

    def pump(self, wait: float = 0.0, ring_too: bool = False) -> None:
        """Process what the server sent; wait up to ``wait`` seconds for something (or the ring) first."""
        if wait > 0:
            if ring_too:
                self.ring.mark_seen(self.sent)  # wake for new records only, not for ones awaiting an ACK
            poller = self._ring_poll if ring_too else self._poll
            for fd, _ in poller.poll(int(wait * 1000)):
                if fd == self.client.wake_fd:
                    self.client.drain_wakeup()
        if self.client.stopping and not self.client.draining:
            raise Stopping()
        self.client.publish()
        while True:
            try:
                n = self.sock.recv_into(self.conn.writable(65536), 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                raise p.ConnectionLost(f"receive failed: {exc.strerror or exc}") from exc
            if n == 0:
                self.conn.commit(0)
                with contextlib.suppress(p.RemoteProtocolError):
                    self._events()
                if self.goodbye:
                    raise p.ConnectionLost("server closed the connection (shutdown)")
                raise p.ConnectionLost("server closed the connection")
            self.conn.commit(n)
            self.rx_bytes += n
            self._events()

    def _events(self) -> None:
        while True:
            ev = self.conn.next_event()
            if ev is p.NEED_DATA:
                return
            if isinstance(ev, p.Ack):
                self.on_ack(ev)
            elif isinstance(ev, p.Welcome):
                self.welcome = ev
            elif isinstance(ev, p.ScanHashes):
                self.scan_replies.append(ev)
            elif isinstance(ev, p.ScanDone):
                self.scan_done = ev
            elif isinstance(ev, p.Goodbye):
                self.goodbye = True
                log.warning("server is shutting down")
            elif isinstance(ev, p.AuthChallenge | p.AuthOk):
                self.auth_reply = ev

    def on_ack(self, ack: p.Ack) -> None:
        self.acks += 1
        self.server_applied, self.server_durable = ack.applied_seq, ack.durable_seq
        self.client.server_durable = ack.durable_seq
        durable = ack.durable_seq
        if durable == p.NO_SEQ:
            return
        release_to = None
        flushed = False
        now = time.monotonic()
        st = self.client.stats
        while self.inflight and self.inflight[0].last_seq <= durable:
            it = self.inflight.popleft()
            release_to = it.end
            flushed = flushed or it.durability_point
            lag = now - it.sent_at
            st.lag_sum += lag
            st.lag_n += 1
            st.lag_max = max(st.lag_max, lag)
        if release_to is not None:
            self.ring.release(release_to)
        if flushed:
            log.info("flush acknowledged: replica durable up to seq %d", durable)
        if self.sync_pending is not None and self.sync_pending <= durable:
            self.sync_pending = None
        log.debug("ack applied %d durable %d, ring tail %d", ack.applied_seq, durable, self.ring.tail)

    def _acks_above(self, n: int) -> bool:
        return self.acks > n

    def wait_for(self, what: str, cond: Callable[[], bool], timeout: float = IO_TIMEOUT) -> None:
        """Process the server's messages until ``cond()``.  ``timeout`` counts time without progress: on a slow,
        lossy link the answer may wait behind megabytes still queued in our send buffer, and a link that moves
        bytes (received, or ours leaving the queue) is not a dead server."""
        deadline = time.monotonic() + timeout
        mark = self._progress()
        while not cond():
            now = time.monotonic()
            if now > deadline:
                now_mark = self._progress()
                if now_mark == mark:
                    raise p.ConnectionLost(f"no {what} from the server within {timeout:.0f}s")
                mark, deadline = now_mark, now + timeout
            self.pump(wait=0.2)

    def _progress(self) -> tuple[int, int]:
        """(bytes received, bytes still queued in the kernel to send): any change is progress."""
        buf = bytearray(4)
        try:
            fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, buf, True)
        except OSError:
            return self.rx_bytes, -1
        return self.rx_bytes, int.from_bytes(buf, sys.byteorder)

    # -- handshake ------------------------------------------------------------------------------------------------

    def authenticate(self) -> None:
        """The shared-secret exchange (bdr.auth): our proof, then the server's, checked before HELLO."""
        assert self.auth is not None
        self._send(self.conn.send(self.auth.begin()))
        self.wait_for("AUTH_CHALLENGE", lambda: self.auth_reply is not None)
        assert isinstance(self.auth_reply, p.AuthChallenge)
        proof = self.auth.on_challenge(self.auth_reply)
        self.auth_reply = None
        self._send(self.conn.send(proof))
        self.wait_for("AUTH_OK", lambda: self.auth_reply is not None)
        assert isinstance(self.auth_reply, p.AuthOk)
        self.auth.on_ok(self.auth_reply)
        log.info("server %s authenticated (shared secret)", self.client.server_text)

    def handshake(self) -> p.Welcome:
        c = self.client
        if self.auth is not None:
            self.authenticate()
        self._send(
            self.conn.send(
                p.Hello(p.PROTOCOL_VERSION, p.ALL_FEATURES, 512, c.dev_size, c.source_id, c.ring_id)
            )
        )
        self.wait_for("WELCOME", lambda: self.welcome is not None)
        assert self.welcome is not None
        return self.welcome

    def start(self) -> None:
        """Handshake, then quick resume or resync, as the flags and the server's state allow."""
        c = self.client
        w = self.handshake()
        c.replica_consistent = bool(w.flags & p.WelcomeFlag.CONSISTENT)
        first = not c.started
        same = w.source_id == c.source_id and w.ring_id == c.ring_id
        resume = p.next_seq(w.durable_seq)
        log.info(
            "connected to %s: replica %d bytes, %s, durable seq %s%s",
            c.server_text,
            w.device_size,
            "same source" if same else "different or unknown source",
            "none" if w.durable_seq == p.NO_SEQ else w.durable_seq,
            ", interrupted resync" if w.flags & p.WelcomeFlag.SCANNING else "",
        )
        pos = None
        if same and w.flags & p.WelcomeFlag.SEQ_VALID and not w.flags & p.WelcomeFlag.SCANNING:
            pos = self.ring.find_seq(resume)
        c.started = True
        if first and c.args.full_replication:
            self.sent = self.ring.tail
            self.resync(p.ScanMode.FULL, [(0, c.dev_size)], whole=True, why="--full-replication")
        elif first and c.args.full_scan:
            self.sent = self.ring.tail
            self.resync(p.ScanMode.HASH, [(0, c.dev_size)], whole=True, why="--full-scan", direct=True)
        elif pos is not None and not c.force_scan:
            self._send(self.conn.send(p.Stream(resume)))
            self.sent = pos
            if pos > self.ring.tail:
                self.ring.release(pos)  # durable on the server already (acknowledged before a disconnect)
            log.info(
                "quick resume at seq %d (ring position %d, %d records to send)",
                resume,
                pos,
                self.ring.head() - pos,
            )
        elif first and c.args.no_replication:
            tail = self.ring.tail  # ours: it does not move while we read the sequence number there
            self._send(self.conn.send(p.Stream(self.ring.tail_seq(), p.StreamFlag.ASSUME_IN_SYNC)))
            self.sent = tail
            log.warning("--no-replication: no initial scan, the replica is assumed to equal the source")
        else:
            if not same:
                why = "the replica mirrors a different or unknown source"
            elif w.flags & p.WelcomeFlag.SCANNING:
                why = "a previous resync was interrupted"
            elif c.force_scan:
                why = "the server could not resume"
            else:
                why = f"the ring no longer holds seq {resume}"
            self.sent = self.ring.tail
            self.resync(p.ScanMode.HASH, [(0, c.dev_size)], whole=True, why=why)
        c.force_scan = False

    # -- streaming ------------------------------------------------------------------------------------------------

    def send_batch(self, b: Batch, sync: bool) -> None:
        self.in_sync = False
        self._check_discards(b)
        hdr = self.conn.send_data_header(b.count, b.data_len, sync)
        try:
            self._sendv([hdr, *b.desc, *b.data])
        finally:
            b.release()
        self.inflight.append(Inflight(b.end, b.last_seq, b.durability_point, time.monotonic()))
        self.sent = b.end
        if sync:
            self.sync_pending = b.last_seq
        st = self.client.stats
        st.records += b.count
        st.bytes += b.data_len
        st.frames += 1
        log.debug(
            "sent seq %d..%d (%d records, %d bytes)%s",
            b.first_seq,
            b.last_seq,
            b.count,
            b.data_len,
            " +sync" if sync else "",
        )

    def _check_discards(self, b: Batch) -> None:
        """A discard is a hint: the source may read zeros, its old data or anything there afterwards.  Read
        each discarded range back from the source (O_DIRECT, no network): zeros -- the DISCARD goes as is and
        the replica is zeroed; anything else -- the record goes flagged UNZEROED (the replica is left as it is)
        and the range is resynced by checksums after it, once the server has recorded that a resync is due."""
        c = self.client
        pos = b.start
        for k, dv in enumerate(b.desc):
            ops = dv.cast("H")[10::16].tolist()
            first, pos = pos, pos + len(ops)
            if p.OP_DISCARD not in ops:
                continue
            copy: bytearray | None = None
            q, i32 = dv.cast("Q"), dv.cast("I")
            for i, op in enumerate(ops):
                if op != p.OP_DISCARD:
                    continue
                off, ln = q[i * 4 + 1] * p.SECTOR, i32[i * 8 + 4]
                c.stats.discarded += ln
                nonzero = c.nonzero_blocks(off, ln)
                if nonzero:  # data written after the discard explains what it covers
                    later = _Extents(self.ring.written(first + i + 1, self.ring.head()))
                    nonzero = [(o, n) for o, n in nonzero if not later.covers(o, n)]
                if not nonzero:
                    continue
                if copy is None:
                    copy = bytearray(dv)
                copy[i * p.RECORD_SIZE + 22] |= p.REC_UNZEROED
                if not c.unzeroed:
                    acks = self.acks
                    self._send(self.conn.send(p.ResyncPending()))
                    self.wait_for("ACK of RESYNC_PENDING", functools.partial(self._acks_above, acks))
                c.unzeroed.append((off, ln))
                log.info("discard of [%d, +%d) left data on the source: that range is resynced", off, ln)
            if copy is not None:
                q.release()
                i32.release()
                dv.release()
                b.desc[k] = memoryview(copy)

    def stream(self) -> None:
        self.streaming = True
        ring = self.ring
        half = ring.geometry.nr_slots // 2
        while True:
            self.pump()
            if self.client.pending_dirty is None and ring.state() & (abi.State.OVERFLOW | abi.State.DIRTY):
                # first the server records on disk that a resync is due, only then is the bitmap ours
                acks = self.acks
                self._send(self.conn.send(p.ResyncPending()))
                self.wait_for("ACK of RESYNC_PENDING", functools.partial(self._acks_above, acks))
                self.client.pending_dirty = dm = ring.take_dirty()
                self.in_sync = False
                log.warning(
                    "ring %s: %d dirty regions (%d KiB each) to resync after ring position %d",
                    "overflowed" if dm.state & abi.State.OVERFLOW else "reported failed writes",
                    dm.nr_dirty,
                    dm.region_bytes // 1024,
                    dm.ring_head,
                )
            head = ring.head()
            pending = self.client.pending_dirty
            limit = head if pending is None else min(head, pending.ring_head)
            job = self.client.verify
            if (
                job is not None
                and pending is None
                and (self.sent >= limit or time.monotonic() - self._verify_t >= VERIFY_STEP_EVERY)
            ):
                self.verify_step(job)
                continue
            if self.sent < limit:
                b = ring.batch(self.sent, BATCH_RECORDS, head=limit)
                assert b is not None
                sync = self.sync_pending is None and b.end - ring.tail > half
                self.send_batch(b, sync)
                self.client.report_bench(self)
                continue
            if pending is not None:
                extents = pending.extents(self.client.dev_size)
                if extents:
                    self.resync(p.ScanMode.HASH, extents, whole=False, why="dirty regions")
                self.client.pending_dirty = None  # only now: a lost connection before this redoes the scan
                continue
            if self.client.unzeroed:
                extents = sorted(self.client.unzeroed)  # scan.windows aligns them and skips overlaps
                self.resync(
                    p.ScanMode.HASH,
                    extents,
                    whole=False,
                    why="discarded ranges the source does not read as zeros",
                )
                self.client.unzeroed = []
                continue
            if self.inflight and self.sync_pending is None:
                self._send(self.conn.send(p.Sync()))
                self.sync_pending = self.inflight[-1].last_seq
            if not self.inflight and ring.tail == head and not self.in_sync and not ring.state():
                self.in_sync = True
                log.info(
                    "in sync at ring position %d: the replica is durable up to seq %s",
                    head,
                    "none" if self.server_durable == p.NO_SEQ else self.server_durable,
                )
            self.client.report_bench(self)
            quiet = ring.is_chardev and not self.inflight and ring.tail == head
            self.pump(wait=0.5 if quiet else 0.002, ring_too=quiet)

    def drain(self) -> None:
        """Stop: send what the ring holds (for a few seconds at most), wait for it to be durable, say goodbye."""
        c = self.client
        c.draining = True
        deadline = time.monotonic() + DRAIN_SECONDS
        with contextlib.suppress(Stopping):
            if self.conn.phase is p.Phase.STREAMING:
                while self.client.pending_dirty is None and time.monotonic() < deadline:
                    b = self.ring.batch(self.sent, BATCH_RECORDS)
                    if b is None:
                        break
                    self.send_batch(b, sync=False)
                if self.inflight:
                    self._send(self.conn.send(p.Sync()))
                    last = self.inflight[-1].last_seq
                    while self.inflight and time.monotonic() < deadline:
                        self.pump(wait=0.05)
                    if self.inflight:
                        log.warning(
                            "stopping with records up to seq %d not confirmed durable (kept in the ring)",
                            last,
                        )
            if self.conn.phase not in (p.Phase.HANDSHAKE, p.Phase.CLOSED):
                self._send(self.conn.send(p.Goodbye(p.GoodbyeReason.SHUTDOWN)))
        left = self.ring.head() - self.sent
        log.warning(
            "stopped: server durable seq %s, %d records not yet sent remain in the ring",
            "none" if self.server_durable == p.NO_SEQ else self.server_durable,
            left,
        )

    # -- online verify (bdr verify) --------------------------------------------------------------------------------

    def verify_step(self, job: VerifyJob) -> None:
        """Compare one window (or one block to look at again) of source and replica; end the pass when done."""
        c = self.client
        self._verify_t = now = time.monotonic()
        if self.ring.state() & (abi.State.OVERFLOW | abi.State.DIRTY):
            c.end_verify(
                job, "the ring overflowed during the pass (the dirty regions are resynced now): run it again"
            )
            return
        item = job.next(now)
        if item is None:
            if job.finished:
                c.end_verify(job)
            return
        off, ln, look = item
        pos = self.sent  # the server hashes after applying every record before pos
        replica = _ReplicaHashes(self)
        for w in pipeline.run(
            [(off, ln)], self._read_source, c.scan_buf, job.block_size, replica, p.VERIFY_SCAN_ID
        ):
            diff = [(o, n) for o, n, _ in w.blocks]
            written = self.ring.written(pos, self.ring.head()) if diff else []
            job.record(off, ln, look, diff, written)

    # -- scans ----------------------------------------------------------------------------------------------------

    def resync(
        self, mode: p.ScanMode, extents: list[tuple[int, int]], whole: bool, why: str, direct: bool = False
    ) -> None:
        """Resync ``extents``; ring records from ``self.sent`` on are applied after the scan's blocks."""
        c = self.client
        self.in_sync = False
        if whole:
            c.pending_dirty = None  # a whole-device scan covers every dirty region
        c.scan_id += 1
        sid = c.scan_id
        start_pos = self.sent
        st = scan.ScanStats(mode="full" if mode is p.ScanMode.FULL else "hash", extents=extents)
        c.stats.scans.append(st)
        total = sum(ln for _, ln in extents)
        log.warning(
            "scan %d (%s) of %s (%d bytes): %s",
            sid,
            st.mode,
            "the whole device" if whole else f"{len(extents)} dirty extents",
            total,
            why,
        )
        t0 = time.monotonic()
        flags = p.ScanFlag.WHOLE_DEVICE if whole else p.ScanFlag.NONE
        if c.journal_full is not None and not direct:
            direct = True
            log.warning("scan %d writes the replica directly: the server's journal is too small for it", sid)
        if direct:
            flags |= p.ScanFlag.DIRECT  # --full-scan: the server writes the replica directly
        c.resync_direct = direct
        bs = c.scan_block
        self._send(self.conn.send(p.ScanBegin(sid, mode, flags, bs)))
        wins = list(scan.windows(extents, c.dev_size, bs))
        prog = Progress(f"scan {sid} ({st.mode})", sum(n for _, n in wins), log, quiet=bool(c.args.no_print))
        c.resync_progress = [0, prog.total]
        c.replica_consistent = False
        c.publish(force=True)
        known_zero = bool(self.welcome and self.welcome.flags & p.WelcomeFlag.KNOWN_ZERO)
        replica = _ReplicaHashes(self) if mode is p.ScanMode.HASH else None
        for w in pipeline.run(
            wins, self._read_source, c.scan_buf, bs, replica, sid, SCAN_INFLIGHT, known_zero
        ):
            st.add(w)
            prog.update(len(w.view))
            c.resync_progress[0] += len(w.view)
            if w.blocks:
                self._send_blocks(sid, w.view, w.offset, w.blocks, st)
            self.pump()
        prog.close()
        c.resync_progress = None
        c.resync_direct = False
        # ring records from start_pos on follow the scan; the replica is consistent again once the server has
        # applied them up to what the ring holds now (writes during the scan may be half-read by the scan)
        head = self.ring.head()
        eflags = p.ScanEndFlag.NONE
        resume = consistent = 0
        if head > start_pos:
            eflags |= p.ScanEndFlag.HAS_RESUME_SEQ | p.ScanEndFlag.HAS_CONSISTENT_SEQ
            resume, consistent = self.ring.seq_at(start_pos), self.ring.seq_at(head - 1)
        if self.ring.state() & (abi.State.OVERFLOW | abi.State.DIRTY):
            eflags |= p.ScanEndFlag.MORE_TO_COME
        self.scan_done = None
        self._send(self.conn.send(p.ScanEnd(sid, eflags, resume, consistent)))
        self.wait_for("SCAN_DONE", lambda: self.scan_done is not None, timeout=300)
        # consistent once the records captured during the scan are applied (the next ones, in order)
        c.replica_consistent = not eflags & p.ScanEndFlag.MORE_TO_COME
        if c.journal_full is not None and c.replica_consistent:
            log.warning("direct resync complete: the next resyncs are staged in the server's journal again")
            c.journal_full = None
        self.sent = start_pos
        # records before start_pos were applied and synced before SCAN_BEGIN or are covered by the scan: they
        # are durable now even when the server could not name a resume sequence number
        while self.inflight and self.inflight[0].end <= start_pos:
            self.inflight.popleft()
        self.sync_pending = None
        if start_pos > self.ring.tail:
            self.ring.release(start_pos)
        took = time.monotonic() - t0
        log.warning(
            "scan %d done in %.2fs: %d blocks compared, %d differed, %d sent with data (%d bytes), %d zero",
            sid,
            took,
            st.blocks,
            st.differing,
            st.sent_blocks,
            st.bytes_sent,
            st.zero_blocks,
        )

    def _read_source(self, view: memoryview, off: int) -> None:
        try:
            self.client.read_source(view, off)
        except OSError as exc:
            raise SourceError(
                f"cannot read source device {self.client.args.source_device} at byte {off} "
                f"(+{len(view)}): {exc.strerror or exc}"
            ) from exc

    def _send_blocks(
        self, sid: int, view: memoryview, off: int, blocks: list[tuple[int, int, int]], st: scan.ScanStats
    ) -> None:
        views: list[memoryview | bytes] = []
        data_len = 0
        for o, n, fl in blocks:
            if not fl & p.BlockFlag.ZERO:
                views.append(view[o - off : o - off + n])
                data_len += n
                st.sent_blocks += 1
        hdr = self.conn.send_scan_data_header(sid, blocks, data_len)
        self._sendv([hdr, *views])
        st.bytes_sent += data_len


class _ReplicaHashes:
    """SCAN_REQUEST / SCAN_HASHES over a session, for the scan window pipeline."""

    def __init__(self, sess: ClientSession) -> None:
        self.sess = sess

    def request(self, scan_id: int, offset: int, length: int) -> None:
        self.sess._send(self.sess.conn.send(p.ScanRequest(scan_id, offset, length)))

    def reply(self) -> p.ScanHashes:
        self.sess.wait_for("SCAN_HASHES", lambda: bool(self.sess.scan_replies))
        return self.sess.scan_replies.popleft()


# --------------------------------------------------------------------------------------------------------------
# Daemon
# --------------------------------------------------------------------------------------------------------------


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tls_ctx, self.secret = load_security(args)
        src = Path(args.source_device)
        try:
            self.source_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ClientError(f"cannot open source device {src}: {exc.strerror}") from exc
        self.dev_size = device_size(self.source_fd)
        try:  # discarded ranges are read back past the page cache, which may still hold what was there
            self.direct_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError:
            self.direct_fd = -1  # a file system without O_DIRECT (tmpfs): its page cache is the file
        self.direct_buf = mmap.mmap(-1, 1 << 20)  # page-aligned, for O_DIRECT
        # discarded ranges the source did not read as zeros: resynced by checksums (the server knows one is due)
        self.unzeroed: list[tuple[int, int]] = []
        if self.dev_size == 0 or self.dev_size % 512:
            raise ClientError(
                f"source device {src} has {self.dev_size} bytes, not a positive multiple of 512"
            )
        self.oneshot = args.control_device is None  # no capture ring: one scan-based sync, then exit
        if self.oneshot and args.no_replication:
            raise ClientError("--no-replication needs --control-device: a one-shot sync always scans")
        try:
            self.ring = (
                NoRing(src, self.dev_size)
                if self.oneshot
                else RingConsumer(args.control_device, dev_size=self.dev_size)
            )
        except RingError as exc:
            raise ClientError(str(exc)) from exc
        g = self.ring.geometry
        if g.dev_sectors is not None and g.dev_sectors * 512 != self.dev_size:
            raise ClientError(
                f"control device {args.control_device} captures a {g.dev_sectors * 512}-byte device, "
                f"but source device {src} has {self.dev_size} bytes: wrong pair?"
            )
        self.source_id = source_identity(src, self.dev_size)
        self.ring_id = oneshot_ring_identity(src, self.dev_size) if self.oneshot else ring_identity(self.ring)
        self.server_text = f"{args.address}:{args.port}"
        self.started = False  # first handshake done (the start-up flags apply to it only)
        # a dirty bitmap taken from the ring and not yet scanned: it outlives a lost connection
        self.pending_dirty: DirtyMap | None = None
        self.server_durable = p.NO_SEQ  # as last acknowledged, on any connection
        self.force_scan = False
        # the server's journal could not stage a resync (its message): with --journal-full direct, resyncs
        # write the replica directly until one has completed
        self.journal_full: str | None = None
        self.resync_direct = False  # the running scan writes the replica directly
        self.scan_id = 0
        self.scan_buf = memoryview(mmap.mmap(-1, scan.WINDOW))  # page-aligned, for O_DIRECT
        # scan block: the dirty-bitmap region with a ring; 4 KiB in one-shot mode (only changed pages travel)
        self.scan_block = scan.ONESHOT_BLOCK_SIZE if self.oneshot else scan.BLOCK_SIZE
        self.stopping = False
        self.draining = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.wake_fd = self._wake_r.fileno()
        self.stats = ClientStats()
        self.bench = BenchClock() if args.benchmark else None
        self._bench_t = 0.0
        # what bdr status and the metrics show (bdr.status), published by this loop
        self.board = status.Board()
        self.session: ClientSession | None = None
        self.reconnects = self.errors = 0
        self.resync_progress: list[int] | None = None  # [bytes done, bytes total] of the running scan
        self.replica_consistent: bool | None = None
        self.verify: VerifyJob | None = None
        self.last_verify: dict[str, object] | None = None
        self._verify_lock = threading.Lock()
        self._published = 0.0
        self._rate = (time.monotonic(), 0)
        self.throughput = 0.0
        self.lag_since: float | None = None
        self.control: status.ControlSocket | None = None
        self.metrics: status.MetricsEndpoint | None = None

    # -- status, metrics and verify requests (bdr.status) ----------------------------------------------------------

    def open_status(self) -> None:
        """The control socket (bdr status, bdr verify) and, with --metrics-address, the Prometheus endpoint."""
        self.publish(force=True)
        if not self.oneshot or self.args.status_socket:
            name = Path(self.args.control_device or self.args.source_device).name
            self.control = status.open_control(
                self.args.status_socket,
                status.RUN_DIR / f"client-{name}.sock",
                self.board,
                {"verify": self.request_verify},
            )
        if self.args.metrics_address:
            try:
                self.metrics = status.MetricsEndpoint(
                    self.args.metrics_address, self.board, METRICS, STATES, "bdr_client"
                )
            except (OSError, ValueError) as exc:
                raise ClientError(f"--metrics-address {self.args.metrics_address}: {exc}") from exc

    def state(self) -> str:
        sess = self.session
        if self.stopping:
            return "stopping"
        if sess is None:
            return "disconnected" if self.started else "connecting"
        if self.resync_progress is not None:
            return "resyncing"
        if not sess.streaming:
            return "connecting"
        if self.pending_dirty is not None or self.ring.state() & (abi.State.OVERFLOW | abi.State.DIRTY):
            return "overflow"
        return "replicating"

    def publish(self, force: bool = False) -> None:
        """Publish a new status snapshot, at most every PUBLISH_INTERVAL unless forced."""
        now = time.monotonic()
        if not force and now - self._published < PUBLISH_INTERVAL:
            return
        self._published = now
        ring, sess, st = self.ring, self.session, self.stats
        head, tail = ring.head(), ring.tail
        if head == tail:
            self.lag_since = None
        elif self.lag_since is None:
            self.lag_since = now
        t0, b0 = self._rate
        if now - t0 >= 1.0:
            self.throughput, self._rate = (st.bytes - b0) / (now - t0), (now, st.bytes)
        lag_bytes = ring.data_bytes(tail, head)
        kstate = ring.state()
        snap: dict[str, object] = {
            "role": "client",
            "version": __version__,
            "pid": os.getpid(),
            "state": self.state(),
            "in_sync": bool(sess is not None and sess.in_sync and head == tail),
            "connected": sess is not None,
            "server": self.server_text,
            "control_device": self.args.control_device,
            "source_device": self.args.source_device,
            "device_bytes": self.dev_size,
            "replica_consistent": self.replica_consistent,
            "ring": {
                "slots": ring.geometry.nr_slots,
                "used": head - tail,
                "head": head,
                "tail": tail,
                "unsent": head - (sess.sent if sess is not None else tail),
                "overflow": bool(kstate & abi.State.OVERFLOW),
            },
            "lag": {
                "records": head - tail,
                "bytes": lag_bytes,
                "seconds": round(now - self.lag_since, 3) if self.lag_since is not None else 0.0,
            },
            "durable_seq": None if self.server_durable == p.NO_SEQ else self.server_durable,
            "replicated": {
                "bytes": st.bytes,
                "records": st.records,
                "frames": st.frames,
                "discarded_bytes": st.discarded,
                "scan_bytes": sum(sc.bytes_sent for sc in st.scans),
            },
            "throughput_bytes_per_s": round(self.throughput, 1),
            "resync": {
                "active": self.resync_progress is not None,
                "done_bytes": self.resync_progress[0] if self.resync_progress else 0,
                "total_bytes": self.resync_progress[1] if self.resync_progress else 0,
                "scans": len(st.scans),
                "last_scan_bytes": sum(n for _, n in st.scans[-1].extents) if st.scans else 0,
                "differing_blocks": sum(sc.differing for sc in st.scans),
                "direct": self.resync_direct,
                "journal_full": self.journal_full,
            },
            "dirty_regions": self.pending_dirty.nr_dirty if self.pending_dirty is not None else 0,
            "metrics_url": self.metrics.url if self.metrics is not None else None,
            "reconnects": self.reconnects,
            "errors": self.errors,
            "verify": self.verify.progress() if self.verify is not None else None,
            "last_verify": self.last_verify,
        }
        self.board.publish(snap)

    def request_verify(self, progress: Callable[[dict[str, object]], None]) -> dict[str, object]:
        """bdr verify, in the control socket's thread: start a pass in the main loop and wait for its end."""
        with self._verify_lock:
            if self.verify is not None:
                return {"ok": False, "error": "a verify pass is already running"}
            sess = self.session
            if sess is None or not sess.streaming or self.resync_progress is not None:
                return {
                    "ok": False,
                    "error": f"the client is {self.state()}: verify needs a replicating client",
                }
            job = self.verify = VerifyJob(self.dev_size, p.VERIFY_BLOCK_SIZE)
        log.warning("verify: comparing all %d bytes of source and replica", self.dev_size)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"v")
        while not job.done.wait(1.0):
            progress(job.progress())
        return job.result()

    def end_verify(self, job: VerifyJob, error: str | None = None) -> None:
        res = job.result() | ({"ok": False, "error": error} if error else {})
        if error:
            log.error("verify failed: %s", error)
        elif job.mismatches:
            for off, ln in res["mismatch_ranges"]:
                log.error("verify: source and replica differ at byte %d (+%d)", off, ln)
        log.warning(
            "verify done in %.1fs: %d bytes compared, %d mismatching ranges, %d busy ranges not verified",
            res["seconds"],
            res["compared_bytes"],
            len(res["mismatch_ranges"]),
            len(res["busy_ranges"]),
        )
        with self._verify_lock:
            self.last_verify = res
            self.verify = None
        if error:
            job.fail(error)
        else:
            job.done.set()

    def install_signals(self) -> None:
        def on_signal(signum: int, frame: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

    def drain_wakeup(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(512):
                pass

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake up at once for a signal."""
        poller = select.poll()
        poller.register(self.wake_fd, select.POLLIN)
        if poller.poll(int(seconds * 1000)):
            self.drain_wakeup()

    def connect(self) -> tuple[socket.socket | tls.TlsStream, bytes]:
        """A connected socket (TLS handshake done when TLS is on) and the TLS channel binding (b"" without)."""
        sock = self._connect_tcp()
        if self.tls_ctx is None:
            return sock, b""
        name = self.args.tls_server_name or self.args.address
        try:
            ssock = self.tls_ctx.wrap_socket(sock, server_hostname=name, do_handshake_on_connect=False)
            tls.handshake(ssock, IO_TIMEOUT, lambda: self.stopping)
            cert = ssock.getpeercert(binary_form=True)
        except BaseException:
            sock.close()
            raise
        assert cert is not None
        log.info(
            "TLS %s with %s, server certificate %r verified", ssock.version(), name, tls.peer_subject(ssock)
        )
        return tls.TlsStream(ssock, IO_TIMEOUT), auth.server_end_point(cert)

    def _connect_tcp(self) -> socket.socket:
        sock = socket.create_connection((self.args.address, self.args.port), timeout=CONNECT_TIMEOUT)
        # blocking mode, so that MSG_DONTWAIT receives return at once; sends give up after IO_TIMEOUT
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(IO_TIMEOUT), 0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 5)):
            opt = getattr(socket, name, None)
            if opt is not None:
                sock.setsockopt(socket.IPPROTO_TCP, opt, value)
        return sock

    def run(self) -> int:
        log.warning(
            "bdr_client %s: source %s (%d bytes), ring %s (%d slots, %s), server %s",
            __version__,
            self.args.source_device,
            self.dev_size,
            self.args.control_device,
            self.ring.geometry.nr_slots,
            "chardev" if self.ring.is_chardev else "ring file",
            self.server_text,
        )
        backoff = BACKOFF_MIN
        while not self.stopping:
            try:
                sock, binding = self.connect()
            except InterruptedError:
                continue  # stopping
            except ssl.SSLError as exc:
                log.error(
                    "TLS handshake with %s failed: %s; retrying in %.0fs",
                    self.server_text,
                    tls.describe(exc),
                    AUTH_BACKOFF,
                )
                self.sleep(AUTH_BACKOFF)
                continue
            except OSError as exc:
                log.warning(
                    "server %s not reachable (%s); retrying in %.2fs",
                    self.server_text,
                    exc.strerror or exc,
                    backoff,
                )
                self.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            sess = ClientSession(self, sock, binding)
            if self.started:
                self.reconnects += 1
            self.session = sess
            self.publish(force=True)
            refused = False
            clean = False  # the session ended as we wanted (stop, one-shot done): not an error
            try:
                log.info("connected to %s", self.server_text)
                sess.start()
                backoff = BACKOFF_MIN
                if self.oneshot:
                    sess.drain()
                    log.warning("one-shot sync of %s done: the replica is identical", self.args.source_device)
                    clean = True
                    return EXIT_OK
                sess.stream()
            except Stopping:
                clean = True
                sess.drain()
            except SourceError as exc:
                log.error(
                    "%s: the scan cannot complete and the replica stays marked inconsistent; fix the source "
                    "device, then start bdr_client again",
                    exc,
                )
                with contextlib.suppress(OSError, p.ProtocolError):
                    sock.sendall(sess.conn.send(p.Error(p.ErrorCode.IO_ERROR, f"client: {exc}")))
                sock.close()
                return EXIT_SOURCE
            except p.PeerError as exc:
                if exc.code in AUTH_CODES:
                    refused = self._refused(f"server {self.server_text} refused us: {exc.message}")
                elif exc.code is p.ErrorCode.JOURNAL_FULL:
                    if self.args.journal_full == "stop":
                        log.error(
                            "server %s cannot stage this resync: %s; stopping (--journal-full stop)",
                            self.server_text,
                            exc.message,
                        )
                        sock.close()
                        return EXIT_REFUSED
                    self.journal_full = exc.message
                    log.error(
                        "server %s cannot stage this resync in its journal: %s. Resyncing with direct writes "
                        "(--journal-full direct): the replica is inconsistent until the scan completes",
                        self.server_text,
                        exc.message,
                    )
                    backoff = BACKOFF_MIN
                elif exc.code in FATAL_CODES:
                    log.error("server %s refused us: %s", self.server_text, exc.message)
                    sock.close()
                    return EXIT_REFUSED
                else:
                    if exc.code is p.ErrorCode.RESUME_IMPOSSIBLE:
                        self.force_scan = True
                    log.warning(
                        "server %s closed the session: %s; reconnecting in %.2fs",
                        self.server_text,
                        exc.message,
                        backoff,
                    )
            except p.ConnectionLost as exc:
                if isinstance(exc.__cause__, ssl.SSLError) and not sess.streaming:
                    # TLS 1.3: the server's verdict on our certificate arrives with its first reply
                    why = tls.describe(exc.__cause__)
                    refused = self._refused(f"TLS session with {self.server_text} refused: {why}")
                else:
                    log.warning(
                        "connection to %s lost: %s; reconnecting in %.2fs",
                        self.server_text,
                        exc.message,
                        backoff,
                    )
            except p.ProtocolError as exc:
                if exc.code in AUTH_CODES:
                    refused = self._refused(f"authentication of {self.server_text} failed: {exc.message}")
                else:
                    log.warning(
                        "protocol error with %s: %s; reconnecting in %.2fs", self.server_text, exc, backoff
                    )
                with contextlib.suppress(OSError, p.ProtocolError):
                    sock.sendall(p.encode(p.Error(exc.code, exc.message)))
            except OSError as exc:
                log.error("I/O error: %s; reconnecting in %.2fs", exc, backoff)
            finally:
                sock.close()
                self.session = None
                self.resync_progress = None
                if self.verify is not None:
                    self.end_verify(self.verify, "the connection to the server ended during the pass")
                self.errors += 0 if clean else 1
                self.publish(force=True)
            if not self.stopping:
                self.sleep(AUTH_BACKOFF if refused else backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        self.report_bench(None, final=True)
        return EXIT_OK

    def _refused(self, message: str) -> bool:
        """The server refused our credentials, or we refused the server's: an error for the operator."""
        log.error("%s; retrying in %.0fs", message, AUTH_BACKOFF)
        return True

    def read_source(self, view: memoryview, offset: int) -> None:
        """Read the source past the page cache: a file system mounted on the source writes file data to the
        device directly, so cached pages of the block device may be stale (O_DIRECT where the source allows it;
        an unaligned request falls back to a cached read)."""
        if self.direct_fd >= 0:
            try:
                scan.read_exact(self.direct_fd, view, offset)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        scan.read_exact(self.source_fd, view, offset)

    def nonzero_blocks(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The sectors of [offset, +length) where the source does not read zeros, as (offset, length).
        Read from the device, past the page cache."""
        buf = memoryview(self.direct_buf)
        end = offset + length
        out: list[tuple[int, int]] = []
        try:
            while offset < end:
                n = min(len(buf), end - offset)
                view = buf[:n]
                self.read_source(view, offset)
                if scan.digest(view) != scan.zero_digest(n):
                    for o in range(0, n, DISCARD_BLOCK):
                        k = min(DISCARD_BLOCK, n - o)
                        if scan.digest(view[o : o + k]) != scan.zero_digest(k):
                            out.append((offset + o, k))
                offset += n
        except OSError as exc:
            raise SourceError(
                f"cannot read source device {self.args.source_device} at byte {offset}: {exc.strerror or exc}"
            ) from exc
        finally:
            buf.release()
        return out

    def report_bench(self, sess: ClientSession | None, final: bool = False) -> None:
        if self.bench is None:
            return
        line = self.bench.report(self.stats.bytes, self.stats.records, final)
        if line:
            head = self.ring.head()
            lag = head - sess.sent if sess else 0
            unreleased = head - self.ring.tail
            st = self.stats
            avg_ms = st.lag_sum / st.lag_n * 1000 if st.lag_n else 0.0
            durable = "none" if self.server_durable == p.NO_SEQ else self.server_durable
            print(
                f"bench client: {line} frames={st.frames} lag_records={lag} unreleased_records={unreleased} "
                f"durable_lag_ms_avg={avg_ms:.1f} durable_lag_ms_max={st.lag_max * 1000:.1f} server_durable={durable}",
                flush=True,
            )
            st.lag_sum, st.lag_n, st.lag_max = 0.0, 0, 0.0

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        if self.metrics is not None:
            self.metrics.close()
        self.ring.close()
        os.close(self.source_fd)
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
        self._wake_r.close()
        self._wake_w.close()


def load_security(args: argparse.Namespace) -> tuple[ssl.SSLContext | None, bytes | None]:
    """The TLS context and the shared secret from the flags; ClientError if they do not fit together."""
    for name in (
        "tls_cert",
        "tls_key",
        "tls_ca",
        "tls_server_name",
        "secret_file",
    ):  # callers that build args
        if not hasattr(args, name):
            setattr(args, name, None)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ClientError("--tls-cert and --tls-key go together")
    if (args.tls_cert or args.tls_server_name) and not args.tls_ca:
        raise ClientError("TLS needs --tls-ca, the CA that issued the server's certificate")
    ctx = None
    try:
        if args.tls_ca:
            ctx = tls.client_context(args.tls_ca, args.tls_cert, args.tls_key)
    except tls.TlsError as exc:
        raise ClientError(str(exc)) from exc
    secret = None
    if args.secret_file:
        try:
            secret, warning = auth.load_secret(args.secret_file)
        except auth.SecretError as exc:
            raise ClientError(str(exc)) from exc
        if warning:
            log.warning("%s", warning)
    return ctx, secret


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bdr_client",
        description="BDR client daemon: ships every write captured by the bdr device-mapper target to bdr_server, "
        "so the replica stays a crash-consistent copy of the source.  At start it resumes where the server's "
        "replica is durable if the ring still holds those writes, otherwise it resyncs with a checksum scan.",
        epilog="Exit status: 0 after a clean stop (SIGTERM / SIGINT), 2 for a usage or configuration error, "
        "3 when the server refuses the source for good (replica too small, protocol version), 4 when the source "
        "device cannot be read during a scan.",
    )
    ap.add_argument("--address", required=True, help="server (receiver) IP address or host name (required)")
    ap.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"server TCP port (default {DEFAULT_PORT})"
    )
    ap.add_argument(
        "--control-device",
        default=None,
        help="BDR control character device /dev/<name> of the target; a ring file with the same layout is "
        "accepted too (tests, benchmarks).  Without it: one-shot mode, a scan-based sync of --source-device (any "
        "device or image file) that exits 0 once the replica is identical",
    )
    ap.add_argument(
        "--source-device",
        required=True,
        help="the BDR device-mapper device /dev/mapper/<name> (required); scans read it",
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument(
        "--full-scan",
        action="store_true",
        help="at start, compare every block of source and replica by checksum and send the differing ones "
        "directly to the replica (it is inconsistent until the scan ends)",
    )
    mode.add_argument(
        "--full-replication",
        action="store_true",
        help="at start, send the whole source device (initial seeding of a new replica)",
    )
    mode.add_argument(
        "--no-replication",
        action="store_true",
        help="at start, skip the initial scan and only stream new writes (the replica must already equal the source)",
    )
    ap.add_argument(
        "--journal-full",
        choices=("direct", "stop"),
        default="direct",
        help="when the server's journal is too small to stage a resync (the replica would stay the old "
        "consistent state until the commit): 'direct' (default) resyncs again writing the replica directly, so "
        "it converges but is inconsistent until the scan ends; 'stop' exits with status 3 and leaves the "
        "replica as it is",
    )
    ap.add_argument(
        "--no-print", action="store_true", help="disable standard output (errors still go to stderr)"
    )
    ap.add_argument(
        "--verbose", action="store_true", help="log connections, resumes, scans and flushes, one line each"
    )
    ap.add_argument("--debug", action="store_true", help="log every batch and acknowledgement (very chatty)")
    ap.add_argument(
        "--benchmark",
        action="store_true",
        help="print throughput, record rate and lag (records captured but not yet sent / not yet durable) every second",
    )
    sec = ap.add_argument_group(
        "security", "Use the same scheme as the server: mutual TLS and/or a shared secret (docs: Security)."
    )
    sec.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="TLS: connect with TLS and accept only a server certificate this CA issued (PEM)",
    )
    sec.add_argument("--tls-cert", metavar="FILE", help="TLS: our client certificate (PEM), for mutual TLS")
    sec.add_argument("--tls-key", metavar="FILE", help="TLS: the private key of --tls-cert (PEM)")
    sec.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="TLS: the name the server certificate must carry (default: --address)",
    )
    sec.add_argument(
        "--secret-file",
        metavar="FILE",
        help="shared secret, the same file as the server's: both sides prove they know it; it never crosses "
        "the network",
    )
    ap.add_argument(
        "--status-socket",
        metavar="PATH",
        help=f"control socket for bdr status and bdr verify (default {status.RUN_DIR}/client-<chardev>.sock)",
    )
    ap.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (for example 127.0.0.1:9788)",
    )
    ap.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file with any of these options (keys are the long flag names); flags given here override it",
    )
    ap.add_argument("--version", action="version", version=f"bdr_client {__version__}")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = config.parse_args(build_parser(), argv)
    setup_logging("bdr_client", args.verbose, args.debug, args.no_print)
    if not 0 < args.port < 65536:
        log.error("--port %d is not a TCP port", args.port)
        return EXIT_USAGE
    try:
        client = Client(args)
    except ClientError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    try:
        client.install_signals()
        client.open_status()
        return client.run()
    except ClientError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
