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
  names the side that loses (``bdr_server --discard-local-changes``).

Encoding (little-endian, at most ``ENCODED_MAX`` bytes)::

    0       2          4          12                     12 + 16 n
    +-------+----------+----------+----------------------+
    | count | reserved | current  | (id, end_seq) x count |
    +-------+----------+----------+----------------------+
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
ENCODED_MAX = _HEAD.size + PAST_MAX * _ENTRY.size


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


@dataclass(frozen=True, slots=True)
class Generations:
    """``current``: the generation being written; ``past``: (id, seq at which it ended), oldest first."""

    current: int
    past: tuple[tuple[int, int], ...] = ()

    @classmethod
    def first(cls) -> Generations:
        return cls(new_id())

    def successor(self, end_seq: int) -> Generations:
        """The history after the current generation ends at ``end_seq`` and a new one begins."""
        return Generations(new_id(), (*self.past, (self.current, end_seq))[-PAST_MAX:])

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
        return _HEAD.pack(len(self.past), 0, self.current) + b"".join(_ENTRY.pack(g, s) for g, s in self.past)

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
        return cls(current, past)

    @staticmethod
    def encoded_size(data: bytes | memoryview) -> int:
        """Bytes taken by the history at the start of ``data``."""
        count: int = struct.unpack_from("<H", data)[0]
        return _HEAD.size + count * _ENTRY.size


def to_json(g: Generations | None) -> dict[str, object] | None:
    if g is None:
        return None
    return {
        "current": fmt_id(g.current),
        "past": [{"id": fmt_id(gid), "ended_at_seq": end} for gid, end in g.past],
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
    return Decision(
        Verdict.SPLIT_BRAIN,
        None,
        f"split brain: {split}; source at {source.describe()}, replica at {replica.describe()}. Nothing is "
        "written until the operator picks the survivor: to keep the source's data, restart bdr_server with "
        "--discard-local-changes (the replica's changes are overwritten by a resync); to keep the replica's, "
        "demote the source and replicate the other way",
    )
