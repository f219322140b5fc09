"""An UNDO record's payload, read from the replica: the extent table, then what each extent holds, except the
extents that hold zeros (their flag says so, they take no data).  Used by the history writer and by its reader
process (reader.py)."""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

import xxhash

from ..journal import ReplicaIOError
from ..seq import NO_SEQ
from .format import CHUNK, FLAG_RESYNC, FLAG_ZERO, Kind, encode

TABLE_ENTRY = 16  # bytes of the extent table per extent: offset (8), length (4), flags (4)
_ZEROS = bytes(CHUNK)  # an extent is at most CHUNK bytes


def payload_room(extents: int, data: int) -> int:
    """Bytes a payload of ``extents`` extents covering ``data`` bytes may need."""
    return extents * TABLE_ENTRY + data


def undo_head(
    segment: int, now: int, extents: int, covered: int, plen: int, digest: int, following: bool = True
) -> bytes:
    """The header of an UNDO record of ``extents`` extents covering ``covered`` bytes, its payload ``plen``
    bytes of xxh3-64 ``digest`` (fill_undo's); ``following``: of the source's writes, not a resync's."""
    return encode(
        segment,
        Kind.UNDO,
        NO_SEQ,
        now,
        extents,
        covered,
        flags=0 if following else FLAG_RESYNC,
        payload_len=plen,
        payload_sum=digest,
    )


def fill_undo(fd: int, mem: memoryview, offsets: Sequence[int], lengths: Sequence[int]) -> tuple[int, int]:
    """Write into ``mem`` the payload of an UNDO record for the extents (offset, length) of the replica ``fd``:
    the extent table, then the bytes of each extent that does not hold zeros, in order.  Returns the payload's
    length and its xxh3-64.  ``mem`` holds at least ``payload_room(len(offsets), sum(lengths))`` bytes; each
    length is at most CHUNK.  ReplicaIOError if a read fails."""
    n = len(offsets)
    struct.pack_into(f"<{n}Q{n}I", mem, 0, *offsets, *lengths)
    flags = [0] * n
    pos = n * TABLE_ENTRY
    preadv, fd_, zeros = os.preadv, fd, _ZEROS
    off = 0
    try:
        for i in range(n):
            off, k = offsets[i], lengths[i]
            part = mem[pos : pos + k]
            got = preadv(fd_, [part], off)
            if got != k:
                _read_rest(fd_, part, off, got)
            # the first byte decides for most data; zeros.startswith compares at memcmp speed
            if mem[pos] or not zeros.startswith(part):
                pos += k
            else:
                flags[i] = FLAG_ZERO
    except OSError as exc:
        raise ReplicaIOError(
            exc.errno, f"replica: I/O error reading what byte {off} holds: {exc.strerror}"
        ) from exc
    struct.pack_into(f"<{n}I", mem, n * 12, *flags)
    return pos, xxhash.xxh3_64_intdigest(mem[:pos])


def _read_rest(fd: int, view: memoryview, offset: int, got: int) -> None:
    while got < len(view):
        k = os.preadv(fd, [view[got:]], offset + got)
        if k <= 0:
            view[got:] = _ZEROS[: len(view) - got]  # past the end of an image file: reads as zeros
            return
        got += k
