"""bdr_server: receives ring records and scan blocks from bdr_client and applies them to the replica.

Layers, from the disk up:

* ``Replica``: the target block device or image file (pwritev, zeroing, fdatasync).
* ``Applier``: applies DATA batches strictly in sequence order (older records skipped, a gap refused),
  coalesces contiguous writes into one write, and makes durability points durable (replica fdatasync, then the
  metadata header on the journal, then the acknowledgement).
* ``ServerSession``: one client connection as a protocol state machine: handshake checks, streaming, scans.
  Bytes in, bytes out; no sockets, so tests drive it in memory.
* ``Server``: the daemon: listening socket, one client at a time, signals as events on the poll loop; the
  ``gate`` does TLS and shared-secret authentication (``bdr.security``) before anything reaches the session.
* ``StagedResync`` (``staging``): a journal resync's lifecycle; ``splice``: the DATA fast path.

A replica or journal I/O error is not a protocol event: the server marks the replica inconsistent in its
metadata (the next client start rescans the whole device), tells the client, and stops with exit status 4.
"""

from .applier import Applier as Applier
from .daemon import Server as Server
from .daemon import open_record_area as open_record_area
from .errors import ServerError as ServerError
from .errors import SessionClosed as SessionClosed
from .options import build_parser as build_parser
from .options import main as main
from .replica import Replica as Replica
from .security import is_loopback as is_loopback
from .security import load_security as load_security
from .session import ServerSession as ServerSession
