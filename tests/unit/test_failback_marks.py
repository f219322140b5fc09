"""A failback that resyncs only what the old source marked: its meta device read from userspace, the marks kept
in its journal by bdr demote, offered by its server (WELCOME MARKED, MARKS), and the checks on both sides that
they hold every write the old source made after the point its replica was promoted at."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.unit.test_session import DEV, MemServer, talk

from bdr import replica_state
from bdr import wire as p
from bdr.cli import roles
from bdr.client import tracking
from bdr.client.metadata import NO_RING, SourceMeta, read_metadata
from bdr.generations import Generations
from bdr.journal import JFlag, Journal
from bdr.journal.marks import FailbackMarks, coarsen
from bdr.kernel.meta import MetaError, read_marks
from bdr.seq import NO_SEQ
from bdr.server import ServerSession, SessionClosed
from bdr.testing.meta_area import pack_meta_area

R_OLD, R_NEW = b"o" * 16, b"n" * 16
A = Generations.first()  # the old source's generation
B = A.successor(99)  # the promoted side's: A's ended at seq 99
REGION = 64 << 10


def test_read_marks_of_a_meta_device(tmp_path: Path) -> None:
    dev = tmp_path / "meta"
    dev.write_bytes(pack_meta_area(DEV, REGION, R_OLD, 100, A.current, [0, 1, 5, DEV // REGION - 1]))
    m = read_marks(str(dev))
    assert (m.dev_size, m.region_bytes, m.clear_ring, m.clear_pos, m.clear_generation) == (
        DEV,
        REGION,
        R_OLD,
        100,
        A.current,
    )
    assert m.extents == [(0, 2 * REGION), (5 * REGION, REGION), (DEV - REGION, REGION)]
    raw = bytearray(dev.read_bytes())
    raw[60] ^= 1  # the clear's generation, under the CRC
    dev.write_bytes(bytes(raw))
    with pytest.raises(MetaError, match="damaged"):
        read_marks(str(dev))
    dev.write_bytes(bytes(8192))
    with pytest.raises(MetaError, match="zeros"):
        read_marks(str(dev))


def test_kept_marks_survive_the_journal_and_are_coarsened_to_fit(tmp_path: Path) -> None:
    server = MemServer(tmp_path)
    ext = [(i * 2 * REGION, REGION) for i in range(20)]
    m = FailbackMarks(A.current, DEV, R_OLD, 100, ext)
    server.journal.store_marks(m)
    assert server.journal.load_marks() == m
    server.journal.store_marks(None)
    assert server.journal.load_marks() is None
    few = coarsen([(0, 4), (10, 4), (16, 4), (100, 4)], 2)
    assert few == [(0, 20), (100, 4)]  # the smallest gaps filled: still covers every range
    assert coarsen(ext, 20) == ext


def demoted(tmp_path: Path, marks: FailbackMarks | None) -> MemServer:
    """A's device, demoted in generation A (not at an exact point), with ``marks`` kept."""
    server = MemServer(tmp_path)
    j = server.journal
    j.store(replica_state.demoted(j.header, A))
    j.store_marks(marks)
    return server


def hello(gens: Generations, features: int = p.ALL_FEATURES) -> p.Hello:
    return p.Hello(1, features, 512, DEV, b"b" * 16, R_NEW, gens)


def test_the_server_offers_its_marks_to_the_side_promoted_from_its_generation(tmp_path: Path) -> None:
    marks = FailbackMarks(A.current, DEV, R_OLD, 100, [(0, REGION), (3 * REGION, REGION)])
    first = demoted(tmp_path, marks)
    sess = ServerSession(first.replica, first.journal, first.applier)
    c = p.Connection(p.Role.CLIENT)
    w, m = talk(sess, c, hello(B))
    assert isinstance(w, p.Welcome) and w.flags & p.WelcomeFlag.MARKED
    assert m == p.Marks(A.current, R_OLD, 100, marks.extents)
    assert talk(sess, c, p.ScanBegin(1, p.ScanMode.HASH, p.ScanFlag.MARKED, 4096)) == []
    # without the feature, from an unrelated source, with marks of another generation, or once a resync
    # began on the replica (the scan above): none offered, and a MARKED scan is refused
    other = FailbackMarks(B.current, DEV, R_OLD, 100, marks.extents)
    for i, (h, kept) in enumerate(
        (
            (hello(B, p.ALL_FEATURES & ~p.Feature.MARKS), marks),
            (hello(Generations.first()), marks),
            (hello(B), other),
            (hello(B), None),
        )
    ):
        (tmp_path / str(i)).mkdir()
        srv = first if kept is None else demoted(tmp_path / str(i), kept)
        sess = ServerSession(srv.replica, srv.journal, srv.applier)
        c = p.Connection(p.Role.CLIENT)
        try:
            got = talk(sess, c, h)
        except SessionClosed:
            assert i == 1  # the unrelated source is a split brain
            continue
        assert len(got) == 1 and not got[0].flags & p.WelcomeFlag.MARKED  # type: ignore[union-attr]
        with pytest.raises(SessionClosed):
            talk(sess, c, p.ScanBegin(1, p.ScanMode.HASH, p.ScanFlag.MARKED, 4096))


