"""The point-in-time history with a real applier, replica file and journal: every checkpoint restores to the
bytes the replica held then; retention, gaps, torn tails, rollback and the refusals."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import signal
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bdr import replica_state
from bdr import wire as p
from bdr.history import At, History, HistoryError, HistoryWriter, Meta, PointRefused, parse_at
from bdr.history import restore as restore_mod
from bdr.history import undo as undo_mod
from bdr.history import writer as writer_mod
from bdr.history.format import HEAD_SIZE, Kind, decode, encode, segment_numbers, unpack_extents
from bdr.history.reader import Reader
from bdr.history.restore import restore, rollback
from bdr.history.segments import HistoryIOError
from bdr.history.undo import payload_room
from bdr.journal import JFlag, Journal, ReplicaIOError
from bdr.server import Applier
from bdr.server.replica import Replica

W, F, D, Z = p.OP_WRITE, p.OP_FLUSH, p.OP_DISCARD, p.OP_WRITE_ZEROES
FUA = p.REC_FUA
SIZE = 256 << 10  # the replica: 64 blocks of 4 KiB


def data_for(seq: int, n: int) -> bytes:
    return hashlib.shake_128(seq.to_bytes(8, "little")).digest(n)


def batch(recs: list[tuple[int, int, int, int, int]]) -> p.Data:
    """recs: (seq, sector, len, op, flags)."""
    desc = b"".join(struct.pack("<QQIHHQ", *r, 0) for r in recs)
    data = b"".join(data_for(r[0], r[2]) for r in recs if r[3] == W)
    return p.Data.parse(memoryview(p.DATA_HEAD.pack(len(recs), len(data)) + desc + data), 0)


class Rig:
    """A replica file, its journal and its history, applied to by the server's applier."""

    def __init__(self, tmp: Path, size_limit: int | None = 64 << 20, size: int = SIZE) -> None:
        self.tmp = tmp
        self.replica_path = tmp / "replica.img"
        self.replica_path.write_bytes(os.urandom(size))  # what the replica held before the history began
        self.replica = Replica(self.replica_path)
        self.journal = Journal(tmp / "journal")
        self.journal.commit(
            flags=JFlag.SEQ_VALID | JFlag.SOURCE_KNOWN | JFlag.CONSISTENT | JFlag.HAS_DATA,
            durable_seq=p.NO_SEQ,
        )
        self.dir = tmp / "history"
        self.history = self.open_history(size_limit)
        self.applier = Applier(self.replica, self.journal)
        self.applier.history = self.history
        self.seq = 0
        self.states: dict[int, bytes] = {}  # checkpoint seq -> replica bytes then

    def open_history(self, size_limit: int | None = 64 << 20) -> HistoryWriter:
        meta = Meta(str(self.replica_path), self.replica.size, str(self.tmp / "journal"))
        return HistoryWriter(self.dir, self.replica.fd, meta, size_limit, None)

    def apply(self, recs: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int, int]]:
        """recs: (sector, len, op, flags), numbered from the next seq, applied as one DATA batch."""
        numbered = []
        for sector, n, op, flags in recs:
            numbered.append((self.seq, sector, n, op, flags))
            self.seq += 1
        self.applier.apply(batch(numbered))
        return numbered

    def close(self) -> None:
        self.history.close()
        self.replica.close()
        self.journal.close()


def track(rig: Rig, model: bytearray, recs: list[tuple[int, int, int, int]]) -> None:
    """Apply ``recs`` and keep ``model`` (what the replica holds after each record) and the rig's states (the
    bytes at each point) in step."""
    for seq, sector, n, op, flags in rig.apply(recs):
        if op == W:
            model[sector * 512 : sector * 512 + n] = data_for(seq, n)
        elif op in (D, Z):
            model[sector * 512 : sector * 512 + n] = bytes(n)
        if op == F or flags & FUA:
            rig.states[seq] = bytes(model)


def restored(rig: Rig, at: At) -> bytes:
    dest = rig.tmp / "restored.img"
    restore(rig.dir, at, str(dest), quiet=True)
    return dest.read_bytes()


