"""Server metadata on the ``--journal`` path: which source the replica mirrors, up to which sequence number it
is durable, and whether it is consistent.

Layout of the journal device or file (version 1)::

    0          4 KiB      8 KiB                                  1 MiB
    +----------+----------+--------------------------------------+---------------------------------
    | header A | header B | record area state, reserved          | record area (resync records)
    +----------+----------+--------------------------------------+---------------------------------

The two header copies are written alternately (generation even -> A, odd -> B), each followed by fdatasync, so
a torn write can only damage the copy being written: at open, the valid copy with the highest generation
wins.  A header block (4096 bytes, little-endian)::

    0        8        12       16           24      28           32          48         64
    +--------+--------+--------+------------+-------+------------+-----------+----------+
    | magic  | version| hdr sz | generation | flags | block_size | source_id | ring_id  |
    +--------+--------+--------+------------+-------+------------+-----------+----------+
    64            72            80             88               96           112           ...  4088       4096
    +-------------+-------------+--------------+----------------+------------+-------------+- 0 -+----------+
    | source_size | durable_seq | consistent_seq| replica_size  | history_id | generations |     | xxh3_64  |
    +-------------+-------------+--------------+----------------+------------+-------------+-----+----------+

``history_id`` names the point-in-time history (``bdr_server --history``) that kept what every write to the
replica overwrote; zero: none.  ``generations`` is the replica's generation history (``bdr.generations``, at
most ``ENCODED_MAX`` bytes; all zero: none).  Both came without a version bump: a BDR that does not know them
reads zeros there and stores zeros, which is what zeros mean (no history kept; no generation known, so the next
source's is taken).  Everything after them up to the checksum is zero; new fields go there (and bump the
version when an older reader must not ignore them).
The record area (``format``, ``area``) keeps its own state block at 8 KiB and its records from 1 MiB on; a
demoted source's marks (``marks``) sit at 64 KiB.
"""

from __future__ import annotations

import dataclasses
import enum
import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from ..generations import Generations, GenerationsError
from ..seq import NO_SEQ
from .copies import BLOCK, BothCopiesCorrupt, TwoCopies, intact, seal
from .errors import JournalError, JournalIOError
from .marks import AT as MARKS_AT
from .marks import MAGIC as MARKS_MAGIC
from .marks import MAX_BYTES as MARKS_MAX
from .marks import FailbackMarks

MAGIC = b"BDRJRNL\x00"
VERSION = 1
HEADER_BLOCK = BLOCK
HEADER_AREA = 1 << 20  # headers and their future growth; the record area (``format``) starts here
MIN_SIZE = 2 * HEADER_BLOCK
_FIXED = struct.Struct("<8sIIQII16s16sQQQQ16s")


class JFlag(enum.IntFlag):
    NONE = 0
    SEQ_VALID = 1 << 0  # durable_seq is meaningful for ring_id
    CONSISTENT = 1 << 1  # the replica is a prefix-consistent copy of the source
    SCANNING = 1 << 2  # a resync was started and has not finished: the replica is a mix
    SOURCE_KNOWN = 1 << 3  # source_id / ring_id / source_size are set
    HAS_DATA = 1 << 4  # the replica has received data at least once
    IO_ERROR = 1 << 5  # the server stopped on a replica I/O error (SCANNING is set too); cleared by a scan
    PROMOTED = 1 << 6  # bdr promote made the replica a source: no server serves it until bdr demote
    # durable_seq is where the replica's data stands in its current generation (bdr demote after a stop in
    # sync), not a resume point in any ring
    GENERATION_POINT = 1 << 7


@dataclass(frozen=True, slots=True)
class Header:
    generation: int = 0
    flags: JFlag = JFlag.NONE
    block_size: int = 512
    source_id: bytes = bytes(16)
    ring_id: bytes = bytes(16)
    source_size: int = 0
    durable_seq: int = NO_SEQ
    consistent_seq: int = NO_SEQ  # when not CONSISTENT: consistent again once durable_seq reaches it
    replica_size: int = 0
    history_id: bytes = bytes(16)  # the history that kept the before-images of every write (zero: none)
    generations: Generations | None = None  # the replica's generation history (None: not known yet)

    def pack(self) -> bytes:
        fixed = _FIXED.pack(
            MAGIC,
            VERSION,
            HEADER_BLOCK,
            self.generation,
            self.flags,
            self.block_size,
            self.source_id,
            self.ring_id,
            self.source_size,
            self.durable_seq,
            self.consistent_seq,
            self.replica_size,
            self.history_id,
        )
        if self.generations is not None:
            fixed += self.generations.pack()
        return seal(fixed)

    @classmethod
    def parse(cls, block: bytes) -> Header | None:
        """The header in block, or None if the block does not hold a valid one.  Raises JournalError if it
        holds a header from a newer version."""
        if not intact(block, MAGIC):
            return None
        (_, version, hdr_size, gen, flags, bs, sid, rid, ssize, dseq, cseq, rsize, hid) = _FIXED.unpack_from(
            block
        )
        if version > VERSION:
            raise JournalError(
                f"journal written by a newer BDR (format version {version}, we know {VERSION})"
            )
        if hdr_size != HEADER_BLOCK:
            return None
        try:
            gens = Generations.unpack(memoryview(block)[_FIXED.size :])
        except GenerationsError:
            return None
        return cls(gen, JFlag(flags & 0xFF), bs, sid, rid, ssize, dseq, cseq, rsize, hid, gens)


