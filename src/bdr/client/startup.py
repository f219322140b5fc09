"""The client's start-up decision: from what the server said in WELCOME, what the ring holds and the start-up
flags, how a connection begins -- stream from where the replica is durable, or resync first, and how."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .. import wire as p
from ..seq import next_seq


class Start(enum.Enum):
    FULL_COPY = "full copy"  # --full-replication: send the whole source
    FULL_SCAN = "full scan"  # --full-scan: hash-compare everything, writing the replica directly
    RESUME = "resume"  # stream from the ring position after the replica's durable seq
    ASSUME_IN_SYNC = "assume in sync"  # --no-replication: stream new writes only
    SCAN = "scan"  # hash-compare the whole device, staged in the server's journal


@dataclass(frozen=True)
class Flags:
    """The start-up flags; they apply to the first connection only."""

    full_replication: bool = False
    full_scan: bool = False
    no_replication: bool = False


@dataclass(frozen=True)
class Decision:
    start: Start
    why: str  # for the log line of a scan
    resume_seq: int  # the first sequence number the replica lacks


def resume_seq(welcome: p.Welcome) -> int:
    return next_seq(welcome.durable_seq)


def can_resume(welcome: p.Welcome, same_source: bool) -> bool:
    """Whether the replica has a resume point in our ring's numbering: look it up in the ring then."""
    f = welcome.flags
    return same_source and bool(f & p.WelcomeFlag.SEQ_VALID) and not f & p.WelcomeFlag.SCANNING


def decide(
    welcome: p.Welcome,
    same_source: bool,
    ring_holds_resume: bool,
    first: bool,
    flags: Flags,
    force_scan: bool,
) -> Decision:
    """How this connection starts.  ``ring_holds_resume``: the ring still holds ``resume_seq(welcome)`` (only
    looked up when ``can_resume``); ``force_scan``: the server said it could not resume last time."""
    resume = resume_seq(welcome)
    if first and flags.full_replication:
        return Decision(Start.FULL_COPY, "--full-replication", resume)
    if first and flags.full_scan:
        return Decision(Start.FULL_SCAN, "--full-scan", resume)
    if ring_holds_resume and not force_scan:
        return Decision(Start.RESUME, "", resume)
    if first and flags.no_replication:
        return Decision(Start.ASSUME_IN_SYNC, "", resume)
    if not same_source:
        why = "the replica mirrors a different or unknown source"
    elif welcome.flags & p.WelcomeFlag.SCANNING:
        why = "a previous resync was interrupted"
    elif force_scan:
        why = "the server could not resume"
    else:
        why = f"the ring no longer holds seq {resume}"
    return Decision(Start.SCAN, why, resume)
