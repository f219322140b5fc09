"""On-disk compatibility: a replica and journal written by an earlier tree (tests/compat/make_images.py: a server
killed half-way through applying a committed journal resync) are read by this one.  The header fields are the
ones that tree wrote, and a server started on the images replays the committed resync, so the replica ends equal
to the source."""

from __future__ import annotations

import hashlib
import json
import lzma

import pytest

from bdr.journal import JFlag, Journal
from tests.compat.make_images import HERE, IMAGES, source_bytes

from .conftest import Daemon, Lab

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def unpack(lab: Lab) -> dict[str, object]:
    manifest: dict[str, object] = json.loads(IMAGES.read_text())
    for name, dst in (("replica.img", lab.replica), ("journal", lab.journal)):
        dst.write_bytes(lzma.decompress((HERE / f"journal-v1-committed.{name}.xz").read_bytes()))
    return manifest


def test_the_header_written_by_the_earlier_tree_reads_the_same(lab: Lab) -> None:
    manifest = unpack(lab)
    j = Journal(lab.journal)
    h = j.header
    j.close()
    got = {
        "generation": h.generation,
        "flags": int(h.flags),
        "block_size": h.block_size,
        "source_id": h.source_id.hex(),
        "ring_id": h.ring_id.hex(),
        "source_size": h.source_size,
        "durable_seq": h.durable_seq,
        "consistent_seq": h.consistent_seq,
        "replica_size": h.replica_size,
    }
    assert got == manifest["header"]
    assert not j.fresh
    assert (
        JFlag.CONSISTENT in h.flags
    )  # a journal resync keeps the replica consistent: the record area has it


def test_a_committed_resync_written_by_the_earlier_tree_is_replayed(lab: Lab) -> None:
    manifest = unpack(lab)
    assert hashlib.sha256(lab.replica.read_bytes()).hexdigest() == manifest["replica_before_sha256"]
    assert hashlib.sha256(source_bytes()).hexdigest() == manifest["source_sha256"]
    srv: Daemon = lab.server()
    srv.wait_log("listening on")
    assert "replayed a committed resync" in srv.log()
    assert hashlib.sha256(lab.replica.read_bytes()).hexdigest() == manifest["source_sha256"]
    assert srv.stop() == 0
    j = Journal(lab.journal)
    assert j.header.source_id.hex() == manifest["header"]["source_id"]  # type: ignore[index]
    j.close()
