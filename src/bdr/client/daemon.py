"""The bdr_client daemon: opens the source device and the ring, connects to the server and reconnects with
capped backoff, runs one ``ClientSession`` per connection, and tells each way a session ends apart (a stop, a
refusal, a lost connection, a source that cannot be read) for the operator and for its exit status.

With ``--tls-ca`` the connection is TLS 1.3 (the server's certificate and name are verified, ``--tls-cert`` /
``--tls-key`` is our client certificate); with ``--secret-file`` the client and the server prove to each other
that they know the shared secret (``bdr.security.auth``) before HELLO.  A refused authentication is logged as an error
and retried slowly (``AUTH_BACKOFF``): the operator fixes one side, the client comes back by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

from .. import __version__, config
from .. import wire as p
from ..daemon.errors import ConnectionLost
from ..daemon.wakeup import Wakeup
from ..generations import UNKNOWN, Generations
from ..kernel.layout import RingError
from ..kernel.ring import RingConsumer
from ..log import BenchClock, setup_logging
from ..scan.verify import VerifyJob
from ..security import tls
from ..seq import NO_SEQ, fmt_seq, prev_seq
from . import startup, tracking, transport
from . import status as client_status
from .errors import EXIT_OK, EXIT_REFUSED, EXIT_SOURCE, EXIT_USAGE, ClientError, SourceError, Stopping
from .identity import ring_identity, source_identity
from .metadata import (
    MetadataError,
    MetaFlag,
    SourceMeta,
    WrittenCount,
    load_or_create,
    read_metadata,
    write_metadata,
)
from .oneshot import NoRing, oneshot_ring_identity
from .options import build_parser, load_security
from .session import ClientSession
from .source import Source
from .state import ReplicationState
from .stats import ClientStats
from .status import ClientStatus

log = logging.getLogger("bdr.client")

BACKOFF_MIN, BACKOFF_MAX = 0.25, 5.0
AUTH_BACKOFF = 30.0  # after a refused TLS handshake or authentication: a configuration problem, retry slowly
AUTH_CODES = frozenset({p.ErrorCode.AUTH_REQUIRED, p.ErrorCode.AUTH_FAILED})
FATAL_CODES = frozenset(
    {
        p.ErrorCode.SIZE_MISMATCH,
        p.ErrorCode.BAD_VERSION,
        p.ErrorCode.WRONG_SOURCE,
        p.ErrorCode.SPLIT_BRAIN,
        p.ErrorCode.SOURCE_BEHIND,
    }
)


class Client:
    """The daemon: source device, ring, signals, the status it reports, connect / reconnect with capped backoff;
    each connection is a ClientSession."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tls_ctx, self.secret = load_security(args)
        self.source = Source(args.source_device)
        src, self.dev_size = self.source.path, self.source.size
        self.replication = ReplicationState()  # what outlives one connection; each session works on it
        self.oneshot = args.control_device is None  # no capture ring: one scan-based sync, then exit
        try:
            self.ring = self._open_ring()
        except BaseException:
            self.source.close()
            raise
        try:
            self.meta_path = Path(args.metadata) if getattr(args, "metadata", None) else None
            before = read_metadata(self.meta_path) if self.meta_path is not None else None
            self.meta = load_or_create(self.meta_path) if self.meta_path is not None else None
        except MetadataError as exc:
            self.ring.close()
            self.source.close()
            raise ClientError(str(exc)) from exc
        self.source_id = source_identity(src, self.dev_size)
        self.ring_id = oneshot_ring_identity(src, self.dev_size) if self.oneshot else ring_identity(self.ring)
        # the bytes written in the current generation (shown at a split brain), sent in HELLO unless the server
        # is older than the counts
        self.hello_counts = True
        self.written = (
            WrittenCount(self.ring, self.ring_id, self.meta)
            if self.meta is not None and not self.oneshot
            else None
        )
        # the target's persistent change tracking (meta_device), cleared whenever the replica is in sync
        self.tracker = None if self.oneshot else tracking.Clearer(self.ring, self.ring_id)
        # the generations in which marks may have been cleared for this process to use them: the current
        # one and the one a start after a crash ended (not one begun elsewhere, e.g. by bdr promote, while
        # this device may have been written without a target: a replica, or set up without a meta_device)
        self.track_generations: set[int] = set()
        if self.meta is not None:
            self.track_generations.add(self.meta.generations.current)
            if before is not None:
                self.track_generations.add(before.generations.current)
        self.server_text = f"{args.address}:{args.port}"
        self.start_flags = startup.Flags(args.full_replication, args.full_scan, args.no_replication)
        self.stopping = False
        self.draining = False
        self.wakeup = Wakeup()  # signals and bdr verify requests interrupt the main loop's waits
        self.stats = ClientStats()
        self.bench = BenchClock() if args.benchmark else None
        self._bench_t = 0.0
        # what bdr status and the metrics show (bdr.status), published by this loop
        self.status = ClientStatus()
        self.session: ClientSession | None = None
        self.reconnects = self.errors = 0
        self.verify: VerifyJob | None = None
        self.last_verify: dict[str, object] | None = None
        self._verify_lock = threading.Lock()

    def _open_ring(self) -> RingConsumer | NoRing:
        args, src = self.args, self.source.path
        if self.oneshot and args.no_replication:
            raise ClientError("--no-replication needs --control-device: a one-shot sync always scans")
        try:
            ring = (
                NoRing(src, self.dev_size)
                if self.oneshot
                else RingConsumer(args.control_device, dev_size=self.dev_size)
            )
        except RingError as exc:
            raise ClientError(str(exc)) from exc
        g = ring.geometry
        if g.dev_sectors is not None and g.dev_sectors * 512 != self.dev_size:
            ring.close()
            raise ClientError(
                f"control device {args.control_device} captures a {g.dev_sectors * 512}-byte device, "
                f"but source device {src} has {self.dev_size} bytes: wrong pair?"
            )
        return ring

    # -- status, metrics and verify requests (bdr.status) ----------------------------------------------------------

    def open_status(self) -> None:
        """The control socket (bdr status, bdr verify) and, with --metrics-address, the Prometheus endpoint."""
        self.status.open(self)

    def state(self) -> str:
        return client_status.state(self)

    def publish(self, force: bool = False) -> None:
        """Publish a new status snapshot, at most every PUBLISH_INTERVAL unless forced."""
        self.status.publish(self, force)

    def request_verify(self, progress: Callable[[dict[str, object]], None]) -> dict[str, object]:
        """bdr verify, in the control socket's thread: start a pass in the main loop and wait for its end."""
        with self._verify_lock:
            if self.verify is not None:
                return {"ok": False, "error": "a verify pass is already running"}
            sess = self.session
            if sess is None or not sess.streaming or self.replication.resync_progress is not None:
                return {
                    "ok": False,
                    "error": f"the client is {self.state()}: verify needs a replicating client",
                }
            job = self.verify = VerifyJob(self.dev_size, p.VERIFY_BLOCK_SIZE)
        log.warning("verify: comparing all %d bytes of source and replica", self.dev_size)
        self.wakeup.poke()
        while not job.done.wait(1.0):
            progress(job.progress())
        return job.result()

    def install_signals(self) -> None:
        self.wakeup.install_signals(self.stop)

    def stop(self) -> None:
        """Stop: drain what the ring holds and say goodbye (SIGTERM, SIGINT)."""
        self.stopping = True

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
        # records not yet released were not acknowledged durable: written with no replica known to have them
        self._unreplicated_mark = None if self.oneshot else self.ring.tail
        while not self.stopping:
            try:
                sock, binding = transport.connect(self.args, self.tls_ctx, lambda: self.stopping)
            except InterruptedError:
                continue  # stopping
            except ssl.SSLError as exc:
                log.error(
                    "TLS handshake with %s failed: %s; retrying in %.0fs",
                    self.server_text,
                    tls.describe(exc),
                    AUTH_BACKOFF,
                )
                self.wakeup.sleep(AUTH_BACKOFF)
                continue
            except OSError as exc:
                log.warning(
                    "server %s not reachable (%s); retrying in %.2fs",
                    self.server_text,
                    exc.strerror or exc,
                    backoff,
                )
                self.wakeup.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            self._new_generation_if_written()
            sess = ClientSession(self, sock, binding)
            if self.replication.started:
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
                self._mark_stopped_in_sync()  # once what the ring held is durable on the replica
                self._clear_tracking_at_stop()
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
                    self.replication.journal_full = exc.message
                    log.error(
                        "server %s cannot stage this resync in its journal: %s. Resyncing with direct writes "
                        "(--journal-full direct): the replica is inconsistent until the scan completes",
                        self.server_text,
                        exc.message,
                    )
                    backoff = BACKOFF_MIN
                elif exc.code in FATAL_CODES:
                    log.error("server %s refused us: %s (%s)", self.server_text, exc.message, exc.code.name)
                    sock.close()
                    return EXIT_REFUSED
                else:
                    if exc.code is p.ErrorCode.RESUME_IMPOSSIBLE:
                        self.replication.force_scan = True
                    log.warning(
                        "server %s closed the session: %s; reconnecting in %.2fs",
                        self.server_text,
                        exc.message,
                        backoff,
                    )
            except ConnectionLost as exc:
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
                # records not acknowledged when the connection ended count as written without a replica
                self._unreplicated_mark = None if self.oneshot else self.ring.tail
                self.session = None
                self.replication.resync_progress = None
                if self.verify is not None:
                    self.end_verify(self.verify, "the connection to the server ended during the pass")
                self.errors += 0 if clean else 1
                self.publish(force=True)
            if not self.stopping:
                self.wakeup.sleep(AUTH_BACKOFF if refused else backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        self.report_bench(None, final=True)
        return EXIT_OK

    def _ring_head(self) -> int | None:
        return None if self.oneshot else self.ring.head()

    @property
    def generations(self) -> Generations | None:
        """The source's generation history, with the bytes written in the current generation as of now."""
        if self.meta is None:
            return None
        if self.written is None:
            return self.meta.generations
        return self.meta.generations.with_written(self.written.now()[0])

    def _store_meta(self, meta: SourceMeta) -> None:
        assert self.meta_path is not None
        if self.written is not None:
            meta = self.written.stamp(meta, self.ring_id)
        try:
            write_metadata(self.meta_path, meta)
        except MetadataError as exc:
            raise ClientError(str(exc)) from exc
        self.meta = meta

    def about_to_replicate(self) -> None:
        """Before STREAM or SCAN_BEGIN: from now on a replica may hold some of the current generation (it takes
        the generation at once), so a write made without it will begin a new one."""
        if self.meta is not None and not self.meta.acked:
            self._store_meta(self.meta.with_(flags=self.meta.flags | MetaFlag.ACKED))

    def _new_generation_if_written(self) -> None:
        """The source was written while no replica was connected (since this client started, or since the
        last connection ended), and a replica holds some of the current generation: those writes begin a new
        generation, ended where the replica last said it was durable.  A replica promoted meanwhile then has a
        generation of its own, and the two are a split brain rather than one silently overwriting the other.
        (While no replica has acknowledged any of the current generation, none can have been promoted from
        it: the writes stay in it.)"""
        head = self._ring_head()
        if self.meta is None or head is None or self._unreplicated_mark is None:
            return
        if head == self._unreplicated_mark or not self.meta.acked:
            return
        gens = self.meta.generations
        mark = max(self._unreplicated_mark, self.ring.tail)
        if self.written is not None:
            written, upto = self.written.now()
            if written != UNKNOWN:  # the records from the mark on are the new generation's
                gens = gens.with_written(written - self.ring.data_bytes(mark, upto))
            self.written.restart(mark)
        gens = gens.successor(self.replication.server_durable)
        self._store_meta(SourceMeta(gens))
        self.track_generations.add(gens.current)
        log.warning(
            "the source was written while no replica was connected: %s begins (the replica resumes into it "
            "or is resynced)",
            gens.describe(),
        )
        self._unreplicated_mark = head

    def _mark_stopped_in_sync(self) -> None:
        """Stopping with every captured write durable on the replica: the metadata says up to which seq, so that
        bdr demote can tell a switchover that needs no resync (if nothing is written before it runs)."""
        r = self.replication
        if self.meta is None or self.oneshot:
            return
        ring = self.ring
        if ring.tail != ring.head() or ring.state() or r.pending_dirty is not None or r.force_scan:
            return
        if not r.replica_consistent or r.unzeroed or r.server_durable == NO_SEQ:
            return
        last = prev_seq(ring.tail_seq())
        if last != r.server_durable:
            return
        self._store_meta(
            self.meta.with_(
                flags=self.meta.flags | MetaFlag.SYNCED, synced_seq=last, synced_ring=self.ring_id
            )
        )
        log.warning("stopped in sync: the replica holds every write up to seq %d", last)

    def _clear_tracking_at_stop(self) -> None:
        """Stopping with every captured write durable on the replica: clear the meta_device's marks, so that a
        reboot before the next start resyncs only what is written meanwhile."""
        r, ring = self.replication, self.ring
        if self.tracker is None or ring.tail != ring.head() or ring.state():
            return
        if r.pending_dirty is not None or r.force_scan or r.unzeroed or not r.replica_consistent:
            return
        self.tracker.in_sync(ring.head(), self.generation_id(), force=True)

    def generation_id(self) -> int:
        """The current generation's id (0 without --metadata), for the marks of a meta_device."""
        return self.meta.generations.current if self.meta is not None else 0

    def _refused(self, message: str) -> bool:
        """The server refused our credentials, or we refused the server's: an error for the operator."""
        log.error("%s; retrying in %.0fs", message, AUTH_BACKOFF)
        return True

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
            durable = fmt_seq(self.replication.server_durable)
            print(
                f"bench client: {line} frames={st.frames} lag_records={lag} unreleased_records={unreleased} "
                f"durable_lag_ms_avg={avg_ms:.1f} durable_lag_ms_max={st.lag_max * 1000:.1f} server_durable={durable}",
                flush=True,
            )
            st.lag_sum, st.lag_n, st.lag_max = 0.0, 0, 0.0

    def close(self) -> None:
        if self.meta is not None and self.written is not None:
            try:
                self._store_meta(self.meta)  # the bytes written in the generation, counted up to now
            except ClientError as exc:
                log.error("%s", exc)
        self.status.close()
        self.ring.close()
        self.source.close()
        self.wakeup.close()


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
