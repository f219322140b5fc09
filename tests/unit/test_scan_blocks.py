"""The scan's hot loop: the digests of a window's blocks, the blocks whose digests differ, and the runs they
travel in."""

from __future__ import annotations

import random

import xxhash

from bdr.scan import HASH_SIZE, differing, hash_window, merge_runs


def test_hash_window_is_one_digest_per_block_the_last_one_short() -> None:
    data = random.Random(3).randbytes(3 * 4096 + 512)
    got = hash_window(memoryview(data), 4096)
    want = [data[i : i + 4096] for i in (0, 4096, 8192, 12288)]
    assert got == b"".join(xxhash.xxh3_128_digest(b) for b in want)
    assert len(want[-1]) == 512


def test_differing_finds_every_changed_block_and_nothing_else() -> None:
    rnd = random.Random(5)
    n = 2048
    mine = bytearray(rnd.randbytes(n * HASH_SIZE))
    theirs = bytearray(mine)
    assert differing(bytes(mine), theirs) == []
    changed = sorted({*rnd.sample(range(n), 40), 0, 15, 16, n - 1})
    for i in changed:
        theirs[i * HASH_SIZE + rnd.randrange(HASH_SIZE)] ^= 0xFF
    assert differing(bytes(mine), memoryview(theirs)) == changed


def test_adjacent_blocks_with_the_same_flags_travel_as_one_run_up_to_the_limit() -> None:
    z = 1  # any flag value: ZERO markers merge with ZERO markers only
    blocks = [(0, 4096, 0), (4096, 4096, 0), (8192, 4096, z), (12288, 4096, z), (20480, 4096, 0)]
    blocks += [(24576 + i * 4096, 4096, 0) for i in range(5)]  # adjacent to the one before: 6 in a row
    assert merge_runs(blocks, limit=16384) == [
        (0, 8192, 0),
        (8192, 8192, z),
        (20480, 16384, 0),  # the limit cuts the run of six pages into four and two
        (36864, 8192, 0),
    ]
    assert merge_runs([]) == []
    # random picks: every block is covered once, in order, with its flags
    rnd = random.Random(9)
    blocks = [(i * 4096, 4096, rnd.choice((0, 0, z))) for i in range(200) if rnd.random() < 0.7]
    runs = merge_runs(blocks, limit=64 * 1024)
    assert all(n <= 64 * 1024 for _, n, _ in runs)
    assert [(o + k, fl) for o, n, fl in runs for k in range(0, n, 4096)] == [(o, fl) for o, _, fl in blocks]
