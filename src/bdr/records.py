"""The one record format: the ring descriptor the kernel publishes, the client sends in DATA frames and the
server applies; its operations and flags, and the columns of a descriptor array.

A descriptor is byte for byte ``struct bdr_record`` of kernel/bdr_uapi.h, little-endian, so the client sends
the ring's descriptor array as is:

  0       8       16      20  22  24      32
  +-------+-------+-------+---+---+-------+
  |  seq  | sector|  len  |op |flg|  rsvd |
  +-------+-------+-------+---+---+-------+

Records are consecutive sequence numbers.  WRITE: len bytes of data follow in the data area (multiple of 512).
FLUSH: len 0, a durability point.  DISCARD / WRITE_ZEROES: len bytes of range, no data.  FUA on a WRITE makes
that write a durability point as well.  A DISCARD means the source reads zeros there (the client checked; the
replica is zeroed and may give the space back), unless flagged UNZEROED (the replica is left as it is).
"""

from __future__ import annotations

import functools
import struct
import sys
from dataclasses import dataclass
from typing import Final

from .seq import SEQ_MASK

_LITTLE = sys.byteorder == "little"

RECORD = struct.Struct("<QQIHHQ")
RECORD_SIZE: Final = RECORD.size

OP_WRITE: Final = 1
OP_FLUSH: Final = 2
OP_DISCARD: Final = 3
OP_WRITE_ZEROES: Final = 4
REC_FUA: Final = 1 << 0
# on the wire only (the kernel never sets it): a DISCARD whose range the source does not read as zeros; the
# server leaves the replica's bytes as they are, and the client resyncs the range by checksums
REC_UNZEROED: Final = 1 << 3
REC_KNOWN_FLAGS: Final = 0xF  # FUA | CONT | MORE | UNZEROED


@dataclass(frozen=True, slots=True)
class RecordFields:
    """Columns of a descriptor array, one list per field (built at C speed)."""

    seqs: list[int]
    sectors: list[int]
    lens: list[int]
    ops: list[int]
    flags: list[int]
    reserved: list[int]


def record_fields(desc: memoryview | bytes) -> RecordFields:
    """Split a descriptor array into per-field lists without a Python loop per record."""
    mv = memoryview(desc)
    if _LITTLE:
        q = mv.cast("B").cast("Q")
        i = mv.cast("B").cast("I")
        h = mv.cast("B").cast("H")
        return RecordFields(
            q[0::4].tolist(),
            q[1::4].tolist(),
            i[4::8].tolist(),
            h[10::16].tolist(),
            h[11::16].tolist(),
            q[3::4].tolist(),
        )
    cols = list(zip(*RECORD.iter_unpack(mv), strict=True)) or [(), (), (), (), (), ()]
    return RecordFields(*(list(c) for c in cols))


def record_data_len(f: RecordFields) -> int:
    """Bytes of data that follow the descriptors (only WRITE records carry data)."""
    if f.ops.count(OP_WRITE) == len(f.ops):
        return sum(f.lens)
    return sum(n for n, op in zip(f.lens, f.ops, strict=True) if op == OP_WRITE)


@functools.lru_cache(maxsize=8)
def _range_cache(n: int) -> range:
    return range(n)


def seq_range(first: int, n: int) -> list[int]:
    """The sequence numbers first, first + 1, ... (n of them), wrapping at 2**64."""
    if first + n - 1 <= SEQ_MASK:
        return list(range(first, first + n))
    return [(first + i) & SEQ_MASK for i in _range_cache(n)]
