"""Discards with real daemons: a discard is a hint, so the replica must read what the source reads afterwards.
A source that zeroes discarded ranges: the replica is zeroed and gives the space back (holes in a sparse file),
no data travels.  A source that keeps its data: the replica keeps it too (checked by a checksum resync of the
range)."""

from __future__ import annotations

import os

import pytest

from bdr.kernel import abi
from bdr.testing.ring_producer import RingProducer

from .conftest import Daemon, Lab

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def synced(lab: Lab) -> tuple[RingProducer, Daemon, Daemon]:
    """Source and replica equal, the daemons replicating: (producer, server, client)."""
    lab.images(src_random=True, seed=31)
    lab.replica.write_bytes(lab.src.read_bytes())
    prod = lab.make_producer()
    srv = lab.server()
    srv.wait_log("listening on")
    cli = lab.client()
    lab.wait_drained()
    return prod, srv, cli


def test_discard_on_a_source_that_zeroes_zeroes_and_frees_the_replica(lab: Lab) -> None:
    prod, srv, cli = synced(lab)
    blocks = os.stat(lab.replica).st_blocks
    prod.discard(4 << 20, 8 << 20)  # the source image reads zeros there now
    lab.wait_drained()
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert lab.identical()
    assert lab.replica.read_bytes()[4 << 20 : 12 << 20] == bytes(8 << 20)
    assert os.stat(lab.replica).st_blocks <= blocks - (8 << 20) // 512  # punched: the space is given back
    assert "left data on the source" not in cli.log()


def test_discard_on_a_source_that_keeps_its_data_keeps_the_replica(lab: Lab) -> None:
    prod, srv, cli = synced(lab)
    prod._single(abi.Op.DISCARD, 4 << 20, 1 << 20, False)  # like a disk that ignores discards
    prod.write(6 << 20, os.urandom(65536))
    cli.wait_log(r"discard of \[4194304, \+1048576\) left data on the source")
    cli.wait_log(
        r"scan \d+ \(hash\) of 1 dirty extents .*: discarded ranges the source does not read as zeros"
    )
    lab.wait_drained()
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert lab.identical()
    assert lab.replica.read_bytes()[4 << 20 : 5 << 20] != bytes(1 << 20)