BLOCKS = SIZE // 4096
record = st.one_of(  # (sector, length, op, flags), inside the replica
    st.builds(
        lambda b, n, fl: (b * 8, n * 4096, W, fl),
        st.integers(0, BLOCKS - 3),
        st.integers(1, 3),
        st.sampled_from([0, 0, 0, FUA]),
    ),
    st.builds(lambda s: (s, 512, W, 0), st.integers(0, SIZE // 512 - 1)),  # a 512-byte write
    st.just((0, 0, F, 0)),
    st.builds(
        lambda b, n, op: (b * 8, n * 4096, op, 0),
        st.integers(0, BLOCKS - 4),
        st.integers(1, 4),
        st.sampled_from([D, Z]),
    ),
)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(record, min_size=1, max_size=12), min_size=1, max_size=8))
def test_every_checkpoint_restores_to_what_the_replica_held_then(tmp_path_factory, batches) -> None:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("h")
    rig = Rig(tmp)
    model = bytearray(rig.replica_path.read_bytes())  # what the replica holds after each record
    try:
        for b in [*batches, [(0, 0, F, 0)]]:
            track(rig, model, b)
            assert rig.replica_path.read_bytes() == bytes(model)
        with History(rig.dir) as h:
            assert [e.seq for e in h.points()] == sorted(rig.states)
        for seq, want in rig.states.items():
            assert restored(rig, At(seq=seq)) == want, f"checkpoint {seq}"
    finally:
        rig.close()


def test_points_inside_one_batch_are_each_a_checkpoint(tmp_path: Path) -> None:
    """Several flushes in one DATA batch: each is a point, not only the last (the applier syncs at each)."""
    rig = Rig(tmp_path)
    before = rig.replica_path.read_bytes()
    rig.apply([(0, 4096, W, 0), (0, 0, F, 0), (0, 4096, W, 0), (8, 4096, W, FUA), (16, 4096, W, 0)])
    rig.apply([(0, 0, F, 0)])
    with History(rig.dir) as h:
        assert [e.seq for e in h.points()] == [1, 3, 5]
    one = bytearray(before)
    one[0:4096] = data_for(0, 4096)
    assert restored(rig, At(seq=1)) == bytes(one)
    assert restored(rig, At(seq=2)) == bytes(one)  # the newest point at or before seq 2
    one[0:4096] = data_for(2, 4096)
    one[4096:8192] = data_for(3, 4096)
    assert restored(rig, At(seq=3)) == bytes(one)
    rig.close()


@pytest.mark.parametrize("length", [4096, 8192, 128 << 10], ids=["4KiB", "8KiB", "128KiB"])
def test_before_images_that_start_with_zeros_are_kept_whole(tmp_path: Path, length: int) -> None:
    """Only a before-image of zeros throughout is kept as "zeros"; one that starts with zeros keeps its data
    (small extents are read one way, large ones another: both are covered)."""
    rig = Rig(tmp_path)
    rig.apply([(0, 512, Z, 0), (0, 0, F, 0)])  # the first sector of each block now reads zeros
    rig.apply([(8, 512, Z, 0), (32, 512, Z, 0), (0, 0, F, 0)])
    rig.apply([(64, 4096, Z, 0), (0, 0, F, 0)])  # a whole block of zeros
    before = rig.replica_path.read_bytes()
    assert before[:512] == bytes(512) and before[512:4096] != bytes(3584)
    point = rig.seq - 1
    rig.apply([(0, length, W, 0), (64, 4096, W, 0), (0, 0, F, 0)])
    assert rig.replica_path.read_bytes() != before
    assert restored(rig, At(seq=point)) == before
    rig.close()


