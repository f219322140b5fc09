"""An UNDO record's payload, read from the replica: the extent table, then what each extent holds, except the
extents that hold zeros (their flag says so, they take no data).  Used by the history writer and by its reader
process (reader.py)."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence

import xxhash

from ..journal import ReplicaIOError
from ..seq import NO_SEQ
from .format import CHUNK, FLAG_RESYNC, FLAG_ZERO, Kind, encode

TABLE_ENTRY = 16  # bytes of the extent table per extent: offset (8), length (4), flags (4)
_ZEROS = bytes(CHUNK)  # an extent is at most CHUNK bytes
SMALL = 64 << 10  # extents of up to this many bytes are copied from the replica's mapping, if it is given


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


def fill_undo(
    fd: int,
    mem: memoryview,
    offsets: Sequence[int],
    lengths: Sequence[int],
    mapped: memoryview | None = None,
    steady: bool = False,
) -> tuple[list[memoryview], int, int]:
    """The payload of an UNDO record for the extents (offset, length) of the replica ``fd``: the extent table,
    then the bytes of each extent that does not hold zeros, in order.  Returns the payload's parts (to be
    written in order), its length and its xxh3-64.  The parts are in ``mem``, which holds at least
    ``payload_room(len(offsets), sum(lengths))`` bytes; each length is at most CHUNK.

    ``mapped``: the replica mapped (map_replica).  Extents of up to SMALL bytes are copied from it, without a
    system call each.  ``steady``: nothing writes to these extents until the parts are written, so that larger
    extents may be parts of the mapping itself (the record's write then copies them straight from the
    replica's pages into the history's, once instead of twice).  ReplicaIOError if a read fails."""
    n = len(offsets)
    struct.pack_into(f"<{n}Q{n}I", mem, 0, *offsets, *lengths)
    flags = [0] * n
    pos = n * TABLE_ENTRY
    fd_, zeros = fd, _ZEROS
    src, small, mapped_end = (mapped, SMALL, len(mapped)) if mapped is not None else (memoryview(b""), 0, 0)
    large = CHUNK if steady and mapped is not None else 0
    parts: list[memoryview] = []
    start = 0  # of the part of ``mem`` not yet in ``parts``
    off = 0
    try:
        for i in range(n):
            off, k = offsets[i], lengths[i]
            if off + k <= mapped_end:
                if k <= small:
                    part = mem[pos : pos + k]
                    part[:] = src[off : off + k]
                elif k <= large:
                    part = src[off : off + k]
                    if part[0] or not zeros.startswith(part):
                        parts += (mem[start:pos], part)
                        start = pos
                    else:
                        flags[i] = FLAG_ZERO
                    continue
                else:
                    part = _read(fd_, mem[pos : pos + k], off)
            else:
                part = _read(fd_, mem[pos : pos + k], off)
            # the first byte decides for most data; zeros.startswith compares at memcmp speed
            if k and (part[0] or not zeros.startswith(part)):
                pos += k
            else:
                flags[i] = FLAG_ZERO
    except OSError as exc:
        raise ReplicaIOError(
            exc.errno, f"replica: I/O error reading what byte {off} holds: {exc.strerror}"
        ) from exc
    struct.pack_into(f"<{n}I", mem, n * 12, *flags)
    parts.append(mem[start:pos])
    if len(parts) == 1:
        return parts, pos, xxhash.xxh3_64_intdigest(parts[0])
    digest = xxhash.xxh3_64()
    for part in parts:
        digest.update(part)
    return parts, sum(map(len, parts)), digest.intdigest()


def _read(fd: int, view: memoryview, offset: int) -> memoryview:
    """Read into ``view`` what the replica holds at ``offset``; past the end of an image file it reads as
    zeros."""
    got = os.preadv(fd, [view], offset)
    while got < len(view):
        k = os.preadv(fd, [view[got:]], offset + got)
        if k <= 0:
            view[got:] = _ZEROS[: len(view) - got]
            break
        got += k
    return view


def map_replica(fd: int) -> memoryview | None:
    """The replica ``fd`` mapped read-only, or None if it cannot be (not a file or a block device, or larger
    than the address space).  Reads through the mapping are copies from the page cache, without a system call:
    for scattered small writes that halves the cost of keeping their before-images.  A read that fails there
    (an I/O error of the disk) is a SIGBUS, which ends the process: only the reader process maps the replica."""
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except (OSError, ValueError, OverflowError):
        return None
    # each fault reads only its page from the disk, as a pread of it would (no read-around)
    m.madvise(mmap.MADV_RANDOM)
    return memoryview(m)
