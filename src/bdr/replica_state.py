"""What the replica is, as the journal header records it, and the only code that changes the header's flags.

Every change of the on-disk replica state is one named transition below: it takes the current header and returns
the next one (the caller makes it durable with ``Journal.store``).  The crash-consistency rules live here:

- the replica is CONSISTENT (a prefix of the source's writes) unless a direct resync is writing it, a ring
  overflow left it behind (SCANNING until a resync ends), or the server stopped on an I/O error;
- a journal-staged resync does not touch the replica until its commit, so it keeps CONSISTENT while it runs;
- SEQ_VALID says ``durable_seq`` is a resume point in the stream of ``ring_id``;
- after a direct resync that ends while writes were still coming, the replica is consistent again only once the
  records up to ``consistent_seq`` are durable.

The flags, from ``journal.JFlag``:

=============  ==========================================================================================
SEQ_VALID      ``durable_seq`` is meaningful for ``ring_id``
CONSISTENT     the replica is a prefix-consistent copy of the source
SCANNING       a resync was started and has not finished (with IO_ERROR: the server stopped on an error)
SOURCE_KNOWN   ``source_id`` / ``ring_id`` / ``source_size`` are set
HAS_DATA       the replica has received data at least once
IO_ERROR       the server stopped on a storage I/O error; cleared by the next resync
PROMOTED       ``bdr promote`` made the replica a source; no server serves it until ``bdr demote``
GENERATION_    ``durable_seq`` is where the data stands in the current generation (``bdr demote`` after a stop
POINT          in sync), not a resume point
=============  ==========================================================================================
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from . import wire as p
from .generations import Generations
from .journal import Header, JFlag
from .seq import NO_SEQ, prev_seq, seq_le

__all__ = ["Condition", "Header", "Source"]


@dataclass(frozen=True, slots=True)
class Source:
    """The identity of the source a client announced (HELLO), and the size of the replica."""

    source_id: bytes
    ring_id: bytes
    source_size: int
    replica_size: int
    generations: Generations | None = None  # the source's generation history (None: it keeps none)


class Condition(enum.Enum):
    """What an operator is told about the replica."""

    NEW = "new"  # never received data
    CONSISTENT = "consistent"
    RESYNCING = "resync interrupted or running"
    BEHIND = "inconsistent until the stream reaches consistent_seq"
    IO_ERROR = "inconsistent: the server stopped on an I/O error"


def _with(h: Header, set_: JFlag = JFlag.NONE, clear: JFlag = JFlag.NONE, **fields: object) -> Header:
    """``h`` with the flags in ``clear`` cleared, then those in ``set_`` set, and ``fields`` replaced."""
    return dataclasses.replace(h, flags=(h.flags & ~clear) | set_, **fields)  # type: ignore[arg-type]


def _adopt(h: Header, src: Source, set_: JFlag, clear: JFlag, **fields: object) -> Header:
    """The replica becomes (or is becoming) a copy of ``src``: it takes its identity and generation history
    (none, from a source that keeps none: the replica's old one no longer says what it holds)."""
    fields["generations"] = src.generations
    return _with(
        h,
        JFlag.SOURCE_KNOWN | set_,
        clear | JFlag.GENERATION_POINT,
        source_id=src.source_id,
        ring_id=src.ring_id,
        source_size=src.source_size,
        replica_size=src.replica_size,
        **fields,
    )


# -- reading ------------------------------------------------------------------------------------------------


def resume_point(h: Header) -> int | None:
    """The last durable sequence number the stream resumes after, or None if there is none."""
    return h.durable_seq if h.flags & JFlag.SEQ_VALID else None


def is_consistent(h: Header) -> bool:
    """The replica is a consistent copy of some moment of the source (what ``bdr status`` reports)."""
    return bool(h.flags & JFlag.CONSISTENT and not h.flags & JFlag.SCANNING)


def resync_interrupted(h: Header) -> bool:
    return bool(h.flags & JFlag.SCANNING)


def has_data(h: Header) -> bool:
    return bool(h.flags & JFlag.HAS_DATA)


def mirrors(h: Header, src: Source) -> bool:
    """The replica mirrors this source and capture ring."""
    return bool(
        h.flags & JFlag.SOURCE_KNOWN
        and h.source_id == src.source_id
        and h.ring_id == src.ring_id
        and h.source_size == src.source_size
    )


def trackable(h: Header, src: Source) -> bool:
    """The replica is a consistent copy of this source device at its durable point in ring ``h.ring_id``, with no
    resync under way: what a resync of only the regions the source tracked since then needs (the generations
    must also say that nothing else wrote the replica)."""
    return bool(
        h.flags & JFlag.SOURCE_KNOWN
        and h.source_id == src.source_id
        and h.source_size == src.source_size
        and h.flags & JFlag.SEQ_VALID
        and h.flags & JFlag.CONSISTENT
        and not h.flags & (JFlag.SCANNING | JFlag.IO_ERROR | JFlag.PROMOTED)
    )


def mirrors_another_source(h: Header, src: Source) -> bool:
    """The replica is known to mirror another source device (not only another ring of the same one)."""
    return bool(
        h.flags & JFlag.SOURCE_KNOWN and (h.source_id != src.source_id or h.source_size != src.source_size)
    )


def welcome_flags(h: Header, known_zero: bool) -> p.WelcomeFlag:
    """What the server tells a client about the replica (WELCOME); ``known_zero``: a never-written replica is
    known to read as zeros."""
    flags = p.WelcomeFlag.NONE
    if h.flags & JFlag.SEQ_VALID:
        flags |= p.WelcomeFlag.SEQ_VALID
    if h.flags & JFlag.CONSISTENT:
        flags |= p.WelcomeFlag.CONSISTENT
    if h.flags & JFlag.SCANNING:
        flags |= p.WelcomeFlag.SCANNING
    if not h.flags & JFlag.HAS_DATA:
        flags |= p.WelcomeFlag.FRESH
        if known_zero:
            flags |= p.WelcomeFlag.KNOWN_ZERO
    return flags


def condition(h: Header) -> Condition:
    if h.flags & JFlag.IO_ERROR:
        return Condition.IO_ERROR
    if h.flags & JFlag.SCANNING:
        return Condition.RESYNCING
    if not h.flags & JFlag.HAS_DATA:
        return Condition.NEW
    if not h.flags & JFlag.CONSISTENT:
        return Condition.BEHIND
    return Condition.CONSISTENT


def demoted_intact(h: Header) -> bool:
    """The device is as ``bdr demote`` left it: consistent, and no resync or stream adopted a source since."""
    return condition(h) is Condition.CONSISTENT and not h.flags & JFlag.SOURCE_KNOWN


# -- transitions ----------------------------------------------------------------------------------------------


def durable_point(h: Header, applied: int, seq_valid: bool) -> Header:
    """Everything applied up to ``applied`` is on the replica's disk (after its fdatasync).  A replica left
    behind by a direct resync becomes consistent once ``consistent_seq`` is reached."""
    set_ = JFlag.HAS_DATA | (JFlag.SEQ_VALID if seq_valid else JFlag.NONE)
    consistent_seq = h.consistent_seq
    if (
        not h.flags & (JFlag.CONSISTENT | JFlag.SCANNING)
        and consistent_seq != NO_SEQ
        and seq_le(consistent_seq, applied)
    ):
        set_ |= JFlag.CONSISTENT
        consistent_seq = NO_SEQ
    return _with(h, set_, durable_seq=applied, consistent_seq=consistent_seq)


def staged_resync_committed(h: Header, applied: int, seq_valid: bool) -> Header:
    """A journal resync is committed (its records will be applied, even after a crash): the replica is
    consistent with the stream up to ``applied``."""
    set_ = JFlag.HAS_DATA | JFlag.CONSISTENT | (JFlag.SEQ_VALID if seq_valid else JFlag.NONE)
    return _with(
        h,
        set_,
        JFlag.SCANNING | JFlag.IO_ERROR,
        durable_seq=applied if seq_valid else h.durable_seq,
        consistent_seq=NO_SEQ,
    )


def storage_failed(h: Header) -> Header:
    """The replica or the journal failed: the next client start resyncs the whole device."""
    return _with(h, JFlag.SCANNING | JFlag.IO_ERROR, JFlag.CONSISTENT)


def writes_lost(h: Header) -> Header:
    """The source's ring overflowed: the replica misses writes until a resync of the dirty regions ends."""
    return _with(h, JFlag.SCANNING, JFlag.CONSISTENT)


def assumed_in_sync(h: Header, src: Source, next_seq: int) -> Header:
    """The operator vouches that the replica equals the source (``--no-replication``): stream from ``next_seq``."""
    return _adopt(
        h,
        src,
        JFlag.SEQ_VALID | JFlag.CONSISTENT,
        JFlag.SCANNING | JFlag.IO_ERROR,
        durable_seq=prev_seq(next_seq),
        consistent_seq=NO_SEQ,
    )


def staged_resync_begun(h: Header, src: Source) -> Header:
    """A journal-staged resync starts: the replica is untouched until the commit, so it stays consistent if it
    was a consistent copy of this source."""
    keep = mirrors(h, src) and bool(h.flags & JFlag.CONSISTENT)
    return _adopt(h, src, JFlag.SCANNING, JFlag.NONE if keep else JFlag.CONSISTENT)


def direct_resync_begun(h: Header, src: Source) -> Header:
    """A resync that writes the replica directly starts: it is inconsistent until the resync ends."""
    return _adopt(h, src, JFlag.SCANNING, JFlag.CONSISTENT)


def direct_resync_ended(h: Header, resume: int | None, consistent_seq: int | None, more: bool) -> Header:
    """A direct resync ended.  ``resume``: the first record the stream resumes at (None: the next one);
    ``consistent_seq``: the replica is consistent once the records up to it are durable; ``more``: another
    resync follows at once."""
    set_ = JFlag.HAS_DATA
    if consistent_seq is None and not more:
        set_ |= JFlag.CONSISTENT
    if resume is not None:
        set_ |= JFlag.SEQ_VALID
    return _with(
        h,
        set_,
        JFlag.SCANNING | JFlag.CONSISTENT | JFlag.SEQ_VALID | JFlag.IO_ERROR,
        durable_seq=prev_seq(resume) if resume is not None else NO_SEQ,
        consistent_seq=NO_SEQ if consistent_seq is None else consistent_seq,
    )


def staged_scan_ended(h: Header, resume: int | None) -> Header:
    """The blocks of a journal resync are staged; the stream resumes at ``resume`` (staged too, up to the commit)."""
    return _with(
        h,
        JFlag.HAS_DATA | (JFlag.SEQ_VALID if resume is not None else JFlag.NONE),
        JFlag.SEQ_VALID,
        durable_seq=prev_seq(resume) if resume is not None else NO_SEQ,
    )


def rollback_begun(h: Header) -> Header:
    """``bdr rollback`` starts writing before-images: the replica is a mix of two moments until it ends."""
    return _with(h, JFlag.SCANNING, JFlag.CONSISTENT)


def rolled_back(h: Header) -> Header:
    """``bdr rollback`` ended: the replica is the source as it was at an earlier durability point, with no
    resume point in the stream (the next client start resyncs it forward)."""
    return _with(
        h,
        JFlag.CONSISTENT | JFlag.HAS_DATA,
        JFlag.SCANNING | JFlag.SEQ_VALID | JFlag.IO_ERROR,
        durable_seq=NO_SEQ,
        consistent_seq=NO_SEQ,
    )


def history_kept(h: Header, history_id: bytes) -> Header:
    """From now on the history ``history_id`` keeps what every write overwrites (zero: no history)."""
    return _with(h, history_id=history_id)


def at_generation_start(h: Header, gens: Generations | None) -> bool:
    """The replica holds exactly the data the source had when its current generation ``gens.current`` began:
    its own generation ended there, at the seq where the replica's data stands."""
    return bool(
        gens is not None
        and gens.past
        and h.flags & JFlag.GENERATION_POINT
        and h.generations is not None
        and gens.past[-1] == (h.generations.current, h.durable_seq)
    )


def generations_adopted(h: Header, gens: Generations) -> Header:
    """A replica with no generation history, mirroring this source, takes the source's."""
    return _with(h, generations=gens)


def promoted(h: Header, gens: Generations) -> Header:
    """``bdr promote``: the replica is a source from now on, in the new generation ``gens.current``; no server
    serves it until ``bdr demote``."""
    return _with(
        h,
        JFlag.PROMOTED,
        JFlag.SEQ_VALID | JFlag.GENERATION_POINT,
        generations=gens,
        durable_seq=NO_SEQ,
        history_id=bytes(16),
    )


def demoted(h: Header, gens: Generations | None, synced_seq: int | None = None) -> Header:
    """``bdr demote``: the device is a replica again, holding the data of ``gens.current`` (None: the source
    kept no generations), up to ``synced_seq`` exactly when the source stopped in sync and nothing was written
    after (GENERATION_POINT).  It has no resume point in any ring: the next client streams from the start of its
    generation if it began there, and resyncs it otherwise (a scan that sends only the blocks that differ).  No
    history kept what it was written with."""
    return _with(
        h,
        JFlag.CONSISTENT
        | JFlag.HAS_DATA
        | (JFlag.GENERATION_POINT if synced_seq is not None else JFlag.NONE),
        JFlag.PROMOTED
        | JFlag.SEQ_VALID
        | JFlag.SOURCE_KNOWN
        | JFlag.SCANNING
        | JFlag.IO_ERROR
        | JFlag.GENERATION_POINT,
        generations=gens,
        durable_seq=NO_SEQ if synced_seq is None else synced_seq,
        consistent_seq=NO_SEQ,
        history_id=bytes(16),
    )
