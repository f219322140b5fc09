"""Generation histories: their encoding (in the journal header, the source's metadata and the handshake) and
what two of them decide at connect."""

from __future__ import annotations

from pathlib import Path

import pytest

from bdr import replica_state
from bdr import wire as p
from bdr.client.metadata import (
    MetadataError,
    MetaFlag,
    SourceMeta,
    WrittenCount,
    load_or_create,
    read_metadata,
    write_metadata,
)
from bdr.generations import PAST_MAX, UNKNOWN, Generations, GenerationsError, Verdict, decide, fmt_id
from bdr.journal import JFlag, Journal
from bdr.kernel.ring import RingConsumer
from bdr.server.session import welcome_history
from bdr.testing.ring_producer import RingProducer


def test_encoding_round_trips_and_rejects_damage(tmp_path: Path) -> None:
    g = Generations.first().successor(41).successor(1000)
    assert Generations.unpack(g.pack()) == g
    assert Generations.unpack(bytes(64)) is None
    with pytest.raises(GenerationsError):
        Generations.unpack(g.pack()[:-1])
    long = Generations.first()
    for k in range(PAST_MAX + 5):
        long = long.successor(k)
    assert len(long.past) == PAST_MAX and long.past[-1][1] == PAST_MAX + 4  # the oldest are forgotten
    # in the journal header
    j = Journal(tmp_path / "journal")
    j.commit(generations=g)
    j.close()
    assert Journal(tmp_path / "journal").header.generations == g
    # in the handshake
    hello = p.Hello(1, p.ALL_FEATURES, 512, 1 << 20, b"s" * 16, b"r" * 16, g)
    assert p.Hello.parse(memoryview(hello.pack()), 0) == hello
    with pytest.raises(p.ProtocolError):
        p.Hello.parse(memoryview(hello.pack() + b"x"), 0)
    # the source's metadata file
    meta = tmp_path / "meta"
    assert read_metadata(meta) is None
    write_metadata(meta, SourceMeta(g, MetaFlag.ACKED | MetaFlag.SYNCED, 77))
    m = read_metadata(meta)
    assert m is not None and m.generations == g and m.acked and m.synced == 77
    assert load_or_create(meta).synced is None  # a client start clears the mark of a stop in sync
    assert read_metadata(meta) == SourceMeta(g, MetaFlag.ACKED)

    # a client start after one that did not stop in sync, once a replica held some of the generation: writes
    # never sent may be on the source, so a new generation begins
    write_metadata(meta, SourceMeta(g, MetaFlag.ACKED))
    after_crash = load_or_create(meta)
    assert after_crash.generations.past[-1][0] == g.current and not after_crash.acked
    write_metadata(meta, SourceMeta(g))  # no replica has any of it: the writes stay in the generation
    assert load_or_create(meta).generations == g
    write_metadata(meta, SourceMeta(g, MetaFlag.ACKED | MetaFlag.SYNCED, 5, b"r" * 16, b"q" * 16))
    m = load_or_create(meta)
    assert m.generations == g and m.synced is None and m.gen_ring == b"q" * 16
    write_metadata(meta, SourceMeta(g))
    damaged = bytearray(meta.read_bytes())
    damaged[20] ^= 1
    meta.write_bytes(bytes(damaged))
    with pytest.raises(MetadataError, match="damaged"):
        read_metadata(meta)


def test_what_two_histories_decide() -> None:
    g1 = Generations.first()
    assert decide(g1, g1).verdict is Verdict.SAME
    assert decide(g1, None).verdict is Verdict.ADOPT
    assert decide(None, g1).verdict is Verdict.LEGACY
    # the replica was promoted at seq 50: the old source is behind, the promoted side ahead
    promoted = g1.successor(50)
    d = decide(promoted, g1)
    assert d.verdict is Verdict.REPLICA_BEHIND and d.since_seq == 50
    d = decide(g1, promoted)
    assert d.verdict is Verdict.SOURCE_BEHIND and d.since_seq == 50 and "demote" in d.text
    # the old source wrote on, disconnected (a generation of its own), while the replica was promoted
    wrote_on = g1.successor(48)
    d = decide(wrote_on, promoted)
    assert d.verdict is Verdict.SPLIT_BRAIN
    assert fmt_id(wrote_on.current) in d.text and fmt_id(promoted.current) in d.text
    assert fmt_id(g1.current) in d.text and "--discard-local-changes" in d.text
    assert decide(promoted, wrote_on).verdict is Verdict.SPLIT_BRAIN
    # two unrelated histories
    assert "share no generation" in decide(Generations.first(), g1).text
    # a replica several generations behind
    assert decide(promoted.successor(70).successor(90), g1).verdict is Verdict.REPLICA_BEHIND


def test_scans_take_the_sources_history_and_promotion_ends_the_generation() -> None:
    g = Generations.first()
    src = replica_state.Source(b"s" * 16, b"r" * 16, 1 << 20, 1 << 20, g)
    h = replica_state.staged_resync_begun(replica_state.Header(), src)
    assert h.generations == g
    assert replica_state.direct_resync_begun(replica_state.Header(), src).generations == g
    nxt = g.successor(7)
    h = replica_state.promoted(h, nxt)
    assert h.generations == nxt and h.flags & JFlag.PROMOTED
    h = replica_state.demoted(h, g)
    assert h.generations == g and not h.flags & JFlag.PROMOTED
    assert replica_state.resume_point(h) is None  # the next client resyncs it