def long_runs_batch(rig: Rig) -> list[tuple[int, int, int, int]]:
    """Writes of 1 MiB records in long runs, 5.5 MiB in all (6 pieces for the reader process), one of them
    over bytes an earlier run of the same batch wrote, then a flush."""
    mib = 1 << 20
    return [
        *[(k * 2048, mib, W, 0) for k in range(3)],  # [0, 3 MiB)
        (512, mib // 2, W, 0),  # [256 KiB, 768 KiB) again
        *[(k * 2048, mib, W, 0) for k in range(4, 6)],  # [4 MiB, 6 MiB)
        (0, 0, F, 0),
    ]


def scattered_batch(rig: Rig, count: int = 600) -> list[tuple[int, int, int, int]]:
    """``count`` 4 KiB writes at random blocks (some written twice), then a flush: pieces of 256 writes."""
    rnd = random.Random(count)
    blocks = rig.replica.size // 4096
    return [*[(rnd.randrange(blocks) * 8, 4096, W, 0) for _ in range(count)], (0, 0, F, 0)]


def kept_extents(directory: Path) -> list[tuple[int, int]]:
    """The (offset, length) extents of every UNDO record the history's files hold."""
    with History(directory) as h:
        out: list[tuple[int, int]] = []
        for e in h.entries():
            if e.kind is Kind.UNDO:
                offsets, lengths, _, _ = unpack_extents(h.read_payload(e), e.offset)
                out += zip(offsets, lengths, strict=True)
    return out


def watch_writes(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, taken: list[int] | None = None
) -> list[list[tuple[int, int, int]]]:
    """Check, as each piece of a batch is written to the replica, that the history's files already hold a
    record of what each of its runs overwrites; returns the pieces written.  ``taken``: gets the ends of the
    data asked to be received ahead (the source's prefetch), and the piece count (negative) at each write."""
    writes: list[list[tuple[int, int, int]]] = []
    real = rig.history.preserve_while_writing

    def checked(
        runs: list[tuple[int, int, int]],
        write: Callable[[list[tuple[int, int, int]]], None],
        prefetch: Callable[[int], None],
    ) -> None:
        def write_checked(piece: list[tuple[int, int, int]]) -> None:
            kept = kept_extents(rig.dir)
            for _, n, off in piece:
                assert any(o <= off and off + n <= o + k for o, k in kept), f"{n} bytes at {off} not kept"
            writes.append(piece)
            if taken is not None:
                taken.append(-len(writes))
            write(piece)

        def prefetch_noted(end: int) -> None:
            if taken is not None:
                taken.append(end)
            prefetch(end)

        real(runs, write_checked, prefetch_noted)

    monkeypatch.setattr(rig.history, "preserve_while_writing", checked)
    return writes


def test_batches_are_kept_by_the_reader_process_ahead_of_their_writes_and_restore_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of long runs and one of scattered small writes: their before-images are kept by the reader
    process (none by the server itself), a piece at a time, each piece's record in the history before the piece
    is written, and each checkpoint restores exactly, also where a write of the batch overwrote an earlier
    one."""
    rig = Rig(tmp_path, size=8 << 20)
    rig.apply([(0, 0, F, 0)])
    states = {rig.seq - 1: rig.replica_path.read_bytes()}
    in_server: list[int] = []
    real_fill = writer_mod.fill_undo
    monkeypatch.setattr(writer_mod, "fill_undo", lambda *a: in_server.append(1) or real_fill(*a))
    taken: list[int] = []
    writes = watch_writes(rig, monkeypatch, taken)
    rig.apply(long_runs_batch(rig))
    states[rig.seq - 1] = rig.replica_path.read_bytes()
    rig.apply(scattered_batch(rig))
    states[rig.seq - 1] = rig.replica_path.read_bytes()
    assert rig.history.reader is not None and rig.history.reader.proc.poll() is None
    assert not in_server  # every before-image was read by the reader process
    assert [len(w) for w in writes] == [1, 1, 1, 2, 1, 1, 256, 256, 88]  # pieces: 1 MiB, or 256 writes
    # while each piece's record is being kept, its data (up to the end of its last run) may be received
    expected: list[int] = []
    for k, w in enumerate(writes, 1):
        expected += [w[-1][0] + w[-1][1], -k]
    assert taken == expected
    with History(rig.dir) as h:
        assert len([e for e in h.entries() if e.kind is Kind.UNDO]) == 9
        assert [e.seq for e in h.points()] == list(states)
    for seq, want in states.items():
        assert restored(rig, At(seq=seq)) == want
    rig.close()


@pytest.mark.parametrize("limit_mib", [16, 32])
def test_the_reader_process_keeps_records_across_segments(tmp_path: Path, limit_mib: int) -> None:
    """A small history (segments of 2 or 4 MiB): batches whose pieces run past the end of a segment start the
    next one between pieces (with records in flight or not), and every record and checkpoint stays readable and
    restores exactly."""
    rig = Rig(tmp_path, size_limit=limit_mib << 20, size=8 << 20)
    rig.apply([(0, 0, F, 0)])
    states = {rig.seq - 1: rig.replica_path.read_bytes()}
    for _ in range(3):
        rig.apply(long_runs_batch(rig))
        states[rig.seq - 1] = rig.replica_path.read_bytes()
        rig.apply(scattered_batch(rig, 700))
        states[rig.seq - 1] = rig.replica_path.read_bytes()
    assert rig.history.reader is not None
    with History(rig.dir) as h:
        assert len(h.segments) > 4 and not any(s.torn for s in h.segments)
        assert h.bytes_used <= limit_mib << 20
        offered = [e.seq for e in h.points()]
    assert len(offered) >= 3 and offered == list(states)[-len(offered) :]
    for seq in offered:
        assert restored(rig, At(seq=seq)) == states[seq]
    rig.close()


def test_runs_that_do_not_overlap_are_kept_straight_from_the_replicas_pages(tmp_path: Path) -> None:
    """Batches whose runs do not overlap (a long sequential run; long runs between scattered small writes):
    the reader process writes their large extents to the history straight from its mapping of the replica, the
    small ones from its buffer, in order; a 1 MiB extent of zeros takes no data.  Each checkpoint restores
    exactly."""
    mib = 1 << 20
    rig = Rig(tmp_path, size=8 << 20)
    model = bytearray(rig.replica_path.read_bytes())
    track(rig, model, [(2 * mib // 512, mib, Z, 0), (5 * mib // 512, 4096, Z, 0), (0, 0, F, 0)])
    assert rig.history.reader is None  # nothing so far went through the reader process
    track(rig, model, [*[(k * 2048, mib, W, 0) for k in range(6)], (0, 0, F, 0)])  # [0, 6 MiB): one run
    assert rig.history.reader is not None
    track(rig, model, [(2 * mib // 512, mib, Z, 0), (5 * mib // 512, 4096, Z, 0), (0, 0, F, 0)])
    blk = 7 * mib // 512
    track(
        rig,
        model,
        [
            (blk, 4096, W, 0),
            (0, mib // 2, W, 0),
            (blk + 16, 4096, W, 0),
            (2 * mib // 512, mib, W, 0),  # zeros before
            (blk + 32, 512, W, 0),
            (5 * mib // 512 - 8, 12288, W, 0),  # 4 KiB of zeros in the middle
            (3 * mib // 512, mib, W, 0),
            (4 * mib // 512, mib // 2, W, 0),  # one run of 1.5 MiB with the one before
            (0, 0, F, 0),
        ],
    )
    with History(rig.dir) as h:
        undo = [e for e in h.entries() if e.kind is Kind.UNDO]
        # the two 1 MiB extents of zeros take no data (less 16 bytes of table per extent of every record)
        assert sum(e.length - e.payload_len for e in undo) >= 2 * mib - 16 * len(undo) * 64
    for seq, want in rig.states.items():
        assert restored(rig, At(seq=seq)) == want
    rig.close()


def test_the_reader_takes_extents_from_the_replicas_pages_only_where_no_earlier_piece_writes() -> None:
    """A batch's large extents are written to the history from the replica's pages only when no two runs of the
    batch overlap: else the server could write an earlier piece there while the reader process hashes and
    copies a later one."""
    mib = 1 << 20
    disjoint = writer_mod._disjoint
    assert disjoint([(0, 8 * mib, 0)])
    assert disjoint([(0, 4096, 9 * mib), (4096, mib, 0), (mib + 4096, mib, mib)])  # touching, not overlapping
    assert not disjoint([(0, 4096, 9 * mib), (4096, mib, 0), (mib + 4096, mib, mib - 512)])
    assert not disjoint([(0, 2 * mib, 0), (2 * mib, 4096, 4096)])  # a small write inside a long run
    assert not disjoint([(0, 4096, 0), (4096, 4096, 8192)])  # small extents are copied anyway


def test_extents_read_through_the_replicas_mapping_are_what_reads_give_and_the_map_is_made_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The payload of scattered, unaligned, large and zero extents read through a ReplicaMap (copied, or parts
    of the mapping itself when steady) is the one preadv gives; once its page-table bound is passed the replica
    is mapped anew, also while a part of the old mapping is still held, which stays readable."""
    mib = 1 << 20
    image = bytearray(os.urandom(8 * mib))
    image[2 * mib : 3 * mib] = bytes(mib)
    image[5 * mib : 5 * mib + 4096] = bytes(4096)
    path = tmp_path / "replica.img"
    path.write_bytes(image)
    fd = os.open(path, os.O_RDONLY)
    extents = [
        (4096, 4096),
        (1536, 65536 - 1536),
        (2 * mib, mib),
        (5 * mib, 4096),
        (3 * mib + 512, mib),
        (0, 0),
    ]
    extents += [(k * 4096 * 97 % (8 * mib - 4096), 4096) for k in range(200)]
    offsets, lengths = [o for o, _ in extents], [n for _, n in extents]
    room = payload_room(len(extents), sum(lengths))

    def payload(mapped: undo_mod.ReplicaMap | None, steady: bool) -> tuple[list[memoryview], bytes, int]:
        parts, plen, digest = undo_mod.fill_undo(
            fd, memoryview(bytearray(room)), offsets, lengths, mapped, steady
        )
        joined = b"".join(parts)
        assert len(joined) == plen
        return parts, joined, digest

    try:
        _, want, want_digest = payload(None, False)
        assert len(want) < sum(lengths)  # the zero extents take no data
        m = undo_mod.ReplicaMap(fd)
        first = m.view
        assert first is not None
        for steady in (False, True):
            parts, got, digest = payload(m, steady)
            assert (got, digest) == (want, want_digest)
        assert len(parts) > 1  # large extents are parts of the mapping
        m.used(offsets, lengths)
        assert m.view is first and m.bounded  # a replica of 8 MiB: its page tables stay small
        monkeypatch.setattr(undo_mod, "TABLES_MAX", 3)  # as if the replica were large
        m.bounded = False
        m.used(offsets[:1], lengths[:1])
        m.used(offsets[1:2], lengths[1:2])  # two extents in region 0
        assert m.view is first and m.regions == {0}
        m.used(offsets[2:], lengths[2:])  # regions 0 to 3
        assert m.view is not None and m.view is not first and not m.regions
        assert b"".join(parts) == want  # a part of the old mapping, still held
        assert payload(m, True)[1:] == (want, want_digest)
        m.close()
    finally:
        os.close(fd)


def test_a_reader_process_ended_by_a_failed_read_of_the_replica_is_started_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A read through the reader process's mapping fails (here the image file was made shorter, as a disk's
    I/O error would): the process dies of SIGBUS, the server keeps that batch's before-images itself (past the
    end of the file they read as zeros), and a new reader process keeps the next batch's."""
    rig = Rig(tmp_path, size=8 << 20)
    rig.apply(scattered_batch(rig))
    reader = rig.history.reader
    assert reader is not None
    os.truncate(rig.replica_path, 4 << 20)
    with caplog.at_level(logging.WARNING, logger="bdr.server"):
        # from 4 MiB on, to the end of the replica: not in the file, still in the mapping
        rig.apply([*[(8192 + k * 8, 4096, W, 0) for k in range(300)], (16376, 4096, W, 0), (0, 0, F, 0)])
    assert reader.proc.returncode == -signal.SIGBUS
    assert "was ended by SIGBUS: a read of the replica through its mapping failed" in caplog.text
    assert "a new reader process starts with the next batch" in caplog.text
    assert rig.history.reader is None
    point, state = rig.seq - 1, rig.replica_path.read_bytes()
    rig.apply(scattered_batch(rig, 700))
    assert rig.history.reader is not None and rig.history.reader.proc.pid != reader.proc.pid
    assert rig.history.reader.proc.poll() is None
    assert restored(rig, At(seq=point)) == state
    rig.close()


