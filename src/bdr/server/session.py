"""One client connection as a protocol state machine: handshake checks, streaming, scans.  Bytes in, bytes
out; no sockets, so tests drive it in memory."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .. import replica_state, scan
from .. import wire as p
from ..generations import Decision, Generations, Verdict, decide
from ..journal import Journal, JournalFull, StorageError
from ..journal.marks import FailbackMarks
from ..security import auth
from ..seq import fmt_seq, seq_after
from .applier import Applier
from .errors import Refusal, SessionClosed
from .replica import Replica
from .staging import StagedResync

log = logging.getLogger("bdr.server")

ACK_EVERY = 32 << 20  # applied bytes after which an ACK goes out even while more input is waiting


@dataclass(slots=True)
class ScanState:
    scan_id: int
    mode: p.ScanMode
    block_size: int
    blocks: int = 0
    bytes: int = 0
    hashed: int = 0
    started: float = 0.0


@dataclass(slots=True)
class Generational:
    """What the last client's generations decided (shown by bdr status), and the operator's choice for a split
    brain; shared by the sessions of one server."""

    discard_local_changes: bool = (
        False  # bdr_server --discard-local-changes: this replica loses a split brain
    )
    peer: Generations | None = None
    decision: Decision | None = None


def welcome_history(gens: Generations | None, features: int) -> Generations | None:
    """The replica's generation history as a WELCOME to a client with ``features`` may carry it."""
    if gens is None or not features & p.Feature.GENERATIONS:
        return None
    return gens if features & p.Feature.WRITTEN else gens.bare()


