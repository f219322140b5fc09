"""A userspace producer of ring files (test and bench machinery): creates a file with the ring's layout and
publishes records into it exactly as the kernel target does, so host tests and benchmarks can feed the client
(``RingConsumer`` reads such files) without the module."""

from __future__ import annotations

import fcntl
import mmap
import os
import time
from array import array
from pathlib import Path

from ..kernel import abi
from ..kernel.layout import DIRTY_SUFFIX, ring_layout
from ..records import RECORD, RECORD_SIZE


class RingProducer:
    """Creates a ring file and appends records the way the kernel target does (test and bench helper).

    A write is first applied to the source image (when one is given), then its records are published: slots
    filled, ``head`` stored, then ``next_seq``, as the kernel does.  When the ring is full the producer does not wait
    (unless ``block=True``): it enters the overflow state and marks the written regions in the ``.dirty`` side
    file until the consumer takes the bitmap.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        nr_slots: int,
        dev_size: int,
        source: str | os.PathLike[str] | None = None,
        first_seq: int = 0,
        region_sectors: int = abi.BDR_DEFAULT_REGION_SECTORS,
    ) -> None:
        self.path = Path(path)
        self.dev_size = dev_size
        self.nr_slots = nr_slots
        self.region_bytes = region_sectors * abi.SECTOR_SIZE
        desc_offset, data_offset, size = ring_layout(nr_slots)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, size)
        self._fd = fd
        self._mm = mmap.mmap(fd, size)
        self._ctl = abi.RingCtl.from_buffer(self._mm)
        c = self._ctl
        c.magic, c.abi_version, c.nr_slots, c.slot_data = abi.BDR_MAGIC, abi.BDR_ABI_VERSION, nr_slots, 4096
        c.desc_offset, c.data_offset, c.mmap_size = desc_offset, data_offset, size
        c.next_seq = first_seq
        self._seq = first_seq
        self._view = memoryview(self._mm)
        self._desc = self._view[desc_offset : desc_offset + nr_slots * RECORD_SIZE]
        self._data = self._view[data_offset : data_offset + nr_slots * abi.BDR_SLOT_DATA]
        nregions = (dev_size + self.region_bytes - 1) // self.region_bytes
        nbytes = (nregions + 63) // 64 * 8
        dpath = str(self.path) + DIRTY_SUFFIX
        self._dirty_fd = os.open(dpath, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.ftruncate(self._dirty_fd, nbytes)
        self._dirty = mmap.mmap(self._dirty_fd, nbytes)
        self._src_fd = os.open(source, os.O_RDWR | os.O_CLOEXEC) if source is not None else -1
        self.dropped = 0
        self.published = 0

    # -- state -------------------------------------------------------------------------------------------------

    @property
    def head(self) -> int:
        return int(self._ctl.head)

    @property
    def tail(self) -> int:
        return int(self._ctl.tail)

    @property
    def state(self) -> abi.State:
        return abi.State(int(self._ctl.state))

    @property
    def next_seq(self) -> int:
        return self._seq

    def free_slots(self) -> int:
        return self.nr_slots - (self.head - self.tail)

    def wait_for_space(self, nslots: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.free_slots() < nslots:
            if time.monotonic() > deadline:
                raise TimeoutError(f"ring still full after {timeout}s (tail {self.tail}, head {self.head})")
            # the kernel's writer never waits on a timer: a producer that looks again only every few ms leaves
            # the consumer idle once it has drained the ring (streaming benches measured 2 ms polls at 0.7 of
            # the throughput of 0.2 ms ones)
            time.sleep(0.0002)

    # -- publishing --------------------------------------------------------------------------------------------

    def _fill(self, pos: int, op: int, flags: int, sector: int, length: int) -> None:
        slot = pos % self.nr_slots
        RECORD.pack_into(self._desc, slot * RECORD_SIZE, self._seq, sector, length, op, flags, 0)
        self._seq += 1

    def _publish(self, new_head: int) -> None:
        self._ctl.head = new_head  # makes the slots visible (release on x86-64)
        self._ctl.next_seq = self._seq  # after head, as the kernel stores them

    def _mark_dirty(self, offset: int, length: int) -> None:
        first = offset // self.region_bytes
        last = (offset + max(length, 1) - 1) // self.region_bytes
        for r in range(first, last + 1):
            self._dirty[r // 8] |= 1 << (r % 8)

    def _to_bitmap(self, offset: int, length: int, nslots: int) -> bool:
        """Ring full or overflowing: mark the bitmap (under the handover lock); True if published after all."""
        fcntl.flock(self._dirty_fd, fcntl.LOCK_EX)
        try:
            st = int(self._ctl.state)
            if not st & abi.State.OVERFLOW and self.free_slots() >= nslots:
                return True  # the consumer re-armed the ring meanwhile
            self._mark_dirty(offset, length)
            self._ctl.state = st | abi.State.OVERFLOW | abi.State.DIRTY
            self.dropped += 1
            return False
        finally:
            fcntl.flock(self._dirty_fd, fcntl.LOCK_UN)

    def _room(self, offset: int, length: int, nslots: int, block: bool) -> bool:
        if block:
            self.wait_for_space(nslots)
        if not self._ctl.state & abi.State.OVERFLOW and self.free_slots() >= nslots:
            return True
        return self._to_bitmap(offset, length, nslots)

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False, block: bool = False) -> bool:
        """Write data to the source image, then publish it (split in 4 KiB records).  False: went to bitmap."""
        if offset % abi.SECTOR_SIZE or len(data) % abi.SECTOR_SIZE or not data:
            raise ValueError("writes are whole sectors")
        if offset + len(data) > self.dev_size:
            raise ValueError("write beyond the device")
        if self._src_fd >= 0:
            os.pwrite(self._src_fd, data, offset)
        sd = abi.BDR_SLOT_DATA
        nslots = (len(data) + sd - 1) // sd
        if not self._room(offset, len(data), nslots, block):
            return False
        pos = self.head
        mv = memoryview(data)
        for i in range(nslots):
            chunk = mv[i * sd : (i + 1) * sd]
            flags = abi.RecFlag.FUA if fua else 0
            if i:
                flags |= abi.RecFlag.CONT
            if i + 1 < nslots:
                flags |= abi.RecFlag.MORE
            slot = (pos + i) % self.nr_slots
            self._data[slot * sd : slot * sd + len(chunk)] = chunk
            self._fill(pos + i, abi.Op.WRITE, flags, (offset + i * sd) // abi.SECTOR_SIZE, len(chunk))
        self._publish(pos + nslots)
        self.published += nslots
        return True

    def _single(self, op: abi.Op, offset: int, length: int, block: bool) -> bool:
        if not self._room(offset, length, 1, block):
            return False
        pos = self.head
        self._fill(pos, op, 0, offset // abi.SECTOR_SIZE, length)
        self._publish(pos + 1)
        self.published += 1
        return True

    def flush(self, block: bool = False) -> bool:
        """A durability point (REQ_PREFLUSH with no data)."""
        return self._single(abi.Op.FLUSH, 0, 0, block)

    def discard(self, offset: int, length: int, block: bool = False) -> bool:
        if self._src_fd >= 0:
            os.pwrite(self._src_fd, bytes(length), offset)  # a discarded range of the image reads as zeros
        return self._single(abi.Op.DISCARD, offset, length, block)

    def write_zeroes(self, offset: int, length: int, block: bool = False) -> bool:
        if self._src_fd >= 0:
            os.pwrite(self._src_fd, bytes(length), offset)
        return self._single(abi.Op.WRITE_ZEROES, offset, length, block)

    def fail_write(self, offset: int, data: bytes) -> None:
        """A write that failed on the device: it may have partly landed, its region goes to the bitmap."""
        if self._src_fd >= 0:
            os.pwrite(self._src_fd, data, offset)
        fcntl.flock(self._dirty_fd, fcntl.LOCK_EX)
        try:
            self._mark_dirty(offset, len(data))
            self._ctl.state = int(self._ctl.state) | abi.State.DIRTY
        finally:
            fcntl.flock(self._dirty_fd, fcntl.LOCK_UN)

    def write_run(self, first_sector: int, data: memoryview, block: bool = True) -> int:
        """Bench fast path: publish len(data) / 4096 full 4 KiB records of consecutive sectors (no source
        image write), filling descriptors column-wise.  Returns the records published."""
        step = abi.BDR_SLOT_DATA // abi.SECTOR_SIZE
        n = len(data) // abi.BDR_SLOT_DATA
        return self.write_records(range(first_sector, first_sector + n * step, step), data, block)

    def write_records(self, sectors: range | list[int], data: memoryview, block: bool = True) -> int:
        """Bench fast path: publish one full 4 KiB record per sector of ``sectors`` (no source image write),
        filling descriptors column-wise.  Returns the records published."""
        sd = abi.BDR_SLOT_DATA
        n = len(sectors)
        if len(data) != n * sd:
            raise ValueError("one 4 KiB block of data per sector")
        if self._room(sectors[0] * abi.SECTOR_SIZE, n * sd, n, block) is False:
            return 0
        pos = self.head
        done = 0
        while done < n:
            slot = (pos + done) % self.nr_slots
            k = min(n - done, self.nr_slots - slot)
            self._data[slot * sd : (slot + k) * sd] = data[done * sd : (done + k) * sd]
            q = self._desc[slot * RECORD_SIZE : (slot + k) * RECORD_SIZE].cast("Q")
            q[0::4] = array("Q", range(self._seq, self._seq + k))
            q[1::4] = array("Q", sectors[done : done + k])
            q[2::4] = array("Q", [sd | (abi.Op.WRITE << 32)]) * k
            q[3::4] = array("Q", bytes(8 * k))
            q.release()
            self._seq += k
            done += k
        self._publish(pos + n)
        self.published += n
        return n

    def close(self) -> None:
        if self._fd < 0:
            return
        self._desc.release()
        self._data.release()
        self._view.release()
        del self._ctl
        self._mm.close()
        self._dirty.close()
        os.close(self._dirty_fd)
        if self._src_fd >= 0:
            os.close(self._src_fd)
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> RingProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
