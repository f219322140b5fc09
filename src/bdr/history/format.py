"""The history's on-disk format: a directory of append-only segment files of checksummed records.

Layout of ``--history DIR``::

    DIR/history.json         what the history belongs to: the replica (path, size) and its journal
    DIR/lock                 held (flock) by the bdr_server writing the history; bdr rollback takes it too
    DIR/<number>.seg         segments, numbered in the order they were written; the oldest is dropped first

A segment is a sequence of records.  A record is a 64-byte header (little-endian) and ``payload_len`` bytes::

    0      4      6      8      16       24       32       40       44       48          56          64
    +------+------+------+------+--------+--------+--------+--------+--------+-----------+-----------+
    | magic| kind | flags|  seq | time_ns| offset | length | pay len| seg tag| pay xxh3  | head xxh3 |
    +------+------+------+------+--------+--------+--------+--------+--------+-----------+-----------+

``head xxh3`` covers bytes 0..56, ``pay xxh3`` the payload.  ``seg tag`` is the number of the segment the
record was written in (low 32 bits): segment files are reused when the oldest is dropped (no allocation, no
freeing), and a record left from a file's earlier life has another tag, so it ends the segment.  Kinds:

- UNDO: what a batch of writes overwrote, read just before they reached the replica (and made durable before
  they did).  ``offset`` is the number of extents n, ``length`` the bytes they cover; the payload is the extent
  table -- n replica offsets (u64), then n lengths (u32), then n flags (u32; ZERO: the extent held zeros and has
  no data) -- followed by the data of the other extents, in order.
- CHECKPOINT: the replica was durable at ``seq``, a durability point of the source (FLUSH or FUA), at
  ``time_ns``.  Undoing every UNDO after it, newest first, gives the replica as it was then.
- GAP: the replica was about to be rewritten without before-images (a direct resync, an operator's assertion);
  no point before it can be restored.  The payload says why (UTF-8).
- RESYNC: a journal resync was applied, its before-images in the UNDO records just before; the points before
  it can still be restored, but no moment of the window it closes: from ``offset`` (the time, ns, the replica
  last followed the source) to ``time_ns``, up to ``seq`` (the replica's sequence number after it), the
  source's states never were on the replica.  The payload says why (UTF-8).
- START: a bdr_server opened the history (payload: a line for the log).
- ROLLBACK: ``bdr rollback`` turned the replica back to the checkpoint before this record (payload: why).

A torn record at the end of the newest segment (power cut) fails its checksums; the server truncates it at open.
"""

from __future__ import annotations

import enum
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import xxhash

from ..seq import NO_SEQ

MAGIC = 0x48524442  # "BDRH"
HEAD_SIZE = 64
_SUMMED = struct.Struct("<IHHQQQQII")  # the fields the header checksum covers (bytes 0..48), then pay xxh3
META = "history.json"
LOCK = "lock"
SEGMENT_SUFFIX = ".seg"
FORMAT_VERSION = 1
CHUNK = 1 << 20  # an UNDO record covers at most this many bytes


class Kind(enum.IntEnum):
    UNDO = 1
    CHECKPOINT = 2
    GAP = 3
    START = 4
    ROLLBACK = 5
    RESYNC = 6


FLAG_ZERO = 1  # an UNDO extent that held zeros (no data)
FLAG_RESYNC = 1  # an UNDO record (its header's flags): before-images kept for a resync, not a source write


@dataclass(frozen=True, slots=True)
class Entry:
    """A record's header, and where it is: segment number and byte position of its header."""

    segment: int
    pos: int
    kind: Kind
    flags: int
    seq: int
    time_ns: int
    offset: int
    length: int
    payload_len: int
    payload_sum: int

    @property
    def end(self) -> int:
        return self.pos + HEAD_SIZE + self.payload_len


SEG_TAG_MASK = 0xFFFFFFFF


