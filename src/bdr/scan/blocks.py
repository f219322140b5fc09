"""Blocks of a scan: the block digest, the digest of an all-zero block, the cutting of byte extents into
block-aligned windows, the exact read of a window, and the comparison of a window's digests with the replica's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import xxhash

BLOCK_SIZE = 64 * 1024
ONESHOT_BLOCK_SIZE = 4096  # one-shot syncs (no dirty bitmap to match): a changed page costs one page
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


def block_spans(offset: int, length: int, block_size: int = BLOCK_SIZE) -> Iterator[tuple[int, int]]:
    """(offset, length) of each block in a window; the last block of a device may be short."""
    pos = offset
    end = offset + length
    while pos < end:
        n = min(block_size, end - pos)
        yield pos, n
        pos += n


def hash_window(buf: memoryview, offset: int, block_size: int = BLOCK_SIZE) -> bytes:
    """Concatenated digests of the blocks of a window already read into buf (buf starts at offset)."""
    return b"".join(
        digest(buf[p - offset : p - offset + n]) for p, n in block_spans(offset, len(buf), block_size)
    )


def hash_range(fd: int, offset: int, length: int, buf: memoryview, block_size: int = BLOCK_SIZE) -> bytes:
    """Read [offset, offset + length) of fd into buf and return the digests of its blocks."""
    view = buf[:length]
    read_exact(fd, view, offset)
    return hash_window(view, offset, block_size)


def differing_blocks(
    buf: memoryview, offset: int, remote: bytes | memoryview, block_size: int = BLOCK_SIZE
) -> list[tuple[int, int]]:
    """Blocks of a source window (in buf) whose digest differs from the replica's digests in ``remote``."""
    out = []
    for i, (p, n) in enumerate(block_spans(offset, len(buf), block_size)):
        if digest(buf[p - offset : p - offset + n]) != bytes(remote[i * HASH_SIZE : (i + 1) * HASH_SIZE]):
            out.append((p, n))
    return out
