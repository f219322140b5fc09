"""The old source's marks, kept in the journal of a demoted source: the regions its meta device marked when it
was demoted (``bdr demote --meta-device``), which hold every write it made after the last point its replica held.
The promoted side resyncs only those (and streams its own writes since the promotion) instead of the whole device.

They sit in the journal's header area, at 64 KiB (the record area starts at 1 MiB), written once by ``bdr demote``
and then synced, before the header that makes the device a replica::

    0        8            16         24           40          48      52         56
    +--------+------------+----------+------------+-----------+-------+----------+----------------+---------+
    | magic  | generation | dev_size | clear_ring | clear_pos | count | reserved | count x (offset,| xxh3_64 |
    |        |            |          |            |           |       |          |  length) u64    |         |
    +--------+------------+----------+------------+-----------+-------+----------+----------------+---------+

``generation`` is the source's generation when it was demoted, which is also the one of the marks' last clear:
the marks serve only while the replica stands in that generation (the next resync adopts another, and they are
void from then on).  More regions than fit are merged into coarser ranges, which only covers more.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

AT = 64 * 1024
MAX_BYTES = 256 * 1024
MAGIC = b"BDRMARKS"
_HEAD = struct.Struct("<8sQQ16sQII")
_EXTENT = struct.Struct("<QQ")
_CSUM = 8
MAX_EXTENTS = (MAX_BYTES - _HEAD.size - _CSUM) // _EXTENT.size


@dataclass(frozen=True, slots=True)
class FailbackMarks:
    generation: int  # the demoted source's generation, which its last clear of the marks was in
    dev_size: int
    clear_ring: bytes  # the ring and position of that clear: every write after it is in the extents
    clear_pos: int
    extents: list[tuple[int, int]]

    @property
    def marked_bytes(self) -> int:
        return sum(n for _, n in self.extents)

    def pack(self) -> bytes:
        ext = coarsen(self.extents, MAX_EXTENTS)
        body = _HEAD.pack(MAGIC, self.generation, self.dev_size, self.clear_ring, self.clear_pos, len(ext), 0)
        body += b"".join(_EXTENT.pack(o, n) for o, n in ext)
        return body + xxhash.xxh3_64_intdigest(body).to_bytes(_CSUM, "little")

    @classmethod
    def unpack(cls, blob: bytes) -> FailbackMarks | None:
        """The marks in ``blob`` (read from AT, MAX_BYTES long); None if there are none or they are damaged."""
        if len(blob) < _HEAD.size or blob[:8] != MAGIC:
            return None
        _, gen, size, ring, pos, count, _ = _HEAD.unpack_from(blob)
        end = _HEAD.size + count * _EXTENT.size
        if count > MAX_EXTENTS or end + _CSUM > len(blob):
            return None
        if xxhash.xxh3_64_intdigest(blob[:end]) != int.from_bytes(blob[end : end + _CSUM], "little"):
            return None
        ext = [_EXTENT.unpack_from(blob, _HEAD.size + i * _EXTENT.size) for i in range(count)]
        return cls(gen, size, ring, pos, ext)


def coarsen(extents: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """``extents`` (sorted, disjoint) in at most ``limit`` ranges that cover them: the smallest gaps are filled."""
    if len(extents) <= limit:
        return list(extents)
    gaps = sorted(extents[i + 1][0] - (extents[i][0] + extents[i][1]) for i in range(len(extents) - 1))
    fill = gaps[len(extents) - limit - 1]  # filling every gap up to this one leaves at most limit ranges
    out = [extents[0]]
    for o, n in extents[1:]:
        po, pn = out[-1]
        if o - (po + pn) <= fill:
            out[-1] = (po, o + n - po)
        else:
            out.append((o, n))
    return out
