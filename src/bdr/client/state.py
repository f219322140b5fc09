"""What the client knows across connections: one object, owned by the daemon, handed to each session.

A session lives as long as its connection; this state outlives it: the dirty bitmap taken from the ring and not
yet scanned, the discarded ranges still to check, where the server last said it was durable, and whether the
replica is consistent.  ``bdr status`` reads it through the daemon."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..kernel.dirty import DirtyMap
from ..seq import NO_SEQ


@dataclass
class ReplicationState:
    started: bool = False  # first handshake done (the start-up flags apply to it only)
    # a dirty bitmap taken from the ring and not yet scanned: it outlives a lost connection
    pending_dirty: DirtyMap | None = None
    # discarded ranges the source did not read as zeros: resynced by checksums (the server knows one is due)
    unzeroed: list[tuple[int, int]] = field(default_factory=list)
    server_durable: int = NO_SEQ  # as last acknowledged, on any connection
    force_scan: bool = False  # the server said it could not resume: the next handshake scans
    # the server's journal could not stage a resync (its message): with --journal-full direct, resyncs write the
    # replica directly until one has completed
    journal_full: str | None = None
    resync_direct: bool = False  # the running scan writes the replica directly
    scan_id: int = 0  # of the last scan begun
    resync_progress: list[int] | None = None  # [bytes done, bytes total] of the running scan
    replica_consistent: bool | None = None  # as the server last said (None: not known yet)
