"""The journal's crash points as an injected plan: the record area stops where the plan says (and only there),
never reads the environment itself, and the server's main builds the plan from the variables the crash tests set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bdr.journal import FaultPlan, Journal, RecordArea
from bdr.journal.faults import CRASH_ENV, CRASH_MODE_ENV, RECEIVE_POINT_AFTER, kill, pause
from bdr.server import Replica

DEV = 4 << 20


class Stop(Exception):
    pass


def stop(point: str) -> None:
    raise Stop(point)


@pytest.fixture
def area_and_replica(tmp_path: Path):  # type: ignore[no-untyped-def]
    (tmp_path / "replica.img").write_bytes(bytes(DEV))
    Journal(tmp_path / "journal").close()

    def make(plan: FaultPlan | None) -> tuple[RecordArea, Replica]:
        fd = os.open(tmp_path / "journal", os.O_RDWR)
        return RecordArea(fd, str(tmp_path / "journal"), None, plan), Replica(str(tmp_path / "replica.img"))

    return make


def test_from_environment() -> None:
    assert FaultPlan.from_environment({}).actions == {}
    assert FaultPlan.from_environment({CRASH_ENV: "commit"}).actions == {"commit": kill}
    assert FaultPlan.from_environment({CRASH_ENV: "apply", CRASH_MODE_ENV: "pause"}).actions == {
        "apply": pause
    }
    assert FaultPlan.from_environment({CRASH_ENV: "elsewhere"}).actions == {}
    with pytest.raises(ValueError, match="unknown crash point"):
        FaultPlan({"elsewhere": kill})


@pytest.mark.parametrize("point", ["receive", "commit", "apply"])
def test_the_area_stops_at_the_planned_point_only(area_and_replica, point: str) -> None:  # type: ignore[no-untyped-def]
    area, replica = area_and_replica(FaultPlan({point: stop}))
    reached = []
    area.begin()
    try:
        for i in range(3):
            area.stage_write(os.urandom(RECEIVE_POINT_AFTER // 2), i * RECEIVE_POINT_AFTER)
            reached.append(f"staged {i}")
        area.commit()
        reached.append("committed")
        area.apply(replica, DEV)
        reached.append("applied")
    except Stop as exc:
        assert str(exc) == point
    expected = {
        "receive": ["staged 0"],  # 1 MiB staged: the second write reaches the point
        "commit": ["staged 0", "staged 1", "staged 2"],
        "apply": ["staged 0", "staged 1", "staged 2", "committed"],
    }[point]
    assert reached == expected
    area.close()
    replica.close()


def test_the_area_does_not_read_the_environment(area_and_replica, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(CRASH_ENV, "commit")  # would SIGKILL this test if the area read it
    area, replica = area_and_replica(None)
    area.begin()
    area.stage_write(b"x" * 4096, 0)
    area.commit()
    assert area.apply(replica, DEV) == 1
    area.close()
    replica.close()
