"""Generations: which line of writes a side's data belongs to, and what two sides decide from them at connect.

A generation is a random 64-bit id.  A side's history is its current generation and, oldest first, the earlier
generations it descends from, each with the sequence number at which it ended.  A new generation begins when a
replica is promoted to a source (``bdr promote``): the replica's last durable sequence number ends the old one.
The source (``bdr_client --metadata``) and the replica (its journal header) each keep their history; HELLO and
WELCOME carry them, and the server decides (``decide``):

- same current generation: stream or resume as the sequence numbers allow;
- the replica has none (a new replica, or one written before generations existed): it takes the source's;
- the source's history holds the replica's current generation, ended at seq S: the replica is behind (a failback
  after a promotion): it is resynced, and takes the source's history;
- the replica's history holds the source's current generation: the replica was promoted after the source's last
  write it has; the source is the one behind, and refused;
- anything else: both sides were written after they last agreed, a **split brain**: refused until the operator
  names the side that loses (``bdr_server --discard-local-changes``).  The refusal says how much each side wrote
  since the split: the bytes written in its generations after the one they share.

Each generation may also carry the bytes written in it (``written``): the source's client counts the data of
the records its capture ring gives it (``bdr.client.metadata``), and ``bdr demote`` adds what the ring still held.
Writes the ring lost (an overflow, a crash of the source's host before its client counted them) are not in it.

Encoding (little-endian, at most ``ENCODED_MAX`` bytes); the written counts are optional::

    0       2          4          12                      12 + 16 n   16 + 16 n   20 + 16 n
    +-------+----------+----------+-----------------------+-----------+-----------+----------------------------+
    | count | reserved | current  | (id, end_seq) x count | "WRTN"    | reserved  | written x (count + 1)      |
    +-------+----------+----------+-----------------------+-----------+-----------+----------------------------+

``written``: one u64 per earlier generation, oldest first, then the current one's; ``UNKNOWN`` (all ones): not
counted (a generation begun by a BDR that did not count).  A reader that does not know the counts stops at the
entries; on the wire they follow only in a HELLO, and in a WELCOME to a client that announces
``Feature.WRITTEN``.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass

from .seq import NO_SEQ

PAST_MAX = 30  # earlier generations kept (the oldest are forgotten first)
_HEAD = struct.Struct("<HHQ")
_ENTRY = struct.Struct("<QQ")
_WRITTEN = struct.Struct("<4sI")
_WRITTEN_MAGIC = b"WRTN"
_COUNT = struct.Struct("<Q")
ENCODED_MAX = _HEAD.size + PAST_MAX * _ENTRY.size + _WRITTEN.size + (PAST_MAX + 1) * _COUNT.size
UNKNOWN = (1 << 64) - 1  # a written count nobody kept


class GenerationsError(ValueError):
    """Bytes that do not encode a generation history."""


def new_id() -> int:
    """A random generation id (never zero: zero means none)."""
    while True:
        gid = int.from_bytes(os.urandom(8), "little")
        if gid:
            return gid


def fmt_id(gid: int) -> str:
    return f"{gid:016x}"


def _at(seq: int) -> str:
    return "at an unknown seq" if seq == NO_SEQ else f"at seq {seq}"


def fmt_bytes(n: float) -> str:
    """``12.3 MiB``; below 1 KiB ``512 B``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


