"""The client's start-up decision as a table: (what WELCOME says, whether the ring holds the resume point, first
connection or not, the start-up flags, a resume the server refused) -> how the connection starts."""

from __future__ import annotations

import pytest

from bdr import wire as p
from bdr.client.startup import Decision, Flags, Start, can_resume, decide

W = p.WelcomeFlag
NONE, FULL, SCAN, NOREP = (
    Flags(),
    Flags(full_replication=True),
    Flags(full_scan=True),
    Flags(no_replication=True),
)


def welcome(flags: p.WelcomeFlag, durable: int = 41) -> p.Welcome:
    return p.Welcome(p.PROTOCOL_VERSION, flags, 0, 512, 1 << 20, b"s" * 16, b"r" * 16, durable)


@pytest.mark.parametrize(
    ("flags", "same", "holds", "first", "start_flags", "force", "start", "why"),
    [
        # the start-up flags win on the first connection, whatever the server holds
        (W.SEQ_VALID, True, True, True, FULL, False, Start.FULL_COPY, "--full-replication"),
        (W.SEQ_VALID, True, True, True, SCAN, False, Start.FULL_SCAN, "--full-scan"),
        # ... and are ignored on the next ones
        (W.SEQ_VALID, True, True, False, FULL, False, Start.RESUME, ""),
        (W.SEQ_VALID, True, True, False, SCAN, False, Start.RESUME, ""),
        # resume when the ring holds the point, unless the server refused a resume
        (W.SEQ_VALID, True, True, True, NONE, False, Start.RESUME, ""),
        (W.SEQ_VALID, True, True, True, NONE, True, Start.SCAN, "the server could not resume"),
        # --no-replication only when there is nothing to resume, and only at the first connection
        (W.SEQ_VALID, True, True, True, NOREP, False, Start.RESUME, ""),
        (W.NONE, False, False, True, NOREP, False, Start.ASSUME_IN_SYNC, ""),
        (
            W.NONE,
            False,
            False,
            False,
            NOREP,
            False,
            Start.SCAN,
            "the replica mirrors a different or unknown source",
        ),
        # otherwise a whole-device scan, saying why
        (
            W.NONE,
            False,
            False,
            True,
            NONE,
            False,
            Start.SCAN,
            "the replica mirrors a different or unknown source",
        ),
        (
            W.SCANNING | W.SEQ_VALID,
            True,
            False,
            True,
            NONE,
            False,
            Start.SCAN,
            "a previous resync was interrupted",
        ),
        (W.SEQ_VALID, True, False, True, NONE, False, Start.SCAN, "the ring no longer holds seq 42"),
    ],
)
def test_start_up_decision(
    flags: p.WelcomeFlag,
    same: bool,
    holds: bool,
    first: bool,
    start_flags: Flags,
    force: bool,
    start: Start,
    why: str,
) -> None:
    assert decide(welcome(flags), same, holds, first, start_flags, force) == Decision(start, why, 42)


@pytest.mark.parametrize(
    ("flags", "same", "expected"),
    [
        (W.SEQ_VALID, True, True),
        (W.SEQ_VALID | W.CONSISTENT, True, True),
        (W.SEQ_VALID, False, False),  # another source or ring: its numbers are not ours
        (W.NONE, True, False),  # the durable seq means nothing
        (W.SEQ_VALID | W.SCANNING, True, False),  # the replica is a mix until a scan completes
    ],
)
def test_the_ring_is_asked_for_the_resume_point_only_when_it_can_mean_something(
    flags: p.WelcomeFlag, same: bool, expected: bool
) -> None:
    assert can_resume(welcome(flags), same) is expected


def test_resume_seq_after_no_durable_seq_is_zero() -> None:
    assert decide(welcome(W.SEQ_VALID, p.NO_SEQ), True, True, True, NONE, False) == Decision(
        Start.RESUME, "", 0
    )
