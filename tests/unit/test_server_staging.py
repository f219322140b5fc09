"""Journal scans in memory: the replica is not touched until the commit (DESIGN invariant 2); the ring writes
captured during the scan are staged with the scan's blocks and committed once the consistent seq is reached."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from bdr import scan
from bdr import wire as p
from bdr.journal import JFlag, Journal, RecordArea
from bdr.journal.format import AreaState
from bdr.server import Applier, Replica, ServerSession

DEV = 2 << 20
W = p.OP_WRITE


def hello() -> p.Hello:
    return p.Hello(1, p.ALL_FEATURES, 512, DEV, b"s" * 16, b"r" * 16)


def talk(sess: ServerSession, c: p.Connection, msg: p.Message) -> list[p.Message]:
    sess.conn.feed(c.send(msg))
    c.feed(sess.receive())
    got = []
    while (ev := c.next_event()) is not p.NEED_DATA:
        assert not isinstance(ev, p.NeedData)
        got.append(ev)
    return got


def batch(recs: list[tuple[int, int, int, int, int]], sync: bool = False) -> p.Data:
    """recs: (seq, sector, len, op, flags); WRITE data is the seq's low byte repeated."""
    desc = b"".join(struct.pack("<QQIHHQ", *r, 0) for r in recs)
    data = b"".join(bytes([r[0] % 256]) * r[2] for r in recs if r[3] == W)
    return p.Data.parse(memoryview(p.DATA_HEAD.pack(len(recs), len(data)) + desc + data), 0x1 if sync else 0)


def make(tmp: Path) -> tuple[ServerSession, p.Connection, Journal, RecordArea]:
    img = tmp / "replica.img"
    img.write_bytes(bytes(DEV))
    replica = Replica(img)
    journal = Journal(tmp / "journal")
    area = RecordArea(os.open(tmp / "journal", os.O_RDWR), str(tmp / "journal"), None)
    sess = ServerSession(replica, journal, Applier(replica, journal, area))
    c = p.Connection(p.Role.CLIENT)
    talk(sess, c, hello())
    return sess, c, journal, area


def test_journal_scan_touches_the_replica_only_after_the_commit(tmp_path: Path) -> None:
    sess, c, journal, area = make(tmp_path)
    img = tmp_path / "replica.img"
    assert talk(sess, c, p.ScanBegin(1, p.ScanMode.HASH, p.ScanFlag.WHOLE_DEVICE, 65536)) == []
    assert area.state.state is AreaState.OPEN and journal.header.flags & JFlag.SCANNING
    talk(sess, c, p.ScanData(1, ((65536, 512, 0),), b"\x07" * 512))
    assert img.read_bytes() == bytes(DEV)  # staged, not applied
    (h,) = talk(sess, c, p.ScanRequest(1, 65536, 65536))  # hashes see the staged block
    assert isinstance(h, p.ScanHashes)
    assert h.digest(0) == scan.digest(b"\x07" * 512 + bytes(65536 - 512))
    # ring records 10..11 were captured during the scan: the replica is consistent once they are applied
    flags = p.ScanEndFlag.HAS_RESUME_SEQ | p.ScanEndFlag.HAS_CONSISTENT_SEQ
    talk(sess, c, p.ScanEnd(1, flags, 10, 11))
    assert img.read_bytes() == bytes(DEV)
    talk(sess, c, batch([(10, 256, 4096, W, 0)]))  # seq 10 at byte 128 KiB
    sess.applier.sync()  # a durability point before the consistent seq: staged records durable, no commit
    assert img.read_bytes() == bytes(DEV) and area.state.state is AreaState.OPEN
    assert journal.header.flags & JFlag.SCANNING
    talk(sess, c, batch([(11, 264, 4096, W, 0)], sync=True))
    data = img.read_bytes()
    assert data[65536 : 65536 + 512] == b"\x07" * 512
    assert data[131072 : 131072 + 4096] == bytes([10]) * 4096
    assert data[135168 : 135168 + 4096] == bytes([11]) * 4096
    assert area.state.state is AreaState.CLEAN
    h2 = journal.header
    assert h2.flags & JFlag.CONSISTENT and not h2.flags & JFlag.SCANNING and h2.durable_seq == 11
    assert not sess.applier.staging


def test_more_to_come_keeps_staging_until_the_last_scan(tmp_path: Path) -> None:
    sess, c, journal, _ = make(tmp_path)
    img = tmp_path / "replica.img"
    talk(sess, c, p.ScanBegin(1, p.ScanMode.HASH, p.ScanFlag.WHOLE_DEVICE, 65536))
    talk(sess, c, p.ScanData(1, ((0, 512, 0),), b"\x01" * 512))
    talk(sess, c, p.ScanEnd(1, p.ScanEndFlag.MORE_TO_COME, 0, 0))
    sess.applier.sync()
    assert img.read_bytes() == bytes(DEV) and sess.applier.staging
    sess.resync_owned = True  # RESYNC_PENDING of this connection
    talk(sess, c, p.ScanBegin(2, p.ScanMode.HASH, p.ScanFlag.NONE, 65536))
    talk(sess, c, p.ScanData(2, ((65536, 512, 0),), b"\x02" * 512))
    talk(sess, c, p.ScanEnd(2, p.ScanEndFlag.NONE, 0, 0))
    data = img.read_bytes()
    assert data[:512] == b"\x01" * 512 and data[65536 : 65536 + 512] == b"\x02" * 512
    assert journal.header.flags & JFlag.CONSISTENT


def test_full_scan_is_direct_and_drops_an_open_staging(tmp_path: Path) -> None:
    sess, c, journal, area = make(tmp_path)
    img = tmp_path / "replica.img"
    talk(sess, c, p.ScanBegin(1, p.ScanMode.HASH, p.ScanFlag.WHOLE_DEVICE, 65536))
    talk(sess, c, p.ScanData(1, ((0, 512, 0),), b"\x01" * 512))
    # the connection is lost; the operator restarts the client with --full-scan
    sess = ServerSession(sess.replica, journal, sess.applier)
    c = p.Connection(p.Role.CLIENT)
    talk(sess, c, hello())
    flags = p.ScanFlag.WHOLE_DEVICE | p.ScanFlag.DIRECT
    talk(sess, c, p.ScanBegin(2, p.ScanMode.HASH, flags, 65536))
    assert area.state.state is AreaState.CLEAN and not sess.applier.staging
    assert not journal.header.flags & JFlag.CONSISTENT
    talk(sess, c, p.ScanData(2, ((65536, 512, 0),), b"\x02" * 512))
    assert img.read_bytes()[65536 : 65536 + 512] == b"\x02" * 512  # written at once
    assert img.read_bytes()[:512] == bytes(512)  # the dropped staging never reached the replica
