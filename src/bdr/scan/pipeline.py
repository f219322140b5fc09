"""The client's scan window pipeline: read a window of source blocks, hash them, and pick the blocks to send.

One pipeline serves the three passes over the source: a hash resync (compare each block with the digest the
server sent for the replica's block, keep the ones that differ), a full resync (keep every block, an all-zero
block as a ZERO marker or not at all when the replica is known to read as zeros) and an online verify (compare,
report, send nothing).  When it compares, the pipeline keeps up to ``depth`` SCAN_REQUEST windows in flight and
takes the replies in order.
"""

from __future__ import annotations

import concurrent.futures
import mmap
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from .. import wire as p
from .blocks import HASH_SIZE, differing, hash_window, zero_digest

Reader = Callable[[memoryview, int], None]  # fills the view from the source at the byte offset


class ReplicaHashes(Protocol):
    """The server's side of a comparison: ask for a window's digests, take the next reply."""

    def request(self, scan_id: int, offset: int, length: int) -> None: ...

    def reply(self) -> p.ScanHashes: ...


@dataclass(slots=True)
class Window:
    """One window of the source, read, with the blocks the pass picked in it."""

    offset: int
    view: memoryview  # the window's bytes; valid until the next window is read into the same buffer
    blocks: list[tuple[int, int, int]]  # (offset, length, protocol.BlockFlag) of the blocks to send
    nblocks: int  # blocks looked at
    differing: int = 0  # blocks whose digest differed from the replica's (comparing)
    zero: int = 0  # all-zero blocks (copying)


@dataclass(slots=True)
class ScanStats:
    mode: str = "hash"
    blocks: int = 0  # blocks looked at
    differing: int = 0  # blocks whose digests differed (hash mode)
    sent_blocks: int = 0  # blocks sent with data
    zero_blocks: int = 0  # blocks sent as a ZERO marker or skipped as known zero
    bytes_sent: int = 0  # data bytes sent
    windows: int = 0
    extents: list[tuple[int, int]] = field(default_factory=list)

    def add(self, w: Window) -> None:
        """Count a window the pipeline produced (what was sent is counted by the sender)."""
        self.blocks += w.nblocks
        self.differing += w.differing
        self.zero_blocks += w.zero
        self.windows += 1


def run(
    wins: Iterable[tuple[int, int]],
    read: Reader,
    buf: memoryview,
    block_size: int,
    replica: ReplicaHashes | None = None,
    scan_id: int = 0,
    depth: int = 1,
    known_zero: bool = False,
) -> Iterator[Window]:
    """The windows ``wins`` (offset, length), in order, each read from the source into ``buf`` (or a second
    buffer of the same size: the next window is read while this one is hashed and sent).

    With ``replica``: each window's blocks are compared with the replica's digests (SCAN_REQUEST ``scan_id``,
    ``depth`` requests in flight, so the replica hashes while we read and hash) and the differing ones are
    picked.  Without: every block is picked, an all-zero one as a ZERO marker, or skipped when ``known_zero``
    (the replica reads as zeros already)."""
    wins = list(wins)
    asked = 0  # windows whose digests were requested from the replica
    for k, (off, ln, view) in enumerate(_read_ahead(wins, read, buf)):
        if replica is not None:
            while asked < len(wins) and asked - k < depth:
                replica.request(scan_id, *wins[asked])
                asked += 1
        mine = hash_window(view, block_size)
        if replica is not None:
            rep = replica.reply()
            _check_reply(rep, scan_id, off, ln, block_size)
            diff = [_span(off, ln, block_size, i) for i in differing(mine, rep.hashes)]
            yield Window(off, view, diff, len(mine) // HASH_SIZE, differing=len(diff))
        else:
            blocks: list[tuple[int, int, int]] = []
            zero = 0
            for i in range(len(mine) // HASH_SIZE):
                o, n, _ = span = _span(off, ln, block_size, i)
                if mine[i * HASH_SIZE : (i + 1) * HASH_SIZE] != zero_digest(n):
                    blocks.append(span)
                    continue
                zero += 1
                if not known_zero:
                    blocks.append((o, n, int(p.BlockFlag.ZERO)))
            yield Window(off, view, blocks, len(mine) // HASH_SIZE, zero=zero)


def _read_ahead(
    wins: list[tuple[int, int]], read: Reader, buf: memoryview
) -> Iterator[tuple[int, int, memoryview]]:
    """(offset, length, view) of each window, read; the read of the next one runs on a thread of its own (the
    read releases the GIL: a disk read or a page-cache copy overlaps the hashing and the sending of this one).
    A view is valid until the next one is taken.  One window alone is read on the caller's thread."""
    if len(wins) <= 1:
        for off, ln in wins:
            view = buf[:ln]
            read(view, off)
            yield off, ln, view
        return
    bufs = [buf, memoryview(mmap.mmap(-1, len(buf)))]  # page-aligned, as O_DIRECT wants
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bdr-scan-read") as reader:
        off, ln = wins[0]
        pending = reader.submit(read, bufs[0][:ln], off)
        for i, (off, ln) in enumerate(wins):
            pending.result()
            if i + 1 < len(wins):
                noff, nln = wins[i + 1]
                pending = reader.submit(read, bufs[(i + 1) % 2][:nln], noff)
            yield off, ln, bufs[i % 2][:ln]


def _span(off: int, ln: int, block_size: int, i: int) -> tuple[int, int, int]:
    """Block ``i`` of the window [off, off + ln): (offset, length, no flags)."""
    o = off + i * block_size
    return o, min(block_size, off + ln - o), 0


def _check_reply(rep: p.ScanHashes, scan_id: int, off: int, ln: int, block_size: int) -> None:
    nblocks = -(-ln // block_size)
    if rep.scan_id != scan_id or rep.offset != off or rep.count != nblocks:
        raise p.RemoteProtocolError(
            p.ErrorCode.BAD_FIELD,
            f"SCAN_HASHES for [{rep.offset}, {rep.count} blocks), asked [{off}, {nblocks})",
        )
