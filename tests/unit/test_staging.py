"""The staged resync's lifecycle as a table: which actions each phase allows and where they lead, when a commit is
due, and what each step leaves on disk (the record area's state, the replica)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bdr.journal import Journal
from bdr.journal import area as jr
from bdr.journal import format as jf
from bdr.seq import NO_SEQ
from bdr.server import Replica
from bdr.server.staging import Phase, StagedResync, StagingError

DEV = 1 << 20
Action = Callable[[StagedResync, Replica], object]
ACTIONS: dict[str, Action] = {
    "end": lambda s, r: s.end(None, False),
    "end more": lambda s, r: s.end(None, True),
    "extend": lambda s, r: s.extend(),
    "stage": lambda s, r: s.write(b"\x07" * 4096, 8192),
    "commit": lambda s, r: s.commit(),
    "apply": lambda s, r: s.apply(r),
    "discard": lambda s, r: s.discard(),
}
# (phase, action) -> phase after, for the allowed pairs; every other pair raises StagingError
TABLE: dict[tuple[Phase, str], Phase] = {
    (Phase.OPEN, "end"): Phase.ENDED,
    (Phase.OPEN, "end more"): Phase.OPEN,
    (Phase.OPEN, "extend"): Phase.OPEN,
    (Phase.OPEN, "stage"): Phase.OPEN,
    (Phase.OPEN, "discard"): Phase.DISCARDED,
    (Phase.ENDED, "extend"): Phase.OPEN,
    (Phase.ENDED, "stage"): Phase.ENDED,
    (Phase.ENDED, "commit"): Phase.COMMITTED,
    (Phase.ENDED, "discard"): Phase.DISCARDED,
    (Phase.COMMITTED, "apply"): Phase.APPLIED,
}
# how to reach each phase from a new staged resync
PATHS = {
    Phase.OPEN: [],
    Phase.ENDED: ["end"],
    Phase.COMMITTED: ["end", "commit"],
    Phase.APPLIED: ["end", "commit", "apply"],
    Phase.DISCARDED: ["discard"],
}


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[jr.RecordArea, Replica]]:
    img = tmp_path / "replica.img"
    img.write_bytes(bytes(DEV))
    Journal(tmp_path / "journal").close()
    fd = os.open(tmp_path / "journal", os.O_RDWR)
    area = jr.RecordArea(fd, str(tmp_path / "journal"), None)
    replica = Replica(img)
    yield area, replica
    replica.close()
    os.close(fd)


@pytest.mark.parametrize("action", list(ACTIONS))
@pytest.mark.parametrize("phase", list(Phase), ids=lambda ph: ph.value)
def test_lifecycle(parts: tuple[jr.RecordArea, Replica], phase: Phase, action: str) -> None:
    area, replica = parts
    s = StagedResync(area)
    s.write(b"\x05" * 4096, 0)
    for step in PATHS[phase]:
        ACTIONS[step](s, replica)
    assert s.phase is phase
    after = TABLE.get((phase, action))
    if after is None:
        with pytest.raises(StagingError, match=f"is {phase.value}"):
            ACTIONS[action](s, replica)
        assert s.phase is phase
    else:
        ACTIONS[action](s, replica)
        assert s.phase is after


@pytest.mark.parametrize(
    ("commit_at", "more", "applied", "due"),
    [
        (None, False, None, True),  # nothing to wait for
        (None, True, 50, False),  # another scan follows
        (40, False, None, False),  # the stream has no position yet
        (40, False, 39, False),
        (40, False, 40, True),
        (40, False, 41, True),
        (
            NO_SEQ,
            False,
            None,
            False,
        ),  # NO_SEQ as commit_at: "before everything", but the stream must have a position
        (NO_SEQ, False, NO_SEQ, True),
    ],
)
def test_when_a_commit_is_due(
    parts: tuple[jr.RecordArea, Replica], commit_at: int | None, more: bool, applied: int | None, due: bool
) -> None:
    s = StagedResync(parts[0])
    assert not s.due(applied)  # open: never
    s.end(commit_at, more)
    assert s.due(applied) is due


def test_what_each_step_leaves_on_disk(parts: tuple[jr.RecordArea, Replica], tmp_path: Path) -> None:
    area, replica = parts
    s = StagedResync(area)
    assert area.state.state is jf.AreaState.OPEN
    s.write(b"\x09" * 4096, 4096)
    s.zeroes(0, 512)
    s.end(None, False)
    s.sync()
    assert (tmp_path / "replica.img").read_bytes() == bytes(DEV)  # the replica is untouched until the apply
    s.commit()
    assert area.state.state is jf.AreaState.COMMITTED
    assert s.apply(replica) == 2
    replica.sync()
    assert (tmp_path / "replica.img").read_bytes()[4096:8192] == b"\x09" * 4096
    assert area.state.state is jf.AreaState.CLEAN
    s2 = StagedResync(area)
    s2.write(b"\x01" * 512, 0)
    s2.discard()
    assert area.state.state is jf.AreaState.CLEAN
    assert (tmp_path / "replica.img").read_bytes()[:512] == bytes(512)
