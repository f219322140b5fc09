"""The consumer of the shared capture ring (kernel/bdr_uapi.h): the client's side of it.

``RingConsumer`` works on two kinds of path:

* the real control chardev ``/dev/<name>``: geometry from ``BDR_IOC_INFO``, one ``mmap`` of ``mmap_size``,
  readiness through ``poll()``, the dirty bitmap through ``BDR_IOC_TAKE_DIRTY``;
* a plain *ring file* with the same layout (control page first).  ``ioctl`` fails there with ENOTTY, so the
  geometry comes from the control page, waiting is done with short sleeps and the dirty bitmap lives in a side
  file ``<ring>.dirty`` guarded by ``flock``.  ``bdr.testing.ring_producer`` creates such files and appends
  records exactly as the kernel does, so host tests and benchmarks can feed the client without the module.

Ordering (see the header): the producer fills slots, then stores ``head`` (release); we load ``head``
(acquire), read slots in ``[tail, head)``, and only when we no longer need them store ``tail`` (release).
``head``, ``tail``, ``state`` and ``next_seq`` are read and written as single aligned 64-bit accesses through
ctypes ``c_uint64`` fields laid over the mapping.  On x86 (TSO) plain aligned loads and stores already have
acquire / release ordering, and CPython does not reorder our loads and stores, so no explicit fences are
needed.  A weakly ordered CPU would need real barriers, which Python cannot issue, and the records are
little-endian on the wire: so the consumer refuses any host but little-endian x86, before it opens the ring.

Slot release is the caller's decision: the client releases a record only after the server acknowledged it as
durable (``release(pos)``), so a server crash never loses a record that the ring still had.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from select import POLLIN, poll

from ..records import OP_WRITE, RECORD_SIZE, record_fields
from . import abi
from .dirty import DirtyMap
from .layout import DIRTY_SUFFIX, PAGE, Geometry, RingError, ring_layout


@dataclass(frozen=True, slots=True)
class Tracking:
    """BDR_IOC_TRACK_INFO: the target's persistent change tracking (``meta_device``)."""

    flags: abi.TrackFlag
    clear_ring: bytes  # the ring and position of the last clear: the replica held every record before it
    clear_pos: int
    clear_generation: int  # the source's generation then (bdr_client --metadata; 0 without)
    loaded_regions: int  # regions marked when the meta_device was loaded
    marked_regions: int
    meta_writes: int
    clears: int

    @property
    def recovered(self) -> bool:
        return bool(self.flags & abi.TrackFlag.RECOVERED)

    @property
    def failed(self) -> bool:
        return bool(self.flags & abi.TrackFlag.FAILED)


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
# a ring file has no poll(): the consumer naps, NAP_MIN while records keep coming (a 2 ms nap left the client
# idle after each drain: the stream bench made 0.5 of loopback TCP with it, 0.6 with 0.2 ms), doubling up to
# NAP_MAX while nothing is published
NAP_MIN, NAP_MAX = 0.0002, 0.002
TSO_MACHINES = frozenset({"x86_64", "amd64", "i386", "i486", "i586", "i686"})


def check_host() -> None:
    """RingError unless this host orders memory as the ring's lock-free protocol assumes (x86, TSO) and is
    little-endian like the records on the wire."""
    machine = platform.machine().lower()
    if sys.byteorder != "little" or machine not in TSO_MACHINES:
        raise RingError(
            f"the ring consumer needs a little-endian x86 host (its loads and stores rely on x86 ordering), "
            f"not {machine or 'unknown'} ({sys.byteorder}-endian)"
        )


class RingConsumer:
    """The client's side of the ring: read published records, release slots, take the dirty bitmap."""

    def __init__(self, path: str | os.PathLike[str], dev_size: int | None = None) -> None:
        self.path = Path(path)
        check_host()
        fd = self._open_exclusive()
        self._fd = fd
        self._dirty_fd = -1
        self._dirty_map: mmap.mmap | None = None
        self.released_data = 0  # bytes of write data in the records released through this consumer
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
        self._nap, self._nap_head = NAP_MIN, -1
        if self.is_chardev:
            self._poll.register(fd, POLLIN)

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
        return abi.State(int(self._ctl.state) & 0xF)

    def next_seq(self) -> int:
        """The sequence number the producer will give its next record."""
        return int(self._ctl.next_seq)

    def release(self, pos: int) -> None:
        """Store the new tail: slots before pos may be reused by the producer."""
        if pos < self._ctl.tail or pos > self._ctl.head:
            raise RingError(f"release to {pos} outside [tail {self._ctl.tail}, head {self._ctl.head}]")
        self.released_data += self.data_bytes(self._ctl.tail, pos)
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
        head = self.head()
        self._nap = NAP_MIN if head != self._nap_head else min(2 * self._nap, NAP_MAX)
        self._nap_head = head
        time.sleep(min(timeout, self._nap))
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

    # -- persistent change tracking ----------------------------------------------------------------------------

    def tracking(self) -> Tracking | None:
        """The target's persistent change tracking (BDR_IOC_TRACK_INFO); None without a meta_device (or on a
        ring file)."""
        if not self.is_chardev:
            return None
        t = abi.Track()
        try:
            fcntl.ioctl(self._fd, abi.BDR_IOC_TRACK_INFO, t, True)
        except OSError as exc:
            if exc.errno == errno.ENOTTY:  # a module without change tracking
                return None
            raise RingError(f"{self.path}: BDR_IOC_TRACK_INFO failed: {exc.strerror}") from exc
        flags = abi.TrackFlag(t.flags)
        if not flags & abi.TrackFlag.ENABLED:
            return None
        return Tracking(
            flags,
            bytes(t.clear_ring),
            t.clear_pos,
            t.clear_generation,
            t.loaded_regions,
            t.marked_regions,
            t.meta_writes,
            t.clears,
        )

    def clear_tracking(self, pos: int, ring_id: bytes, generation: int) -> bool:
        """BDR_IOC_TRACK_CLEAR: the replica durably holds every record before ``pos`` and every region of
        every bitmap taken; ``ring_id`` (the client's name of this ring) is kept with ``pos``.  False if the
        kernel saw a write in flight or a record after ``pos`` (try later)."""
        return self._track_ioctl(abi.BDR_IOC_TRACK_CLEAR, "BDR_IOC_TRACK_CLEAR", pos, ring_id, generation)

    def rotate_tracking(self, pos: int, ring_id: bytes, generation: int) -> bool:
        """BDR_IOC_TRACK_ROTATE, while writes go on: the replica durably holds every record before ``pos`` (the
        tail) and every region of every bitmap taken.  The kernel clears the marks of the regions not written
        in its current epoch if every write of the earlier ones is before ``pos``, and begins a new epoch; the
        current epoch's start becomes the clear point kept with ``ring_id``.  False: not yet (try later)."""
        return self._track_ioctl(abi.BDR_IOC_TRACK_ROTATE, "BDR_IOC_TRACK_ROTATE", pos, ring_id, generation)

    def _track_ioctl(self, req: int, name: str, pos: int, ring_id: bytes, generation: int) -> bool:
        c = abi.TrackClear()
        c.pos = pos
        c.ring[:] = ring_id
        c.generation = generation
        try:
            fcntl.ioctl(self._fd, req, c, True)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return False
            raise RingError(f"{self.path}: {name} failed: {exc.strerror}") from exc
        return True

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