def test_written_counts_travel_with_the_history_and_older_encodings_still_read(tmp_path: Path) -> None:
    g = Generations.first().with_written(4096).successor(41).with_written(12288)
    assert g.written == (4096, 12288) and g.current_written == 12288
    assert Generations.unpack(g.pack()) == g
    # a history written before the counts existed reads as not counted, and a successor counts from zero
    old = g.bare()
    assert old.written is None and Generations.unpack(old.pack()) == old
    assert old.successor(50).written == (UNKNOWN, UNKNOWN, 0)
    assert old.with_written(7).written == (UNKNOWN, 7)
    assert Generations.unpack(old.pack() + bytes(32)) == old  # the zeros after it in a journal header
    with pytest.raises(GenerationsError):
        Generations.unpack(g.pack()[:-1])  # counts cut short
    # the handshake carries the counts; a WELCOME to a client that does not know them leaves them out
    hello = p.Hello(1, p.ALL_FEATURES, 512, 1 << 20, b"s" * 16, b"r" * 16, g)
    assert p.Hello.parse(memoryview(hello.pack()), 0).generations == g
    assert welcome_history(g, p.ALL_FEATURES) == g
    assert welcome_history(g, p.Feature.GENERATIONS) == old
    assert welcome_history(g, 0) is None
    # the metadata file keeps them, and where in which ring the current generation's count stands
    meta = tmp_path / "meta"
    write_metadata(meta, SourceMeta(g, counted_ring=b"r" * 16, counted_pos=9))
    m = read_metadata(meta)
    assert m is not None and m.generations == g and (m.counted_ring, m.counted_pos) == (b"r" * 16, 9)


def test_a_split_brain_says_how_much_each_side_wrote_since_it() -> None:
    shared = Generations.first().with_written(1 << 30)  # written before the split: not counted in it
    source = shared.successor(48).with_written(3 << 20).successor(60).with_written(4096)
    replica = shared.successor(50).with_written(8192)
    d = decide(source, replica)
    assert d.verdict is Verdict.SPLIT_BRAIN and d.split_written == ((3 << 20) + 4096, 8192)
    assert "the source's side wrote 3.0 MiB and the replica's 8.0 KiB" in d.text, d.text
    # a generation begun before the counts existed: said, not guessed
    d = decide(source, shared.bare().successor(50).bare())
    assert d.split_written == ((3 << 20) + 4096, None) and "an amount not counted" in d.text
    # no shared generation: everything each side holds
    d = decide(Generations.first().with_written(512), replica)
    assert d.split_written == (512, (1 << 30) + 8192)
    assert decide(replica, replica).split_written is None


def test_the_client_counts_the_bytes_written_in_its_generation(tmp_path: Path) -> None:
    """What the ring's records carry, whether released or still in the ring, across a restart on the same ring
    (counted once) and on another ring (all of its records)."""
    dev = 4 << 20
    src = tmp_path / "src.img"
    src.write_bytes(bytes(dev))
    prod = RingProducer(tmp_path / "ring", 64, dev, source=src)
    cons = RingConsumer(tmp_path / "ring", dev_size=dev)
    try:
        meta = SourceMeta(Generations.first())
        count = WrittenCount(cons, b"r" * 16, meta)
        prod.write(0, bytes(4096), block=True)
        prod.write(8192, bytes(8192), block=True)  # two records of a slot's 4 KiB
        prod.flush(block=True)
        prod.discard(65536, 65536, block=True)  # no data: not counted
        assert count.now() == (12288, 5)
        cons.release(2)  # released records stay counted
        assert count.now() == (12288, 5)
        stored = count.stamp(meta, b"r" * 16)
        assert stored.generations.current_written == 12288 and stored.counted_pos == 5
        # a restart on the same ring counts only the records after the stored position
        prod.write(0, bytes(4096), block=True)
        assert WrittenCount(cons, b"r" * 16, stored).now()[0] == 12288 + 4096
        # a start after a crash begins a new generation: it counts only the records after the stored position
        path = tmp_path / "meta"
        write_metadata(path, stored.with_(flags=MetaFlag.ACKED))
        after = load_or_create(path)
        assert after.generations.past[-1][0] == stored.generations.current
        assert after.generations.written == (12288, 0)
        assert WrittenCount(cons, b"r" * 16, after).now()[0] == 4096
        # on another ring, all of that ring's records (here the last 4096 of the 8192 write, and the new 4096)
        assert WrittenCount(cons, b"x" * 16, stored).now()[0] == 12288 + 4096 + 4096
        # a new generation begins with the record at position 5
        count.restart(5)
        assert count.now()[0] == 4096
        # a generation begun before the counts existed stays not counted
        assert WrittenCount(cons, b"r" * 16, SourceMeta(Generations(5))).now()[0] == UNKNOWN
    finally:
        cons.close()
        prod.close()
