"""The journal's record area: record and state formats, staging, commit, replay, discard, corruption, size."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bdr.journal import Journal
from bdr.journal import area as jr
from bdr.journal import format as jf
from bdr.journal.errors import JournalCorrupt, JournalFull
from bdr.journal.faults import CRASH_ENV
from bdr.server import Replica

DEV = 4 << 20


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    replica = tmp_path / "replica.img"
    replica.write_bytes(os.urandom(DEV))
    Journal(tmp_path / "journal").close()
    yield tmp_path / "journal", replica


def open_area(path: Path, limit: int | None = None) -> jr.RecordArea:
    fd = os.open(path, os.O_RDWR)
    return jr.RecordArea(fd, str(path), limit)


def close_area(area: jr.RecordArea) -> None:
    os.close(area.fd)


def stage_some(area: jr.RecordArea) -> bytes:
    """Stage a few writes and zero ranges; return the bytes they make of a replica of zeros."""
    area.begin()
    expect = bytearray(DEV)
    for off, n in ((0, 65536), (65536 * 5, 65536), (1234 * 512, 4096), (65536 * 5 + 100, 7)):
        data = os.urandom(n)
        area.stage_write(data, off)
        expect[off : off + n] = data
    area.stage_zeroes(65536 * 5, 512)
    expect[65536 * 5 : 65536 * 5 + 512] = bytes(512)
    return bytes(expect)


@given(
    rtype=st.sampled_from([jf.RecType.BLOCK, jf.RecType.ZERO, jf.RecType.COMMIT]),
    epoch=st.integers(0, 2**64 - 1),
    index=st.integers(0, 2**64 - 1),
    offset=st.integers(0, 2**64 - 1),
    data=st.binary(max_size=300),
)
def test_record_round_trip(rtype: jf.RecType, epoch: int, index: int, offset: int, data: bytes) -> None:
    if rtype is not jf.RecType.BLOCK:
        data = b""
    rec = jf.Record(rtype, epoch, index, offset, len(data), data)
    buf = rec.pack()
    assert len(buf) == rec.size and len(buf) % jf.ALIGN == 0
    parsed = jf.parse_record_header(buf)
    assert parsed is not None
    assert parsed[:5] == (rtype, epoch, index, offset, len(data))
    got = buf[jf.REC_HEADER : jf.REC_HEADER + len(data)]
    assert got == data and jf.record_checksum(buf, got) == parsed[5]


@given(st.binary(min_size=64, max_size=64))
def test_garbage_is_not_a_record_header(garbage: bytes) -> None:
    assert jf.parse_record_header(garbage) is None or garbage[:8] == jf.REC_MAGIC


def test_state_block_round_trip_and_corruption() -> None:
    s = jf.StateBlock(jf.AreaState.COMMITTED, 7, 3, jf.RECORDS_AT + 640, 9)
    block = s.pack()
    assert jf.StateBlock.parse(block) == s
    bad = bytearray(block)
    bad[30] ^= 0x40
    assert jf.StateBlock.parse(bytes(bad)) is None


def test_committed_resync_is_applied_and_replay_is_idempotent(paths: tuple[Path, Path]) -> None:
    jpath, rpath = paths
    rpath.write_bytes(bytes(DEV))
    area = open_area(jpath)
    expect = stage_some(area)
    area.commit()
    close_area(area)
    shutil.copy(jpath, jpath.with_suffix(".committed"))
    replica = Replica(rpath)
    area = open_area(jpath)
    assert area.state.state is jf.AreaState.COMMITTED
    assert area.recover(replica).startswith("replayed a committed resync (5 records)")
    assert rpath.read_bytes() == expect
    assert area.state.state is jf.AreaState.CLEAN
    close_area(area)
    area = open_area(jpath)
    assert area.recover(replica) == ""  # clean: nothing to do
    close_area(area)
    # a crash after the apply, before the area was marked clean: the same records are applied again
    shutil.copy(jpath.with_suffix(".committed"), jpath)
    area = open_area(jpath)
    area.recover(replica)
    close_area(area)
    replica.close()
    assert rpath.read_bytes() == expect


def test_uncommitted_resync_is_discarded(paths: tuple[Path, Path]) -> None:
    jpath, rpath = paths
    before = rpath.read_bytes()
    area = open_area(jpath)
    stage_some(area)
    area.sync()
    close_area(area)
    replica = Replica(rpath)
    area = open_area(jpath)
    assert area.state.state is jf.AreaState.OPEN
    assert "discarded an uncommitted resync" in area.recover(replica)
    assert area.state.state is jf.AreaState.CLEAN
    close_area(area)
    replica.close()
    assert rpath.read_bytes() == before


@pytest.mark.parametrize("where", ["data", "header", "commit"])
def test_corrupt_committed_journal_is_refused_and_nothing_applied(
    paths: tuple[Path, Path], where: str
) -> None:
    jpath, rpath = paths
    before = rpath.read_bytes()
    area = open_area(jpath)
    stage_some(area)
    area.commit()
    commit_off = area.state.commit_off
    close_area(area)
    at = {
        "data": jf.RECORDS_AT + jf.REC_HEADER + 65536 // 2,  # inside the first record's data
        "header": jf.RECORDS_AT + jf.REC_HEADER + 65536 + 32,  # offset field of the second record
        "commit": commit_off + 30,
    }[where]
    with open(jpath, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))
    replica = Replica(rpath)
    area = open_area(jpath)
    with pytest.raises(JournalCorrupt, match=r"record \d+ at byte \d+"):
        area.recover(replica)
    assert area.state.state is jf.AreaState.COMMITTED  # still refused on the next start
    close_area(area)
    replica.close()
    assert rpath.read_bytes() == before


def test_both_state_copies_corrupt_is_refused(paths: tuple[Path, Path]) -> None:
    jpath, _ = paths
    area = open_area(jpath)
    area.begin()  # state copy B
    area.discard()  # state copy A
    close_area(area)
    with open(jpath, "r+b") as f:
        for at in (jf.STATE_AT + 40, jf.STATE_AT + 4096 + 40):
            f.seek(at)
            f.write(b"\xee")
    with pytest.raises(JournalCorrupt, match="both copies of the record area state are corrupt"):
        open_area(jpath)


def test_torn_state_write_falls_back_to_the_other_copy(paths: tuple[Path, Path]) -> None:
    jpath, _ = paths
    area = open_area(jpath)
    area.begin()  # generation 1 -> copy B
    stage_some(area)  # generation 2 -> copy A (begin again)
    gen = area.state.generation
    close_area(area)
    with open(jpath, "r+b") as f:
        f.seek(jf.STATE_AT + (gen % 2) * 4096 + 20)
        f.write(b"\xee")
    area = open_area(jpath)
    assert area.state.generation == gen - 1 and area.state.state is jf.AreaState.OPEN
    close_area(area)


def test_journal_too_small_for_the_resync(paths: tuple[Path, Path]) -> None:
    jpath, _ = paths
    area = open_area(jpath, limit=jf.RECORDS_AT + 100_000)
    area.begin()
    area.stage_write(bytes(65536), 0)
    with pytest.raises(JournalFull, match="too small for this resync"):
        area.stage_write(bytes(65536), 65536)
    close_area(area)


def test_overlay_shows_the_staged_writes(paths: tuple[Path, Path]) -> None:
    jpath, rpath = paths
    area = open_area(jpath)
    area.begin()
    area.stage_write(b"a" * 100, 1000)
    area.stage_zeroes(1050, 10)
    area.stage_write(b"b" * 10, 990)
    buf = bytearray(rpath.read_bytes()[:4096])
    expect = bytearray(buf)
    expect[1000:1100] = b"a" * 100
    expect[1050:1060] = bytes(10)
    expect[990:1000] = b"b" * 10
    area.overlay(memoryview(buf), 0)
    assert buf == expect
    close_area(area)


def test_crash_hook_only_when_asked(monkeypatch: pytest.MonkeyPatch, paths: tuple[Path, Path]) -> None:
    jpath, _ = paths
    monkeypatch.setenv(CRASH_ENV, "elsewhere")
    area = open_area(jpath)
    stage_some(area)
    area.commit()  # the hook names another point: no crash
    assert area.state.state is jf.AreaState.COMMITTED
    close_area(area)


def test_overlay_across_index_buckets(paths: tuple[Path, Path]) -> None:
    jpath, rpath = paths
    area = open_area(jpath)
    area.begin()
    edge = 1 << jr.BUCKET_SHIFT
    area.stage_write(b"x" * 8192, edge - 4096)  # straddles two buckets
    area.stage_zeroes(0, 3 * edge)  # covers everything so far, later: wins
    area.stage_write(b"y" * 10, edge + 5)
    for win_off in (edge - 8192, edge, 2 * edge - 4096):
        buf = bytearray(rpath.read_bytes()[win_off : win_off + 16384])
        area.overlay(memoryview(buf), win_off)
        expect = bytearray(16384)
        if win_off <= edge + 5 < win_off + 16384:
            expect[edge + 5 - win_off : edge + 15 - win_off] = b"y" * 10
        assert buf == expect, win_off
    close_area(area)


def apply_to(area: jr.RecordArea, rpath: Path) -> bytes:
    area.commit()
    replica = Replica(rpath)
    area.apply(replica)
    replica.close()
    return rpath.read_bytes()


@settings(deadline=None)  # each example writes and reads files: its time follows the machine's load
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 63), st.integers(1, 16), st.booleans()),  # sector, sectors, zeroes?
        min_size=1,
        max_size=80,
    )
)
# the staged records fill the area to the byte, leaving just the room kept for the commit record
@example(ops=[(0, 1, False)] * 4 + [(0, 1, True)] * 2 + [(0, 15, False)] + [(0, 16, False)] * 4)
def test_compacted_staging_applies_what_the_records_wrote(ops: list[tuple[int, int, bool]]) -> None:
    """Rewrites of a 32 KiB range into an area that holds little more: compaction keeps each byte once, newest
    version, and the apply gives the replica the bytes of the records applied in order."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        jpath, rpath = Path(d) / "journal", Path(d) / "replica.img"
        rpath.write_bytes(bytes(range(256)) * 256)
        Journal(jpath).close()
        # 32 KiB of data, plus a record header for each of up to 80 pieces
        area = open_area(jpath, limit=jf.RECORDS_AT + (32 << 10) + 128 * 81 + 128)
        area.begin()
        expect = bytearray(rpath.read_bytes())
        for i, (sector, count, zero) in enumerate(ops):
            off, n = sector * 512, min(count, 64 - sector) * 512
            if zero:
                area.stage_zeroes(off, n)
                expect[off : off + n] = bytes(n)
            else:
                data = bytes([i + 1]) * n
                area.stage_write(data, off)
                expect[off : off + n] = data
        buf = bytearray(rpath.read_bytes())
        area.overlay(memoryview(buf), 0)  # reads through the staging see the newest bytes, compacted or not
        assert buf == expect
        assert area.peak <= (32 << 10) + 128 * 81 + 128
        assert apply_to(area, rpath) == bytes(expect)
        close_area(area)


def test_rewriting_the_same_blocks_does_not_grow_the_staging(paths: tuple[Path, Path]) -> None:
    """A journal as large as the range staged holds a resync whose blocks are written many times over."""
    jpath, rpath = paths
    area = open_area(jpath, limit=jf.RECORDS_AT + (264 << 10))  # 256 KiB range: 64 records of 4 KiB + headers
    area.begin()
    expect = bytearray(rpath.read_bytes())
    for _ in range(10):  # 10 x the area in staged bytes
        for blk in range(64):
            data = os.urandom(4096)
            area.stage_write(data, blk * 4096)
            expect[blk * 4096 : (blk + 1) * 4096] = data
    assert area.compactions > 0
    assert area.staged_bytes == 10 * (256 << 10)
    assert apply_to(area, rpath) == bytes(expect)
    close_area(area)