class Journal:
    """The metadata header on the journal path; ``commit(**changes)`` makes a new header durable."""

    def __init__(self, path: str | os.PathLike[str], lock: str | None = None) -> None:
        """``lock``: who opens it (``bdr_server``, ``bdr promote``...), to hold it alone (an exclusive flock
        while it is open); JournalError if another process holds it."""
        self.path = Path(path)
        flags = os.O_RDWR | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags)
            self.created = False
        except FileNotFoundError:
            try:
                self._fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as exc:
                raise JournalError(f"cannot create journal {self.path}: {exc.strerror}") from exc
            self.created = True
        except OSError as exc:
            raise JournalError(f"cannot open journal {self.path}: {exc.strerror}") from exc
        self.fresh = False  # no valid header yet: a new file or a never-used device
        try:
            if lock is not None:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise JournalError(
                        f"journal {self.path} is in use by another process (a running bdr_server?); {lock} "
                        "needs it to itself"
                    ) from None
            st = os.fstat(self._fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise JournalError(f"journal {self.path} is neither a regular file nor a block device")
            self.is_block = stat.S_ISBLK(st.st_mode)
            size = os.lseek(self._fd, 0, os.SEEK_END)
            if self.is_block and size < MIN_SIZE:
                raise JournalError(f"journal device {self.path} has {size} bytes, needs at least {MIN_SIZE}")
            if not self.is_block:
                # allocate both header blocks now: a full file system is a start-up error, not a failed commit
                try:
                    os.posix_fallocate(self._fd, 0, MIN_SIZE)
                except OSError as exc:
                    raise JournalError(f"cannot allocate journal {self.path}: {exc.strerror}") from exc
            self._copies = TwoCopies(self._fd, 0, MAGIC, Header.parse)
            self.header = self._load()
        except BaseException:
            os.close(self._fd)
            raise

    def _load(self) -> Header:
        try:
            header = self._copies.load()
        except BothCopiesCorrupt:
            raise JournalError(
                f"journal {self.path}: both header copies are corrupt (bad checksum); refusing to guess. "
                "Move it away to start over (the next client start then resyncs with a scan)."
            ) from None
        if header is None:
            self.fresh = True
            return Header()
        return header

    def commit(self, **changes: object) -> Header:
        """Write the header with ``changes`` applied as the next generation, and make it durable."""
        return self.store(dataclasses.replace(self.header, **changes))  # type: ignore[arg-type]

    def store(self, header: Header) -> Header:
        """Write ``header`` (a transition of ``replica_state``) as the next generation, and make it durable."""
        new = dataclasses.replace(header, generation=self.header.generation + 1)
        try:
            self._copies.store(new, new.pack())
        except OSError as exc:
            raise JournalIOError(
                exc.errno, f"journal {self.path}: I/O error: {exc.strerror or exc}", str(self.path)
            ) from exc
        self.header = new
        return new

    def store_marks(self, marks: FailbackMarks | None) -> None:
        """Keep a demoted source's marks (``marks``), or none, durably; before the header that uses them."""
        blob = marks.pack() if marks is not None else bytes(len(MARKS_MAGIC))
        if self.is_block and os.lseek(self._fd, 0, os.SEEK_END) < MARKS_AT + len(blob):
            if marks is None:
                return  # too small ever to have held any
            raise JournalError(
                f"journal device {self.path} is too small to keep the marks ({len(blob)} bytes)"
            )
        try:
            os.pwrite(self._fd, blob, MARKS_AT)
            os.fdatasync(self._fd)
        except OSError as exc:
            raise JournalIOError(
                exc.errno, f"journal {self.path}: I/O error: {exc.strerror or exc}", str(self.path)
            ) from exc

    def load_marks(self) -> FailbackMarks | None:
        """The marks ``store_marks`` kept; None if there are none (or they are damaged: then they do not serve)."""
        try:
            blob = os.pread(self._fd, MARKS_MAX, MARKS_AT)
        except OSError:
            return None
        return FailbackMarks.unpack(blob)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
