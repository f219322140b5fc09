"""The bdr_server daemon: listening socket, one client at a time, signals as events on the poll loop, the
authentication gate, status and metrics."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import socket
import ssl
import time
from typing import TYPE_CHECKING

from .. import __version__, replica_state, status
from .. import wire as p
from ..daemon.sockets import close_gently
from ..daemon.wakeup import Wakeup
from ..generations import to_json
from ..journal import FaultPlan, JFlag, Journal, JournalError, RecordArea, StorageError
from ..journal.format import AreaState
from ..log import BenchClock
from ..security import tls
from ..seq import NO_SEQ, fmt_seq, seq_or_none
from .applier import Applier
from .errors import EXIT_STORAGE, ServerError, SessionClosed
from .gate import Gate
from .replica import Replica
from .runtime import Tally
from .security import load_security
from .session import Generational, ServerSession
from .splice import SpliceReceiver

if TYPE_CHECKING:
    from ..history import HistoryWriter

log = logging.getLogger("bdr.server")


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


PUBLISH_INTERVAL = 0.25  # seconds between status snapshots (bdr status, metrics)


class Server:
    """Listens, serves one client at a time, turns SIGTERM / SIGINT into a clean stop."""

    def __init__(self, args: argparse.Namespace, faults: FaultPlan | None = None) -> None:
        """``faults``: crash points of the journal resync (the crash tests), none by default."""
        self.args = args
        # security first: a server that must not start touches neither the replica nor the journal
        self.tls_ctx, self.secret, self.binding = load_security(args)
        self.replica = Replica(args.target_device)
        try:
            self.journal = Journal(args.journal, lock="bdr_server")
        except JournalError as exc:
            raise ServerError(str(exc)) from exc
        if self.journal.header.flags & JFlag.PROMOTED:
            gens = self.journal.header.generations
            raise ServerError(
                f"replica {args.target_device} was promoted to a source (bdr promote"
                f"{', ' + gens.describe() if gens is not None else ''}): no server serves it until "
                f"bdr demote --journal {args.journal}"
            )
        if os.path.samefile(args.journal, args.target_device):
            raise ServerError("the journal and the target device must be different")
        self.history = open_history(args, self.replica, self.journal)
        self.area = open_record_area(
            self.journal, self.replica, getattr(args, "journal_size", None), faults, self.history
        )
        self.applier = Applier(self.replica, self.journal, self.area)
        self.applier.history = self.history
        self.generational = Generational(getattr(args, "discard_local_changes", False))
        self.stopping = False
        self.wakeup = Wakeup()  # signals, and connections through the gate, interrupt the main loop's polls
        self.bench = BenchClock() if args.benchmark else None
        self.listener: socket.socket | None = None
        self.splicer = SpliceReceiver()
        self.failed: str | None = None  # the storage error the daemon stops on
        # what bdr status and the metrics show (bdr.status), published by the main loop
        self.board = status.Board()
        self.session: ServerSession | None = None
        self.tally = Tally()  # connections served, and those that ended with an error
        self._published = 0.0
        self.control: status.ControlSocket | None = None
        self.metrics: status.MetricsEndpoint | None = None
        self.gate = Gate(
            self.tls_ctx,
            self.secret,
            self.binding,
            lambda peer, server_auth: ServerSession(
                self.replica, self.journal, self.applier, peer, server_auth, self.generational
            ),
            lambda: self.session.peer if self.session is not None else None,
            lambda: self.stopping,
            self.wakeup.poke,
            self.tally,
            HANDSHAKE_TIMEOUT,
            MAX_PENDING,
            MAX_PENDING_PER_HOST,
        )

    # -- signals ----------------------------------------------------------------------------------------------

    def install_signals(self) -> None:
        self.wakeup.install_signals(self.stop)

    def stop(self) -> None:
        """Stop at the next turn of the main loop (SIGTERM, SIGINT)."""
        self.stopping = True

    @property
    def errors(self) -> int:
        """Connections that ended with an error (refusals by the gate included)."""
        return self.tally.errors

    @property
    def last_error(self) -> str | None:
        return self.tally.last_error

    @property
    def spliced_frames(self) -> int:
        """DATA frames received by the splice fast path."""
        return self.splicer.frames

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
                self.metrics = status.MetricsEndpoint(
                    address, self.board, status.SERVER_METRICS, status.SERVER_STATES, "bdr_server"
                )
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
        snap: status.ServerSnapshot = {
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
            "applied_seq": seq_or_none(ap.applied),
            "durable_seq": seq_or_none(ap.durable),
            "applied": {"bytes": ap.stats.bytes, "records": ap.stats.records, "syncs": ap.stats.syncs},
            "resync": {
                "active": sc is not None,
                "hashed_bytes": sc.hashed if sc is not None else 0,
                "received_bytes": sc.bytes if sc is not None else 0,
            },
            "verified_bytes": sess.verified if sess is not None else 0,
            "metrics_url": self.metrics.url if self.metrics is not None else None,
            "connections": self.tally.connections,
            "errors": self.tally.errors,
            "last_error": self.tally.last_error,
            "history": self.history.summary() if self.history is not None else None,
            "generations": to_json(jh.generations),
            "peer_generations": to_json(self.generational.peer),
            "generations_decision": d.text if (d := self.generational.decision) is not None else None,
            "split_brain": (
                {"source_written": d.split_written[0], "replica_written": d.split_written[1]}
                if d is not None and d.split_written is not None
                else None
            ),
        }
        self.board.publish(snap)

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
            fmt_seq(self.applier.durable),
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
        poller.register(self.wakeup.fd, select.POLLIN)
        while not self.stopping:
            self.publish()
            for fd, _ in poller.poll(1000):
                if fd == self.wakeup.fd:
                    self.wakeup.drain()
                elif fd == lst.fileno():
                    self.gate.accept(lst)
            for admitted in self.gate.take_admitted():
                if self.stopping:  # through the gate as we stop
                    admitted[0].close()
                else:
                    self.serve(*admitted)
        self.gate.close()
        if self.failed is not None:
            log.error(
                "bdr_server stopped on a storage error (%s): fix the device, then start the server again; "
                "the replica is marked inconsistent and the next client start rescans the whole device",
                self.failed,
            )
            return EXIT_STORAGE
        self.applier.sync()
        self._report_bench(final=True)
        log.warning("bdr_server stopped (durable seq %s)", fmt_seq(self.applier.durable))
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

    def serve(
        self, sock: socket.socket | tls.ServerTls, sess: ServerSession, peer: str, deadline: float
    ) -> None:
        """One session, from the HELLO (the gate has authenticated the client) to the close."""
        sock.settimeout(60.0)
        self.session = sess
        self.tally.connections += 1
        self.publish(force=True)
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(self.wakeup.fd, select.POLLIN)
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
                self.gate.refuse_admitted()
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
                    if fd == self.wakeup.fd:
                        self.wakeup.drain()
                    elif fd == self.listener.fileno():
                        self.gate.accept(self.listener)
                    elif fd == sock.fileno():
                        last_rx = time.monotonic()
                        if isinstance(sock, socket.socket) and self.splicer.receive(sess, sock):
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
                except StorageError as exc:
                    sess.storage_failed(exc)
                    fatal = True
            if fatal:
                self.failed = reason
                self.stopping = True
            if not clean:
                self.tally.failed(reason)
            self.session = None
            self.publish(force=True)
            if gentle:
                close_gently(sock, linger=1.0)
            else:
                sock.close()
            self.splicer.reset()  # a frame cut short may have left bytes in its pipe: never reuse them
            log.warning(
                "client %s disconnected (%s); applied seq %s, durable seq %s",
                peer,
                reason,
                fmt_seq(self.applier.applied),
                fmt_seq(self.applier.durable),
            )

    @staticmethod
    def _check_timeouts(sess: ServerSession, deadline: float, last_rx: float) -> None:
        """Called when the client sent nothing: end a handshake that takes too long, or a frame left unfinished."""
        now = time.monotonic()
        if sess.conn.phase in (p.Phase.AUTH, p.Phase.HANDSHAKE) and now > deadline:
            msg = f"no complete handshake within {HANDSHAKE_TIMEOUT:.0f}s"
            raise SessionClosed(f"refused: {msg}", p.encode(p.Error(p.ErrorCode.UNEXPECTED, msg)))
        if sess.conn.mid_frame and now - last_rx > FRAME_TIMEOUT:
            msg = f"stalled in the middle of a frame: no data for {FRAME_TIMEOUT:.0f}s"
            raise SessionClosed(f"refused: {msg}", p.encode(p.Error(p.ErrorCode.TRUNCATED, msg)))

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
        if self.history is not None:
            self.history.close()
        self.wakeup.close()
        self.splicer.close()


def open_history(args: argparse.Namespace, replica: Replica, journal: Journal) -> HistoryWriter | None:
    """With --history: the history of this replica, opened (a torn last record cut) and locked.  The journal
    header names the history that kept every write's before-image: another one, or none (the server ran
    without it), means writes it never saw -- a GAP.  Without --history, a history named there is let go."""
    directory = getattr(args, "history", None)
    if not directory:
        if getattr(args, "history_size", None) or getattr(args, "history_age", None):
            raise ServerError("--history-size and --history-age need --history DIR")
        if journal.header.history_id != bytes(16):
            log.warning(
                "no --history: the history kept so far stops here (it cannot give back any moment before the "
                "writes applied from now on)"
            )
            journal.store(replica_state.history_kept(journal.header, bytes(16)))
        return None
    from ..history import HistoryError, HistoryWriter, Meta  # only a server with --history needs it

    meta = Meta(os.path.abspath(replica.path), replica.size, os.path.abspath(journal.path))
    try:
        writer = HistoryWriter(directory, replica.fd, meta, args.history_size, args.history_age)
    except (HistoryError, OSError) as exc:
        raise ServerError(str(exc)) from exc
    if journal.header.history_id != writer.id:
        if replica_state.has_data(journal.header):
            writer.gap(
                "the replica may have been written while this history was not kept (its journal names another "
                "history, or none)"
            )
        journal.store(replica_state.history_kept(journal.header, writer.id))
    writer.start_reader()  # now rather than at the first batch, which would wait for it
    return writer


def open_record_area(
    journal: Journal,
    replica: Replica,
    limit: int | None,
    faults: FaultPlan | None = None,
    history: HistoryWriter | None = None,
) -> RecordArea:
    """The journal's record area, after replaying a committed resync or discarding an uncommitted one."""
    try:
        fd = os.open(journal.path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ServerError(f"cannot open journal {journal.path}: {exc.strerror}") from exc
    if journal.is_block:
        size = os.lseek(fd, 0, os.SEEK_END)
        limit = size if limit is None else min(size, limit)
    try:
        area = RecordArea(fd, str(journal.path), limit, faults)
        replay = area.state.state is AreaState.COMMITTED
        done = area.recover(
            replica, replica.size, history.preserve_for_resync if history is not None else None
        )
        if history is not None and replay:
            durable = replica_state.resume_point(journal.header)
            history.resync(
                "a committed journal resync was replayed at start", NO_SEQ if durable is None else durable
            )
    except JournalError as exc:
        os.close(fd)
        raise ServerError(str(exc)) from exc
    if done:
        log.warning("journal %s: %s", journal.path, done)
    return area
