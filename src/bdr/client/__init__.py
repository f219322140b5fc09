"""bdr_client: ships the writes captured in the ring to bdr_server, and resyncs with scans when it must.

``daemon`` (the supervisor: connect, reconnect, exit status) runs a ``session`` per connection, whose start is
``startup``'s decision, whose unacknowledged batches are ``inflight``'s and whose scans are ``scans``' (through
``bdr.scan``'s window pipeline).  A record's slot is released only when the server acknowledged it durable, so
after a disconnect or a server crash the client resends from the server's last durable sequence number; when the
ring cannot provide what the server needs (overflow, records already gone, a different source or ring, an
interrupted scan) the client resyncs with a scan instead of losing writes.  Without a ring, ``oneshot`` syncs a
device or image by one scan and exits.
"""

from .daemon import Client as Client
from .daemon import main as main
from .errors import ClientError as ClientError
from .errors import SourceError as SourceError
from .errors import Stopping as Stopping
from .options import DEFAULT_PORT as DEFAULT_PORT
from .options import build_parser as build_parser
from .session import ClientSession as ClientSession
