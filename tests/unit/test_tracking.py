"""Persistent change tracking, the parts above the kernel: when the server lets a scan of only the regions the
source's meta_device marked adopt a new ring (WELCOME TRACKABLE, SCAN_BEGIN TRACKED), when the client uses the
marks, when it clears them, and the table line ``bdr setup --meta-device`` writes."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.unit.test_session import DEV, MemServer, talk

from bdr import wire as p
from bdr.cli.targets import SetupPlan
from bdr.client import tracking
from bdr.generations import Generations
from bdr.journal import Journal
from bdr.kernel import abi
from bdr.kernel.layout import RingError
from bdr.kernel.ring import Tracking
from bdr.server import ServerSession, SessionClosed

SRC, R1, R2 = b"s" * 16, b"1" * 16, b"2" * 16
G = Generations.first()
GENS = {G.current, G.successor(4).current}  # the source's own: the current one and the one a restart ended


def hello(ring: bytes, gens: Generations | None, src: bytes = SRC) -> p.Hello:
    return p.Hello(1, p.ALL_FEATURES, 512, DEV, src, ring, gens)


def session(server: MemServer, h: p.Hello) -> tuple[ServerSession, p.Connection, p.Welcome]:
    sess = ServerSession(server.replica, server.journal, server.applier)
    c = p.Connection(p.Role.CLIENT)
    (w,) = talk(sess, c, h)
    assert isinstance(w, p.Welcome)
    return sess, c, w


def in_sync_replica(tmp_path: Path) -> MemServer:
    """A replica consistent with source SRC at seq 4 of ring R1, in generation G."""
    server = MemServer(tmp_path)
    sess, c, _ = session(server, hello(R1, G))
    talk(sess, c, p.Stream(5, p.StreamFlag.ASSUME_IN_SYNC))
    with pytest.raises(SessionClosed, match="goodbye"):
        talk(sess, c, p.Goodbye(p.GoodbyeReason.SHUTDOWN))
    return server


def refused(sess: ServerSession, c: p.Connection, msg: p.Message) -> str:
    with pytest.raises(SessionClosed) as ei:
        talk(sess, c, msg)
    return ei.value.reason


TRACKED = p.ScanBegin(1, p.ScanMode.HASH, p.ScanFlag.TRACKED, 65536)


@pytest.mark.parametrize("gens", [G, G.successor(4)], ids=["same generation", "source began a new one"])
def test_a_tracked_scan_adopts_the_new_ring(tmp_path: Path, gens: Generations) -> None:
    server = in_sync_replica(tmp_path)
    sess, c, w = session(server, hello(R2, gens))
    assert w.flags & p.WelcomeFlag.TRACKABLE and w.ring_id == R1 and w.durable_seq == 4
    assert talk(sess, c, TRACKED) == []
    assert Journal(tmp_path / "journal").header.ring_id == R2  # the stream goes on in the new ring


def test_a_tracked_scan_is_refused_unless_the_replica_is_a_clean_copy_of_that_lineage(tmp_path: Path) -> None:
    server = in_sync_replica(tmp_path)
    # a source without generations cannot say that nothing else wrote the replica (refused at once here)
    sess = ServerSession(server.replica, server.journal, server.applier)
    assert "--metadata" in refused(sess, p.Connection(p.Role.CLIENT), hello(R2, None))
    # another source device
    sess, c, w = session(server, hello(R2, G, src=b"o" * 16))
    assert not w.flags & p.WelcomeFlag.TRACKABLE
    refused(sess, c, TRACKED)
    # a whole-device tracked scan is not a thing
    sess, c, w = session(server, hello(R2, G))
    with pytest.raises(SessionClosed):
        talk(sess, c, p.ScanBegin(1, p.ScanMode.HASH, p.ScanFlag.TRACKED | p.ScanFlag.WHOLE_DEVICE, 65536))
    # a resync left half done: the replica is no longer one moment of the source
    sess, c, w = session(server, hello(R1, G))
    talk(sess, c, p.ScanBegin(1, p.ScanMode.HASH, p.ScanFlag.WHOLE_DEVICE, 65536))
    sess, c, w = session(server, hello(R2, G))
    assert not w.flags & p.WelcomeFlag.TRACKABLE
    refused(sess, c, TRACKED)


def welcome(flags: p.WelcomeFlag, ring: bytes = R1, durable: int = 4) -> p.Welcome:
    return p.Welcome(1, flags, p.ALL_FEATURES, 512, DEV, SRC, ring, durable, G)


def marks(
    flags: abi.TrackFlag = abi.TrackFlag.ENABLED | abi.TrackFlag.RECOVERED,
    ring: bytes = R1,
    pos: int = 5,
    gen: int = G.current,
) -> Tracking:
    return Tracking(flags, ring, pos, gen, 3, 3, 10, 1)


def test_when_the_client_uses_the_marks() -> None:
    ok = p.WelcomeFlag.TRACKABLE | p.WelcomeFlag.SEQ_VALID | p.WelcomeFlag.CONSISTENT
    assert tracking.refusal(welcome(ok), marks(), GENS) is None
    assert tracking.refusal(welcome(ok, durable=9), marks(pos=5), GENS) is None
    assert tracking.refusal(welcome(ok), marks(pos=0), GENS) is None
    assert "new" in str(tracking.refusal(welcome(ok), marks(abi.TrackFlag.ENABLED), GENS))
    failed = abi.TrackFlag.ENABLED | abi.TrackFlag.RECOVERED | abi.TrackFlag.FAILED
    assert "failed" in str(tracking.refusal(welcome(ok), marks(failed), GENS))
    assert "--metadata" in str(tracking.refusal(welcome(ok & ~p.WelcomeFlag.TRACKABLE), marks(), GENS))
    # the marks count from a clear in another ring, or from a point the replica has not reached
    assert "another capture ring" in str(tracking.refusal(welcome(ok, ring=R2), marks(ring=R1), GENS))
    assert "another capture ring" in str(
        tracking.refusal(welcome(ok, ring=bytes(16)), marks(ring=bytes(16)), GENS)
    )
    assert "before the last clear" in str(tracking.refusal(welcome(ok, durable=3), marks(pos=5), GENS))
    # cleared in a generation this source did not continue (it was a replica, or promoted, since)
    other = Generations.first().current
    assert "last cleared in generation" in str(tracking.refusal(welcome(ok), marks(gen=other), GENS))


class FakeRing:
    def __init__(self, busy: bool | None = False) -> None:
        self.cleared: list[tuple[int, bytes]] = []
        self.busy = busy

    def tracking(self) -> Tracking:
        return marks()

    def clear_tracking(self, pos: int, ring_id: bytes, generation: int) -> bool:
        if self.busy is None:
            raise RingError("/dev/bdr_x: BDR_IOC_TRACK_CLEAR failed: Input/output error")
        self.cleared.append((pos, generation))
        return not self.busy

    def rotate_tracking(self, pos: int, ring_id: bytes, generation: int) -> bool:
        if self.busy is None:
            raise RingError("/dev/bdr_x: BDR_IOC_TRACK_ROTATE failed: Input/output error")
        self.cleared.append((-pos, generation))
        return not self.busy


def test_the_client_clears_the_marks_when_in_sync_at_most_every_few_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(tracking.time, "monotonic", lambda: now[0])
    ring = FakeRing()
    c = tracking.Clearer(ring, R2)  # type: ignore[arg-type]
    c.in_sync(7, 1)
    c.in_sync(7, 1)  # nothing new since
    now[0] += 1
    c.in_sync(9, 1)  # too soon
    assert ring.cleared == [(7, 1)]
    now[0] += tracking.CLEAR_EVERY
    c.in_sync(9, 1)
    c.in_sync(12, 1, force=True)  # a stop in sync clears at once
    c.in_sync(12, 2, force=True)  # a new generation: the clear names it
    assert ring.cleared == [(7, 1), (9, 1), (12, 1), (12, 2)]
    busy = FakeRing(busy=True)
    c = tracking.Clearer(busy, R2)  # type: ignore[arg-type]
    c.in_sync(3, 1)
    now[0] += tracking.CLEAR_EVERY
    c.in_sync(3, 1)  # refused (a write was in flight): tried again
    assert busy.cleared == [(3, 1), (3, 1)]
    failing = FakeRing(busy=None)  # the meta device failed: tracking is off, the client goes on
    c = tracking.Clearer(failing, R2)  # type: ignore[arg-type]
    c.in_sync(3, 1)
    assert not c.enabled


def test_under_writes_the_client_rotates_the_epochs_at_most_every_few_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(tracking.time, "monotonic", lambda: now[0])
    ring = FakeRing()
    c = tracking.Clearer(ring, R2)  # type: ignore[arg-type]
    c.acked(5, 1)
    now[0] += 1
    c.acked(8, 1)  # too soon
    now[0] += tracking.CLEAR_EVERY
    c.acked(11, 1)
    assert ring.cleared == [(-5, 1), (-11, 1)]
    c.in_sync(11, 1, force=True)  # a full clear after a rotation at the same position still happens
    assert ring.cleared[-1] == (11, 1)
    failing = FakeRing(busy=None)  # an older module, or a failed meta device: no more rotations
    c = tracking.Clearer(failing, R2)  # type: ignore[arg-type]
    c.acked(3, 1)
    assert not c.rotating


def test_setup_table_lines() -> None:
    plan = SetupPlan("/dev/vdb", "rep", "bdr_rep", 1000)
    assert plan.table(2048) == "0 2048 bdr /dev/vdb bdr_rep 1000"
    assert (
        SetupPlan("/dev/vdb", "rep", "bdr_rep", 1000, 256).table(2048)
        == "0 2048 bdr /dev/vdb bdr_rep 1000 256"
    )
    tracked = SetupPlan("/dev/vdb", "rep", "bdr_rep", 1000, None, "/dev/vdc")
    assert tracked.table(2048) == "0 2048 bdr /dev/vdb bdr_rep 1000 2 meta_device /dev/vdc"
    both = SetupPlan("/dev/vdb", "rep", "bdr_rep", 1000, 256, "/dev/vdc")
    assert both.table(2048) == "0 2048 bdr /dev/vdb bdr_rep 1000 4 region_sectors 256 meta_device /dev/vdc"


def test_promote_puts_the_device_behind_a_target_with_a_new_record(monkeypatch: pytest.MonkeyPatch) -> None:
    from bdr.cli import app, roles

    got: list[SetupPlan | None] = []
    monkeypatch.setattr(roles, "do_promote", lambda j, r, m, f, plan: got.append(plan) or 0)
    base = ["promote", "--journal", "/j", "--target-device", "/dev/vdb", "--metadata", "/m"]
    assert app.main([*base, "--name", "rep", "--chardev", "bdr_rep", "--meta-device", "/dev/vdc"]) == 0
    plan = got[-1]
    assert plan is not None and plan.meta_device == "/dev/vdc" and plan.new_meta
    assert plan.table(8) == "0 8 bdr /dev/vdb bdr_rep 16256 2 meta_device /dev/vdc"
    assert app.main([*base, "--meta-device", "/dev/vdc"]) != 0  # a record needs the target