def test_a_piece_whose_record_cannot_be_written_is_not_written_nor_are_those_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader cannot write the third piece's record: the batch fails with the history's error, the two
    pieces before it reached the replica, that piece and the ones after did not."""
    rig = Rig(tmp_path, size=8 << 20)
    before = rig.replica_path.read_bytes()
    reader = rig.history.start_reader()
    assert reader is not None
    real, answers = reader.result, []

    def failing() -> int:
        answers.append(real())
        if len(answers) == 3:
            raise HistoryIOError(errno.EIO, "history: write failed: Input/output error")
        return answers[-1]

    monkeypatch.setattr(reader, "result", failing)
    with pytest.raises(HistoryIOError):
        rig.apply(long_runs_batch(rig))
    after = rig.replica_path.read_bytes()
    mib = 1 << 20
    assert after[: 2 * mib] != before[: 2 * mib]
    assert after[2 * mib :] == before[2 * mib :]
    assert reader.waiting == 0  # what was in flight was waited for
    rig.close()


def test_the_reader_process_reports_failed_reads_and_writes(tmp_path: Path) -> None:
    """A read of the replica that fails is the replica's error, a record that cannot be written the history's;
    each names what failed, and the reader goes on with the next request."""
    seg = tmp_path / "segment"
    seg.write_bytes(b"")
    replica = os.open(tmp_path, os.O_RDONLY)  # a directory: every read fails (EISDIR)
    readonly = os.open(seg, os.O_RDONLY)  # a segment that cannot be written (EBADF)
    data = tmp_path / "data"
    data.write_bytes(os.urandom(8192))
    good = os.open(data, os.O_RDONLY)
    try:
        reader = Reader(replica, 1 << 20, tmp_path)
        reader.submit(1, readonly, 0, 0, [4096], [4096])
        with pytest.raises(ReplicaIOError, match="I/O error reading what byte 4096 holds: Is a directory"):
            reader.result()
        reader.close()
        reader = Reader(good, 1 << 20, tmp_path)
        reader.submit(1, readonly, 0, 0, [4096], [4096])
        with pytest.raises(HistoryIOError, match=f"history {tmp_path}: write failed: Bad file descriptor"):
            reader.result()
        writable = os.open(seg, os.O_WRONLY)
        reader.submit(2, writable, 0, 0, [0, 4096], [4096, 4096])
        assert reader.result() == 2 * 16 + 8192
        os.close(writable)
        reader.close()
        assert reader.proc.returncode == 0
    finally:
        for fd in (replica, readonly, good):
            os.close(fd)


@pytest.mark.parametrize(
    ("sig", "name"), [(signal.SIGKILL, "SIGKILL"), (signal.SIGRTMIN + 3, f"signal {signal.SIGRTMIN + 3}")]
)
def test_a_server_whose_reader_process_stopped_keeps_the_before_images_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, sig: int, name: str
) -> None:
    """The reader process killed between two batches (a real-time signal has no name): the next batch is kept
    by the server itself, with a warning naming the signal, and restores exactly."""
    rig = Rig(tmp_path, size=8 << 20)
    rig.apply([(0, 0, F, 0)])
    states = {rig.seq - 1: rig.replica_path.read_bytes()}
    rig.apply(long_runs_batch(rig))
    states[rig.seq - 1] = rig.replica_path.read_bytes()
    reader = rig.history.reader
    assert reader is not None
    reader.proc.send_signal(sig)
    reader.proc.wait()
    with caplog.at_level(logging.WARNING, logger="bdr.server"):
        rig.apply(scattered_batch(rig))
    states[rig.seq - 1] = rig.replica_path.read_bytes()
    assert (
        f"the reader process was ended by {name}; the server keeps the before-images itself from now on"
        in caplog.text
    )
    assert rig.history.reader is None
    for seq, want in states.items():
        assert restored(rig, At(seq=seq)) == want
    rig.close()


def test_a_moment_before_the_first_point_or_a_gap_is_refused_naming_the_points(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.apply([(0, 4096, W, 0), (0, 0, F, 0)])
    with pytest.raises(
        PointRefused, match=r"older than the history holds.*oldest point offered is .*seq 1\)"
    ):
        restored(rig, At(time_ns=1))
    rig.history.gap("a journal resync was applied (test)")
    with pytest.raises(PointRefused, match="no point is offered yet"):
        restored(rig, At(seq=1))
    rig.apply([(8, 4096, W, 0), (0, 0, F, 0)])
    want = rig.replica_path.read_bytes()
    with pytest.raises(PointRefused) as refused:
        restored(rig, At(seq=1))
    msg = str(refused.value)
    assert "before a gap in the history" in msg and "a journal resync was applied (test)" in msg
    assert (
        "(seq 1), can no longer be given back" in msg
        and "oldest point offered is" in msg
        and "(seq 3)" in msg
    )
    assert restored(rig, At(seq=3)) == want
    rig.close()


def test_retention_keeps_the_history_under_its_size_and_drops_the_oldest_first(tmp_path: Path) -> None:
    limit = 16 << 20
    rig = Rig(tmp_path, size_limit=limit, size=4 << 20)
    rng = random.Random(7)
    inodes: dict[int, str] = {}

    def point() -> None:
        rig.apply([(0, 0, F, 0)])
        rig.states[rig.seq - 1] = rig.replica_path.read_bytes()

    for k in range(40):  # rounds of a 1 MiB write and two 4 KiB writes, a point after each: 40 MiB
        if k == 30:
            inodes = {f.stat().st_ino: f.name for f in rig.dir.glob("*.seg")}
        rig.apply([(rng.randrange(0, 3) * 2048, 1 << 20, W, 0)])
        point()
        for _ in range(2):
            rig.apply([(rng.randrange(0, 1024) * 8, 4096, W, 0)])
            point()
        used = sum(f.stat().st_size for f in rig.dir.glob("*.seg"))
        assert used <= limit
        assert rig.history.bytes_used == used
    with History(rig.dir) as h:
        pts = [e.seq for e in h.points()]
    assert pts and pts[-1] == rig.seq - 1 and pts == list(range(pts[0], rig.seq, 2))
    assert 20 <= len(pts) < 60
    assert restored(rig, At(seq=pts[0])) == rig.states[pts[0]]
    with pytest.raises(PointRefused, match="older than the history holds"):
        restored(rig, At(seq=pts[0] - 1))
    # the files of dropped segments were reused, under the numbers of new segments
    renamed = [f for f in rig.dir.glob("*.seg") if inodes.get(f.stat().st_ino, f.name) != f.name]
    assert renamed and rig.history.files.bytes_appended > 2 * limit
    # a crash in a reused segment after the first records of a round: the records it held before, intact and
    # where the new ones would be, are not taken for new ones
    rig.apply([(0, 1 << 20, W, 0)])
    point()
    newest = rig.seq - 1
    current = rig.dir / f"{rig.history.number:016d}.seg"
    assert current.stat().st_size > rig.history.files.pos  # what the reused file held before is still there
    os.close(rig.history.files.fd)  # no clean close: the old content stays after the last record
    os.close(rig.history.lock_fd)
    rig.history.files.fd = rig.history.lock_fd = -1
    rig.history = rig.open_history(limit)
    rig.applier.history = rig.history
    with History(rig.dir) as h:
        after = [e.seq for e in h.points()]
        assert after[-1] == newest and after == sorted(after) and not h.barriers()
    assert restored(rig, At(seq=pts[-3])) == rig.states[pts[-3]]
    assert restored(rig, At(seq=newest)) == rig.states[newest]
    rig.close()


def test_a_record_of_another_segment_is_not_read_as_this_ones() -> None:
    head = encode(7, Kind.CHECKPOINT, 5, 1)
    assert decode(head, 7, 0) is not None
    assert decode(head, 8, 0) is None  # the same bytes in segment 8: left from the file's life as segment 7


def test_a_torn_record_at_the_end_is_cut_at_the_next_start(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.apply([(0, 4096, W, 0), (0, 0, F, 0)])
    want = rig.replica_path.read_bytes()
    rig.history.close()
    last = rig.dir / f"{segment_numbers(rig.dir)[-1]:016d}.seg"
    size = last.stat().st_size
    with open(last, "ab") as f:
        f.write(os.urandom(HEAD_SIZE + 100))  # half a record, as a power cut leaves it
    rig.history = rig.open_history()
    rig.applier.history = rig.history
    assert last.stat().st_size == size
    rig.apply([(8, 4096, W, 0), (0, 0, F, 0)])
    assert restored(rig, At(seq=1)) == want
    rig.close()


def test_the_history_belongs_to_one_replica_and_one_server(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    with pytest.raises(HistoryError, match="in use by another process"):
        rig.open_history()
    other = Meta(str(tmp_path / "other.img"), SIZE * 2, str(tmp_path / "journal"))
    rig.history.close()
    with pytest.raises(HistoryError, match="belongs to a replica of 262144 bytes"):
        HistoryWriter(rig.dir, rig.replica.fd, other, 64 << 20, None)
    with pytest.raises(HistoryError, match="--history-size and/or --history-age"):
        HistoryWriter(tmp_path / "h2", rig.replica.fd, other, None, None)
    with pytest.raises(HistoryError, match="too small"):
        HistoryWriter(tmp_path / "h2", rig.replica.fd, other, 1 << 20, None)
    rig.replica.close()
    rig.journal.close()


def test_rollback_turns_the_replica_back_and_leaves_it_to_be_resynced(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.apply([(0, 8192, W, 0), (0, 0, F, 0)])
    want = rig.replica_path.read_bytes()
    rig.apply([(8, 4096, W, 0), (24, 8192, D, 0), (0, 0, F, 0)])
    rig.apply([(40, 4096, W, FUA)])
    with pytest.raises(HistoryError, match="in use"):
        rollback(rig.dir, At(seq=1), quiet=True)  # the server still holds it
    rig.history.close()
    rig.journal.close()
    out = rollback(rig.dir, At(seq=2), quiet=True)
    assert out.point.seq == 1 and out.undone == 3
    assert rig.replica_path.read_bytes() == want
    j = Journal(tmp_path / "journal")
    assert replica_state.is_consistent(j.header) and replica_state.resume_point(j.header) is None
    j.close()
    with History(rig.dir) as h:
        assert [e.seq for e in h.points()] == [1]
        assert h.summary()["rolled_back"].startswith("rolled back to ")
    rig.replica.close()


def test_at_accepts_times_unix_seconds_and_sequence_numbers() -> None:
    assert parse_at("1234") == At(seq=1234)
    # a time covers its last digit
    assert parse_at("@1700000000.5") == At(time_ns=1_700_000_000_599_999_999)
    assert parse_at("@1700000000.123456789") == At(time_ns=1_700_000_000_123_456_789)
    assert parse_at("2026-12-04T09:30:00+00:00") == At(time_ns=1_796_376_600_999_999_999)
    assert parse_at("2026-12-04T09:30:00.002+00:00") == At(time_ns=1_796_376_600_002_999_999)
    assert parse_at("2026-12-04T09:30+00:00") == At(time_ns=1_796_376_659_999_999_999)
    with pytest.raises(ValueError, match="give a time"):
        parse_at("yesterday")


def test_a_resync_keeps_the_points_before_it_and_refuses_its_window(tmp_path: Path) -> None:
    clock = iter(range(10**9, 10**12, 10**6))  # a millisecond a step
    rig = Rig(tmp_path)
    rig.history.clock = lambda: next(clock)
    rig.apply([(0, 8192, W, 0), (0, 0, F, 0)])
    before = rig.replica_path.read_bytes()
    with History(rig.dir) as h:
        (p1,) = h.points()
    # the source moves on while the replica does not follow (an overflow); a resync brings it back
    rig.history.clock()
    ranges = [(0, 4096), (40960, 8192)]
    rig.history.preserve_for_resync(ranges)
    with open(rig.replica_path, "r+b") as f:
        for off, n in ranges:
            f.seek(off)
            f.write(os.urandom(n))
    rig.history.resync("a journal resync rewrote 2 ranges of the replica", 40)
    rig.seq = 41
    rig.applier.restart_at(41)  # the stream resumes after the resync
    rig.apply([(16, 4096, W, 0), (0, 0, F, 0)])
    after = rig.replica_path.read_bytes()
    with History(rig.dir) as h:
        p2 = h.points()[-1]
        ((r, b, a),) = h.windows()
    assert (b, a) == (p1, p2) and r.offset == p1.time_ns < r.time_ns < p2.time_ns
    assert restored(rig, At(time_ns=p1.time_ns)) == before  # undone across the resync
    assert restored(rig, At(time_ns=p2.time_ns)) == after
    for inside in (p1.time_ns + 1, r.time_ns, p2.time_ns - 1):
        with pytest.raises(
            PointRefused, match=r"inside a resync window.*rewrote 2 ranges.*before it .*after it"
        ):
            restored(rig, At(time_ns=inside))
    with pytest.raises(PointRefused, match="older points are asked for by time"):
        restored(rig, At(seq=p1.seq))
    assert restored(rig, At(seq=42)) == after
    rig.close()


def test_a_torn_payload_under_an_intact_header_is_cut_at_the_next_start(tmp_path: Path) -> None:
    """A power cut in a reused segment can leave a new header over an old payload: the payload's checksum tells."""
    rig = Rig(tmp_path)
    rig.apply([(0, 4096, W, 0), (0, 0, F, 0)])
    want = rig.replica_path.read_bytes()
    rig.apply([(8, 8192, W, 0)])  # an UNDO record after the point, then the power cut
    rig.history.close()
    with History(rig.dir) as h:
        last = h.entries()[-1]
        path = h.segments[-1].path
    assert last.kind is Kind.UNDO
    with open(path, "r+b") as f:
        f.seek(last.pos + HEAD_SIZE + last.payload_len - 100)
        f.write(os.urandom(100))
    # its write never reached the replica: a before-image is synced before the write is issued
    rig.replica_path.write_bytes(want)
    rig.history = rig.open_history()
    rig.applier.history = rig.history
    with History(rig.dir) as h:
        assert all(e.pos != last.pos or e.segment != last.segment for e in h.entries())
    assert restored(rig, At(seq=1)) == want
    rig.close()


