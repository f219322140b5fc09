"""The scan's hot loop: the digests of a window's blocks and the blocks whose digests differ."""

from __future__ import annotations

import random

import xxhash

from bdr.scan import HASH_SIZE, differing, hash_window


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
