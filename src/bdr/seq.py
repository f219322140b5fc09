"""Sequence numbers of captured writes: 64-bit, wrapping, with ``NO_SEQ`` for "no record yet".

The kernel target numbers every published record; the client and server count in the same space.  All the
arithmetic on them is here, so that wrapping and "none" are handled the same way everywhere.
"""

from __future__ import annotations

from typing import Final

SEQ_MASK: Final = (1 << 64) - 1
NO_SEQ: Final = SEQ_MASK  # "no record yet": next_seq(NO_SEQ) == 0


def next_seq(seq: int) -> int:
    """The sequence number after ``seq`` (``NO_SEQ`` is followed by 0)."""
    return (seq + 1) & SEQ_MASK


def prev_seq(seq: int) -> int:
    """The sequence number before ``seq`` (0 is preceded by ``NO_SEQ``): the last durable one when ``seq`` is next."""
    return (seq - 1) & SEQ_MASK


def add_seq(seq: int, n: int) -> int:
    """``seq`` advanced by ``n`` (which may be negative), wrapping."""
    return (seq + n) & SEQ_MASK


def seq_distance(a: int, b: int) -> int:
    """How far ``b`` is ahead of ``a`` (wrapping): ``add_seq(a, seq_distance(a, b)) == b``."""
    return (b - a) & SEQ_MASK


def seq_after(a: int, b: int) -> bool:
    """``a`` comes after ``b`` in the wrapping order (less than half the space ahead of it)."""
    return a != b and seq_distance(b, a) < 1 << 63


def seq_le(a: int, b: int) -> bool:
    """a <= b where ``NO_SEQ`` means "none yet" (before everything)."""
    if a == NO_SEQ:
        return True
    return b != NO_SEQ and a <= b


def fmt_seq(seq: int) -> str:
    """A sequence number for logs: "none" for ``NO_SEQ``."""
    return "none" if seq == NO_SEQ else str(seq)


def seq_or_none(seq: int) -> int | None:
    """A sequence number for status output: None for ``NO_SEQ``."""
    return None if seq == NO_SEQ else seq