def encode(
    segment: int,
    kind: Kind,
    seq: int = NO_SEQ,
    time_ns: int = 0,
    offset: int = 0,
    length: int = 0,
    payload: bytes | bytearray | memoryview = b"",
    flags: int = 0,
    payload_len: int | None = None,
    payload_sum: int | None = None,
) -> bytes:
    """A record's 64-byte header (the payload is written after it as it is).  A payload written in pieces is
    given by its length and xxh3 instead."""
    if payload_len is None:
        payload_len = len(payload)
        payload_sum = xxhash.xxh3_64_intdigest(payload) if payload else 0
    assert payload_sum is not None
    body = _SUMMED.pack(MAGIC, kind, flags, seq, time_ns, offset, length, payload_len, segment & SEG_TAG_MASK)
    body += payload_sum.to_bytes(8, "little")
    return body + xxhash.xxh3_64_intdigest(body).to_bytes(8, "little")


def decode(head: bytes | memoryview, segment: int, pos: int) -> Entry | None:
    """The entry of a 64-byte header, or None if it is not an intact record header of this segment."""
    if len(head) < HEAD_SIZE:
        return None
    if xxhash.xxh3_64_intdigest(head[:56]) != int.from_bytes(head[56:64], "little"):
        return None
    magic, kind, flags, seq, time_ns, offset, length, plen, tag = _SUMMED.unpack_from(head)
    if magic != MAGIC or kind not in Kind._value2member_map_ or tag != segment & SEG_TAG_MASK:
        return None
    return Entry(
        segment,
        pos,
        Kind(kind),
        flags,
        seq,
        time_ns,
        offset,
        length,
        plen,
        int.from_bytes(head[48:56], "little"),
    )


def payload_intact(entry: Entry, payload: bytes | memoryview) -> bool:
    return len(payload) == entry.payload_len and (
        not payload or xxhash.xxh3_64_intdigest(payload) == entry.payload_sum
    )


def unpack_extents(payload: bytes, n: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]:
    """offsets, lengths, flags, and where the data starts."""
    table = struct.Struct(f"<{n}Q{n}I{n}I")
    cols = table.unpack_from(payload)
    return cols[:n], cols[n : 2 * n], cols[2 * n :], table.size


def segment_name(number: int) -> str:
    return f"{number:016d}{SEGMENT_SUFFIX}"


def segment_numbers(directory: Path) -> list[int]:
    """The segments in ``directory``, oldest first."""
    out = []
    for name in os.listdir(directory):
        if name.endswith(SEGMENT_SUFFIX) and name[: -len(SEGMENT_SUFFIX)].isdigit():
            out.append(int(name[: -len(SEGMENT_SUFFIX)]))
    return sorted(out)


@dataclass(frozen=True)
class Meta:
    """What a history belongs to (``history.json``)."""

    replica: str  # absolute paths
    replica_bytes: int
    journal: str
    id: bytes = bytes(16)  # the journal header names it while this history keeps every write's before-image

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT_VERSION,
                "id": self.id.hex(),
                "replica": self.replica,
                "replica_bytes": self.replica_bytes,
                "journal": self.journal,
            },
            indent=2,
        )


class HistoryFormatError(Exception):
    """The directory is not a usable history."""


class NotAHistory(HistoryFormatError):
    """The directory has no history.json (a new history may be made there)."""


def read_meta(directory: Path) -> Meta:
    path = directory / META
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotAHistory(f"{directory} is not a bdr history (no {META})") from None
    except (OSError, ValueError) as exc:
        raise HistoryFormatError(f"{path}: unreadable: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION:
        raise HistoryFormatError(f"{path}: not a bdr history of format {FORMAT_VERSION}")
    try:
        ident = bytes.fromhex(str(raw["id"]))
        if len(ident) != 16:
            raise ValueError("id")
        return Meta(str(raw["replica"]), int(raw["replica_bytes"]), str(raw["journal"]), ident)
    except (KeyError, TypeError, ValueError) as exc:
        raise HistoryFormatError(f"{path}: missing or bad field {exc}") from exc


def write_meta(directory: Path, meta: Meta) -> None:
    """Replace ``history.json`` atomically (write, fsync, rename, fsync the directory)."""
    tmp = directory / (META + ".tmp")
    with open(tmp, "w") as f:
        f.write(meta.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / META)
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
