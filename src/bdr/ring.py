"""Consumer of the shared capture ring (kernel/bdr_uapi.h), and a userspace producer for tests and benches.

``RingConsumer`` works on two kinds of path:

* the real control chardev ``/dev/<name>``: geometry from ``BDR_IOC_INFO``, one ``mmap`` of ``mmap_size``,
  readiness through ``poll()``, the dirty bitmap through ``BDR_IOC_TAKE_DIRTY``;
* a plain *ring file* with the same layout (control page first).  ``ioctl`` fails there with ENOTTY, so the
  geometry comes from the control page, waiting is done with short sleeps and the dirty bitmap lives in a side
  file ``<ring>.dirty`` guarded by ``flock``.  ``RingProducer`` creates such files and appends records exactly
  as the kernel does, so host tests and benchmarks can feed the client without the module.

Ordering (see the header): the producer fills slots, then stores ``head`` (release); we load ``head``
(acquire), read slots in ``[tail, head)``, and only when we no longer need them store ``tail`` (release).
``head``, ``tail``, ``state`` and ``next_seq`` are read and written as single aligned 64-bit accesses through
ctypes ``c_uint64`` fields laid over the mapping.  On x86-64 (TSO) plain aligned loads and stores already have
acquire / release ordering, and CPython does not reorder our loads and stores, so no explicit fences are
needed; a weakly ordered architecture would need real barriers here.

Slot release is the caller's decision: the client releases a record only after the server acknowledged it as
durable (``release(pos)``), so a server crash never loses a record that the ring still had.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import sys
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from select import POLLIN, poll

from . import abi
from .protocol import OP_WRITE, RECORD, RECORD_SIZE, record_fields

PAGE = mmap.PAGESIZE
DIRTY_SUFFIX = ".dirty"


class RingError(Exception):
    """The ring cannot be used: wrong path, wrong magic or version, inconsistent geometry, corrupt record."""


@dataclass(frozen=True, slots=True)
class Geometry:
    nr_slots: int
    slot_data: int
    desc_offset: int
    data_offset: int
    mmap_size: int
    dev_sectors: int | None  # None for a ring file: the caller knows the source size
    region_sectors: int
    name: str
    instance: int = 0  # random per kernel ring (sequence numbers restart with a new one); 0 for a file

    def nr_regions(self, dev_size: int) -> int:
        region = self.region_sectors * abi.SECTOR_SIZE
        return (dev_size + region - 1) // region

    def bitmap_bytes(self, dev_size: int) -> int:
        return (self.nr_regions(dev_size) + 63) // 64 * 8


def ring_layout(nr_slots: int) -> tuple[int, int, int]:
    """(desc_offset, data_offset, mmap_size) for a ring of nr_slots, as the kernel lays it out."""
    desc_offset = PAGE
    data_offset = _align(desc_offset + nr_slots * RECORD_SIZE, PAGE)
    return desc_offset, data_offset, data_offset + nr_slots * abi.BDR_SLOT_DATA


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(slots=True)
class Batch:
    """Records at ring positions [start, end): their descriptors and their data, as views of the mapping."""

    start: int
    end: int
    first_seq: int
    last_seq: int
    desc: list[memoryview]  # 1 view, or 2 when the batch wraps around the end of the ring
    data: list[memoryview]  # the data of the WRITE records, in order, contiguous slots merged
    data_len: int
    durability_point: bool  # contains a FLUSH or a FUA write

    @property
    def count(self) -> int:
        return self.end - self.start

    def release(self) -> None:
        """Drop the views so the mapping can be closed."""
        for v in self.desc:
            v.release()
        for v in self.data:
            v.release()
        self.desc = []
        self.data = []


@dataclass(frozen=True, slots=True)
class DirtyMap:
    """What BDR_IOC_TAKE_DIRTY handed over."""

    bitmap: bytes
    region_bytes: int
    ring_head: int  # records from this position on follow the bitmap's writes
    next_seq: int
    nr_dirty: int
    state: int

    def extents(self, dev_size: int) -> list[tuple[int, int]]:
        """Dirty regions as merged (offset, length) byte ranges, clipped to the device."""
        out: list[tuple[int, int]] = []
        rb = self.region_bytes
        bm = self.bitmap
        i = 0
        n = len(bm)
        while i < n:
            if not bm[i]:
                i += 1
                continue
            byte = bm[i]
            for bit in range(8):
                if byte >> bit & 1:
                    off = (i * 8 + bit) * rb
                    if off >= dev_size:
                        break
                    end = min(off + rb, dev_size)
                    if out and out[-1][0] + out[-1][1] == off:
                        out[-1] = (out[-1][0], end - out[-1][0])
                    else:
                        out.append((off, end - off))
            i += 1
        return out


@dataclass(frozen=True, slots=True)
class _Cols:
    lens: list[int]
    ops: list[int]
    flags: list[int]


def _batch_fields(desc: memoryview) -> _Cols:
    """The columns the client needs to find the data of a batch (fewer than the server validates)."""
    if sys.byteorder == "little":
        i = desc.cast("I")
        h = desc.cast("H")
        return _Cols(i[4::8].tolist(), h[10::16].tolist(), h[11::16].tolist())
    f = record_fields(desc)
    return _Cols(f.lens, f.ops, f.flags)


BUSY_WAIT = 5.0  # seconds an open waits for another consumer of the ring to close it


class RingConsumer:
    """The client's side of the ring: read published records, release slots, take the dirty bitmap."""

    def __init__(self, path: str | os.PathLike[str], dev_size: int | None = None) -> None:
        self.path = Path(path)
        fd = self._open_exclusive()
        self._fd = fd
        self._dirty_fd = -1
        self._dirty_map: mmap.mmap | None = None
        try:
            self.is_chardev = stat.S_ISCHR(os.fstat(fd).st_mode)
            self.geometry = self._query_geometry(dev_size)
            size = self.geometry.mmap_size
            if not self.is_chardev and os.fstat(fd).st_size < size:
                raise RingError(
                    f"{self.path}: ring file is {os.fstat(fd).st_size} bytes, geometry needs {size}"
                )
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._ctl = abi.RingCtl.from_buffer(self._mm)
        self._view = memoryview(self._mm)
        g = self.geometry
        self._desc = self._view[g.desc_offset : g.desc_offset + g.nr_slots * RECORD_SIZE]
        self._data = self._view[g.data_offset : g.data_offset + g.nr_slots * g.slot_data]
        self.dev_size = dev_size if g.dev_sectors is None else g.dev_sectors * abi.SECTOR_SIZE
        self._poll = poll()
        if self.is_chardev:
            self._poll.register(fd, POLLIN)
        if sys.byteorder != "little":
            raise RingError(
                "the ring is host byte order and the wire is little-endian: big-endian hosts unsupported"
            )

    def _open_exclusive(self) -> int:
        """Open the ring as its one consumer.  The kernel refuses a second writable open (EBUSY); a consumer
        that is still exiting (a restart right after a kill) gets BUSY_WAIT seconds to let go."""
        deadline = time.monotonic() + BUSY_WAIT
        while True:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                why = exc.strerror or str(exc)
                if exc.errno == errno.EBUSY:
                    why += " (another consumer, e.g. a running bdr_client, has it open: the ring has one consumer)"
                raise RingError(f"cannot open control device {self.path}: {why}") from exc

    # -- geometry ------------------------------------------------------------------------------------------------

    def _query_geometry(self, dev_size: int | None) -> Geometry:
        info = abi.Info()
        self._kernel_bitmap_bytes = 0
        try:
            fcntl.ioctl(self._fd, abi.BDR_IOC_INFO, info, True)
        except OSError as exc:
            if exc.errno != errno.ENOTTY or self.is_chardev:
                raise RingError(f"{self.path}: BDR_IOC_INFO failed: {exc.strerror}") from exc
            return self._file_geometry(dev_size)
        if info.magic != abi.BDR_MAGIC or info.abi_version != abi.BDR_ABI_VERSION:
            raise RingError(
                f"{self.path}: not a bdr ring (magic {info.magic:#x}, ABI {info.abi_version}, "
                f"want {abi.BDR_MAGIC:#x} / {abi.BDR_ABI_VERSION})"
            )
        self._kernel_bitmap_bytes = int(info.bitmap_bytes)
        g = Geometry(
            info.nr_slots,
            info.slot_data,
            info.desc_offset,
            info.data_offset,
            info.mmap_size,
            info.dev_sectors,
            info.region_sectors,
            info.name.decode(errors="replace"),
            int(info.instance),
        )
        self._check_geometry(g)
        return g

    def _file_geometry(self, dev_size: int | None) -> Geometry:
        raw = os.pread(self._fd, ctypes.sizeof(abi.RingCtl), 0)
        if len(raw) < ctypes.sizeof(abi.RingCtl):
            raise RingError(f"{self.path}: too short for a ring control page")
        ctl = abi.RingCtl.from_buffer_copy(raw)
        if ctl.magic != abi.BDR_MAGIC or ctl.abi_version != abi.BDR_ABI_VERSION:
            raise RingError(
                f"{self.path}: not a bdr ring (magic {ctl.magic:#x}, ABI {ctl.abi_version}, "
                f"want {abi.BDR_MAGIC:#x} / {abi.BDR_ABI_VERSION})"
            )
        g = Geometry(
            ctl.nr_slots,
            ctl.slot_data,
            ctl.desc_offset,
            ctl.data_offset,
            ctl.mmap_size,
            None,
            abi.BDR_DEFAULT_REGION_SECTORS,
            self.path.name,
        )
        self._check_geometry(g)
        if dev_size is not None:
            self._open_dirty_file(g.bitmap_bytes(dev_size))
        return g

    def _check_geometry(self, g: Geometry) -> None:
        d, dd, size = ring_layout(g.nr_slots) if g.nr_slots else (0, 0, 0)
        ok = (
            0 < g.nr_slots <= abi.BDR_MAX_SLOTS
            and g.slot_data == abi.BDR_SLOT_DATA
            and g.desc_offset >= ctypes.sizeof(abi.RingCtl)
            and g.desc_offset % PAGE == 0
            and g.data_offset % PAGE == 0
            and g.data_offset >= g.desc_offset + g.nr_slots * RECORD_SIZE
            and g.mmap_size >= g.data_offset + g.nr_slots * g.slot_data
            and g.region_sectors > 0
        )
        if not ok:
            raise RingError(
                f"{self.path}: inconsistent ring geometry {g} (kernel layout would be {d}/{dd}/{size})"
            )

    def _open_dirty_file(self, nbytes: int) -> None:
        side = Path(str(self.path) + DIRTY_SUFFIX)
        try:
            self._dirty_fd = os.open(side, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # a ring file without a bitmap: overflow cannot be recovered from the bitmap
        if os.fstat(self._dirty_fd).st_size < nbytes:
            raise RingError(f"{side}: dirty bitmap shorter than the {nbytes} bytes the device needs")
        self._dirty_map = mmap.mmap(self._dirty_fd, nbytes)

    # -- ring state ------------------------------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def head(self) -> int:
        """Load head (one aligned 64-bit load; on x86-64 it has acquire semantics)."""
        return int(self._ctl.head)

    @property
    def tail(self) -> int:
        return int(self._ctl.tail)

    def state(self) -> abi.State:
        return abi.State(int(self._ctl.state) & 0x7)

    def next_seq(self) -> int:
        """The sequence number the producer will give its next record."""
        return int(self._ctl.next_seq)

    def release(self, pos: int) -> None:
        """Store the new tail: slots before pos may be reused by the producer."""
        if pos < self._ctl.tail or pos > self._ctl.head:
            raise RingError(f"release to {pos} outside [tail {self._ctl.tail}, head {self._ctl.head}]")
        self._ctl.tail = pos

    def mark_seen(self, pos: int) -> None:
        """Tell the producer we have read up to pos: poll() wakes us only for records after it."""
        self._ctl.seen = pos

    def seq_at(self, pos: int) -> int:
        slot = pos % self.geometry.nr_slots
        return int.from_bytes(self._desc[slot * RECORD_SIZE : slot * RECORD_SIZE + 8], "little")

    def _tail_head_seq(self) -> tuple[int, int, int]:
        """tail, head, and the sequence number at tail (next_seq when the ring is empty).  next_seq is loaded
        before head: the producer stores head first, so a record published in between never makes next_seq
        look ahead of an empty [tail, head) (bdr_uapi.h)."""
        nseq = self.next_seq()
        tail, head = self.tail, self.head()
        return tail, head, self.seq_at(tail) if head > tail else nseq

    def tail_seq(self) -> int:
        """The sequence number of the record at tail, or of the next one published if the ring is empty."""
        return self._tail_head_seq()[2]

    def find_seq(self, seq: int) -> int | None:
        """The position in [tail, head] of the record with ``seq`` (head if seq is the next one), or None."""
        tail, head, first = self._tail_head_seq()
        if tail == head:
            return head if seq == first else None
        pos = tail + ((seq - first) & ((1 << 64) - 1))
        if pos == head and seq == (self.seq_at(head - 1) + 1) & ((1 << 64) - 1):
            return head
        if tail <= pos < head and self.seq_at(pos) == seq:
            return pos
        return None

    def wait(self, timeout: float) -> bool:
        """Wait until the producer may have published something new (or the state changed)."""
        if self.is_chardev:
            return bool(self._poll.poll(max(0, int(timeout * 1000))))
        time.sleep(min(timeout, 0.002))
        return True

    # -- records -------------------------------------------------------------------------------------------------

    def _chunks(self, start: int, end: int) -> Iterator[memoryview]:
        """The descriptors of the records at positions [start, end), in at most two views (wrap-around)."""
        nr = self.geometry.nr_slots
        while start < end:
            slot = start % nr
            k = min(end - start, nr - slot)
            with self._desc[slot * RECORD_SIZE : (slot + k) * RECORD_SIZE] as dv:
                yield dv
            start += k

    def written(self, start: int, end: int) -> list[tuple[int, int]]:
        """The byte extents that the records at positions [start, end) change (writes, discards, write-zeroes)."""
        extents: list[tuple[int, int]] = []
        for dv in self._chunks(start, end):
            f = record_fields(dv)
            extents += [
                (sector * 512, ln)
                for sector, ln, op in zip(f.sectors, f.lens, f.ops, strict=True)
                if op != abi.Op.FLUSH and ln
            ]
        return extents

    def data_bytes(self, start: int, end: int) -> int:
        """Bytes of write data the records at positions [start, end) carry (a few ms for 256 Ki records)."""
        total = 0
        for dv in self._chunks(start, end):
            f = _batch_fields(dv)
            if f.ops.count(OP_WRITE) == len(f.ops):
                total += sum(f.lens)
            else:
                total += sum(ln for ln, op in zip(f.lens, f.ops, strict=True) if op == OP_WRITE)
        return total

    def batch(self, start: int, max_records: int, head: int | None = None) -> Batch | None:
        """Records from position start up to head (at most max_records), without copying their data."""
        if head is None:
            head = self.head()
        n = min(head - start, max_records)
        if n <= 0:
            return None
        g = self.geometry
        nr, sd = g.nr_slots, g.slot_data
        slot = start % nr
        first_n = min(n, nr - slot)
        chunks = [(slot, first_n)] if first_n == n else [(slot, first_n), (0, n - first_n)]
        descs: list[memoryview] = []
        datas: list[memoryview] = []
        data_len = 0
        durable = False
        first_seq = last_seq = 0
        for ci, (s, k) in enumerate(chunks):
            dv = self._desc[s * RECORD_SIZE : (s + k) * RECORD_SIZE]
            descs.append(dv)
            f = _batch_fields(dv)
            if ci == 0:
                first_seq = int.from_bytes(dv[:8], "little")
            last_seq = int.from_bytes(dv[(k - 1) * RECORD_SIZE : (k - 1) * RECORD_SIZE + 8], "little")
            if f.ops.count(OP_WRITE) == k and f.lens.count(sd) == k:
                # the common case: full 4 KiB writes, their data is one contiguous run of slots
                datas.append(self._data[s * sd : (s + k) * sd])
                data_len += k * sd
                if max(f.flags) and any(fl & abi.RecFlag.FUA for fl in f.flags):
                    durable = True
                continue
            run_start = run_len = 0
            for i, (ln, op, fl) in enumerate(zip(f.lens, f.ops, f.flags, strict=True)):
                if op != OP_WRITE:
                    durable = durable or op == abi.Op.FLUSH
                    if run_len:
                        datas.append(self._data[run_start : run_start + run_len])
                        run_len = 0
                    continue
                if ln > sd:
                    seq = int.from_bytes(dv[i * RECORD_SIZE : i * RECORD_SIZE + 8], "little")
                    raise RingError(f"ring record seq {seq} claims {ln} bytes of data in a {sd}-byte slot")
                if fl & abi.RecFlag.FUA:
                    durable = True
                off = (s + i) * sd
                if run_len and run_start + run_len == off:
                    run_len += ln
                else:
                    if run_len:
                        datas.append(self._data[run_start : run_start + run_len])
                    run_start, run_len = off, ln
                data_len += ln
                if ln != sd and run_len:
                    datas.append(self._data[run_start : run_start + run_len])
                    run_len = 0
            if run_len:
                datas.append(self._data[run_start : run_start + run_len])
        return Batch(start, start + n, first_seq, last_seq, descs, datas, data_len, durable)

    # -- overflow ------------------------------------------------------------------------------------------------

    def take_dirty(self) -> DirtyMap:
        """Hand the dirty bitmap over, clear it and re-arm the ring (BDR_IOC_TAKE_DIRTY or its file twin)."""
        g = self.geometry
        if self.dev_size is None:
            raise RingError("device size unknown: cannot size the dirty bitmap")
        region_bytes = g.region_sectors * abi.SECTOR_SIZE
        if self.is_chardev:
            nbytes = max(self._kernel_bitmap_bytes, g.bitmap_bytes(self.dev_size))
            buf = (ctypes.c_uint8 * max(nbytes, 8))()
            d = abi.Dirty()
            d.bitmap = ctypes.addressof(buf)
            d.bitmap_bytes = len(buf)
            try:
                fcntl.ioctl(self._fd, abi.BDR_IOC_TAKE_DIRTY, d, True)
            except OSError as exc:
                raise RingError(f"{self.path}: BDR_IOC_TAKE_DIRTY failed: {exc.strerror}") from exc
            return DirtyMap(bytes(buf)[:nbytes], region_bytes, d.ring_head, d.next_seq, d.nr_dirty, d.state)
        if self._dirty_map is None:
            raise RingError(f"{self.path}: the ring overflowed and it has no {DIRTY_SUFFIX} bitmap file")
        fcntl.flock(self._dirty_fd, fcntl.LOCK_EX)
        try:
            bitmap = bytes(self._dirty_map)
            self._dirty_map[:] = bytes(len(bitmap))
            state = int(self._ctl.state)
            ring_head = int(self._ctl.head)
            nseq = int(self._ctl.next_seq)
            self._ctl.state = 0
        finally:
            fcntl.flock(self._dirty_fd, fcntl.LOCK_UN)
        nr_dirty = int.from_bytes(bitmap, "little").bit_count()
        return DirtyMap(bitmap, region_bytes, ring_head, nseq, nr_dirty, state)

    def close(self) -> None:
        if self._fd < 0:
            return
        self._desc.release()
        self._data.release()
        self._view.release()
        del self._ctl
        self._mm.close()
        if self._dirty_map is not None:
            self._dirty_map.close()
        if self._dirty_fd >= 0:
            os.close(self._dirty_fd)
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> RingConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
            time.sleep(0.002)  # a poll every 2 ms: cheap for a bench producer, the ring holds far more

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
