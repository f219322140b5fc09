"""A resync staged in the journal, as an object with an explicit lifecycle.

A journal resync does not touch the replica until it is complete: the scan's blocks, then the ring records
captured meanwhile, are staged in the journal's record area; once the scan has ended and the records up to the
consistent sequence number are staged, the resync is committed (one durable record) and applied.  After a crash
the journal replays a committed resync and discards an uncommitted one, so the replica is always the old or the
new consistent state.

    OPEN ──end(more=False)──> ENDED(commit_at) ──commit()──> COMMITTED ──apply()──> APPLIED
     ^  └─end(more=True): stays OPEN   │
     └────────── extend() ─────────────┘          OPEN / ENDED ──discard()──> DISCARDED

``extend()``: another scan of dirty regions joins the resync before its commit (the ring overflowed again).
The session owns the staged resync; the applier writes through ``target`` while it is open and reports its
durability points, at which the session asks ``due()`` and commits.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from ..journal import RecordArea, ReplicaTarget, StagingTarget
from ..seq import seq_le


class Phase(enum.Enum):
    OPEN = "open"  # scan blocks and ring records are being staged
    ENDED = "ended"  # the scan ended: commit once the records up to commit_at are staged and durable
    COMMITTED = "committed"  # the commit record is durable: the resync will be applied, even after a crash
    APPLIED = "applied"  # the replica holds the resync
    DISCARDED = "discarded"  # dropped before its commit: the replica was never touched


class StagingError(Exception):
    """A staged resync was asked to do what its phase does not allow (a bug, not an operator error)."""


_ALLOWED: dict[str, frozenset[Phase]] = {
    "end": frozenset({Phase.OPEN}),
    "extend": frozenset({Phase.OPEN, Phase.ENDED}),
    "commit": frozenset({Phase.ENDED}),
    "apply": frozenset({Phase.COMMITTED}),
    "discard": frozenset({Phase.OPEN, Phase.ENDED}),
    "stage": frozenset({Phase.OPEN, Phase.ENDED}),  # ring records keep coming until the commit
}


class StagedResync:
    """One journal resync, from its first staged block to its apply (or discard)."""

    def __init__(self, area: RecordArea) -> None:
        area.begin()  # a new epoch: whatever an earlier, uncommitted resync staged is void
        self.area = area
        self.target = StagingTarget(area)
        self.phase = Phase.OPEN
        self.commit_at: int | None = None

    def _check(self, action: str) -> None:
        if self.phase not in _ALLOWED[action]:
            raise StagingError(f"cannot {action} a staged resync that is {self.phase.value}")

    # -- staging ---------------------------------------------------------------------------------------------

    def write(self, data: bytes | memoryview, offset: int) -> None:
        self._check("stage")
        self.area.stage_write(data, offset)

    def zeroes(self, offset: int, length: int) -> None:
        self._check("stage")
        self.area.stage_zeroes(offset, length)

    def overlay(self, view: memoryview, offset: int) -> None:
        """``view`` (replica bytes at ``offset``) as the replica will read after the commit."""
        self.area.overlay(view, offset)

    def sync(self) -> None:
        """Make what is staged durable (not a commit)."""
        self.area.sync()

    # -- lifecycle -------------------------------------------------------------------------------------------

    def end(self, commit_at: int | None, more: bool) -> None:
        """The scan ended.  ``commit_at``: commit once the ring records up to it are staged (None: at the next
        durability point); ``more``: another scan of this resync follows, the resync stays open."""
        self._check("end")
        if not more:
            self.phase = Phase.ENDED
            self.commit_at = commit_at

    def extend(self) -> None:
        """Another scan joins this resync before its commit."""
        self._check("extend")
        self.phase = Phase.OPEN
        self.commit_at = None

    def due(self, applied: int | None) -> bool:
        """Whether the resync may be committed now that the stream is applied up to ``applied`` (None: the
        stream has no known position yet)."""
        if self.phase is not Phase.ENDED:
            return False
        return self.commit_at is None or (applied is not None and seq_le(self.commit_at, applied))

    def commit(self) -> None:
        self._check("commit")
        self.area.commit()
        self.phase = Phase.COMMITTED

    def apply(
        self, replica: ReplicaTarget, before: Callable[[list[tuple[int, int]]], None] | None = None
    ) -> int:
        """Apply the committed resync to the replica; the number of records applied.  ``before``: as for
        ``RecordArea.apply`` (the history)."""
        self._check("apply")
        n = self.area.apply(replica, before=before)
        self.phase = Phase.APPLIED
        return n

    def discard(self) -> None:
        """Drop the resync before its commit: the replica was never touched."""
        self._check("discard")
        self.area.discard()
        self.phase = Phase.DISCARDED

    def superseded(self) -> None:
        """A new resync starts in the same record area (its ``begin`` voids this one on disk)."""
        self._check("discard")
        self.phase = Phase.DISCARDED
