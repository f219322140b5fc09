"""The replica-state transitions as a table: (state, event) -> (flags written, sequence numbers written)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bdr import replica_state as rs
from bdr import wire as p
from bdr.journal import Header, JFlag, Journal
from bdr.seq import NO_SEQ

S, C, N, K, D, E = (
    JFlag.SEQ_VALID,
    JFlag.CONSISTENT,
    JFlag.SCANNING,
    JFlag.SOURCE_KNOWN,
    JFlag.HAS_DATA,
    JFlag.IO_ERROR,
)
SRC = rs.Source(b"s" * 16, b"r" * 16, 1 << 20, 1 << 20)
OTHER_RING = rs.Source(b"s" * 16, b"R" * 16, 1 << 20, 1 << 20)
IDS = {"source_id": SRC.source_id, "ring_id": SRC.ring_id, "source_size": SRC.source_size}


def hdr(flags: JFlag, durable: int = 9, consistent: int = NO_SEQ, **ids: object) -> Header:
    return Header(flags=flags, durable_seq=durable, consistent_seq=consistent, **ids)  # type: ignore[arg-type]


Event = Callable[[Header], Header]
# (name, state before, event, flags after, durable_seq after, consistent_seq after)
TABLE: list[tuple[str, Header, Event, JFlag, int, int]] = [
    # durable points
    ("fresh replica, first sync", hdr(JFlag.NONE, NO_SEQ), lambda h: rs.durable_point(h, 4, True), S | D, 4, NO_SEQ),
    ("sync before any record", hdr(K | C), lambda h: rs.durable_point(h, NO_SEQ, False), K | C | D, NO_SEQ, NO_SEQ),
    ("behind, not reached", hdr(K | D | S, 5, 20), lambda h: rs.durable_point(h, 19, True), K | D | S, 19, 20),
    ("behind, reached", hdr(K | D | S, 5, 20), lambda h: rs.durable_point(h, 20, True), K | D | S | C, 20, NO_SEQ),
    ("behind but scanning", hdr(K | D | S | N, 5, 20), lambda h: rs.durable_point(h, 30, True), K | D | S | N, 30, 20),
    # staged (journal) resyncs
    ("staged begin, same source", hdr(K | C | D | S, **IDS), lambda h: rs.staged_resync_begun(h, SRC), K | C | D | S | N, 9, NO_SEQ),
    ("staged begin, other ring", hdr(K | C | D | S, **IDS), lambda h: rs.staged_resync_begun(h, OTHER_RING), K | D | S | N, 9, NO_SEQ),
    ("staged begin, unknown", hdr(JFlag.NONE, NO_SEQ), lambda h: rs.staged_resync_begun(h, SRC), K | N, NO_SEQ, NO_SEQ),
    ("staged scan end, resume", hdr(K | D | N), lambda h: rs.staged_scan_ended(h, 40), K | D | N | S, 39, NO_SEQ),
    ("staged scan end, no resume", hdr(K | D | N | S), lambda h: rs.staged_scan_ended(h, None), K | D | N, NO_SEQ, NO_SEQ),
    ("staged commit, streaming", hdr(K | D | N | E, 3, 7), lambda h: rs.staged_resync_committed(h, 50, True), K | D | C | S, 50, NO_SEQ),
    ("staged commit, no stream", hdr(K | N, 3), lambda h: rs.staged_resync_committed(h, 50, False), K | D | C, 3, NO_SEQ),
    # direct resyncs
    ("direct begin", hdr(K | C | D | S, **IDS), lambda h: rs.direct_resync_begun(h, SRC), K | D | S | N, 9, NO_SEQ),
    ("direct end, idle source", hdr(K | D | N | S | E), lambda h: rs.direct_resync_ended(h, 12, None, False), K | D | S | C, 11, NO_SEQ),
    ("direct end, writes meanwhile", hdr(K | D | N), lambda h: rs.direct_resync_ended(h, 12, 30, False), K | D | S, 11, 30),
    ("direct end, more to come", hdr(K | D | N | C), lambda h: rs.direct_resync_ended(h, None, None, True), K | D, NO_SEQ, NO_SEQ),
    # failures and operator decisions
    ("ring overflow", hdr(K | C | D | S), rs.writes_lost, K | D | S | N, 9, NO_SEQ),
    ("storage error", hdr(K | C | D | S), rs.storage_failed, K | D | S | N | E, 9, NO_SEQ),
    ("--no-replication", hdr(K | D | N | E, 9, 30), lambda h: rs.assumed_in_sync(h, SRC, 100), K | D | S | C, 99, NO_SEQ),
    ("--no-replication at 0", hdr(JFlag.NONE, NO_SEQ), lambda h: rs.assumed_in_sync(h, SRC, 0), K | S | C, NO_SEQ, NO_SEQ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("before", "event", "flags", "durable", "consistent"), [t[1:] for t in TABLE], ids=[t[0] for t in TABLE]
)
def test_transition(before: Header, event: Event, flags: JFlag, durable: int, consistent: int) -> None:
    after = event(before)
    assert (after.flags, after.durable_seq, after.consistent_seq) == (flags, durable, consistent)
    assert after.generation == before.generation  # the journal numbers the copies when it stores them


@pytest.mark.parametrize(
    "event",
    [
        lambda h: rs.staged_resync_begun(h, SRC),
        lambda h: rs.direct_resync_begun(h, SRC),
        lambda h: rs.assumed_in_sync(h, SRC, 5),
    ],
    ids=["staged", "direct", "assumed"],
)
def test_adopting_a_source_records_its_identity(event: Event) -> None:
    after = event(hdr(K, source_id=b"x" * 16, ring_id=b"y" * 16, source_size=7))
    assert (after.source_id, after.ring_id, after.source_size, after.replica_size) == (
        SRC.source_id,
        SRC.ring_id,
        SRC.source_size,
        SRC.replica_size,
    )
    assert rs.mirrors(after, SRC) and not rs.mirrors(after, OTHER_RING)
    assert not rs.mirrors_another_source(after, OTHER_RING)  # same device, new ring: a resync, not a refusal


@pytest.mark.parametrize(
    ("flags", "condition", "consistent", "welcome"),
    [
        (JFlag.NONE, rs.Condition.NEW, False, p.WelcomeFlag.FRESH | p.WelcomeFlag.KNOWN_ZERO),
        (K | D | C | S, rs.Condition.CONSISTENT, True, p.WelcomeFlag.CONSISTENT | p.WelcomeFlag.SEQ_VALID),
        (K | D | C | N, rs.Condition.RESYNCING, False, p.WelcomeFlag.CONSISTENT | p.WelcomeFlag.SCANNING),
        (K | D | S, rs.Condition.BEHIND, False, p.WelcomeFlag.SEQ_VALID),
        (K | D | N | E, rs.Condition.IO_ERROR, False, p.WelcomeFlag.SCANNING),
    ],
)
def test_what_is_reported(
    flags: JFlag, condition: rs.Condition, consistent: bool, welcome: p.WelcomeFlag
) -> None:
    h = hdr(flags)
    assert rs.condition(h) is condition
    assert rs.is_consistent(h) is consistent
    assert rs.welcome_flags(h, known_zero=True) == welcome
    assert rs.resume_point(h) == (9 if flags & S else None)


def test_a_stored_transition_survives_reopening(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "journal"
    j = Journal(path)
    j.store(rs.direct_resync_begun(j.header, SRC))
    j.store(rs.direct_resync_ended(j.header, 12, 30, False))
    j.close()
    j2 = Journal(path)
    assert (j2.header.flags, j2.header.durable_seq, j2.header.consistent_seq) == (K | D | S, 11, 30)
    assert j2.header.generation == 2
    j2.close()