@dataclass(frozen=True, slots=True)
class Generations:
    """``current``: the generation being written; ``past``: (id, seq at which it ended), oldest first;
    ``written``: the bytes written in each of ``past`` and then in ``current`` (None: not counted)."""

    current: int
    past: tuple[tuple[int, int], ...] = ()
    written: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.written is not None and len(self.written) != len(self.past) + 1:
            raise GenerationsError(
                f"{len(self.written)} written counts for a history of {len(self.past) + 1} generations"
            )

    @classmethod
    def first(cls) -> Generations:
        return cls(new_id(), written=(0,))

    @property
    def current_written(self) -> int:
        """Bytes written in the current generation so far (UNKNOWN: not counted)."""
        return self.written[-1] if self.written is not None else UNKNOWN

    def successor(self, end_seq: int) -> Generations:
        """The history after the current generation ends at ``end_seq`` and a new one begins (nothing written
        in it yet)."""
        past = (*self.past, (self.current, end_seq))
        done = self.written if self.written is not None else (UNKNOWN,) * len(past)
        return Generations(new_id(), past[-PAST_MAX:], (*done, 0)[-(PAST_MAX + 1) :])

    def with_written(self, current: int) -> Generations:
        """The same history, ``current`` bytes written in the current generation."""
        done = self.written[:-1] if self.written is not None else (UNKNOWN,) * len(self.past)
        return Generations(self.current, self.past, (*done, current))

    def bare(self) -> Generations:
        """The history without written counts (for a peer that does not know them)."""
        return Generations(self.current, self.past)

    def written_after(self, gid: int | None) -> int | None:
        """Bytes written in the generations after ``gid`` (None: in all of them); None if one of them was not
        counted."""
        ids = [g for g, _ in self.past] + [self.current]
        start = 0 if gid is None else ids.index(gid) + 1
        counts = (self.written or (UNKNOWN,) * len(ids))[start:]
        return None if UNKNOWN in counts else sum(counts)

    def ended_at(self, gid: int) -> int | None:
        """The seq at which ``gid`` ended in this history; None if it is not an earlier generation here."""
        for old, end in reversed(self.past):
            if old == gid:
                return end
        return None

    def common(self, other: Generations) -> tuple[int, int, int] | None:
        """The newest generation both histories hold, and where it ended on each side: (id, here, there).
        A current generation has no end: NO_SEQ."""
        theirs = {gid: end for gid, end in (*other.past, (other.current, NO_SEQ))}
        for gid, end in reversed((*self.past, (self.current, NO_SEQ))):
            if gid in theirs:
                return gid, end, theirs[gid]
        return None

    def describe(self) -> str:
        """``generation 0123… (after 4567… ended at seq 42)``."""
        if not self.past:
            return f"generation {fmt_id(self.current)}"
        gid, end = self.past[-1]
        return f"generation {fmt_id(self.current)} (after {fmt_id(gid)} ended {_at(end)})"

    def pack(self) -> bytes:
        out = _HEAD.pack(len(self.past), 0, self.current) + b"".join(_ENTRY.pack(g, s) for g, s in self.past)
        if self.written is not None:
            out += _WRITTEN.pack(_WRITTEN_MAGIC, 0) + b"".join(_COUNT.pack(n) for n in self.written)
        return out

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Generations | None:
        """The history encoded at the start of ``data``; None when it holds none (all zero)."""
        if len(data) < _HEAD.size:
            raise GenerationsError(f"generation history of {len(data)} bytes, needs at least {_HEAD.size}")
        count, rsvd, current = _HEAD.unpack_from(data)
        if not current:
            if count or rsvd:
                raise GenerationsError("generation history with earlier generations but no current one")
            return None
        if rsvd or count > PAST_MAX or len(data) < _HEAD.size + count * _ENTRY.size:
            raise GenerationsError(f"generation history with {count} earlier generations does not fit")
        past = tuple(_ENTRY.unpack_from(data, _HEAD.size + k * _ENTRY.size) for k in range(count))
        if any(not g for g, _ in past):
            raise GenerationsError("generation history with a zero id")
        at = _HEAD.size + count * _ENTRY.size
        written = None
        if _has_written(data, at):
            if len(data) < at + _WRITTEN.size + (count + 1) * _COUNT.size:
                raise GenerationsError(
                    f"generation history with {count} earlier generations: written counts cut"
                )
            at += _WRITTEN.size
            written = tuple(_COUNT.unpack_from(data, at + k * _COUNT.size)[0] for k in range(count + 1))
        return cls(current, past, written)

    @staticmethod
    def encoded_size(data: bytes | memoryview) -> int:
        """Bytes taken by the history at the start of ``data``."""
        count: int = struct.unpack_from("<H", data)[0]
        at = _HEAD.size + count * _ENTRY.size
        if _has_written(data, at):
            at += _WRITTEN.size + (count + 1) * _COUNT.size
        return at