def test_an_interrupted_rollback_voids_the_later_points_and_runs_again(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.apply([(0, 8192, W, 0), (0, 0, F, 0)])
    want = rig.replica_path.read_bytes()
    rig.apply([(8, 4096, W, 0), (0, 0, F, 0), (16, 4096, W, FUA)])
    rig.history.close()
    rig.journal.close()
    with History(rig.dir) as h:
        point = h.select(At(seq=1))
        restore_mod._append_marker(h, point, b"rolling back (interrupted)")  # then the operator's Ctrl-C
    with History(rig.dir) as h:
        assert [e.seq for e in h.points()] == [1]  # seq 3 and 5 are void: the replica may be half undone
    out = rollback(rig.dir, At(seq=1), quiet=True)
    assert out.point.seq == 1 and rig.replica_path.read_bytes() == want
    rig.replica.close()


def test_a_discard_larger_than_a_quarter_of_the_history_is_a_gap(tmp_path: Path) -> None:
    rig = Rig(tmp_path, size_limit=16 << 20, size=16 << 20)
    rig.apply([(0, 4096, W, 0), (0, 0, F, 0)])
    assert rig.history.large == 4 << 20
    rig.apply([(0, 2 << 20, D, 0), (0, 0, F, 0)])  # kept
    with History(rig.dir) as h:
        assert [e.seq for e in h.points()] == [1, 3] and not h.barriers()
    rig.apply([(0, 8 << 20, D, 0), (0, 0, F, 0)])  # mkfs: not read, a gap
    with History(rig.dir) as h:
        assert [e.seq for e in h.points()] == [5]
        ((_, gap),) = h.barriers()
    assert "a discard of 8388608 bytes at byte 0 was applied without keeping" in gap.reason
    rig.close()
