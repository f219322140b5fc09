"""Server apply logic in memory: sequence checks, coalescing, flush -> fdatasync -> metadata -> ack ordering."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from bdr import wire as p
from bdr.journal import JFlag, Journal
from bdr.server import Applier

W, F, D, Z = p.OP_WRITE, p.OP_FLUSH, p.OP_DISCARD, p.OP_WRITE_ZEROES
FUA = p.REC_FUA


class FakeTarget:
    """Records what the applier does, in order, together with the journal commits."""

    def __init__(self, log: list[tuple[object, ...]]) -> None:
        self.log = log

    def write_runs(self, runs: list[tuple[memoryview, int]]) -> None:
        for data, offset in runs:
            self.log.append(("write", offset, bytes(data)))

    def write_zeroes(self, offset: int, length: int) -> None:
        self.log.append(("zero", offset, length))

    def discard(self, offset: int, length: int) -> None:
        self.log.append(("zero", offset, length))  # reads as zeros (and may free the space)

    def sync(self) -> None:
        self.log.append(("fdatasync",))


class LoggingJournal(Journal):
    def __init__(self, path: Path, log: list[tuple[object, ...]]) -> None:
        super().__init__(path)
        self.log = log

    def store(self, header):  # type: ignore[no-untyped-def]
        h = super().store(header)
        self.log.append(("metadata", h.durable_seq))
        return h


def batch(recs: list[tuple[int, int, int, int, int]], sync: bool = False) -> p.Data:
    """recs: (seq, sector, len, op, flags); WRITE data is a byte pattern derived from the seq."""
    desc = b"".join(struct.pack("<QQIHHQ", *r, 0) for r in recs)
    data = b"".join(bytes([r[0] % 256]) * r[2] for r in recs if r[3] == W)
    return p.Data.parse(memoryview(p.DATA_HEAD.pack(len(recs), len(data)) + desc + data), 0x1 if sync else 0)


def pat(seq: int, n: int) -> bytes:
    return bytes([seq % 256]) * n


@pytest.fixture
def env(tmp_path: Path) -> tuple[Applier, list[tuple[object, ...]]]:
    log: list[tuple[object, ...]] = []
    j = LoggingJournal(tmp_path / "journal", log)
    j.commit(flags=JFlag.SEQ_VALID | JFlag.SOURCE_KNOWN, durable_seq=p.NO_SEQ)
    log.clear()
    a = Applier(FakeTarget(log), j)
    assert a.expect == 0
    return a, log


# (name, batches, expected operations, applied, durable)
CASES = [
    (
        "contiguous 4K writes coalesce into one write",
        [[(0, 0, 4096, W, 0), (1, 8, 4096, W, 0), (2, 16, 4096, W, 0)]],
        [("write", 0, pat(0, 4096) + pat(1, 4096) + pat(2, 4096))],
        2,
        p.NO_SEQ,
    ),
    (
        "small contiguous writes coalesce, a hole splits",
        [[(0, 0, 512, W, 0), (1, 1, 1024, W, 0), (2, 100, 512, W, 0), (3, 101, 512, W, 0)]],
        [("write", 0, pat(0, 512) + pat(1, 1024)), ("write", 51200, pat(2, 512) + pat(3, 512))],
        3,
        p.NO_SEQ,
    ),
    (
        "backwards neighbour is not merged",
        [[(0, 8, 4096, W, 0), (1, 0, 4096, W, 0)]],
        [("write", 4096, pat(0, 4096)), ("write", 0, pat(1, 4096))],
        1,
        p.NO_SEQ,
    ),
    (
        "flush: writes before it, fdatasync, metadata, then the rest",
        [[(0, 0, 512, W, 0), (1, 0, 0, F, 0), (2, 8, 512, W, 0)]],
        [("write", 0, pat(0, 512)), ("fdatasync",), ("metadata", 1), ("write", 4096, pat(2, 512))],
        2,
        1,
    ),
    (
        "two flushes in a batch: one sync at the last",
        [[(0, 0, 0, F, 0), (1, 0, 512, W, 0), (2, 0, 0, F, 0), (3, 8, 512, W, 0)]],
        [("write", 0, pat(1, 512)), ("fdatasync",), ("metadata", 2), ("write", 4096, pat(3, 512))],
        3,
        2,
    ),
    (
        "FUA write is a durability point",
        [[(0, 0, 512, W, FUA), (1, 8, 512, W, 0)]],
        [("write", 0, pat(0, 512)), ("fdatasync",), ("metadata", 0), ("write", 4096, pat(1, 512))],
        1,
        0,
    ),
    (
        "discard and write-zeroes zero the range",
        [[(0, 0, 512, W, 0), (1, 0, 4096, D, 0), (2, 16, 1024, Z, 0), (3, 1, 512, W, 0)]],
        [("write", 0, pat(0, 512)), ("zero", 0, 4096), ("zero", 8192, 1024), ("write", 512, pat(3, 512))],
        3,
        p.NO_SEQ,
    ),
    (
        "a discard the source does not read as zeros leaves the replica as it is",
        [[(0, 0, 512, W, 0), (1, 0, 4096, D, p.REC_UNZEROED), (2, 1, 512, W, 0)]],
        [("write", 0, pat(0, 512)), ("write", 512, pat(2, 512))],
        2,
        p.NO_SEQ,
    ),
    (
        "sync flag: fdatasync and metadata after the batch",
        [([(0, 0, 512, W, 0)], True)],
        [("write", 0, pat(0, 512)), ("fdatasync",), ("metadata", 0)],
        0,
        0,
    ),
    (
        "replayed batch is skipped entirely",
        [[(0, 0, 512, W, 0), (1, 1, 512, W, 0)], [(0, 0, 512, W, 0), (1, 1, 512, W, 0)]],
        [("write", 0, pat(0, 512) + pat(1, 512))],
        1,
        p.NO_SEQ,
    ),
    (
        "partly replayed batch applies only the new records",
        [[(0, 0, 512, W, 0)], [(0, 0, 512, W, 0), (1, 0, 0, F, 0), (2, 1, 512, W, 0)]],
        [("write", 0, pat(0, 512)), ("fdatasync",), ("metadata", 1), ("write", 512, pat(2, 512))],
        2,
        1,
    ),
    ("empty sync batch with nothing applied does nothing", [([], True)], [], p.NO_SEQ, p.NO_SEQ),
]


@pytest.mark.parametrize(("name", "batches", "ops", "applied", "durable"), CASES, ids=[c[0] for c in CASES])
def test_apply(
    env: tuple[Applier, list[tuple[object, ...]]],
    name: str,
    batches: list[object],
    ops: list[tuple[object, ...]],
    applied: int,
    durable: int,
) -> None:
    a, log = env
    for b in batches:
        recs, sync = b if isinstance(b, tuple) else (b, False)
        a.apply(batch(recs, sync))
    assert log == ops
    assert (a.applied, a.durable) == (applied, durable)
    assert a.ack() == p.Ack(applied, durable)


def test_gap_is_a_protocol_error(env: tuple[Applier, list[tuple[object, ...]]]) -> None:
    a, log = env
    a.apply(batch([(0, 0, 512, W, 0)]))
    with pytest.raises(p.RemoteProtocolError) as ei:
        a.apply(batch([(2, 0, 512, W, 0)]))
    assert ei.value.code is p.ErrorCode.SEQ_GAP
    assert len(log) == 1  # nothing of the bad batch was written


def test_rebase_after_scan_takes_the_first_record(env: tuple[Applier, list[tuple[object, ...]]]) -> None:
    a, _ = env
    a.restart_at(None)
    a.apply(batch([(500, 0, 512, W, 0)], sync=True))
    assert (a.applied, a.durable, a.expect) == (500, 500, 501)
    assert a.journal.header.durable_seq == 500
    assert a.journal.header.flags & JFlag.SEQ_VALID


def test_restart_at_sets_the_resume_point(env: tuple[Applier, list[tuple[object, ...]]]) -> None:
    a, _ = env
    a.restart_at(10)
    assert (a.applied, a.durable, a.expect) == (9, 9, 10)
    with pytest.raises(p.RemoteProtocolError):
        a.apply(batch([(11, 0, 512, W, 0)]))
    a.apply(batch([(9, 0, 512, W, 0), (10, 0, 512, W, 0)]))
    assert a.applied == 10 and a.stats.skipped == 1


def test_consistent_again_once_durable_reaches_the_consistent_seq(tmp_path: Path) -> None:
    log: list[tuple[object, ...]] = []
    j = LoggingJournal(tmp_path / "j", log)
    j.commit(flags=JFlag.SEQ_VALID | JFlag.SOURCE_KNOWN, durable_seq=4, consistent_seq=6)
    a = Applier(FakeTarget(log), j)
    a.apply(batch([(5, 0, 512, W, 0)], sync=True))
    assert not j.header.flags & JFlag.CONSISTENT
    a.apply(batch([(6, 0, 512, W, 0)], sync=True))
    assert j.header.flags & JFlag.CONSISTENT
    assert j.header.consistent_seq == p.NO_SEQ


def test_state_survives_a_restart(tmp_path: Path) -> None:
    log: list[tuple[object, ...]] = []
    j = LoggingJournal(tmp_path / "j", log)
    j.commit(flags=JFlag.SEQ_VALID | JFlag.SOURCE_KNOWN)
    a = Applier(FakeTarget(log), j)
    a.apply(batch([(0, 0, 512, W, 0), (1, 0, 0, F, 0), (2, 0, 512, W, 0)]))
    j.close()
    b = Applier(FakeTarget([]), Journal(tmp_path / "j"))
    # the unsynced record 2 is gone with the crash; the client resends from durable + 1
    assert (b.applied, b.durable, b.expect) == (1, 1, 2)


def test_real_file_target_coalesced_writes(tmp_path: Path) -> None:
    from bdr.server import Replica

    img = tmp_path / "rep.img"
    img.write_bytes(bytes(1 << 20))
    r = Replica(img)
    j = Journal(tmp_path / "j")
    j.commit(flags=JFlag.SEQ_VALID | JFlag.SOURCE_KNOWN)
    a = Applier(r, j)
    a.apply(batch([(0, 0, 4096, W, 0), (1, 8, 4096, W, 0), (2, 0, 0, F, 0), (3, 2000, 512, D, 0)]))
    r.close()
    data = img.read_bytes()
    assert data[:8192] == pat(0, 4096) + pat(1, 4096)
    assert a.stats.writes == 1
    assert a.durable == 2
