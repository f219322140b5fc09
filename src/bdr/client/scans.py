"""The scans a session runs, each through the one window pipeline of ``bdr.scan.pipeline``: a resync (hash
compare, or full copy, of extents of the source; staged in the server's journal unless direct) and the online
verify's step (one window compared, written ranges left for a later look)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from .. import scan
from .. import wire as p
from ..kernel import abi
from ..progress import Progress
from ..scan import pipeline
from ..scan.verify import VerifyJob

if TYPE_CHECKING:
    from .session import ClientSession

log = logging.getLogger("bdr.client")

SCAN_INFLIGHT = 4  # SCAN_REQUEST windows in flight


def resync(
    sess: ClientSession,
    mode: p.ScanMode,
    extents: list[tuple[int, int]],
    whole: bool,
    why: str,
    direct: bool = False,
    tracked: bool = False,
    marked: bool = False,
) -> None:
    """Resync ``extents``; ring records from ``sess.sent`` on are applied after the scan's blocks.  ``tracked``:
    the extents are the regions the meta_device marked (SCAN_BEGIN TRACKED: the replica may adopt this ring);
    ``marked``: those a demoted old source's marked (SCAN_BEGIN MARKED)."""
    c, rs = sess.client, sess.replication
    sess.in_sync = False
    if whole:
        rs.pending_dirty = None  # a whole-device scan covers every dirty region
    rs.scan_id += 1
    sid = rs.scan_id
    start_pos = sess.sent
    st = scan.ScanStats(mode="full" if mode is p.ScanMode.FULL else "hash", extents=extents)
    c.stats.scans.append(st)
    total = sum(ln for _, ln in extents)
    log.warning(
        "scan %d (%s) of %s (%d bytes): %s",
        sid,
        st.mode,
        "the whole device"
        if whole
        else f"{len(extents)} {'tracked' if tracked else 'marked' if marked else 'dirty'} extents",
        total,
        why,
    )
    t0 = time.monotonic()
    flags = (
        p.ScanFlag.WHOLE_DEVICE
        if whole
        else p.ScanFlag.TRACKED
        if tracked
        else p.ScanFlag.MARKED
        if marked
        else p.ScanFlag.NONE
    )
    if rs.journal_full is not None and not direct and not tracked and not marked:
        direct = True
        log.warning("scan %d writes the replica directly: the server's journal is too small for it", sid)
    if direct:
        flags |= p.ScanFlag.DIRECT  # --full-scan: the server writes the replica directly
    rs.resync_direct = direct
    bs = scan.BLOCK_SIZE
    sess.send(sess.conn.send(p.ScanBegin(sid, mode, flags, bs)))
    wins = list(scan.windows(extents, c.dev_size, bs))
    prog = Progress(f"scan {sid} ({st.mode})", sum(n for _, n in wins), log, quiet=bool(c.args.no_print))
    rs.resync_progress = [0, prog.total]
    rs.replica_consistent = False
    c.publish(force=True)
    known_zero = bool(sess.welcome and sess.welcome.flags & p.WelcomeFlag.KNOWN_ZERO)
    replica = ReplicaHashes(sess) if mode is p.ScanMode.HASH else None
    for w in pipeline.run(
        wins, c.source.read_window, c.source.window_buf, bs, replica, sid, SCAN_INFLIGHT, known_zero
    ):
        st.add(w)
        prog.update(len(w.view))
        rs.resync_progress[0] += len(w.view)
        if w.blocks:
            send_blocks(sess, sid, w.view, w.offset, w.blocks, st)
        sess.pump()
    prog.close()
    # ring records from start_pos on follow the scan; the replica is consistent again once the server has
    # applied them up to what the ring holds now (writes during the scan may be half-read by the scan).  With
    # none, the next record's seq is where the stream resumes: the server then knows where the replica stands
    # in this ring before any record comes (next_seq is loaded before head, so it is the seq at start_pos then)
    next_seq = sess.ring.next_seq()
    head = sess.ring.head()
    eflags = p.ScanEndFlag.NONE
    resume = consistent = 0
    if head > start_pos:
        eflags |= p.ScanEndFlag.HAS_RESUME_SEQ | p.ScanEndFlag.HAS_CONSISTENT_SEQ
        resume, consistent = sess.ring.seq_at(start_pos), sess.ring.seq_at(head - 1)
    if sess.ring.state() & (abi.State.OVERFLOW | abi.State.DIRTY):
        eflags |= p.ScanEndFlag.MORE_TO_COME
    elif head == start_pos and next_seq == start_pos and not c.oneshot:
        # (seq == position in a ring; a one-shot sync has no ring to resume in)
        eflags |= p.ScanEndFlag.HAS_RESUME_SEQ
        resume = next_seq
    sess.scan_done = None
    sess.send(sess.conn.send(p.ScanEnd(sid, eflags, resume, consistent)))
    sess.wait_for("SCAN_DONE", lambda: sess.scan_done is not None, timeout=300)
    # the scan is done once the server has its end: resyncing until then
    rs.resync_progress = None
    rs.resync_direct = False
    # consistent once the records captured during the scan are applied (the next ones, in order)
    rs.replica_consistent = not eflags & p.ScanEndFlag.MORE_TO_COME
    if rs.journal_full is not None and rs.replica_consistent:
        log.warning("direct resync complete: the next resyncs are staged in the server's journal again")
        rs.journal_full = None
    sess.sent = start_pos
    # records before start_pos were applied and synced before SCAN_BEGIN or are covered by the scan: they
    # are durable now even when the server could not name a resume sequence number
    sess.inflight.durable_through(start_pos)
    took = time.monotonic() - t0
    log.warning(
        "scan %d done in %.2fs: %d blocks compared, %d differed, %d sent with data (%d bytes), %d zero",
        sid,
        took,
        st.blocks,
        st.differing,
        st.sent_blocks,
        st.bytes_sent,
        st.zero_blocks,
    )


