"""Discards with real daemons: a discard is a hint, so the replica must read what the source reads afterwards.
A source that zeroes discarded ranges: the replica is zeroed and gives the space back (holes in a sparse file),
no data travels.  A source that keeps its data: the replica keeps it too (checked by a checksum resync of the
range)."""

from __future__ import annotations

import errno
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


def first_data_from(path: os.PathLike[str], offset: int) -> int:
    """Where the first allocated byte at or after offset is (the file's size if none): a hole's end.  Counting
    the file's blocks instead would also count the extent-tree blocks a file system may add to record a hole."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as e:
        if e.errno != errno.ENXIO:  # ENXIO: nothing is allocated past offset
            raise
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def test_discard_on_a_source_that_zeroes_zeroes_and_frees_the_replica(lab: Lab) -> None:
    prod, srv, cli = synced(lab)
    prod.discard(4 << 20, 8 << 20)  # the source image reads zeros there now
    lab.wait_drained()
    assert cli.stop() == 0
    assert srv.stop() == 0
    assert lab.identical()
    assert lab.replica.read_bytes()[4 << 20 : 12 << 20] == bytes(8 << 20)
    assert first_data_from(lab.replica, 4 << 20) >= 12 << 20  # punched: the space is given back
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
