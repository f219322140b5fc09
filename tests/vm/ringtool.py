"""Minimal, independent reader of the bdr ring, used by the kernel target's VM tests.

It deliberately does not use the client's ring code: the kernel tests check the target against the ABI
header's rules, not against our own consumer.

    ringtool.py dump CHARDEV OUT             append published records to OUT, release them, print a summary
    ringtool.py drain CHARDEV OUT STOPFILE   dump continuously (poll) until STOPFILE exists and the ring is empty
    ringtool.py replay RECORDS IMAGE         apply RECORDS to IMAGE (discard / write-zeroes as zeros)
    ringtool.py list RECORDS                 records as JSON lines (seq, sector, len, op, flags)
    ringtool.py status CHARDEV               BDR_IOC_STATUS as JSON
    ringtool.py take CHARDEV [RECORDS READY] BDR_IOC_TAKE_DIRTY: JSON with the dirty regions; with RECORDS, create
                                             READY, wait until that many records were counted, then take
    ringtool.py hold CHARDEV READY STOP      open + mmap, create READY, wait for STOP, then read ctl and close
    ringtool.py seen CHARDEV [POS]           store seen = POS (default head); print poll readiness and the instance
    ringtool.py diff A B                     JSON list of the 4 KiB blocks that differ between two files/devices
    ringtool.py release CHARDEV STOP [MS]    consume without reading (tail = head) until STOP exists (benchmarks);
                                             with MS: every MS milliseconds instead of at each poll() wake-up
    ringtool.py watch CHARDEV SECS READY     create READY, then print the distinct (head, next_seq)
                                             pairs seen in SECS seconds, sampled every 10 ms
    ringtool.py scribble CHARDEV             write garbage over the kernel's ctl fields; print what INFO and poll say
    ringtool.py opens CHARDEV                what a second writable open, a read-only open and its handover get
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import mmap
import os
import select
import sys
import time
from collections.abc import Iterator

from bdr.kernel import abi

REC = ctypes.sizeof(abi.Record)


class Ring:
    def __init__(self, path: str, writable: bool = True) -> None:
        self.fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        self.info = abi.Info()
        fcntl.ioctl(self.fd, abi.BDR_IOC_INFO, self.info)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.mm = mmap.mmap(self.fd, self.info.mmap_size, mmap.MAP_SHARED, prot)
        # a read-only mapping has no ctypes view (from_buffer needs a writable buffer)
        self.ctl = abi.RingCtl.from_buffer(self.mm) if writable else abi.RingCtl()

    def close(self) -> None:
        del self.ctl
        self.mm.close()
        os.close(self.fd)

    def status(self) -> abi.Status:
        st = abi.Status()
        fcntl.ioctl(self.fd, abi.BDR_IOC_STATUS, st)
        return st

    def dump(self, out: object) -> int:
        """Write every published record (descriptor + data) to out; release the slots."""
        head, tail = self.ctl.head, self.ctl.tail
        n = self.info.nr_slots
        for pos in range(tail, head):
            slot = pos % n
            d = self.info.desc_offset + slot * REC
            rec = abi.Record.from_buffer_copy(self.mm[d : d + REC])
            data = b""
            if rec.op == abi.Op.WRITE:
                o = self.info.data_offset + slot * abi.BDR_SLOT_DATA
                data = self.mm[o : o + rec.len]
            out.write(bytes(rec) + data)  # type: ignore[attr-defined]
        self.ctl.tail = head
        return head - tail


def read_records(path: str) -> Iterator[tuple[abi.Record, bytes]]:
    with open(path, "rb") as f:
        while hdr := f.read(REC):
            rec = abi.Record.from_buffer_copy(hdr)
            data = f.read(rec.len) if rec.op == abi.Op.WRITE else b""
            yield rec, data


def regions(bitmap: bytes) -> list[int]:
    out = []
    for i, byte in enumerate(bitmap):
        for bit in range(8):
            if byte >> bit & 1:
                out.append(i * 8 + bit)
    return out


def main(argv: list[str]) -> int:
    cmd = argv[0]
    if cmd == "dump":
        ring = Ring(argv[1])
        with open(argv[2], "ab") as f:
            n = ring.dump(f)
        print(json.dumps({"records": n, "state": ring.ctl.state, "next_seq": ring.ctl.next_seq}))
        ring.close()
    elif cmd == "drain":
        ring = Ring(argv[1])
        p = select.poll()
        p.register(ring.fd, select.POLLIN)
        total = 0
        with open(argv[2], "ab") as f:
            while True:
                total += ring.dump(f)
                if os.path.exists(argv[3]) and ring.ctl.head == ring.ctl.tail:
                    break
                p.poll(100)
        print(json.dumps({"records": total, "state": ring.ctl.state}))
        ring.close()
    elif cmd == "replay":
        fd = os.open(argv[2], os.O_WRONLY)
        for rec, data in read_records(argv[1]):
            if rec.op == abi.Op.WRITE:
                os.pwrite(fd, data, rec.sector * 512)
            elif rec.op in (abi.Op.DISCARD, abi.Op.WRITE_ZEROES):
                os.pwrite(fd, bytes(rec.len), rec.sector * 512)
        os.close(fd)
    elif cmd == "list":
        for rec, _ in read_records(argv[1]):
            print(json.dumps({k: getattr(rec, k) for k in ("seq", "sector", "len", "op", "flags")}))
    elif cmd == "status":
        ring = Ring(argv[1], writable=False)  # beside the one writable consumer (a running client)
        st = ring.status()
        print(json.dumps({k: getattr(st, k) for k, _ in abi.Status._fields_}))
        ring.close()
    elif cmd == "take":
        ring = Ring(argv[1])
        if len(argv) > 2:
            open(argv[3], "w").close()
            while ring.status().records < int(argv[2]):
                time.sleep(0.005)
        buf = ctypes.create_string_buffer(ring.info.bitmap_bytes)
        d = abi.Dirty(bitmap=ctypes.addressof(buf), bitmap_bytes=ring.info.bitmap_bytes)
        fcntl.ioctl(ring.fd, abi.BDR_IOC_TAKE_DIRTY, d)
        head_after = ring.ctl.head  # what the consumer can read right after the handover
        out = {k: getattr(d, k) for k, _ in abi.Dirty._fields_ if k != "bitmap"}
        out["head_after"] = head_after
        out["region_sectors"] = ring.info.region_sectors
        out["regions"] = regions(buf.raw)
        print(json.dumps(out))
        ring.close()
    elif cmd == "hold":
        ring = Ring(argv[1])
        open(argv[2], "w").close()
        while not os.path.exists(argv[3]):
            time.sleep(0.05)
        print(json.dumps({"state": ring.ctl.state, "head": ring.ctl.head, "magic": ring.ctl.magic}))
        ring.close()
    elif cmd == "seen":
        ring = Ring(argv[1])
        if len(argv) > 2 or ring.ctl.seen != ring.ctl.head:
            ring.ctl.seen = int(argv[2]) if len(argv) > 2 else ring.ctl.head
        p = select.poll()
        p.register(ring.fd, select.POLLIN)
        readable = bool(p.poll(0))
        print(json.dumps({"readable": readable, "instance": ring.ctl.instance, "head": ring.ctl.head}))
        ring.close()
    elif cmd == "diff":
        changed = []
        with open(argv[1], "rb") as fa, open(argv[2], "rb") as fb:
            block = 0
            while True:
                a, b = fa.read(1 << 20), fb.read(1 << 20)
                if not a and not b:
                    break
                for i in range(0, max(len(a), len(b)), 4096):
                    if a[i : i + 4096] != b[i : i + 4096]:
                        changed.append(block + i // 4096)
                block += (1 << 20) // 4096
        print(json.dumps(changed))
    elif cmd == "release":
        ring = Ring(argv[1])
        p = select.poll()
        p.register(ring.fd, select.POLLIN)
        released = takes = 0
        buf = ctypes.create_string_buffer(ring.info.bitmap_bytes)
        while not os.path.exists(argv[2]):
            head = ring.ctl.head
            released += head - ring.ctl.tail
            ring.ctl.tail = head
            if ring.ctl.state & abi.State.OVERFLOW:  # as the client does: re-arm the ring
                d = abi.Dirty(bitmap=ctypes.addressof(buf), bitmap_bytes=ring.info.bitmap_bytes)
                fcntl.ioctl(ring.fd, abi.BDR_IOC_TAKE_DIRTY, d)
                takes += 1
            if len(argv) > 3:
                time.sleep(int(argv[3]) / 1000)  # batched: not on the wait queue, so publishing wakes nobody
            else:
                p.poll(20)
        print(json.dumps({"released": released, "takes": takes}))
        ring.close()
    elif cmd == "watch":
        ring = Ring(argv[1])
        pairs: list[tuple[int, int]] = []
        open(argv[3], "w").close()
        end = time.monotonic() + float(argv[2])
        while time.monotonic() < end:
            seq = ring.ctl.next_seq  # next_seq before head, as bdr_uapi.h says a consumer reads them
            pair = (ring.ctl.head, seq)
            if not pairs or pairs[-1] != pair:
                pairs.append(pair)
            time.sleep(0.01)
        print(json.dumps(pairs))
        ring.close()
    elif cmd == "scribble":
        ring = Ring(argv[1])
        before = (ring.info.instance, ring.info.desc_offset, ring.info.data_offset)
        ring.ctl.seen = ring.ctl.head
        ring.ctl.head += 5
        ring.ctl.instance ^= 0xFFFF
        ring.ctl.desc_offset = 12345
        ring.ctl.data_offset = 0
        ring.ctl.state |= abi.State.OVERFLOW
        info = abi.Info()
        fcntl.ioctl(ring.fd, abi.BDR_IOC_INFO, info)
        p = select.poll()
        p.register(ring.fd, select.POLLIN)
        print(
            json.dumps(
                {
                    "before": before,
                    "after": (info.instance, info.desc_offset, info.data_offset),
                    "readable": bool(p.poll(0)),
                }
            )
        )
        ring.close()
    elif cmd == "opens":
        out: dict[str, object] = {}
        first = Ring(argv[1])
        try:
            os.close(os.open(argv[1], os.O_RDWR))
            out["second_rw"] = 0
        except OSError as exc:
            out["second_rw"] = exc.errno
        ro = Ring(argv[1], writable=False)
        out["ro_instance_ok"] = ro.info.instance == first.info.instance
        buf = ctypes.create_string_buffer(ro.info.bitmap_bytes)
        d = abi.Dirty(bitmap=ctypes.addressof(buf), bitmap_bytes=ro.info.bitmap_bytes)
        try:
            fcntl.ioctl(ro.fd, abi.BDR_IOC_TAKE_DIRTY, d)
            out["ro_take"] = 0
        except OSError as exc:
            out["ro_take"] = exc.errno
        ro.close()
        first.close()
        try:
            Ring(argv[1]).close()
            out["rw_after_close"] = 0
        except OSError as exc:
            out["rw_after_close"] = exc.errno
        print(json.dumps(out))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
