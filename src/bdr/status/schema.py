"""What each daemon reports: the typed status snapshots (the JSON ``bdr status --json`` shows, a field for each
figure) and the Prometheus metrics read from them, with the states each daemon can be in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypedDict


@dataclass(frozen=True)
class Spec:
    """One metric: its name, kind ("counter" or "gauge"), help text, and where its value is in the snapshot."""

    name: str
    kind: str
    help: str
    path: tuple[str, ...]


# -- the client -----------------------------------------------------------------------------------------------------


class RingFill(TypedDict):
    slots: int
    used: int  # records captured, not yet released (durable on the replica)
    head: int
    tail: int
    unsent: int  # records captured, not yet sent
    overflow: bool


class Lag(TypedDict):
    records: int
    bytes: int
    seconds: float  # age of the oldest record not yet durable on the replica


class Replicated(TypedDict):
    bytes: int
    records: int
    frames: int
    discarded_bytes: int
    scan_bytes: int


class ClientResync(TypedDict):
    active: bool
    done_bytes: int
    total_bytes: int
    scans: int
    last_scan_bytes: int
    differing_blocks: int
    direct: bool  # writing the replica directly: inconsistent until the resync ends
    journal_full: str | None  # why resyncs cannot be staged in the server's journal


class ClientSnapshot(TypedDict):
    role: Literal["client"]
    version: str
    pid: int
    state: str  # one of CLIENT_STATES
    in_sync: bool
    connected: bool
    server: str
    control_device: str | None
    source_device: str | None
    device_bytes: int
    replica_consistent: bool | None
    ring: RingFill
    lag: Lag
    durable_seq: int | None
    replicated: Replicated
    throughput_bytes_per_s: float
    resync: ClientResync
    dirty_regions: int
    metrics_url: str | None
    reconnects: int
    errors: int
    verify: dict[str, Any] | None  # the running pass (bdr.scan.verify)
    last_verify: dict[str, Any] | None
    generations: dict[str, Any] | None  # the source's generation history (--metadata)


CLIENT_STATES = ("connecting", "disconnected", "resyncing", "overflow", "replicating", "stopping")

CLIENT_METRICS = [
    Spec("replicated_bytes_total", "counter", "write data sent to the server", ("replicated", "bytes")),
    Spec("replicated_records_total", "counter", "ring records sent to the server", ("replicated", "records")),
    Spec("lag_records", "gauge", "records captured but not yet durable on the replica", ("lag", "records")),
    Spec("lag_bytes", "gauge", "write data captured but not yet durable on the replica", ("lag", "bytes")),
    Spec(
        "lag_seconds", "gauge", "age of the oldest record not yet durable on the replica", ("lag", "seconds")
    ),
    Spec("ring_used_slots", "gauge", "ring slots holding records", ("ring", "used")),
    Spec("ring_slots", "gauge", "ring size in slots", ("ring", "slots")),
    Spec("durable_seq", "gauge", "last sequence number the server acknowledged durable", ("durable_seq",)),
    Spec("throughput_bytes_per_second", "gauge", "write data sent per second", ("throughput_bytes_per_s",)),
    Spec("resync_done_bytes", "gauge", "bytes of the running scan done", ("resync", "done_bytes")),
    Spec("resync_total_bytes", "gauge", "bytes the running scan covers", ("resync", "total_bytes")),
    Spec("scans_total", "counter", "scans (resyncs) started", ("resync", "scans")),
    Spec(
        "resync_direct",
        "gauge",
        "1 while a resync writes the replica directly (inconsistent until it ends), e.g. the journal is too small",
        ("resync", "direct"),
    ),
    Spec("dirty_regions", "gauge", "dirty regions taken from the ring, not yet resynced", ("dirty_regions",)),
    Spec("connected", "gauge", "1 while connected to the server", ("connected",)),
    Spec("in_sync", "gauge", "1 while everything captured is durable on the replica", ("in_sync",)),
    Spec("reconnects_total", "counter", "connections to the server after the first", ("reconnects",)),
    Spec("errors_total", "counter", "connections that ended with an error", ("errors",)),
]

# -- the server -----------------------------------------------------------------------------------------------------


class Applied(TypedDict):
    bytes: int
    records: int
    syncs: int


class ServerResync(TypedDict):
    active: bool
    hashed_bytes: int
    received_bytes: int


class HistoryStatus(TypedDict):
    path: str
    bytes: int
    size_limit: int | None
    age_limit_seconds: float | None
    points: int  # checkpoints offered
    oldest_time: float | None  # Unix seconds of the oldest point offered
    oldest_seq: int | None
    newest_time: float | None
    newest_seq: int | None
    gaps: int
    last_gap: str | None


class ServerSnapshot(TypedDict):
    role: Literal["server"]
    version: str
    pid: int
    state: str  # one of SERVER_STATES
    listen: str | None
    peer: str | None
    connected: bool
    replica: str
    replica_bytes: int
    journal: str
    consistent: bool
    applied_seq: int | None
    durable_seq: int | None
    applied: Applied
    resync: ServerResync
    verified_bytes: int
    metrics_url: str | None
    connections: int
    errors: int
    last_error: str | None
    history: HistoryStatus | None  # with --history
    generations: dict[str, Any] | None  # the replica's generation history (bdr.generations.to_json)
    peer_generations: dict[str, Any] | None  # the last client's
    generations_decision: str | None  # what the two decided at the last connect
    # after a split brain: bytes written since the split, {"source_written", "replica_written"} (None: not counted)
    split_brain: dict[str, int | None] | None


SERVER_STATES = ("listening", "replicating", "resyncing", "stopping", "failed")

SERVER_METRICS = [
    Spec("applied_bytes_total", "counter", "write data applied to the replica", ("applied", "bytes")),
    Spec("applied_records_total", "counter", "ring records applied to the replica", ("applied", "records")),
    Spec(
        "syncs_total", "counter", "fdatasync calls of the replica (durability points)", ("applied", "syncs")
    ),
    Spec("applied_seq", "gauge", "last sequence number applied", ("applied_seq",)),
    Spec("durable_seq", "gauge", "last sequence number durable on the replica", ("durable_seq",)),
    Spec(
        "consistent",
        "gauge",
        "1 while the replica is a prefix-consistent copy of the source",
        ("consistent",),
    ),
    Spec("connected", "gauge", "1 while a client is connected", ("connected",)),
    Spec(
        "resync_hashed_bytes", "gauge", "replica bytes hashed by the running scan", ("resync", "hashed_bytes")
    ),
    Spec(
        "resync_received_bytes", "gauge", "bytes received by the running scan", ("resync", "received_bytes")
    ),
    Spec("connections_total", "counter", "client connections served", ("connections",)),
    Spec("errors_total", "counter", "connections that ended with an error", ("errors",)),
    Spec(
        "history_oldest_timestamp_seconds",
        "gauge",
        "time of the oldest point the history can give back (Unix seconds)",
        ("history", "oldest_time"),
    ),
    Spec(
        "history_newest_timestamp_seconds",
        "gauge",
        "time of the newest point the history can give back (Unix seconds)",
        ("history", "newest_time"),
    ),
    Spec("history_bytes", "gauge", "bytes the history uses on disk", ("history", "bytes")),
    Spec("history_points", "gauge", "checkpoints the history can give back", ("history", "points")),
    Spec(
        "history_gaps",
        "gauge",
        "gaps the history holds (rewrites of the replica without history)",
        ("history", "gaps"),
    ),
]