def test_the_client_uses_marks_only_when_they_cover_everything_after_its_promotion() -> None:
    meta = SourceMeta(B, gen_ring=R_NEW, base_ring=R_OLD, base_seq=99)
    ok = p.Marks(A.current, R_OLD, 100, [(0, REGION)])
    assert tracking.marks_refusal(ok, meta, R_NEW) is None
    assert tracking.marks_refusal(p.Marks(A.current, R_OLD, 50, [(0, REGION)]), meta, R_NEW) is None
    assert "after seq 99" in str(tracking.marks_refusal(p.Marks(A.current, R_OLD, 101, []), meta, R_NEW))
    assert "another capture ring" in str(
        tracking.marks_refusal(p.Marks(A.current, R_NEW, 100, []), meta, R_NEW)
    )
    assert "not in the one" in str(tracking.marks_refusal(p.Marks(B.current, R_OLD, 100, []), meta, R_NEW))
    assert "not created with" in str(tracking.marks_refusal(ok, meta, b"x" * 16))
    assert tracking.marks_refusal(ok, None, R_NEW) is not None


def test_marks_on_the_wire() -> None:
    m = p.Marks(7, R_OLD, 9, [(0, 4096), (8192, 512)])
    assert p.parse_payload(p.MsgType.MARKS, 0, memoryview(p.encode(m))[p.HEADER_SIZE :]) == m
    bad = p.Marks(7, R_OLD, 9, [(8192, 4096), (0, 4096)])  # out of order
    with pytest.raises(p.ProtocolError, match="out of order"):
        p.parse_payload(p.MsgType.MARKS, 0, memoryview(p.encode(bad))[p.HEADER_SIZE :])


def test_demote_takes_the_marks_of_the_meta_device_the_target_wrote_them_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine, other = tmp_path / "mine", tmp_path / "other"
    mine.write_bytes(b"x")
    other.write_bytes(b"y")
    assert roles._target_meta_device("t", str(mine), None) == str(mine)
    assert roles._target_meta_device("t", str(mine), str(mine)) == str(mine)
    assert roles._target_meta_device("t", str(mine), str(other)) is None
    assert f"marked its writes on {mine}" in capsys.readouterr().err
    assert roles._target_meta_device("t", None, str(other)) is None
    assert "had no meta device" in capsys.readouterr().err


@pytest.mark.parametrize("consistent", [True, False])
def test_promote_records_where_the_replica_stood_only_if_it_is_consistent(
    tmp_path: Path, consistent: bool
) -> None:
    img, jpath, meta = tmp_path / "replica.img", tmp_path / "journal", tmp_path / "b.meta"
    img.write_bytes(bytes(DEV))
    j = Journal(jpath)
    flags = JFlag.SEQ_VALID | JFlag.SOURCE_KNOWN | JFlag.HAS_DATA | JFlag.CONSISTENT
    if not consistent:
        flags = (flags & ~JFlag.CONSISTENT) | JFlag.SCANNING  # a direct resync was running
    j.commit(flags=flags, ring_id=R_OLD, source_id=b"a" * 16, source_size=DEV, durable_seq=41, generations=A)
    j.close()
    roles.promote(str(jpath), str(img), str(meta), force=True)
    m = read_metadata(meta)
    assert m is not None and m.generations.past[-1] == (A.current, 41)
    assert (m.base_ring, m.base_seq) == ((R_OLD, 41) if consistent else (NO_RING, NO_SEQ))
