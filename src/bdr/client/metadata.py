"""The source's metadata (``bdr_client --metadata FILE``): its generation history, which the replica compares
with its own at every connect (``bdr.generations``), whether a replica has acknowledged any write of the current
generation, and where the source stood when its client last stopped with everything replicated.

One 4 KiB block, little-endian, then zeros and a checksum (the journal header's sealing)::

    0         8       12         16            24             40           56
    +---------+-------+----------+-------------+--------------+------------+---------------------+
    | magic   | flags | reserved | synced_seq  | synced_ring  | gen_ring   | generation history  |
    +---------+-------+----------+-------------+--------------+------------+---------------------+

``synced_ring``: the capture ring of ``synced_seq``; ``gen_ring``: the ring created with the current generation
(``bdr promote --name``), which then holds every write of the generation from its seq 0 while it lives.

The history carries the bytes written in each generation (``bdr.generations``).  The current one's count covers
the records of ring ``counted_ring`` before ring position ``counted_pos``, at byte 2048::

    2048           2064          2072
    +--------------+-------------+
    | counted_ring | counted_pos |
    +--------------+-------------+

A client that starts on that ring adds the records from ``counted_pos`` on; on another ring (the host rebooted),
all of that ring's records.  ``WrittenCount`` keeps the count while the client runs.

A generation that ``bdr promote`` began records what the replica held then, at byte 2072: the source's ring
and the last seq of it the replica held (the past generation's end).  A demoted old source's marks that were last
cleared at or before that point in that ring hold every write the old source made after it::

    2072        2088       2096
    +-----------+----------+
    | base_ring | base_seq |
    +-----------+----------+

It is replaced whole: written to a temporary file, synced, renamed over the old one, and the directory synced,
so a crash leaves the old block or the new one, never a torn one.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..generations import UNKNOWN, Generations, GenerationsError
from ..journal.copies import BLOCK, intact, seal
from ..kernel.ring import RingConsumer
from ..seq import NO_SEQ, fmt_seq

log = logging.getLogger("bdr.client")

MAGIC = b"BDRSMETA"
_FIXED = struct.Struct("<8sIIQ16s16s")
_COUNTED = struct.Struct("<16sQ")
_COUNTED_AT = 2048
_BASE = struct.Struct("<16sQ")
_BASE_AT = _COUNTED_AT + _COUNTED.size
NO_RING = bytes(16)


class MetaFlag(enum.IntFlag):
    NONE = 0
    ACKED = 1 << 0  # a replica acknowledged a write of the current generation
    SYNCED = 1 << 1  # the client stopped with every write up to synced_seq durable on the replica, none after


@dataclass(frozen=True, slots=True)
class SourceMeta:
    generations: Generations
    flags: MetaFlag = MetaFlag.NONE
    synced_seq: int = NO_SEQ  # with SYNCED: the last seq the replica holds (the ring held nothing after it)
    synced_ring: bytes = NO_RING  # the ring identity of synced_seq
    gen_ring: bytes = NO_RING  # the ring created with the current generation (NO_RING: not known)
    counted_ring: bytes = NO_RING  # the current generation's written count covers this ring's records ...
    counted_pos: int = 0  # ... before this position
    base_ring: bytes = NO_RING  # bdr promote: the replica held the old source's ring base_ring ...
    base_seq: int = NO_SEQ  # ... up to this seq when the current generation began

    @property
    def acked(self) -> bool:
        return bool(self.flags & MetaFlag.ACKED)

    @property
    def synced(self) -> int | None:
        return self.synced_seq if self.flags & MetaFlag.SYNCED else None

    def describe(self) -> str:
        s = self.generations.describe()
        if self.synced is not None:
            s += f", stopped in sync at seq {fmt_seq(self.synced_seq)}"
        return s

    def with_(self, **changes: object) -> SourceMeta:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


class MetadataError(Exception):
    """The metadata file cannot be read or written."""


def read_metadata(path: Path) -> SourceMeta | None:
    """The metadata in ``path``; None if the file does not exist."""
    try:
        block = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MetadataError(f"cannot read source metadata {path}: {exc.strerror}") from exc
    if not intact(block, MAGIC):
        raise MetadataError(
            f"source metadata {path} is damaged or not BDR source metadata (bad magic or checksum); refusing "
            "to guess the source's generation. Restore it, or move it away to start a new generation history"
        )
    _, flags, _, synced, synced_ring, gen_ring = _FIXED.unpack_from(block)
    counted_ring, counted_pos = _COUNTED.unpack_from(block, _COUNTED_AT)
    base_ring, base_seq = _BASE.unpack_from(block, _BASE_AT)
    try:
        gens = Generations.unpack(memoryview(block)[_FIXED.size :])
    except GenerationsError as exc:
        raise MetadataError(f"source metadata {path}: {exc}") from None
    if gens is None:
        raise MetadataError(f"source metadata {path} holds no generation")
    return SourceMeta(
        gens,
        MetaFlag(flags & 0x3),
        synced,
        synced_ring,
        gen_ring,
        counted_ring,
        counted_pos,
        base_ring,
        base_seq,
    )


def write_metadata(path: Path, meta: SourceMeta) -> None:
    fixed = _FIXED.pack(MAGIC, meta.flags, 0, meta.synced_seq, meta.synced_ring, meta.gen_ring)
    gens = meta.generations.pack()
    assert len(fixed) + len(gens) <= _COUNTED_AT
    body = (
        (fixed + gens).ljust(_COUNTED_AT, b"\0")
        + _COUNTED.pack(meta.counted_ring, meta.counted_pos)
        + _BASE.pack(meta.base_ring, meta.base_seq)
    )
    block = seal(body)
    assert len(block) == BLOCK
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise MetadataError(f"cannot write source metadata {path}: {exc.strerror}") from exc


def load_or_create(path: Path) -> SourceMeta:
    """The source's metadata at a client start; a first generation when the file does not exist yet (a new
    source).  A replica holds some of the current generation (ACKED) and the last client did not stop in sync
    (it crashed, or stopped with writes not replicated): writes it never sent may be on the source, so a new
    generation begins, and a replica promoted meanwhile is a split brain, not a replica that is behind.  A mark
    of a stop in sync is cleared: the source is being written again."""
    meta = read_metadata(path)
    if meta is None:
        meta = SourceMeta(Generations.first())
        write_metadata(path, meta)
        log.info("source metadata %s created: %s", path, meta.describe())
        return meta
    log.info("source metadata %s: %s", path, meta.describe())
    if meta.acked and meta.synced is None:
        # the count of the generation that ends is what was stored; the ring's records after it are the new one's
        meta = SourceMeta(
            meta.generations.successor(NO_SEQ), counted_ring=meta.counted_ring, counted_pos=meta.counted_pos
        )
        write_metadata(path, meta)
        log.warning(
            "the last bdr_client did not stop in sync: writes it never sent may be on the source; %s begins",
            meta.generations.describe(),
        )
    elif meta.synced is not None:
        meta = meta.with_(flags=meta.flags & ~MetaFlag.SYNCED, synced_seq=NO_SEQ, synced_ring=NO_RING)
        write_metadata(path, meta)
    return meta


class WrittenCount:
    """The bytes written in the current generation while the client runs: the count in the metadata, plus the
    data of the ring's records since (those released by the ring's ``released_data``, and those still in it)."""

    def __init__(self, ring: RingConsumer, ring_id: bytes, meta: SourceMeta) -> None:
        self.ring = ring
        tail, head = ring.tail, ring.head()
        pos = meta.counted_pos if meta.counted_ring == ring_id and tail <= meta.counted_pos <= head else tail
        stored = meta.generations.current_written
        self.known = stored != UNKNOWN
        self.base = stored - ring.data_bytes(tail, pos) if self.known else 0
        self.released = ring.released_data

    def now(self) -> tuple[int, int]:
        """(bytes written in the generation, the ring position they count up to)."""
        ring = self.ring
        tail, head = ring.tail, ring.head()
        if not self.known:
            return UNKNOWN, head
        return self.base + ring.released_data - self.released + ring.data_bytes(tail, head), head

    def restart(self, at: int) -> None:
        """A new generation begins with the ring's record at position ``at`` (not released yet)."""
        self.base = -self.ring.data_bytes(self.ring.tail, at)
        self.released = self.ring.released_data
        self.known = True

    def stamp(self, meta: SourceMeta, ring_id: bytes) -> SourceMeta:
        """``meta`` with the current generation's count as of now, to be stored."""
        written, pos = self.now()
        return meta.with_(
            generations=meta.generations.with_written(written), counted_ring=ring_id, counted_pos=pos
        )
