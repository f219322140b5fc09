"""The dirty bitmap handed over by BDR_IOC_TAKE_DIRTY (or the ring file's side file): the regions written while
the ring could not take records, as byte extents of the device."""

from __future__ import annotations

from dataclasses import dataclass


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
