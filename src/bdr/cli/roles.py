"""``bdr promote`` and ``bdr demote``: turn a replica into a source in a new generation, and a source into a
replica (``bdr.generations`` says what the two sides then decide at connect)."""

from __future__ import annotations

import sys
from pathlib import Path

from .. import replica_state
from ..client.metadata import MetadataError, read_metadata, write_metadata
from ..generations import Generations
from ..journal import JFlag, Journal, JournalError
from ..seq import NO_SEQ
from ..server.daemon import open_record_area
from ..server.errors import ServerError
from ..server.replica import Replica


class RoleError(Exception):
    """The role cannot change; the message says why and what to do."""


def promote(journal_path: str, replica_path: str, metadata: str, force: bool) -> Generations:
    """The replica (its bdr_server stopped) becomes a source: a staged resync is replayed if committed or
    discarded if not, the replica's generation ends at its last durable sequence number and a new one begins,
    written to the new source's metadata file and to the journal (which no server serves from then on)."""
    try:
        journal = Journal(journal_path, lock="bdr promote")
    except JournalError as exc:
        raise RoleError(str(exc)) from exc
    try:
        jh = journal.header
        if journal.fresh:
            raise RoleError(f"journal {journal_path} holds no replica metadata: is it the replica's journal?")
        if jh.flags & JFlag.PROMOTED:
            raise RoleError(f"replica {replica_path} is promoted already ({_gens(jh.generations)})")
        replica = Replica(replica_path)
        try:
            area = open_record_area(
                journal, replica, None
            )  # a committed resync is replayed, an open one dropped
            area.close()
        except ServerError as exc:
            raise RoleError(str(exc)) from exc
        finally:
            replica.close()
        jh = journal.header
        condition = replica_state.condition(jh)
        if condition is not replica_state.Condition.CONSISTENT:
            if not force:
                raise RoleError(
                    f"replica {replica_path} is not a consistent copy of the source ({condition.value}): a "
                    "source made of it may hold a mix of two moments. Give --force to promote it anyway "
                    "(then check its file system)"
                )
            print(f"bdr promote: promoting an inconsistent replica ({condition.value})", file=sys.stderr)
        end = jh.durable_seq if jh.flags & JFlag.SEQ_VALID else NO_SEQ
        old = jh.generations if jh.generations is not None else Generations.first()
        gens = old.successor(end)
        write_metadata(Path(metadata), gens)
        journal.store(replica_state.promoted(jh, gens))
        return gens
    except MetadataError as exc:
        raise RoleError(str(exc)) from exc
    finally:
        journal.close()


def demote(journal_path: str, metadata: str) -> Generations | None:
    """A source (its bdr_client stopped, its target removed) becomes a replica: the journal its bdr_server
    will use takes the source's generation history, and no resume point (the next client resyncs it)."""
    try:
        gens = read_metadata(Path(metadata))
        journal = Journal(journal_path, lock="bdr demote")
    except (MetadataError, JournalError) as exc:
        raise RoleError(str(exc)) from exc
    try:
        journal.store(replica_state.demoted(journal.header, gens))
    finally:
        journal.close()
    return gens


def _gens(g: Generations | None) -> str:
    return g.describe() if g is not None else "no generation"


def do_promote(journal: str, replica: str, metadata: str, force: bool) -> int:
    try:
        gens = promote(journal, replica, metadata, force)
    except RoleError as exc:
        print(f"bdr promote: {exc}", file=sys.stderr)
        return 1
    print(f"{replica} is a source now, {gens.describe()}; its metadata is in {metadata}.")
    print(
        "Next: put it behind a bdr target (bdr setup --device "
        f"{replica} --name NAME --chardev CHARDEV), use /dev/mapper/NAME, and start bdr_client with "
        f"--metadata {metadata}. On the old source, stop bdr_client and run bdr demote before serving it."
    )
    return 0


def do_demote(journal: str, metadata: str) -> int:
    try:
        gens = demote(journal, metadata)
    except RoleError as exc:
        print(f"bdr demote: {exc}", file=sys.stderr)
        return 1
    if gens is None:
        print(
            f"bdr demote: {metadata} does not exist (the source kept no generations): the replica will take "
            "the next source's",
            file=sys.stderr,
        )
    print(
        f"the device is a replica now ({_gens(gens)}); journal {journal}. Next: remove its bdr target (bdr "
        "remove NAME) and start bdr_server on the device itself with this --journal; the new source's "
        "bdr_client resyncs it (only the blocks that differ are sent)."
    )
    return 0
