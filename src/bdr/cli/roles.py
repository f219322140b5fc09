"""``bdr promote`` and ``bdr demote``: turn a replica into a source in a new generation, and a source into a
replica (``bdr.generations`` says what the two sides then decide at connect)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from .. import replica_state
from ..client.identity import ring_identity
from ..client.metadata import (
    NO_RING,
    MetadataError,
    SourceMeta,
    WrittenCount,
    read_metadata,
    write_metadata,
)
from ..generations import Generations, fmt_id
from ..journal import JFlag, Journal, JournalError
from ..journal.marks import FailbackMarks
from ..kernel.layout import RingError
from ..kernel.meta import MetaError, read_marks
from ..kernel.ring import RingConsumer
from ..seq import NO_SEQ, fmt_seq, prev_seq
from ..server.daemon import open_record_area
from ..server.errors import ServerError
from ..server.replica import Replica
from .targets import SetupError, SetupPlan, check_plan, setup


class RoleError(Exception):
    """The role cannot change; the message says why and what to do."""


def promote(
    journal_path: str, replica_path: str, metadata: str, force: bool, plan: SetupPlan | None = None
) -> Generations:
    """The replica (its bdr_server stopped) becomes a source: a staged resync is replayed if committed or
    discarded if not, the replica's generation ends at its last durable sequence number and a new one begins,
    written to the new source's metadata file and to the journal (which no server serves from then on).  With
    ``plan`` the device is then put behind a bdr target, so that no write escapes capture."""
    if plan is not None:
        try:
            check_plan(plan)
        except SetupError as exc:
            raise RoleError(str(exc)) from exc
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
        # where the replica stood in the old source's ring: a demoted old source's marks cleared at or before
        # it hold every write the old source made after it
        # (only for a consistent replica: a forced one's durable seq may count records of a resync dropped here)
        consistent = condition is replica_state.Condition.CONSISTENT
        base_ring = jh.ring_id if consistent and jh.flags & JFlag.SEQ_VALID and end != NO_SEQ else NO_RING
        base = SourceMeta(gens, base_ring=base_ring, base_seq=end if base_ring != NO_RING else NO_SEQ)
        write_metadata(Path(metadata), base)
        journal.store(replica_state.promoted(jh, gens))
    except MetadataError as exc:
        raise RoleError(str(exc)) from exc
    finally:
        journal.close()
    if plan is not None:
        try:
            setup(plan)
        except SetupError as exc:
            raise RoleError(
                f"{replica_path} is promoted ({gens.describe()}), but its bdr target was not created: {exc}; "
                f"create it with bdr setup before writing to the device"
            ) from exc
        # the target's ring holds every write of the new generation from its seq 0 while it lives: the old
        # source, once demoted after a stop in sync, needs only those (no resync)
        try:
            ring = _ring_id(plan.chardev)
            write_metadata(Path(metadata), base.with_(gen_ring=ring, counted_ring=ring))
        except (MetadataError, RingError) as exc:
            raise RoleError(str(exc)) from exc
    return gens


def _ring_id(chardev: str) -> bytes:
    ring = RingConsumer(f"/dev/{chardev}")
    try:
        return ring_identity(ring)
    finally:
        ring.close()


def demote(
    journal_path: str, metadata: str, name: str | None = None, meta_device: str | None = None
) -> tuple[SourceMeta | None, bool]:
    """A source (its bdr_client stopped) becomes a replica: the journal its bdr_server will use takes the
    source's generation history, and no resume point in any ring.  With ``name`` (the source's bdr target,
    still set up) the target is removed here: suspended first, so that nothing is written between the check
    and the removal, then, if its ring is empty and its last write is the one the client stopped in sync at,
    the journal says the device holds the generation exactly up to that seq (the promoted side then streams
    its writes since, with no scan).  The marks of the target's meta device (``meta_device``, or the one in
    its table) are kept in the journal when they hold every write since the replica's last point: the promoted
    side then resyncs only those regions.  Returns the metadata, and whether the device is at that point."""
    try:
        meta = read_metadata(Path(metadata))
        journal = Journal(journal_path, lock="bdr demote")
    except (MetadataError, JournalError) as exc:
        raise RoleError(str(exc)) from exc
    try:
        at: int | None = None
        if name is not None:
            ring, last, written, table_meta = _remove_target(name, meta)
            meta_device = _target_meta_device(name, table_meta, meta_device)
            if meta is not None and written is not None:
                meta = meta.with_(generations=meta.generations.with_written(written))
            if (
                meta is not None
                and meta.synced is not None
                and last == meta.synced
                and ring == meta.synced_ring
            ):
                at = meta.synced
            else:
                print(
                    f"bdr demote: the source was written after bdr_client stopped in sync, or did not stop in "
                    f"sync (last write seq {fmt_seq(last)}"
                    + (
                        f", in sync at seq {meta.synced}"
                        if meta is not None and meta.synced is not None
                        else ""
                    )
                    + "): the next client resyncs this device",
                    file=sys.stderr,
                )
        marks = _failback_marks(meta_device, meta)
        try:
            journal.store_marks(marks)
        except JournalError as exc:
            if marks is None:
                raise
            print(
                f"bdr demote: not keeping the marks: {exc}: the promoted side resyncs the whole device",
                file=sys.stderr,
            )
            journal.store_marks(None)
        journal.store(replica_state.demoted(journal.header, meta.generations if meta else None, at))
    except JournalError as exc:
        raise RoleError(str(exc)) from exc
    finally:
        journal.close()
    return meta, at is not None


def _failback_marks(meta_device: str | None, meta: SourceMeta | None) -> FailbackMarks | None:
    """The marks of ``meta_device`` to keep, if they hold every write of this source since its replica's last
    point: they were last cleared in its current generation (at a point the replica held)."""
    if meta_device is None:
        return None
    try:
        m = read_marks(meta_device)
    except MetaError as exc:
        print(f"bdr demote: {exc}: the promoted side resyncs the whole device", file=sys.stderr)
        return None
    why = None
    if meta is None:
        why = "the source kept no generations"
    elif m.clear_ring == NO_RING:
        why = "they were never cleared (they do not say what the replica held)"
    elif m.clear_generation != meta.generations.current:
        why = (
            f"they were last cleared in generation {fmt_id(m.clear_generation)}, not in this source's current "
            f"one ({fmt_id(meta.generations.current)})"
        )
    if why is not None or meta is None:
        print(f"bdr demote: not keeping the marks of {meta_device}: {why}", file=sys.stderr)
        return None
    print(
        f"bdr demote: kept the marks of {meta_device}: {len(m.extents)} ranges, {m.marked_bytes} bytes that may "
        "hold writes the replica never had"
    )
    return FailbackMarks(meta.generations.current, m.dev_size, m.clear_ring, m.clear_pos, m.extents)


def _target_meta_device(name: str, table_meta: str | None, given: str | None) -> str | None:
    """The meta device whose marks cover the writes through target ``name``: the one in its table; none if it had
    none, or if ``given`` (--meta-device) is another device (writes through the target missed it)."""
    if table_meta is None:
        if given is not None:
            print(
                f"bdr demote: not keeping the marks of {given}: /dev/mapper/{name} had no meta device (writes "
                "through it were not marked)",
                file=sys.stderr,
            )
        return None
    if given is not None:
        try:
            a, b = os.stat(given), os.stat(table_meta)
            blocks = stat.S_ISBLK(a.st_mode) and stat.S_ISBLK(b.st_mode)
            same = a.st_rdev == b.st_rdev if blocks else os.path.samefile(given, table_meta)
        except OSError as exc:
            print(f"bdr demote: not keeping the marks of {given}: {exc.strerror}", file=sys.stderr)
            return None
        if not same:
            print(
                f"bdr demote: not keeping the marks of {given}: /dev/mapper/{name} marked its writes on "
                f"{table_meta}",
                file=sys.stderr,
            )
            return None
    return table_meta


def _dev_path(dev: str) -> str:
    """A device of a table line (a path, or major:minor) as a path."""
    if dev.startswith("/"):
        return dev
    try:
        uevent = Path(f"/sys/dev/block/{dev}/uevent").read_text()
    except OSError:
        return f"/dev/block/{dev}"
    names = [line.split("=", 1)[1] for line in uevent.splitlines() if line.startswith("DEVNAME=")]
    return f"/dev/{names[0]}" if names else f"/dev/block/{dev}"


def _dmsetup(*args: str) -> str:
    res = subprocess.run(["dmsetup", *args], capture_output=True, text=True, check=False)
    if res.returncode:
        raise RoleError(f"dmsetup {' '.join(args)} failed: {res.stderr.strip()}")
    return res.stdout


def _remove_target(name: str, meta: SourceMeta | None) -> tuple[bytes, int, int | None, str | None]:
    """Remove the bdr target ``name`` once nothing uses it: its ring's identity, the seq of the last write
    it captured (NO_SEQ: none, or its ring still held records or had overflowed), the bytes written in the
    current generation of ``meta`` counting what the ring still held (None: no metadata), and its meta device
    (None: none)."""
    if shutil.which("dmsetup") is None:
        raise RoleError("dmsetup not found: install the dmsetup package")
    table = _dmsetup("table", name).split()
    if len(table) < 6 or table[2] != "bdr":
        raise RoleError(f"/dev/mapper/{name} is not a bdr target")
    meta_dev = _dev_path(table[table.index("meta_device") + 1]) if "meta_device" in table[6:] else None
    info = _dmsetup("info", "-c", "--noheadings", "-o", "open", name).strip()
    if info != "0":
        raise RoleError(f"/dev/mapper/{name} is in use ({info} open): unmount it and stop what uses it first")
    try:
        consumer = RingConsumer(f"/dev/{table[4]}")  # fails while bdr_client holds the ring
    except RingError as exc:
        raise RoleError(f"{exc} (stop bdr_client first)") from exc
    try:
        ring = ring_identity(consumer)
        _dmsetup("suspend", name)  # nothing is written from here on
        try:
            st = dict(f.split("=", 1) for f in _dmsetup("status", name).split()[3:] if "=" in f)
            written = WrittenCount(consumer, ring, meta).now()[0] if meta is not None else None
        except BaseException:
            _dmsetup("resume", name)
            raise
    finally:
        consumer.close()
    try:
        _dmsetup("remove", name)
    except BaseException:
        _dmsetup("resume", name)
        raise
    empty = st.get("fill", "").startswith("0/") and st.get("state") == "capturing"
    nseq = int(st.get("next_seq", "0"))
    return ring, prev_seq(nseq) if empty and nseq else NO_SEQ, written, meta_dev


def _gens(g: Generations | None) -> str:
    return g.describe() if g is not None else "no generation"


def do_promote(journal: str, replica: str, metadata: str, force: bool, plan: SetupPlan | None) -> int:
    try:
        gens = promote(journal, replica, metadata, force, plan)
    except RoleError as exc:
        print(f"bdr promote: {exc}", file=sys.stderr)
        return 1
    print(f"{replica} is a source now, {gens.describe()}; its metadata is in {metadata}.")
    target = (
        f"use /dev/mapper/{plan.name}"
        if plan is not None
        else f"put it behind a bdr target (bdr setup --device {replica} --name NAME --chardev CHARDEV), use "
        "/dev/mapper/NAME"
    )
    print(
        f"Next: {target}, and start bdr_client with --metadata {metadata}. On the old source, stop bdr_client "
        "and run bdr demote before serving it."
    )
    return 0


def do_demote(journal: str, metadata: str, name: str | None, meta_device: str | None = None) -> int:
    try:
        meta, exact = demote(journal, metadata, name, meta_device)
    except RoleError as exc:
        print(f"bdr demote: {exc}", file=sys.stderr)
        return 1
    gens = meta.generations if meta is not None else None
    if meta is None:
        print(
            f"bdr demote: {metadata} does not exist (the source kept no generations): the replica will take "
            "the next source's",
            file=sys.stderr,
        )
    then = (
        "the new source's bdr_client streams its writes since its promotion, no resync"
        if exact
        else "the new source's bdr_client resyncs it (only the blocks that differ are sent)"
    )
    removed = (
        "its bdr target is removed; " if name is not None else "remove its bdr target (bdr remove NAME); "
    )
    print(
        f"the device is a replica now ({_gens(gens)}); journal {journal}. Next: {removed}start bdr_server on the "
        f"device itself with this --journal; {then}."
    )
    return 0