def _has_written(data: bytes | memoryview, at: int) -> bool:
    if len(data) < at + _WRITTEN.size:
        return False
    magic, rsvd = _WRITTEN.unpack_from(data, at)
    if magic != _WRITTEN_MAGIC:
        return False
    if rsvd:
        raise GenerationsError("generation history: written counts with a nonzero reserved field")
    return True


def to_json(g: Generations | None) -> dict[str, object] | None:
    if g is None:
        return None
    counts = g.written or (UNKNOWN,) * (len(g.past) + 1)
    known = [None if n == UNKNOWN else n for n in counts]
    return {
        "current": fmt_id(g.current),
        "written": known[-1],
        "past": [
            {"id": fmt_id(gid), "ended_at_seq": end, "written": n}
            for (gid, end), n in zip(g.past, known, strict=False)
        ],
    }


class Verdict(enum.Enum):
    SAME = "same generation"
    ADOPT = "the replica has no generation yet and takes the source's"
    LEGACY = "the source keeps no generations (bdr_client without --metadata)"
    REPLICA_BEHIND = "the replica is behind (its generation ended on the source)"
    SOURCE_BEHIND = "the source is behind (the replica was promoted after it)"
    SPLIT_BRAIN = "split brain"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    since_seq: int | None  # REPLICA_BEHIND / SOURCE_BEHIND: where the side that is behind left off
    text: str  # for logs, status and ERROR messages
    # SPLIT_BRAIN: bytes written since the split on the source's side and on the replica's (None: not counted)
    split_written: tuple[int | None, int | None] | None = None


def _amount(n: int | None) -> str:
    return fmt_bytes(n) if n is not None else "an amount not counted"


def decide(source: Generations | None, replica: Generations | None) -> Decision:
    """What a connection between a source and a replica with these histories may do (see the module)."""
    if source is None:
        return Decision(Verdict.LEGACY, None, Verdict.LEGACY.value)
    if replica is None:
        return Decision(Verdict.ADOPT, None, f"{Verdict.ADOPT.value}: {source.describe()}")
    if source.current == replica.current:
        return Decision(Verdict.SAME, None, f"{Verdict.SAME.value} {fmt_id(source.current)}")
    end = source.ended_at(replica.current)
    if end is not None:
        return Decision(
            Verdict.REPLICA_BEHIND,
            end,
            f"the replica's generation {fmt_id(replica.current)} ended {_at(end)} on the source, which is at "
            f"{source.describe()}: the replica is behind and is resynced",
        )
    end = replica.ended_at(source.current)
    if end is not None:
        return Decision(
            Verdict.SOURCE_BEHIND,
            end,
            f"the source's generation {fmt_id(source.current)} ended {_at(end)} on the replica, which is at "
            f"{replica.describe()} (it was promoted): this source is behind; demote it (bdr demote) and "
            "replicate from the promoted side",
        )
    common = source.common(replica)
    split = (
        f"both sides were written after generation {fmt_id(common[0])} "
        f"(the source's ended {_at(common[1])}, the replica's {_at(common[2])})"
        if common is not None
        else "the two sides share no generation"
    )
    shared = common[0] if common is not None else None
    written = source.written_after(shared), replica.written_after(shared)
    return Decision(
        Verdict.SPLIT_BRAIN,
        None,
        f"split brain: {split}; since then the source's side wrote {_amount(written[0])} and the replica's "
        f"{_amount(written[1])}; source at {source.describe()}, replica at {replica.describe()}. Nothing is "
        "written until the operator picks the survivor: to keep the source's data, restart bdr_server with "
        "--discard-local-changes (the replica's changes are overwritten by a resync); to keep the replica's, "
        "demote the source and replicate the other way",
        written,
    )