def send_blocks(
    sess: ClientSession,
    sid: int,
    view: memoryview,
    off: int,
    blocks: list[tuple[int, int, int]],
    st: scan.ScanStats,
) -> None:
    st.sent_blocks += sum(1 for _, _, fl in blocks if not fl & p.BlockFlag.ZERO)
    runs = scan.merge_runs(blocks)
    views: list[memoryview | bytes] = []
    data_len = 0
    for o, n, fl in runs:
        if not fl & p.BlockFlag.ZERO:
            views.append(view[o - off : o - off + n])
            data_len += n
    hdr = sess.conn.send_scan_data_header(sid, runs, data_len)
    sess.sendv([hdr, *views])
    st.bytes_sent += data_len


def verify_step(sess: ClientSession, job: VerifyJob) -> None:
    """Compare one window (or one block to look at again) of source and replica; end the pass when done."""
    c = sess.client
    sess.verify_t = now = time.monotonic()
    if sess.ring.state() & (abi.State.OVERFLOW | abi.State.DIRTY):
        c.end_verify(
            job, "the ring overflowed during the pass (the dirty regions are resynced now): run it again"
        )
        return
    item = job.next(now)
    if item is None:
        if job.finished:
            c.end_verify(job)
        return
    off, ln, look = item
    pos = sess.sent  # the server hashes after applying every record before pos
    replica = ReplicaHashes(sess)
    for w in pipeline.run(
        [(off, ln)], c.source.read_window, c.source.window_buf, job.block_size, replica, p.VERIFY_SCAN_ID
    ):
        diff = [(o, n) for o, n, _ in w.blocks]
        written = sess.ring.written(pos, sess.ring.head()) if diff else []
        job.record(off, ln, look, diff, written)


class ReplicaHashes:
    """SCAN_REQUEST / SCAN_HASHES over a session, for the scan window pipeline."""

    def __init__(self, sess: ClientSession) -> None:
        self.sess = sess

    def request(self, scan_id: int, offset: int, length: int) -> None:
        self.sess.send(self.sess.conn.send(p.ScanRequest(scan_id, offset, length)))

    def reply(self) -> p.ScanHashes:
        self.sess.wait_for("SCAN_HASHES", lambda: bool(self.sess.scan_replies))
        return self.sess.scan_replies.popleft()
