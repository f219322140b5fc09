"""What the client reports (``bdr status``, metrics): its state, and the snapshot its main loop publishes, built
from the parts that own each figure (the ring, the session, the counters, the running scan and verify pass)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__, status
from ..generations import to_json
from ..kernel import abi
from ..seq import seq_or_none
from .errors import ClientError

if TYPE_CHECKING:
    from .daemon import Client

PUBLISH_INTERVAL = 0.25  # seconds between status snapshots (bdr status, metrics)


def state(c: Client) -> str:
    """One of status.CLIENT_STATES."""
    sess = c.session
    if c.stopping:
        return "stopping"
    if sess is None:
        return "disconnected" if c.replication.started else "connecting"
    if c.replication.resync_progress is not None:
        return "resyncing"
    if not sess.streaming:
        return "connecting"
    if c.replication.pending_dirty is not None or c.ring.state() & (abi.State.OVERFLOW | abi.State.DIRTY):
        return "overflow"
    return "replicating"


class ClientStatus:
    """The client's board, control socket and metrics endpoint, and the figures only the status needs (lag
    age, throughput)."""

    def __init__(self) -> None:
        self.board = status.Board()
        self.control: status.ControlSocket | None = None
        self.metrics: status.MetricsEndpoint | None = None
        self._published = 0.0
        self._rate = (time.monotonic(), 0)
        self.throughput = 0.0
        self.lag_since: float | None = None

    def open(self, c: Client) -> None:
        """The control socket (bdr status, bdr verify) and, with --metrics-address, the Prometheus endpoint."""
        self.publish(c, force=True)
        if not c.oneshot or c.args.status_socket:
            name = Path(c.args.control_device or c.args.source_device).name
            self.control = status.open_control(
                c.args.status_socket,
                status.RUN_DIR / f"client-{name}.sock",
                self.board,
                {"verify": c.request_verify},
            )
        if c.args.metrics_address:
            try:
                self.metrics = status.MetricsEndpoint(
                    c.args.metrics_address,
                    self.board,
                    status.CLIENT_METRICS,
                    status.CLIENT_STATES,
                    "bdr_client",
                )
            except (OSError, ValueError) as exc:
                raise ClientError(f"--metrics-address {c.args.metrics_address}: {exc}") from exc

    def publish(self, c: Client, force: bool = False) -> None:
        """Publish a new snapshot, at most every PUBLISH_INTERVAL unless forced."""
        now = time.monotonic()
        if not force and now - self._published < PUBLISH_INTERVAL:
            return
        self._published = now
        ring, sess, st = c.ring, c.session, c.stats
        head, tail = ring.head(), ring.tail
        if head == tail:
            self.lag_since = None
        elif self.lag_since is None:
            self.lag_since = now
        t0, b0 = self._rate
        if now - t0 >= 1.0:
            self.throughput, self._rate = (st.bytes - b0) / (now - t0), (now, st.bytes)
        progress = c.replication.resync_progress
        snap: status.ClientSnapshot = {
            "role": "client",
            "version": __version__,
            "pid": os.getpid(),
            "state": state(c),
            "in_sync": bool(sess is not None and sess.in_sync and head == tail),
            "connected": sess is not None,
            "server": c.server_text,
            "control_device": c.args.control_device,
            "source_device": c.args.source_device,
            "device_bytes": c.dev_size,
            "replica_consistent": c.replication.replica_consistent,
            "ring": {
                "slots": ring.geometry.nr_slots,
                "used": head - tail,
                "head": head,
                "tail": tail,
                "unsent": head - (sess.sent if sess is not None else tail),
                "overflow": bool(ring.state() & abi.State.OVERFLOW),
            },
            "lag": {
                "records": head - tail,
                "bytes": ring.data_bytes(tail, head),
                "seconds": round(now - self.lag_since, 3) if self.lag_since is not None else 0.0,
            },
            "durable_seq": seq_or_none(c.replication.server_durable),
            "replicated": {
                "bytes": st.bytes,
                "records": st.records,
                "frames": st.frames,
                "discarded_bytes": st.discarded,
                "scan_bytes": sum(sc.bytes_sent for sc in st.scans),
            },
            "throughput_bytes_per_s": round(self.throughput, 1),
            "resync": {
                "active": progress is not None,
                "done_bytes": progress[0] if progress else 0,
                "total_bytes": progress[1] if progress else 0,
                "scans": len(st.scans),
                "last_scan_bytes": sum(n for _, n in st.scans[-1].extents) if st.scans else 0,
                "differing_blocks": sum(sc.differing for sc in st.scans),
                "direct": c.replication.resync_direct,
                "journal_full": c.replication.journal_full,
            },
            "dirty_regions": c.replication.pending_dirty.nr_dirty
            if c.replication.pending_dirty is not None
            else 0,
            "metrics_url": self.metrics.url if self.metrics is not None else None,
            "reconnects": c.reconnects,
            "errors": c.errors,
            "verify": c.verify.progress() if c.verify is not None else None,
            "last_verify": c.last_verify,
            "generations": to_json(c.generations),
        }
        self.board.publish(snap)

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        if self.metrics is not None:
            self.metrics.close()
