"""Checksum scan: where a block is hashed, how ranges are cut into windows, which blocks differ.

A scan resynchronises the replica with the source when the ring cannot (client start, ring overflow, failed
writes, a different source).  Both sides cut the device into fixed blocks (``BLOCK_SIZE``, 4 KiB: a changed
page costs one page); the server hashes replica blocks with xxh3_128 and streams the digests (SCAN_HASHES, one
reply per SCAN_REQUEST window, the client keeps a few windows in flight), the client hashes the same source
blocks and sends only the blocks whose digests differ (SCAN_DATA, adjacent blocks merged into runs).  A full
replication sends every block (all-zero blocks as a ZERO marker, or not at all when the replica is known to
read as zeros).

Ordering rule: ring records captured after the scan started are applied after the scan's blocks, so ring
records win over whatever a scan read.

* ``blocks``: block digests, windows, exact reads (used by both daemons).
* ``pipeline``: the client's window pipeline (read a window of the source, hash its blocks, pick the blocks to
  send), used by the resync scans (hash and full) and by online verify.
* ``verify``: the bookkeeping of an online verify pass (``bdr verify``).
"""

from .blocks import BLOCK_SIZE as BLOCK_SIZE
from .blocks import HASH_SIZE as HASH_SIZE
from .blocks import WINDOW as WINDOW
from .blocks import differing as differing
from .blocks import digest as digest
from .blocks import hash_window as hash_window
from .blocks import merge_runs as merge_runs
from .blocks import read_exact as read_exact
from .blocks import windows as windows
from .blocks import zero_digest as zero_digest
from .pipeline import ScanStats as ScanStats
