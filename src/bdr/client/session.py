"""One connection of the client to the server: authentication and handshake, the start-up decision carried out
(``startup``), then streaming ring records as DATA frames, and a clean stop (drain, GOODBYE).

Streaming sends batches of ring records with ``sendmsg`` over views of the ring mapping (frame header +
descriptor array + data runs; no copy of the data in Python).  What was sent and not yet acknowledged durable is
``inflight``'s; the scans a session runs are ``scans``'; the check of discarded ranges is ``discards``'.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import select
import socket
import sys
import termios
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import wire as p
from ..daemon.errors import ConnectionLost
from ..kernel import abi
from ..kernel.ring import Batch, RingConsumer
from ..scan.verify import VerifyJob
from ..security import auth, tls
from ..seq import fmt_seq
from . import discards, scans, startup, tracking
from .errors import Stopping
from .inflight import InflightBatches
from .startup import Start
from .transport import IO_TIMEOUT

if TYPE_CHECKING:
    from .daemon import Client

log = logging.getLogger("bdr.client")

BATCH_RECORDS = 2048  # records per DATA frame (8 MiB of 4 KiB writes)
IOV_MAX = 1024
DRAIN_SECONDS = 5.0
VERIFY_STEP_EVERY = 0.05  # while records wait to be sent, a verify window at most this often


class ClientSession:
    """One connection to the server."""

    def __init__(self, client: Client, sock: socket.socket | tls.TlsStream, binding: bytes = b"") -> None:
        self.client = client
        self.replication = client.replication  # what outlives this connection (the daemon owns it)
        self.ring = client.ring
        self.sock = sock
        secret = client.secret
        self.auth = auth.ClientAuth(secret, binding) if secret is not None else None
        self.conn = p.Connection(p.Role.CLIENT, auth=self.auth is not None)
        self.auth_reply: p.AuthChallenge | p.AuthOk | None = None
        self.rx_bytes = 0  # received so far: progress for wait_for
        self.welcome: p.Welcome | None = None
        self.marks: p.Marks | None = None  # a demoted source's marks (after a WELCOME with MARKED)
        self.sent = self.ring.tail  # ring position of the next record to send
        self.inflight = InflightBatches(self.ring, client.stats)  # sent, not yet acknowledged durable
        self.scan_replies: collections.deque[p.ScanHashes] = collections.deque()
        self.scan_done: p.ScanDone | None = None
        self.goodbye = False
        self.streaming = False  # handshake and start-up resync done
        self.in_sync = False  # everything captured is durable on the replica (logged once per transition)
        self.verify_t = 0.0
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._poll.register(client.wakeup.fd, select.POLLIN)
        self._ring_poll = select.poll()
        self._ring_poll.register(sock, select.POLLIN)
        self._ring_poll.register(client.wakeup.fd, select.POLLIN)
        if self.ring.is_chardev:
            self._ring_poll.register(self.ring.fileno(), select.POLLIN)

    # -- I/O ------------------------------------------------------------------------------------------------------

    def sendv(self, views: list[memoryview | bytes]) -> None:
        """Send all views with sendmsg (gathered, no copies), handling partial sends."""
        bufs = [memoryview(v) if isinstance(v, bytes) else v for v in views]
        i = 0
        while i < len(bufs):
            try:
                n = self.sock.sendmsg(bufs[i : i + IOV_MAX])
            except (TimeoutError, BlockingIOError) as exc:
                raise ConnectionLost(f"server did not take data for {IO_TIMEOUT:.0f}s") from exc
            except OSError as exc:
                self._peer_error()  # the server may have said why before it closed
                raise ConnectionLost(f"send failed: {exc.strerror or exc}") from exc
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
        with contextlib.suppress(OSError, ConnectionLost, BlockingIOError):
            while True:
                n = self.sock.recv_into(self.conn.writable(65536), 0, socket.MSG_DONTWAIT)
                if n <= 0:
                    break
                self.conn.commit(n)
                with contextlib.suppress(p.LocalProtocolError):
                    self._events()

    def send(self, data: bytes) -> None:
        self.sendv([data])

    def pump(self, wait: float = 0.0, ring_too: bool = False) -> None:
        """Process what the server sent; wait up to ``wait`` seconds for something (or the ring) first."""
        if wait > 0:
            if ring_too:
                self.ring.mark_seen(self.sent)  # wake for new records only, not for ones awaiting an ACK
            poller = self._ring_poll if ring_too else self._poll
            for fd, _ in poller.poll(int(wait * 1000)):
                if fd == self.client.wakeup.fd:
                    self.client.wakeup.drain()
        if self.client.stopping and not self.client.draining:
            raise Stopping()
        self.client.publish()
        while True:
            try:
                n = self.sock.recv_into(self.conn.writable(65536), 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                raise ConnectionLost(f"receive failed: {exc.strerror or exc}") from exc
            if n == 0:
                self.conn.commit(0)
                with contextlib.suppress(p.RemoteProtocolError):
                    self._events()
                if self.goodbye:
                    raise ConnectionLost("server closed the connection (shutdown)")
                raise ConnectionLost("server closed the connection")
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
            elif isinstance(ev, p.Marks):
                self.marks = ev
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
        self.inflight.on_ack(ack)
        self.replication.server_durable = ack.durable_seq

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
                    raise ConnectionLost(f"no {what} from the server within {timeout:.0f}s")
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
        """The shared-secret exchange (bdr.security.auth): our proof, then the server's, checked before HELLO."""
        assert self.auth is not None
        self.send(self.conn.send(self.auth.begin()))
        self.wait_for("AUTH_CHALLENGE", lambda: self.auth_reply is not None)
        assert isinstance(self.auth_reply, p.AuthChallenge)
        proof = self.auth.on_challenge(self.auth_reply)
        self.auth_reply = None
        self.send(self.conn.send(proof))
        self.wait_for("AUTH_OK", lambda: self.auth_reply is not None)
        assert isinstance(self.auth_reply, p.AuthOk)
        self.auth.on_ok(self.auth_reply)
        log.info("server %s authenticated (shared secret)", self.client.server_text)

    def handshake(self) -> p.Welcome:
        c = self.client
        if self.auth is not None:
            self.authenticate()
        gens = c.generations
        counted = gens is not None and gens.written is not None and c.hello_counts
        if gens is not None and not counted:
            gens = gens.bare()
        self.send(
            self.conn.send(
                p.Hello(p.PROTOCOL_VERSION, p.ALL_FEATURES, 512, c.dev_size, c.source_id, c.ring_id, gens)
            )
        )
        try:
            self.wait_for("WELCOME", lambda: self.welcome is not None)
        except p.PeerError as exc:
            if counted and exc.code in (p.ErrorCode.BAD_LENGTH, p.ErrorCode.BAD_FIELD):
                # a bdr_server from before the written counts: the next HELLO carries the history without them
                c.hello_counts = False
                log.warning(
                    "server %s refused the generation history with written counts (%s): it predates them; "
                    "sending it without them from now on (upgrade bdr_server to see them at a split brain)",
                    c.server_text,
                    exc.message,
                )
            raise
        assert self.welcome is not None
        if self.welcome.flags & p.WelcomeFlag.MARKED:
            self.wait_for("MARKS", lambda: self.marks is not None)
        return self.welcome

    def start(self) -> None:
        """Handshake, then quick resume or resync, as the flags and the server's state allow (``startup``)."""
        c = self.client
        w = self.handshake()
        self.replication.replica_consistent = bool(w.flags & p.WelcomeFlag.CONSISTENT)
        first = not self.replication.started
        same = w.source_id == c.source_id and w.ring_id == c.ring_id
        log.info(
            "connected to %s: replica %d bytes, %s, durable seq %s%s",
            c.server_text,
            w.device_size,
            "same source" if same else "different or unknown source",
            fmt_seq(w.durable_seq),
            ", interrupted resync" if w.flags & p.WelcomeFlag.SCANNING else "",
        )
        if c.generations is not None:
            log.info(
                "source at %s; replica at %s",
                c.generations.describe(),
                "no generation yet" if w.generations is None else w.generations.describe(),
            )
        c.about_to_replicate()
        if (
            w.flags & p.WelcomeFlag.AT_GENERATION_START
            and c.meta is not None
            and c.meta.gen_ring == c.ring_id  # the ring created with this generation: it holds all of it
            and self.ring.tail == 0
            and not self.ring.state()
            and self.replication.pending_dirty is None
            and not c.start_flags.full_replication
            and not c.start_flags.full_scan
        ):
            # the replica holds our data as of the start of our generation, and the ring every write since
            seq0 = self.ring.tail_seq()
            self.replication.started = True
            self.send(self.conn.send(p.Stream(seq0, p.StreamFlag.FROM_GENERATION_START)))
            self.sent = self.ring.tail
            log.warning(
                "the replica holds this source's data as of the start of its generation: streaming every write "
                "since, from seq %d (%d records), no scan",
                seq0,
                self.ring.head() - self.ring.tail,
            )
            return
        if self.marks is not None and self._marked_start(self.marks, first):
            return
        if self.ring.state() & abi.State.RECOVERED and self._tracked_start(w, first):
            return
        pos = self.ring.find_seq(startup.resume_seq(w)) if startup.can_resume(w, same) else None
        self.replication.started = True
        d = startup.decide(w, same, pos is not None, first, c.start_flags, self.replication.force_scan)
        if d.start is Start.RESUME:
            assert pos is not None
            self.send(self.conn.send(p.Stream(d.resume_seq)))
            self.sent = pos
            if pos > self.ring.tail:
                self.ring.release(pos)  # durable on the server already (acknowledged before a disconnect)
            log.info(
                "quick resume at seq %d (ring position %d, %d records to send)",
                d.resume_seq,
                pos,
                self.ring.head() - pos,
            )
        elif d.start is Start.ASSUME_IN_SYNC:
            tail = self.ring.tail  # ours: it does not move while we read the sequence number there
            self.send(self.conn.send(p.Stream(self.ring.tail_seq(), p.StreamFlag.ASSUME_IN_SYNC)))
            self.sent = tail
            log.warning("--no-replication: no initial scan, the replica is assumed to equal the source")
        else:
            self.sent = self.ring.tail
            mode = p.ScanMode.FULL if d.start is Start.FULL_COPY else p.ScanMode.HASH
            direct = d.start is Start.FULL_SCAN  # --full-scan: the server writes the replica directly
            self.resync(mode, [(0, c.dev_size)], whole=True, why=d.why, direct=direct)
        self.replication.force_scan = False

    def _marked_start(self, marks: p.Marks, first: bool) -> bool:
        """The replica is a demoted old source, as it was when this source's generation began except in the
        regions its meta device marked: resync those, then stream every write of the generation from the ring,
        if the ring holds them all and the marks hold every write the old source made after that point."""
        c, ring = self.client, self.ring
        why = tracking.marks_refusal(marks, c.meta, c.ring_id)
        if why is None and (ring.tail != 0 or ring.state() or self.replication.pending_dirty is not None):
            why = "the capture ring no longer holds every write since the promotion"
        elif why is None and first and (c.start_flags.full_replication or c.start_flags.full_scan):
            why = "a start-up flag asks for another start"
        elif why is None and self.replication.journal_full is not None:
            why = "the server's journal is too small for a staged resync"
        n = sum(ln for _, ln in marks.extents)
        if why is not None:
            log.warning(
                "the replica (the old source) marks %d bytes it may have written after this source's promotion, "
                "but %s: not using them",
                n,
                why,
            )
            return False
        extents = [(o, min(ln, c.dev_size - o)) for o, ln in marks.extents if o < c.dev_size]
        self._resync_regions(
            extents,
            f"the replica (the old source) marks {len(extents)} ranges ({n} bytes) it may have written after "
            f"this source's promotion; the {ring.head()} writes since the promotion follow",
            marked=True,
        )
        return True

    def _resync_regions(
        self, extents: list[tuple[int, int]], why: str, tracked: bool = False, marked: bool = False
    ) -> None:
        """The start of a connection with a journal scan of some regions, then every record the ring holds."""
        self.replication.started = True
        self.replication.force_scan = False
        self.sent = self.ring.tail
        self.resync(p.ScanMode.HASH, extents, whole=False, why=why, tracked=tracked, marked=marked)

    def _tracked_start(self, w: p.Welcome, first: bool) -> bool:
        """The target loaded the marks of its meta_device (a source crash or reboot): take them (any scan covers
        them from now on), and resync only the marked regions if the replica allows it (``tracking``)."""
        c, ring = self.client, self.ring
        trk = ring.tracking()
        dm = ring.take_dirty()
        why = None
        if trk is None:
            why = "the target has no meta_device any more"
        elif first and (
            c.start_flags.full_replication or c.start_flags.full_scan or c.start_flags.no_replication
        ):
            why = "a start-up flag asks for another start"
        elif self.replication.journal_full is not None:
            why = "the server's journal is too small for a staged resync"
        else:
            why = tracking.refusal(w, trk, c.track_generations)
        if why is not None:
            log.warning(
                "the meta_device marks %d regions written since the replica was last in sync, but %s: not using them",
                dm.nr_dirty,
                why,
            )
            return False
        self._resync_regions(
            dm.extents(c.dev_size),
            f"the meta_device marks {dm.nr_dirty} regions written since the replica was last in sync",
            tracked=True,
        )
        return True

    # -- streaming ------------------------------------------------------------------------------------------------

    def send_batch(self, b: Batch, sync: bool) -> None:
        self.in_sync = False
        discards.check(self, b)
        hdr = self.conn.send_data_header(b.count, b.data_len, sync)
        try:
            self.sendv([hdr, *b.desc, *b.data])
        finally:
            b.release()
        self.inflight.sent(b, sync)
        self.sent = b.end
        self.client.stats.count_batch(b.count, b.data_len)
        log.debug(
            "sent seq %d..%d (%d records, %d bytes)%s",
            b.first_seq,
            b.last_seq,
            b.count,
            b.data_len,
            " +sync" if sync else "",
        )

    def stream(self) -> None:
        self.streaming = True
        ring = self.ring
        half = ring.geometry.nr_slots // 2
        while True:
            self.pump()
            if self.replication.pending_dirty is None and ring.state() & (
                abi.State.OVERFLOW | abi.State.DIRTY
            ):
                # first the server records on disk that a resync is due, only then is the bitmap ours
                self.resync_pending()
                self.replication.pending_dirty = dm = ring.take_dirty()
                self.in_sync = False
                log.warning(
                    "ring %s: %d dirty regions (%d KiB each) to resync after ring position %d",
                    "overflowed" if dm.state & abi.State.OVERFLOW else "reported failed writes",
                    dm.nr_dirty,
                    dm.region_bytes // 1024,
                    dm.ring_head,
                )
            head = ring.head()
            pending = self.replication.pending_dirty
            limit = head if pending is None else min(head, pending.ring_head)
            self._rotate_marks(ring)
            job = self.client.verify
            if (
                job is not None
                and pending is None
                and (self.sent >= limit or time.monotonic() - self.verify_t >= VERIFY_STEP_EVERY)
            ):
                self.verify_step(job)
                continue
            if self.sent < limit:
                b = ring.batch(self.sent, BATCH_RECORDS, head=limit)
                assert b is not None
                sync = self.inflight.sync_pending is None and b.end - ring.tail > half
                self.send_batch(b, sync)
                self.client.report_bench(self)
                continue
            if pending is not None:
                extents = pending.extents(self.client.dev_size)
                if extents:
                    self.resync(p.ScanMode.HASH, extents, whole=False, why="dirty regions")
                # only now: a lost connection before this redoes the scan
                self.replication.pending_dirty = None
                continue
            if self.replication.unzeroed:
                extents = sorted(self.replication.unzeroed)  # scan.windows aligns them and skips overlaps
                self.resync(
                    p.ScanMode.HASH,
                    extents,
                    whole=False,
                    why="discarded ranges the source does not read as zeros",
                )
                self.replication.unzeroed = []
                continue
            if self.inflight and self.inflight.sync_pending is None:
                self.send(self.conn.send(p.Sync()))
                self.inflight.sync_pending = self.inflight.last_seq
            if not self.inflight and ring.tail == head and not self.in_sync and not ring.state():
                self.in_sync = True
                log.info(
                    "in sync at ring position %d: the replica is durable up to seq %s",
                    head,
                    fmt_seq(self.inflight.durable),
                )
            if self.in_sync and self.client.tracker is not None:
                self.client.tracker.in_sync(head, self.client.generation_id())
            self.client.report_bench(self)
            quiet = ring.is_chardev and not self.inflight and ring.tail == head
            self.pump(wait=0.5 if quiet else 0.002, ring_too=quiet)

    def _rotate_marks(self, ring: RingConsumer) -> None:
        """While writes go on: the marks of the regions not written lately may go (tracking.Clearer.acked), if
        the replica is a consistent copy holding every record before the tail and no resync is due."""
        rs, tracker = self.replication, self.client.tracker
        if tracker is None or rs.pending_dirty is not None or rs.unzeroed or rs.force_scan:
            return
        if rs.replica_consistent and not ring.state():
            tracker.acked(ring.tail, self.client.generation_id())

    def drain(self) -> None:
        """Stop: send what the ring holds (for a few seconds at most), wait for it to be durable, say goodbye."""
        c = self.client
        c.draining = True
        deadline = time.monotonic() + DRAIN_SECONDS
        with contextlib.suppress(Stopping):
            if self.conn.phase is p.Phase.STREAMING:
                while self.replication.pending_dirty is None and time.monotonic() < deadline:
                    b = self.ring.batch(self.sent, BATCH_RECORDS)
                    if b is None:
                        break
                    self.send_batch(b, sync=False)
                if self.inflight:
                    self.send(self.conn.send(p.Sync()))
                    last = self.inflight.last_seq
                    while self.inflight and time.monotonic() < deadline:
                        self.pump(wait=0.05)
                    if self.inflight:
                        log.warning(
                            "stopping with records up to seq %d not confirmed durable (kept in the ring)",
                            last,
                        )
            if self.conn.phase not in (p.Phase.HANDSHAKE, p.Phase.CLOSED):
                self.send(self.conn.send(p.Goodbye(p.GoodbyeReason.SHUTDOWN)))
        left = self.ring.head() - self.sent
        log.warning(
            "stopped: server durable seq %s, %d records not yet sent remain in the ring",
            fmt_seq(self.inflight.durable),
            left,
        )

    def resync_pending(self) -> None:
        """Have the server record on disk that a resync is due (before the dirty bitmap is taken, or before a
        discarded range is left to a resync): RESYNC_PENDING, and its ACK."""
        acks = self.inflight.acks
        self.send(self.conn.send(p.ResyncPending()))
        self.wait_for("ACK of RESYNC_PENDING", lambda: self.inflight.acks > acks)

    # -- scans (bdr.client.scans) ----------------------------------------------------------------------------------

    def resync(
        self,
        mode: p.ScanMode,
        extents: list[tuple[int, int]],
        whole: bool,
        why: str,
        direct: bool = False,
        tracked: bool = False,
        marked: bool = False,
    ) -> None:
        """Resync ``extents``; ring records from ``self.sent`` on are applied after the scan's blocks."""
        scans.resync(self, mode, extents, whole, why, direct, tracked, marked)

    def verify_step(self, job: VerifyJob) -> None:
        scans.verify_step(self, job)
