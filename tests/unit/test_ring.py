"""Ring consumer against the userspace producer: layout, wrap-around, full ring, overflow and dirty bitmap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bdr import wire as p
from bdr.kernel import abi
from bdr.kernel.layout import RingError, ring_layout
from bdr.kernel.ring import Batch, RingConsumer
from bdr.testing.ring_producer import RingProducer

DEV = 4 << 20


@pytest.fixture
def ring(tmp_path: Path) -> tuple[RingProducer, RingConsumer]:
    src = tmp_path / "src.img"
    src.write_bytes(bytes(DEV))
    prod = RingProducer(tmp_path / "ring", 8, DEV, source=src)
    cons = RingConsumer(tmp_path / "ring", dev_size=DEV)
    yield prod, cons
    cons.close()
    prod.close()


def wire(b: Batch) -> p.Data:
    """What the client puts on the wire for a batch, decoded and validated like the server does."""
    payload = p.DATA_HEAD.pack(b.count, b.data_len) + b"".join(bytes(v) for v in b.desc + b.data)
    return p.Data.parse(memoryview(payload), 0, DEV)


def records(b: Batch) -> list[tuple[int, int, int, int, int, bytes]]:
    """(seq, offset, len, op, flags, data) per record of a batch."""
    msg = wire(b)
    f = msg.fields()
    out, pos = [], 0
    data = bytes(msg.data)
    for seq, sec, ln, op, fl in zip(f.seqs, f.sectors, f.lens, f.ops, f.flags, strict=True):
        d = data[pos : pos + ln] if op == p.OP_WRITE else b""
        pos += len(d)
        out.append((seq, sec * 512, ln, op, fl, d))
    return out


def blk(i: int, n: int = 4096) -> bytes:
    return bytes([i % 251 + 1]) * n


def test_layout_matches_the_kernel_formula() -> None:
    assert ring_layout(8) == (4096, 8192, 8192 + 8 * 4096)
    assert ring_layout(1000) == (4096, 4096 + 32768, 4096 + 32768 + 1000 * 4096)


def test_geometry_from_the_control_page(ring: tuple[RingProducer, RingConsumer]) -> None:
    _, cons = ring
    g = cons.geometry
    assert (g.nr_slots, g.slot_data, g.dev_sectors, g.region_sectors) == (8, 4096, None, 128)
    assert not cons.is_chardev
    assert cons.dev_size == DEV


def test_records_and_data_zero_copy(ring: tuple[RingProducer, RingConsumer]) -> None:
    prod, cons = ring
    assert prod.write(0, blk(1))
    assert prod.write(8192, blk(2, 512), fua=True)
    assert prod.flush()
    assert prod.discard(65536, 65536)
    assert prod.write_zeroes(1 << 20, 4096)
    assert prod.write(4096, blk(3, 8192))  # two slots: MORE then CONT
    b = cons.batch(cons.tail, 100)
    assert b is not None
    assert (b.start, b.end, b.first_seq, b.last_seq, b.count) == (0, 7, 0, 6, 7)
    assert b.durability_point
    assert all(isinstance(v, memoryview) for v in b.desc + b.data)
    assert records(b) == [
        (0, 0, 4096, 1, 0, blk(1)),
        (1, 8192, 512, 1, abi.RecFlag.FUA, blk(2, 512)),
        (2, 0, 0, 2, 0, b""),
        (3, 65536, 65536, 3, 0, b""),
        (4, 1 << 20, 4096, 4, 0, b""),
        (5, 4096, 4096, 1, abi.RecFlag.MORE, blk(3, 4096)),
        (6, 8192, 4096, 1, abi.RecFlag.CONT, blk(3, 4096)),
    ]
    # the source image has the data the ring describes
    with open(prod.path.parent / "src.img", "rb") as f:
        assert f.read(4096) == blk(1)
    b.release()


def test_full_slots_are_one_data_view(ring: tuple[RingProducer, RingConsumer]) -> None:
    prod, cons = ring
    for i in range(5):
        prod.write(i * 4096, blk(i))
    b = cons.batch(0, 100)
    assert b is not None
    assert len(b.data) == 1 and b.data_len == 5 * 4096
    assert not b.durability_point
    b.release()


def test_wrap_around_many_times(ring: tuple[RingProducer, RingConsumer]) -> None:
    prod, cons = ring
    expected: list[tuple[int, bytes]] = []
    got: list[tuple[int, bytes]] = []
    pos = 0
    for rnd in range(20):
        for i in range(5):  # 5 + leftover crosses the end of the 8-slot ring
            n = 512 * (1 + (rnd + i) % 8)
            off = ((rnd * 5 + i) % 64) * 4096
            assert prod.write(off, blk(rnd * 7 + i, n))
            expected.append((off, blk(rnd * 7 + i, n)))
        while (b := cons.batch(pos, 3)) is not None:
            got += [(r[1], r[5]) for r in records(b)]
            pos = b.end
            b.release()
        cons.release(pos)
    assert got == expected
    assert cons.tail == prod.head == 100
    assert prod.state == 0


def test_batch_across_the_wrap_has_two_descriptor_views(ring: tuple[RingProducer, RingConsumer]) -> None:
    prod, cons = ring
    for i in range(6):
        prod.write(i * 4096, blk(i))
    cons.release(6)
    for i in range(6):
        prod.write(i * 4096, blk(10 + i))
    b = cons.batch(6, 100)
    assert b is not None
    assert len(b.desc) == 2 and len(b.data) == 2
    assert [r[5] for r in records(b)] == [blk(10 + i) for i in range(6)]
    assert b.first_seq == 6 and b.last_seq == 11
    b.release()


def test_full_ring_overflows_into_the_bitmap(ring: tuple[RingProducer, RingConsumer]) -> None:
    prod, cons = ring
    for i in range(8):
        assert prod.write(i * 4096, blk(i))
    assert not prod.write(1 << 20, blk(99))  # ring full: goes to the bitmap
    cons.release(4)  # space again, but the target stays in overflow until the bitmap is taken
    assert not prod.write(3 << 20, blk(98))
    assert cons.state() == abi.State.OVERFLOW | abi.State.DIRTY
    assert prod.dropped == 2
    d = cons.take_dirty()
    assert d.ring_head == 8 and d.next_seq == 8 and d.nr_dirty == 2
    assert d.state & abi.State.OVERFLOW
    assert d.extents(DEV) == [(1 << 20, 65536), (3 << 20, 65536)]
    assert cons.state() == 0
    # re-armed: the next write is in the ring again, after ring_head, and the old records are intact
    assert prod.write(8192, blk(50))
    b = cons.batch(4, 100)
    assert b is not None
    assert [r[0] for r in records(b)] == [4, 5, 6, 7, 8]
    assert records(b)[-1][5] == blk(50)
    b.release()
    assert cons.take_dirty().nr_dirty == 0


def test_failed_write_marks_dirty_without_overflow(ring: tuple[RingProducer, RingConsumer]) -> None:
    prod, cons = ring
    prod.fail_write(65536 * 3 + 512, blk(1, 65536))  # spans two regions
    assert cons.state() == abi.State.DIRTY
    assert prod.write(0, blk(2))  # the ring keeps publishing
    d = cons.take_dirty()
    assert d.extents(DEV) == [(65536 * 3, 2 * 65536)]


def test_dirty_extents_merge_and_clip() -> None:
    from bdr.kernel.dirty import DirtyMap

    bm = bytes([0b1110_0001, 0b1000_0000])
    d = DirtyMap(bm, 65536, 0, 0, 5, 0)
    assert d.extents(15 * 65536 + 100) == [(0, 65536), (5 * 65536, 3 * 65536), (15 * 65536, 100)]


def test_find_seq(ring: tuple[RingProducer, RingConsumer]) -> None:
    prod, cons = ring
    assert cons.find_seq(0) == 0  # empty ring: the next record
    assert cons.find_seq(1) is None
    for i in range(6):
        prod.write(0, blk(i))
    cons.release(2)
    assert cons.find_seq(1) is None  # released already
    assert cons.find_seq(2) == 2
    assert cons.find_seq(5) == 5
    assert cons.find_seq(6) == 6  # the next one
    assert cons.find_seq(7) is None


def test_release_outside_window_is_refused(ring: tuple[RingProducer, RingConsumer]) -> None:
    prod, cons = ring
    prod.write(0, blk(1))
    with pytest.raises(RingError):
        cons.release(2)
    cons.release(1)
    with pytest.raises(RingError):
        cons.release(0)


def test_write_run_fast_path(ring: tuple[RingProducer, RingConsumer]) -> None:
    prod, cons = ring
    data = b"".join(blk(i) for i in range(6))
    assert prod.write_run(16, memoryview(data)) == 6
    cons.release(6)
    assert prod.write_run(64, memoryview(data)) == 6  # wraps
    b = cons.batch(6, 100)
    assert b is not None
    recs = records(b)
    assert [(r[0], r[1], r[5]) for r in recs] == [(6 + i, 64 * 512 + i * 4096, blk(i)) for i in range(6)]
    b.release()


def test_bad_paths_and_bad_rings(tmp_path: Path) -> None:
    with pytest.raises(RingError, match="cannot open"):
        RingConsumer(tmp_path / "missing")
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(8192))
    with pytest.raises(RingError, match="not a bdr ring"):
        RingConsumer(junk)
    short = tmp_path / "short"
    short.write_bytes(b"x")
    with pytest.raises(RingError, match="too short"):
        RingConsumer(short)
    prod = RingProducer(tmp_path / "r", 8, DEV)
    os.truncate(prod.path, 8192)
    with pytest.raises(RingError, match="ring file is"):
        RingConsumer(prod.path, DEV)
    prod.close()


# -- property: no write is lost ------------------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("write"), st.integers(0, DEV // 512 - 64), st.sampled_from([512, 4096, 8192, 12288])
        ),
        st.tuples(st.just("flush"), st.just(0), st.just(0)),
        st.tuples(st.just("consume"), st.integers(1, 12), st.integers(0, 12)),
        st.tuples(st.just("take"), st.just(0), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_every_write_is_delivered_in_order_or_marked_dirty(
    tmp_path_factory: pytest.TempPathFactory, script: list[tuple[str, int, int]]
) -> None:
    tmp = tmp_path_factory.mktemp("ring")
    prod = RingProducer(tmp / "ring", 8, DEV)
    cons = RingConsumer(tmp / "ring", dev_size=DEV)
    published: list[tuple[int, bytes]] = []  # (offset, data) of each record, in publish order
    dropped: list[tuple[int, int]] = []  # (offset, length) of writes that went to the bitmap
    dirty: set[int] = set()  # regions handed over by take_dirty
    delivered: list[tuple[int, int, bytes]] = []
    pos = 0
    n = 0

    def consume(limit: int, release: int) -> None:
        nonlocal pos
        b = cons.batch(pos, limit)
        if b is not None:
            delivered.extend((r[0], r[1], r[5]) for r in records(b) if r[3] == p.OP_WRITE)
            pos = b.end
            b.release()
        cons.release(min(pos, cons.tail + release))

    def take() -> None:
        d = cons.take_dirty()
        for off, ln in d.extents(DEV):
            dirty.update(range(off // 65536, (off + ln) // 65536))

    for op, a, b in script:
        if op == "write":
            n += 1
            data = bytes([n % 251 + 1]) * b
            if prod.write(a * 512, data):
                published += [(a * 512 + i, data[i : i + 4096]) for i in range(0, b, 4096)]
            else:
                dropped.append((a * 512, b))
        elif op == "flush":
            prod.flush()
        elif op == "consume":
            consume(a, b)
        elif cons.state():
            take()
    while cons.head() != cons.tail:  # drain
        consume(100, 100)
    take()
    assert [(off, data) for _, off, data in delivered] == published
    seqs = [s for s, _, _ in delivered]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    for off, ln in dropped:
        assert set(range(off // 65536, (off + ln - 1) // 65536 + 1)) <= dirty
    cons.close()
    prod.close()


def test_written_extents_and_data_bytes_across_the_wrap(ring: tuple[RingProducer, RingConsumer]) -> None:
    prod, cons = ring
    for i in range(5):
        prod.write(i * 4096, blk(i))
    cons.release(5)
    prod.write(65536, blk(1, 512))
    prod.flush()
    prod.discard(1 << 20, 65536)
    prod.write_zeroes(2 << 20, 8192)
    prod.write(3 << 20, blk(2))  # positions 5..9 (write, flush, discard, zeroes, write): slots 5, 6, 7, 0, 1
    assert cons.written(5, cons.head()) == [(65536, 512), (1 << 20, 65536), (2 << 20, 8192), (3 << 20, 4096)]
    assert cons.data_bytes(5, cons.head()) == 512 + 4096  # discards and write-zeroes carry no data
    assert cons.written(7, 9) == [(1 << 20, 65536), (2 << 20, 8192)] and cons.written(6, 7) == []  # a flush
    assert cons.data_bytes(7, 9) == 0 and cons.data_bytes(9, 10) == 4096 and cons.data_bytes(3, 3) == 0
    for i in range(3):  # a full ring of full writes: the fast path
        prod.write(i * 4096, blk(i))
    cons.release(10)
    assert cons.data_bytes(10, cons.head()) == 3 * 4096
