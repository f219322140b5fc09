"""``bdr export``: a past moment served read-only over NBD, the network block device protocol, without copying
the device: the kernel's NBD client (``nbd-client``) shows it as /dev/nbdN, to mount read-only and copy files
from, while replication goes on.  The bytes come from a PointView (view.py).

The server speaks the fixed newstyle handshake (NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_EXPORT_NAME, NBD_OPT_ABORT)
and simple replies; it offers one export, read-only (writes and trims are refused with EPERM).  A read the
view can no longer give (the point left the history) fails with EIO, and the reason is logged.
"""

from __future__ import annotations

import errno
import logging
import socket
import socketserver
import struct
import threading
from collections.abc import Callable

from .view import PointView, ViewGone

log = logging.getLogger("bdr")

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2  # handshake flags (the client's NO_ZEROES has the same value)
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN = (1 << 31) + 1, (1 << 31) + 3, (1 << 31) + 6
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
TFLAG_HAS_FLAGS, TFLAG_READ_ONLY, TFLAG_CAN_MULTI_CONN = 1, 2, 1 << 8
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4

TRANSMISSION_FLAGS = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN
READ_MAX = 32 << 20  # the largest read served (told to clients as the maximum block size)
_OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
_REPLY = struct.Struct(">IIQ")  # magic, error, handle


class Export:
    """The moment of ``view`` offered as the NBD export ``name`` (a client may also ask for the default, "")."""

    def __init__(self, view: PointView, name: str) -> None:
        self.view = view
        self.name = name
        self.lock = threading.Lock()  # the view reads and extends its map one read at a time
        self.reported: str | None = None

    def read(self, offset: int, length: int) -> bytes | int:
        """The bytes, or an errno for the client."""
        if offset + length > self.view.size or length > READ_MAX:
            return errno.EINVAL
        try:
            with self.lock:
                return self.view.read(offset, length)
        except ViewGone as exc:
            if self.reported != str(exc):
                self.reported = str(exc)
                log.error("export %s: %s; reads fail from now on", self.name, exc)
            return errno.EIO
        except Exception as exc:  # a client gets an error for its read, whatever went wrong
            log.error("export %s: reading %d bytes at byte %d failed: %s", self.name, length, offset, exc)
            err = getattr(exc, "errno", None)
            return err if err in (errno.ENOMEM, errno.EOVERFLOW, errno.ESHUTDOWN) else errno.EIO

    # -- one client ---------------------------------------------------------------------------------------------

    def serve(self, conn: socket.socket, peer: str) -> None:
        """The handshake, then requests until the client disconnects."""
        conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", _recv(conn, 4))
        if not self._negotiate(conn, bool(client_flags & FLAG_NO_ZEROES)):
            return
        log.info("export %s: %s connected", self.name, peer)
        self._transmit(conn)
        log.info("export %s: %s disconnected", self.name, peer)

    def _negotiate(self, conn: socket.socket, no_zeroes: bool) -> bool:
        """Options until the client chooses the export (True) or aborts (False)."""
        while True:
            magic, opt, n = _OPTION.unpack(_recv(conn, _OPTION.size))
            if magic != IHAVEOPT:
                raise ConnectionError("not an NBD client (bad option magic)")
            if n > 4096:
                raise ConnectionError(f"option {opt} of {n} bytes")
            data = _recv(conn, n)

            def reply(kind: int, payload: bytes = b"", opt: int = opt) -> None:
                conn.sendall(_OPT_REPLY.pack(OPT_REPLY_MAGIC, opt, kind, len(payload)) + payload)

            if opt == OPT_EXPORT_NAME:
                if data.decode(errors="replace") not in ("", self.name):
                    raise ConnectionError(f"no export {data!r}")
                conn.sendall(
                    struct.pack(">QH", self.view.size, TRANSMISSION_FLAGS)
                    + (b"" if no_zeroes else bytes(124))
                )
                return True
            if opt == OPT_ABORT:
                reply(REP_ACK)
                return False
            if opt == OPT_LIST:
                ours = self.name.encode()
                reply(REP_SERVER, struct.pack(">I", len(ours)) + ours)
                reply(REP_ACK)
            elif opt in (OPT_INFO, OPT_GO):
                if len(data) < 6:
                    reply(REP_ERR_INVALID)
                    continue
                (k,) = struct.unpack_from(">I", data)
                if 4 + k + 2 > len(data):
                    reply(REP_ERR_INVALID)
                    continue
                name = data[4 : 4 + k].decode(errors="replace")
                asked = data[6 + k :]
                wants = set(struct.unpack(f">{len(asked) // 2}H", asked[: len(asked) // 2 * 2]))
                if name not in ("", self.name):
                    reply(REP_ERR_UNKNOWN, f"no export {name!r}; this server offers {self.name!r}".encode())
                    continue
                reply(REP_INFO, struct.pack(">HQH", INFO_EXPORT, self.view.size, TRANSMISSION_FLAGS))
                if INFO_BLOCK_SIZE in wants:
                    reply(REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, READ_MAX))
                reply(REP_ACK)
                if opt == OPT_GO:
                    return True
            else:
                reply(REP_ERR_UNSUP)

    def _transmit(self, conn: socket.socket) -> None:
        while True:
            try:
                magic, _flags, cmd, handle, offset, length = _REQUEST.unpack(_recv(conn, _REQUEST.size))
            except ConnectionError:
                return  # the client went without NBD_CMD_DISC
            if magic != REQUEST_MAGIC:
                raise ConnectionError("bad request magic")
            if cmd == CMD_DISC:
                return
            if cmd == CMD_READ:
                got = self.read(offset, length)
                if isinstance(got, int):
                    conn.sendall(_REPLY.pack(SIMPLE_REPLY_MAGIC, got, handle))
                else:
                    conn.sendall(_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle) + got)
                continue
            if (
                cmd == CMD_WRITE
            ):  # its data is read and dropped, and the write refused: the export is read-only
                if length > READ_MAX:
                    raise ConnectionError(f"a write of {length} bytes")
                _recv(conn, length)
            err = 0 if cmd == CMD_FLUSH else errno.EPERM if cmd in (CMD_WRITE, CMD_TRIM) else errno.EINVAL
            conn.sendall(_REPLY.pack(SIMPLE_REPLY_MAGIC, err, handle))


def _recv(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the client closed the connection")
        buf += chunk
    return bytes(buf)


def make_server(export: Export, listen: str) -> socketserver.BaseServer:
    """A server for ``export`` on ``listen``: HOST:PORT (TCP), or the path of a Unix socket."""
    handler = _handler(export)
    if listen.startswith("/"):
        return _UnixServer(listen, handler)
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--listen {listen!r}: give HOST:PORT or the path of a Unix socket")
    host = host.strip("[]")
    cls = _TCPServer6 if ":" in host else _TCPServer
    return cls((host, int(port)), handler)


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class _TCPServer6(_TCPServer):
    address_family = socket.AF_INET6


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


def _handler(export: Export) -> Callable[..., socketserver.BaseRequestHandler]:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            conn: socket.socket = self.request
            peer = str(self.client_address) if self.client_address else "a local client"
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                export.serve(conn, peer)
            except (ConnectionError, OSError) as exc:
                log.warning("export %s: %s: %s", export.name, peer, exc)

    return Handler
