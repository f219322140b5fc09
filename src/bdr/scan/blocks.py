"""Blocks of a scan: the block digest, the digest of an all-zero block, the cutting of byte extents into
block-aligned windows, the exact read of a window, and the comparison of a window's digests with the replica's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import xxhash

BLOCK_SIZE = 4096  # a changed page costs one page on the wire, whatever the dirty bitmap's region size
RUN_MAX = 1024 * 1024  # adjacent blocks to send travel as one SCAN_DATA block of up to this many bytes
WINDOW = 8 * 1024 * 1024  # bytes of device per SCAN_REQUEST / per read of the source
HASH_SIZE = 16


def digest(data: bytes | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


_ZERO_DIGESTS: dict[int, bytes] = {}


def zero_digest(length: int) -> bytes:
    d = _ZERO_DIGESTS.get(length)
    if d is None:
        d = _ZERO_DIGESTS[length] = digest(bytes(length))
    return d


def windows(
    extents: list[tuple[int, int]], dev_size: int, block_size: int = BLOCK_SIZE, window: int = WINDOW
) -> Iterator[tuple[int, int]]:
    """Cut byte extents into block-aligned windows of at most ``window`` bytes, clipped to the device."""
    window = max(block_size, window // block_size * block_size)
    prev_end = 0
    for off, length in extents:
        start = max(off // block_size * block_size, prev_end)
        end = min(-(-(off + length) // block_size) * block_size, dev_size)
        while start < end:
            n = min(window, end - start)
            yield start, n
            start += n
        prev_end = max(prev_end, end)


def read_exact(fd: int, buf: memoryview, offset: int) -> None:
    """Fill buf from fd at offset (short reads retried; EOF is an error)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of device at byte {offset + done}")
        done += n


def hash_window(buf: memoryview, block_size: int = BLOCK_SIZE) -> bytes:
    """Concatenated digests of the blocks of a window already read into buf (the hot loop of every scan: one
    native call per block and nothing else)."""
    h = xxhash.xxh3_128_digest
    return b"".join([h(buf[i : i + block_size]) for i in range(0, len(buf), block_size)])


def merge_runs(blocks: list[tuple[int, int, int]], limit: int = RUN_MAX) -> list[tuple[int, int, int]]:
    """(offset, length, flags) blocks in increasing order, adjacent ones with the same flags merged into runs
    of at most ``limit`` bytes (one SCAN_DATA block each: one staged record instead of one per page)."""
    out: list[tuple[int, int, int]] = []
    for o, n, fl in blocks:
        if out:
            po, pn, pf = out[-1]
            if pf == fl and po + pn == o and pn + n <= limit:
                out[-1] = (po, pn + n, fl)
                continue
        out.append((o, n, fl))
    return out


GROUP = 16 * HASH_SIZE  # digests compared 16 at a time first: most groups of a mostly-equal window are equal


def differing(mine: bytes, theirs: bytes | memoryview) -> list[int]:
    """Indices of the blocks whose digests differ between two equally long digest strings."""
    if mine == theirs:
        return []
    theirs = bytes(theirs)
    out = []
    for g in range(0, len(mine), GROUP):
        if mine[g : g + GROUP] != theirs[g : g + GROUP]:
            for i in range(g, min(g + GROUP, len(mine)), HASH_SIZE):
                if mine[i : i + HASH_SIZE] != theirs[i : i + HASH_SIZE]:
                    out.append(i // HASH_SIZE)
    return out