class ServerSession:
    """The protocol state machine of one client connection on the server side."""

    def __init__(
        self,
        replica: Replica,
        journal: Journal,
        applier: Applier,
        peer: str = "memory",
        auth: auth.ServerAuth | None = None,
        generational: Generational | None = None,
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
        self.generational = generational if generational is not None else Generational()
        self.behind = False  # the generations say the replica is behind: it is resynced, never resumed
        self.replaces = False  # ... by a source its generations descend from: no WRONG_SOURCE refusal
        self.discarding = False  # this connection uses --discard-local-changes (spent once its resync begins)
        # ... but it holds the source's data as of the start of its generation: streaming all of it will do
        self.gen_start = False
        # ... except in the regions its meta device marked when it was demoted (offered in MARKS)
        self.marks: FailbackMarks | None = None
        self.ack_pending = False
        self.resync_owned = False  # SCANNING was set by this connection (RESYNC_PENDING), not inherited
        self.verified = 0  # bytes hashed for online verify requests (bdr verify)
        self.staged: StagedResync | None = None  # this connection's journal resync, until applied or dropped
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
            except (Refusal, p.LocalProtocolError) as exc:
                err = p.encode(p.Error(exc.code, exc.message))
                raise SessionClosed(f"refused: {exc.message}", b"".join(out) + err) from exc
            except StorageError as exc:
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

    def _refusal(self, exc: p.RemoteProtocolError) -> str:
        """Why the client's input was refused, in words for the log."""
        if exc.code in (p.ErrorCode.AUTH_FAILED, p.ErrorCode.AUTH_REQUIRED):
            return f"authentication failed: {exc.message}"
        start = self.conn.frame_start()
        if start is not None and start.number == 0 and start.length & 0xFFFF == 0x0316:  # 16 03: a TLS record
            return "the client speaks TLS, this server has no --tls-cert / --tls-key"
        return f"protocol error from client: {exc}"

    def storage_failed(self, exc: StorageError, reply: bytes = b"") -> SessionClosed:
        """The replica or the journal failed (``exc`` names which): mark the replica inconsistent on disk (the
        next client start rescans the whole device) and end the session with an IO_ERROR the daemon treats as
        fatal."""
        msg = exc.strerror or str(exc)
        if exc.role == "history":  # stopped before the write whose before-image could not be kept
            marked = f"the replica keeps its durable point, seq {fmt_seq(self.applier.durable)}"
        else:
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
            self._drop_staged()
            log.warning(
                "journal resync from %s dropped, the replica is untouched: %s (peak %d bytes staged)",
                self.peer,
                exc,
                exc.needed,
            )
            raise Refusal(
                p.ErrorCode.JOURNAL_FULL,
                f"{exc}. Give the server a larger --journal / --journal-size (the range a resync covers plus "
                "2 %), or resync with direct writes (bdr_client --journal-full direct, or --full-scan once: the "
                "replica is inconsistent until it completes)",
            ) from exc

    def _handle(self, msg: p.Message) -> bytes | None:
        match msg:
            case p.AuthBegin() | p.AuthProof():
                return self._auth(msg)
            case p.Data():
                self.applier.apply(msg)
            case p.Sync():
                self.applier.sync()
            case p.Hello():
                return self._hello(msg)
            case p.Stream():
                return self._stream(msg)
            case p.ScanBegin():
                return self._scan_begin(msg)
            case p.ScanRequest():
                return self._scan_request(msg)
            case p.ScanData():
                return self._scan_data(msg)
            case p.ScanEnd():
                return self._scan_end(msg)
            case p.ResyncPending():
                self.applier.sync()
                self.journal.store(replica_state.writes_lost(self.journal.header))
                self.resync_owned = True
                log.info("client %s: the ring lost writes; replica marked for resync", self.peer)
                return self.take_ack()
            case p.Goodbye():
                self.applier.sync()
                return p.encode(self.applier.ack())
            case _:
                raise p.RemoteProtocolError(p.ErrorCode.UNEXPECTED, f"client sent {msg.TYPE.name}")
        return None

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
        self._claim_applier()
        if h.device_size > self.replica.size:
            raise Refusal(
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
        self._decide(h, jh)
        jh = self.journal.header
        flags = replica_state.welcome_flags(jh, self.replica.known_zero)
        if self.behind:
            self.ids_match = False
            flags &= ~p.WelcomeFlag.SEQ_VALID  # no resume point: the client resyncs
        if self.gen_start:
            flags |= p.WelcomeFlag.AT_GENERATION_START
        if self._trackable(jh):
            flags |= p.WelcomeFlag.TRACKABLE
        self.marks = self._failback_marks(h, jh)
        if self.marks is not None:
            flags |= p.WelcomeFlag.MARKED
        durable = self.applier.durable
        log.info(
            "client %s: source %s size %d, replica %s, durable seq %s%s",
            self.peer,
            h.source_id.hex()[:12],
            h.device_size,
            "same source" if self.ids_match else "different or unknown source",
            fmt_seq(durable),
            ", interrupted scan" if replica_state.resync_interrupted(jh) else "",
        )
        welcome = self.conn.send(
            p.Welcome(
                p.PROTOCOL_VERSION,
                flags,
                h.features & p.ALL_FEATURES,
                self.replica.block_size,
                self.replica.size,
                jh.source_id,
                jh.ring_id,
                durable,
                welcome_history(jh.generations, h.features),
            )
        )
        if self.marks is None:
            return welcome
        m = self.marks
        return welcome + self.conn.send(p.Marks(m.generation, m.clear_ring, m.clear_pos, m.extents))

    def _failback_marks(self, h: p.Hello, jh: replica_state.Header) -> FailbackMarks | None:
        """The marks ``bdr demote`` kept, if they can bring this replica (the old source) up to the client's
        source: the generations say the client's source was promoted from this one's current generation, and
        nothing wrote the replica since it was demoted."""
        if not self.behind or self.gen_start or self.discarding or not h.features & p.Feature.MARKS:
            return None
        m = self.journal.load_marks()
        if m is None or jh.generations is None or m.generation != jh.generations.current:
            return None
        if h.generations is None or h.generations.ended_at(m.generation) is None:
            return None
        if m.dev_size != h.device_size or not replica_state.demoted_intact(jh):
            return None
        log.info(
            "client %s: offering the marks kept when this device was demoted: %d ranges, %d bytes it may have "
            "written after the client's source was promoted",
            self.peer,
            len(m.extents),
            m.marked_bytes,
        )
        return m

    def _decide(self, h: p.Hello, jh: replica_state.Header) -> None:
        """What the two generation histories allow (bdr.generations): refuse, resync, or go on."""
        g = self.generational
        d = decide(h.generations, jh.generations)
        g.peer, g.decision = h.generations, d
        v = d.verdict
        if v in (Verdict.SPLIT_BRAIN, Verdict.SOURCE_BEHIND):
            code = p.ErrorCode.SPLIT_BRAIN if v is Verdict.SPLIT_BRAIN else p.ErrorCode.SOURCE_BEHIND
            if not g.discard_local_changes:
                raise Refusal(code, d.text)
            log.warning(
                "client %s: %s; --discard-local-changes: this replica's changes are overwritten by a resync from "
                "the client's source",
                self.peer,
                d.text,
            )
            self.behind = True
            # the histories share a generation: the client's source replaces this replica's data (no WRONG_SOURCE)
            self.replaces = (
                h.generations is not None
                and jh.generations is not None
                and bool(h.generations.common(jh.generations))
            )
            self.discarding = True
        elif v is Verdict.LEGACY and jh.generations is not None and not self.ids_match:
            # a source without generations cannot say it descends from what this replica holds
            text = (
                f"the replica keeps a generation history ({jh.generations.describe()}) and the client's source "
                "keeps none: start bdr_client with its --metadata file, or, to overwrite this replica with this "
                "source anyway, restart bdr_server with --discard-local-changes"
            )
            if not g.discard_local_changes:
                raise Refusal(p.ErrorCode.SPLIT_BRAIN, text)
            log.warning("client %s: %s; --discard-local-changes given", self.peer, text)
            self.behind = self.discarding = True
        elif v is Verdict.REPLICA_BEHIND and self.ids_match and d.since_seq is not None:
            # the source only went on writing while disconnected, in the same capture ring: the ring (or a
            # resync) brings the replica forward from its resume point; it takes the new history once it does
            log.info("client %s: %s", self.peer, d.text.replace("is resynced", "follows from the ring"))
        elif v is Verdict.REPLICA_BEHIND and replica_state.at_generation_start(jh, h.generations):
            log.info(
                "client %s: %s; the replica holds the source's data as of the start of its generation (a "
                "switchover after a stop in sync): the writes since then are all it needs",
                self.peer,
                d.text.replace(" and is resynced", ""),
            )
            self.behind = self.gen_start = True
        elif v is Verdict.REPLICA_BEHIND:
            log.warning("client %s: %s", self.peer, d.text)
            self.behind = self.replaces = True
        elif v is Verdict.ADOPT:
            assert h.generations is not None
            log.info("client %s: %s", self.peer, d.text)
            if self.ids_match:
                self.journal.store(replica_state.generations_adopted(jh, h.generations))
        else:
            log.info("client %s: %s", self.peer, d.text)

    def _trackable(self, jh: replica_state.Header) -> bool:
        """A resync of only the regions the client's source tracked can bring this replica up to date: it is a
        consistent copy of that source device, and the generations say nothing else wrote it since."""
        d = self.generational.decision
        return (
            not self.discarding
            and d is not None
            and d.verdict in (Verdict.SAME, Verdict.REPLICA_BEHIND)
            and replica_state.trackable(jh, self._source())
        )

    # -- the staged resync ---------------------------------------------------------------------------------------

    def _claim_applier(self) -> None:
        """This connection is the session now: the applier reports its durability points here, and writes to
        the replica until this session stages a resync (an earlier connection's uncommitted resync is void)."""
        self.applier.at_durability_point = self._durability_point
        self.applier.stage_into(None)

    def _begin_staged(self) -> None:
        assert self.applier.area is not None
        if self.staged is not None:
            self.staged.superseded()
        self.staged = StagedResync(self.applier.area)
        self.applier.stage_into(self.staged.target)

    def _drop_staged(self) -> None:
        """Forget an uncommitted resync (the replica was not touched; the header still says SCANNING)."""
        if self.staged is not None:
            self.staged.discard()
            self.staged = None
            self.applier.stage_into(None)
        elif self.applier.area is not None and self.applier.area.is_open:
            self.applier.area.discard()  # left open by an earlier connection

    def _durability_point(self) -> bool:
        """At a durability point of the stream: commit and apply the staged resync if it is due (True)."""
        st, ap = self.staged, self.applier
        if st is None or not st.due(ap.applied if ap.expect is not None else None):
            return False
        st.sync()
        st.commit()
        self.journal.store(
            replica_state.staged_resync_committed(self.journal.header, ap.applied, ap.expect is not None)
        )
        hist = ap.history
        n = st.apply(ap.replica_target, hist.preserve_for_resync if hist is not None else None)
        if hist is not None:
            hist.resync(f"a journal resync rewrote {n - 1} ranges of the replica", ap.applied)
        ap.resync_applied()
        self.staged = None
        log.info("journal resync applied (%d records); replica consistent at seq %d", n, ap.applied)
        return True

    def _source(self) -> replica_state.Source:
        """The source the client announced, and this replica's size."""
        assert self.hello is not None
        h = self.hello
        return replica_state.Source(h.source_id, h.ring_id, h.device_size, self.replica.size, h.generations)

    def _adopt_source(self, new: replica_state.Header) -> None:
        """Store a transition that makes the replica mirror the client's source."""
        self.journal.store(new)
        self.ids_match = True
        if self.discarding and self.generational.discard_local_changes:
            # the operator's choice is made: the replica takes this source's history; a later split brain
            # (with any client) is refused again
            self.generational.discard_local_changes = False
            log.warning(
                "the replica now takes the data of client %s's source; --discard-local-changes is spent",
                self.peer,
            )

    def _stream(self, s: p.Stream) -> bytes | None:
        if s.flags & p.StreamFlag.FROM_GENERATION_START:
            if not self.gen_start:
                raise Refusal(
                    p.ErrorCode.RESUME_IMPOSSIBLE,
                    "the replica does not hold the source's data as of the start of its generation",
                )
            log.info(
                "client %s streams its generation from its first write, seq %d (no scan)",
                self.peer,
                s.from_seq,
            )
            self._drop_staged()
            self._adopt_source(replica_state.assumed_in_sync(self.journal.header, self._source(), s.from_seq))
            self.applier.restart_at(s.from_seq)
            self.behind = self.gen_start = False
            return None
        if s.flags & p.StreamFlag.ASSUME_IN_SYNC:
            log.warning(
                "client asserts the replica is in sync (--no-replication): streaming from seq %d", s.from_seq
            )
            self._drop_staged()  # an unfinished journal resync is moot: the operator vouches for the replica
            self.applier.sync()
            if self.applier.history is not None:
                self.applier.history.gap("the client asserted the replica is in sync (--no-replication)")
            self._adopt_source(replica_state.assumed_in_sync(self.journal.header, self._source(), s.from_seq))
            self.applier.restart_at(s.from_seq)
            return None
        jh = self.journal.header
        why = None
        if self.behind:
            why = "the generations say the replica is behind"
        elif not self.ids_match:
            why = "the replica mirrors a different source or capture ring"
        elif replica_state.resync_interrupted(jh):
            why = "a resync was interrupted"
        elif self.applier.expect is None:
            why = "the replica has no resume point"
        elif seq_after(s.from_seq, self.applier.expect):
            why = f"records {self.applier.expect}..{s.from_seq - 1} would be missing"
        if why:
            raise Refusal(p.ErrorCode.RESUME_IMPOSSIBLE, f"cannot resume at seq {s.from_seq}: {why}")
        log.info("client %s resumes streaming at seq %d", self.peer, s.from_seq)
        h = self.hello
        assert h is not None
        if h.generations is not None and jh.generations != h.generations:
            self.journal.store(replica_state.generations_adopted(jh, h.generations))
        return None

    # -- scans -----------------------------------------------------------------------------------------------

    def _scan_begin(self, b: p.ScanBegin) -> bytes | None:
        assert self.hello is not None
        whole = bool(b.flags & p.ScanFlag.WHOLE_DEVICE)
        jh, h = self.journal.header, self.hello
        if (
            replica_state.mirrors_another_source(jh, self._source())
            and not (b.mode is p.ScanMode.FULL or b.flags & p.ScanFlag.DIRECT)
            and not self.replaces  # the generations say this source's data replaces the replica's
        ):
            raise Refusal(
                p.ErrorCode.WRONG_SOURCE,
                f"replica {self.replica.path} mirrors another source ({jh.source_id.hex()[:12]}, "
                f"{jh.source_size} bytes), not this one ({h.source_id.hex()[:12]}, {h.device_size} bytes): "
                "refusing to turn it into a copy of this source; to replace it on purpose, start bdr_client "
                "with --full-scan or --full-replication",
            )
        tracked = bool(b.flags & p.ScanFlag.TRACKED)
        if tracked and (whole or b.mode is not p.ScanMode.HASH or b.flags & p.ScanFlag.DIRECT):
            raise p.RemoteProtocolError(
                p.ErrorCode.BAD_FIELD, "SCAN_BEGIN TRACKED is a journal hash scan of some regions"
            )
        if tracked and not self._trackable(jh):
            raise Refusal(
                p.ErrorCode.IDENTITY_MISMATCH,
                "a resync of the regions the source tracked needs a consistent replica of that source that "
                "nothing else wrote since; scan the whole device",
            )
        marked = bool(b.flags & p.ScanFlag.MARKED)
        if marked and (whole or tracked or b.mode is not p.ScanMode.HASH or b.flags & p.ScanFlag.DIRECT):
            raise p.RemoteProtocolError(
                p.ErrorCode.BAD_FIELD, "SCAN_BEGIN MARKED is a journal hash scan of some regions"
            )
        if marked and self.marks is None:
            raise Refusal(
                p.ErrorCode.IDENTITY_MISMATCH,
                "no marks were offered to this connection, or they were used; scan the whole device",
            )
        if marked:
            self.marks = None  # used once: the resync that begins here may change the replica
        interrupted = replica_state.resync_interrupted(self.journal.header) and not self.resync_owned
        if not whole and not tracked and not marked and (not self.ids_match or interrupted):
            raise Refusal(
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
            if whole or self.staged is None:
                self._begin_staged()
            else:
                self.staged.extend()  # dirty regions lost again before the commit join the same resync
            self._adopt_source(replica_state.staged_resync_begun(self.journal.header, self._source()))
        else:
            self._drop_staged()
            if self.applier.history is not None:
                self.applier.history.gap(f"scan {b.scan_id} writes the replica directly (without history)")
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
            "whole device"
            if whole
            else "tracked regions"
            if tracked
            else "marked regions"
            if marked
            else "dirty regions",
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
        if self.staged is not None:
            self.staged.overlay(view, r.offset)  # hash what the replica will be after the commit
        digests = scan.hash_window(view, block_size)
        if sc is None:
            self.verified += r.length
        else:
            sc.hashed += r.length
        return self.conn.send(p.ScanHashes(r.scan_id, r.offset, digests))

    def _scan_data(self, d: p.ScanData) -> bytes:
        sc = self._check_scan(d.scan_id)
        mv = memoryview(d.data)
        pos = 0
        staged = self.staged
        for offset, length, bflags in d.blocks:
            if bflags & p.BlockFlag.ZERO:
                if staged is not None:
                    staged.zeroes(offset, length)
                else:
                    self.replica.write_zeroes(offset, length)
            else:
                if staged is not None:
                    staged.write(mv[pos : pos + length], offset)
                else:
                    self.replica.write(mv[pos : pos + length], offset)
                pos += length
            sc.blocks += 1
            sc.bytes += length
        return b""

    def _scan_end(self, e: p.ScanEnd) -> bytes:
        sc = self._check_scan(e.scan_id)
        log.info(
            "scan %d ended after %.1fs: %d blocks (%d bytes) received; making them durable",
            sc.scan_id,
            time.monotonic() - sc.started,
            sc.blocks,
            sc.bytes,
        )
        if self.staged is not None:
            return self._scan_end_staged(sc, self.staged, e)
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

    def _scan_end_staged(self, sc: ScanState, staged: StagedResync, e: p.ScanEnd) -> bytes:
        """The end of a journal scan: the blocks are staged; the ring records captured meanwhile follow (staged
        too) up to the consistent sequence number, then the whole resync is committed and applied."""
        staged.sync()
        resume = e.resume_seq if e.flags & p.ScanEndFlag.HAS_RESUME_SEQ else None
        self.journal.store(replica_state.staged_scan_ended(self.journal.header, resume))
        self.applier.restart_at(resume)
        more = bool(e.flags & p.ScanEndFlag.MORE_TO_COME)
        staged.end(e.consistent_seq if e.flags & p.ScanEndFlag.HAS_CONSISTENT_SEQ else None, more)
        commit_at = staged.commit_at
        if not more and commit_at is None:
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
            if commit_at is None
            else f"commit after seq {commit_at}",
        )
        self.scan = None
        return self.conn.send(p.ScanDone(e.scan_id, sc.blocks, sc.bytes))

    def goodbye(self) -> bytes:
        """Our side closes the conversation cleanly (server shutdown): final ACK and GOODBYE."""
        try:
            self.applier.sync()
        except StorageError as exc:
            raise self.storage_failed(exc) from exc
        if self.conn.phase in (p.Phase.HANDSHAKE, p.Phase.CLOSED):
            return b""
        return p.encode(self.applier.ack()) + self.conn.send(p.Goodbye(p.GoodbyeReason.SHUTDOWN))
