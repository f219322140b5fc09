"""An UNDO record's payload, read from the replica: the extent table, then what each extent holds, except the
extents that hold zeros (their flag says so, they take no data).  Used by the history writer and by its reader
process (reader.py)."""

from __future__ import annotations

import contextlib
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
PAGE = mmap.PAGESIZE
# a mapping of the replica is made anew before its page tables pass this many pages (16 MiB)
TABLES_MAX = 4096
REGION = 21  # log2 of the bytes of mapping one page of page table covers (2 MiB)


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
    mapped: ReplicaMap | None = None,
    steady: bool = False,
) -> tuple[list[memoryview], int, int]:
    """The payload of an UNDO record for the extents (offset, length) of the replica ``fd``: the extent table,
    then the bytes of each extent that does not hold zeros, in order.  Returns the payload's parts (to be
    written in order), its length and its xxh3-64.  The parts are in ``mem``, which holds at least
    ``payload_room(len(offsets), sum(lengths))`` bytes; each length is at most CHUNK.

    ``mapped``: the replica mapped.  Extents of up to SMALL bytes are copied from it, without a system call
    each.  ``steady``: nothing writes to these extents until the parts are written, so that larger
    extents may be parts of the mapping itself (the record's write then copies them straight from the
    replica's pages into the history's, once instead of twice).  ReplicaIOError if a read fails."""
    n = len(offsets)
    struct.pack_into(f"<{n}Q{n}I", mem, 0, *offsets, *lengths)
    flags = [0] * n
    pos = n * TABLE_ENTRY
    fd_, zeros = fd, _ZEROS
    if mapped is not None and mapped.view is not None:  # extents up to ``limit`` bytes come from the mapping
        src, ahead = mapped.view, mapped.read_ahead
        small, limit, mapped_end = SMALL, CHUNK if steady else SMALL, len(src)
    else:
        src, small, limit, mapped_end = memoryview(b""), 0, 0, 0
    parts: list[memoryview] = []
    start = 0  # of the part of ``mem`` not yet in ``parts``
    off = 0
    try:
        for i in range(n):
            off, k = offsets[i], lengths[i]
            if k > limit or off + k > mapped_end:
                part = _read(fd_, mem[pos : pos + k], off)
            else:
                if k > PAGE:
                    ahead(off, k)
                if k > small:  # a large extent, steady: a part of the mapping itself
                    part = src[off : off + k]
                    if part[0] or not zeros.startswith(part):
                        parts += (mem[start:pos], part)
                        start = pos
                    else:
                        flags[i] = FLAG_ZERO
                    continue
                part = mem[pos : pos + k]
                part[:] = src[off : off + k]
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


class ReplicaMap:
    """The replica ``fd`` mapped read-only (``view``; None if it cannot be: not a file or a block device, or
    larger than the address space).  Reads through the mapping are copies from the page cache without a system
    call: for scattered small writes that halves the cost of keeping their before-images.

    A read that fails there (an I/O error of the disk) is a SIGBUS, which ends the process: only the reader
    process maps the replica.  Each fault reads only its page from the disk (MADV_RANDOM: no read-around for
    scattered 4 KiB reads); a larger extent is read ahead whole first (MADV_WILLNEED), as one read would.  The
    kernel keeps a page of page table per 2 MiB of the mapping ever touched, until it is unmapped: the replica
    is mapped anew once its extents touched more than TABLES_MAX such regions (never if it is smaller)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.view: memoryview | None = None
        self._map: mmap.mmap | None = None
        self.regions: set[int] = set()  # the 2 MiB regions touched since the mapping was made
        self.bounded = False  # the replica is too small for its page tables to pass TABLES_MAX
        self._open()

    def _open(self) -> None:
        try:
            size = os.lseek(self.fd, 0, os.SEEK_END)
            m = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except (OSError, ValueError, OverflowError):
            return
        m.madvise(mmap.MADV_RANDOM)
        self._map, self.view = m, memoryview(m)
        self.bounded = size >> REGION < TABLES_MAX

    def read_ahead(self, offset: int, length: int) -> None:
        start = offset & -PAGE
        assert self._map is not None
        self._map.madvise(mmap.MADV_WILLNEED, start, offset + length - start)

    def used(self, offsets: Sequence[int], lengths: Sequence[int]) -> None:
        """After a request's parts are written (and dropped): note the regions its extents touched, and map the
        replica anew when the page tables may have grown past TABLES_MAX pages."""
        if self.view is None or self.bounded:
            return
        regions = self.regions
        regions.update(o >> REGION for o in offsets)
        # an extent is at most CHUNK bytes: it ends in the region it starts in, or in the next
        regions.update((o + k - 1) >> REGION for o, k in zip(offsets, lengths, strict=True) if k > PAGE)
        if len(regions) > TABLES_MAX:
            self.close()
            regions.clear()
            self._open()

    def close(self) -> None:
        view, m = self.view, self._map
        self.view = self._map = None
        if view is not None:
            view.release()
        if m is not None:
            with contextlib.suppress(BufferError):  # a part still held: unmapped when the last one goes
                m.close()
