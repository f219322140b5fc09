"""TLS for the daemons, with the standard ``ssl`` module: contexts, a handshake that honours a deadline and a
stop request, the socket adapter the client streams through, and the server's TLS connection.

* TLS 1.3 only: both ends are BDR, so there is no older peer to talk to.
* Server: ``--tls-cert`` / ``--tls-key``; with ``--tls-ca`` every client must present a certificate issued by
  that CA for client authentication (mutual TLS).  No session tickets (a daemon reconnects rarely).
* Client: ``--tls-ca`` verifies the server certificate and its name (``--tls-server-name``, default the
  ``--address``); ``--tls-cert`` / ``--tls-key`` is the client certificate the server checks.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

COALESCE = 64 * 1024  # gathered pieces smaller than this are copied into one TLS write
READ_CHUNK = 128 * 1024  # ciphertext the server takes from the socket per recv (8 records; stays in cache)


class TlsError(Exception):
    """A TLS file cannot be used: the message names the file and the reason."""


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise TlsError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"cannot use certificate {cert} with key {key}: {exc}") from exc


def _load_ca(ctx: ssl.SSLContext, ca: str) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except FileNotFoundError as exc:
        raise TlsError(f"cannot read CA file {ca}: {exc.strerror}") from exc
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"cannot use CA file {ca}: {exc}") from exc


def server_context(cert: str, key: str, ca: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.num_tickets = 0
    _load_chain(ctx, cert, key)
    if ca is not None:
        _load_ca(ctx, ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: str, cert: str | None, key: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and the host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    _load_ca(ctx, ca)
    if cert is not None and key is not None:
        _load_chain(ctx, cert, key)
    return ctx


def first_cert_der(path: str) -> bytes:
    """The first certificate of a PEM file (the server's own, for the channel binding), in DER."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        raise TlsError(f"cannot read certificate {path}: {exc.strerror}") from exc
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    i = text.find(begin)
    j = text.find(end, i)
    if i < 0 or j < 0:
        raise TlsError(f"{path} holds no PEM certificate")
    return ssl.PEM_cert_to_DER_cert(text[i : j + len(end)] + "\n")


def handshake(
    ssock: ssl.SSLSocket, timeout: float, stop: Callable[[], bool] = lambda: False, slice_s: float = 0.2
) -> None:
    """Run the TLS handshake of a non-blocking SSL socket within ``timeout`` seconds.

    Raises TimeoutError when the peer is too slow (or silent), InterruptedError when ``stop()`` turns true,
    ssl.SSLError / OSError when the handshake fails."""
    ssock.setblocking(False)
    deadline = time.monotonic() + timeout
    while True:
        try:
            ssock.do_handshake()
            return
        except ssl.SSLWantReadError:
            events = select.POLLIN
        except ssl.SSLWantWriteError:
            events = select.POLLOUT
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"TLS handshake not finished within {timeout:.0f}s")
        if stop():
            raise InterruptedError("stopping")
        poller = select.poll()
        poller.register(ssock.fileno(), events)
        poller.poll(int(min(left, slice_s) * 1000) + 1)


def peer_subject(ssock: ssl.SSLSocket | ServerTls) -> str:
    """The peer certificate's subject common name, for log lines ("" without a certificate)."""
    cert = ssock.getpeercert()
    if not cert:
        return ""
    subject: Any = cert.get("subject", ())
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return "?"


def describe(exc: BaseException) -> str:
    """A TLS failure in words an operator can act on."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        hints = {
            "WRONG_VERSION_NUMBER": "the peer does not speak TLS (is TLS configured on both sides?)",
            "HTTP_REQUEST": "the peer does not speak TLS",
            "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate (--tls-cert, --tls-key)",
            "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate (--tls-cert, --tls-key)",
            "SSLV3_ALERT_BAD_CERTIFICATE": "the peer rejected our certificate",
            "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust the CA that issued our certificate",
            "CERTIFICATE_VERIFY_FAILED": "the peer's certificate is not trusted",
            "UNSUPPORTED_PROTOCOL": "the peer does not speak TLS 1.3",
            "TLSV1_ALERT_PROTOCOL_VERSION": "the peer does not speak TLS 1.3",
        }
        return f"{reason}: {hints[reason]}" if reason in hints else reason
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def pending(sock: object) -> int:
    """Bytes a TLS connection holds that poll() on its descriptor cannot see (0 for plain sockets)."""
    return sock.pending() if isinstance(sock, (ssl.SSLSocket, ServerTls)) else 0


class ServerTls:
    """The server end of a TLS connection, over memory BIOs on a non-blocking socket.

    An SSL socket reads each 16 KiB record with two recv calls (header, then body), and the receive loop
    polls between records: three system calls per record, a third of the server's TLS cost.  Here one recv
    takes up to READ_CHUNK bytes of ciphertext, and the records in it are decrypted straight into the
    caller's buffer.  Blocking calls give up after ``settimeout`` seconds without progress (TimeoutError)."""

    def __init__(self, raw: socket.socket, ctx: ssl.SSLContext) -> None:
        self.raw = raw
        raw.setblocking(False)
        self.timeout: float | None = None
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self._in, self._out, server_side=True)
        self._chunk = memoryview(bytearray(READ_CHUNK))

    def fileno(self) -> int:
        return self.raw.fileno()

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout

    def version(self) -> str | None:
        return self.obj.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self.obj.cipher()

    def getpeercert(self) -> Any:
        return self.obj.getpeercert()

    def pending(self) -> int:
        """Decrypted bytes, plus ciphertext already taken from the socket."""
        return self.obj.pending() + self._in.pending

    def handshake(
        self, timeout: float, stop: Callable[[], bool] = lambda: False, slice_s: float = 0.2
    ) -> None:
        """The TLS handshake within ``timeout`` seconds; an alert that ends it badly is sent before raising.
        Raises like ``handshake()``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.obj.do_handshake()
                self._flush(deadline)
                return
            except ssl.SSLWantReadError:
                self._flush(deadline)
            except ssl.SSLError:
                with contextlib.suppress(OSError, TimeoutError):
                    self._flush(time.monotonic() + 1.0)
                raise
            while not self._fill() and not self._in.eof:  # at the end, do_handshake raises SSLEOFError
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"TLS handshake not finished within {timeout:.0f}s")
                if stop():
                    raise InterruptedError("stopping")
                self._wait(select.POLLIN, min(left, slice_s))

    def recv_into(self, view: memoryview) -> int:
        """Decrypted bytes into ``view``: at least one unless the peer closed (0), and as many as the socket
        already holds, up to ``len(view)``."""
        n, size = 0, len(view)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while n < size:
            try:
                k: int = self.obj.read(size - n, view[n:])  # type: ignore[assignment]  # with a buffer: a count
            except ssl.SSLWantReadError:
                k = -1
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # close_notify, or the peer just closed
                return n
            if k == 0:
                return n
            if k > 0:
                n += k
                continue
            if self._fill():
                continue
            if n or self._in.eof:
                return n
            if not self._wait(select.POLLIN, None if deadline is None else deadline - time.monotonic()):
                raise TimeoutError(f"no data for {self.timeout:.0f}s")
        if self._out.pending:  # a reply the TLS layer owes the peer (a key update)
            self._flush(None if deadline is None else deadline + 1.0)
        return n

    def sendall(self, data: bytes | memoryview) -> None:
        self.obj.write(data)
        self._flush(None if self.timeout is None else time.monotonic() + self.timeout)

    def close(self) -> None:
        self.raw.close()

    def _fill(self) -> bool:
        """Move the ciphertext the socket holds into the TLS object; False if there was none."""
        try:
            n = self.raw.recv_into(self._chunk)
        except (BlockingIOError, InterruptedError):
            return False
        if n == 0:
            self._in.write_eof()
            return False
        self._in.write(self._chunk[:n])
        return True

    def _flush(self, deadline: float | None) -> None:
        """Send what the TLS object has produced."""
        if not self._out.pending:
            return
        view = memoryview(self._out.read())
        while view:
            try:
                view = view[self.raw.send(view) :]
            except (BlockingIOError, InterruptedError):
                if not self._wait(select.POLLOUT, None if deadline is None else deadline - time.monotonic()):
                    raise TimeoutError("the peer reads nothing: send timed out") from None

    def _wait(self, events: int, left: float | None) -> bool:
        """Wait up to ``left`` seconds (None: for ever) for the socket to be ready; False on timeout."""
        if left is not None and left <= 0:
            return False
        poller = select.poll()
        poller.register(self.raw.fileno(), events)
        return bool(poller.poll(None if left is None else int(left * 1000) + 1))


class TlsStream:
    """An SSL socket with the calls the client session makes on a plain one: ``sendmsg`` of gathered views
    (SSL sockets have none; small pieces are coalesced into one TLS write) and ``recv_into`` honouring
    ``MSG_DONTWAIT``.  Sends and receives give up after ``timeout`` seconds without progress (TimeoutError)."""

    def __init__(self, ssock: ssl.SSLSocket, timeout: float) -> None:
        self.ssock = ssock
        self.timeout = timeout
        ssock.settimeout(timeout)
        self._stage = bytearray()

    def fileno(self) -> int:
        return self.ssock.fileno()

    def sendmsg(self, bufs: Iterable[memoryview | bytes]) -> int:
        total = 0
        stage = self._stage
        for b in bufs:
            n = len(b) if isinstance(b, bytes) else b.nbytes
            if n < COALESCE:
                stage += b
            else:
                if stage:
                    self.ssock.sendall(stage)
                    stage.clear()
                self.ssock.sendall(b)
            total += n
        if stage:
            self.ssock.sendall(stage)
            stage.clear()
        return total

    def sendall(self, data: bytes | memoryview) -> None:
        self.ssock.sendall(data)

    def recv_into(self, buf: memoryview, nbytes: int = 0, flags: int = 0) -> int:
        if not flags & socket.MSG_DONTWAIT:
            return self.ssock.recv_into(buf, nbytes)
        self.ssock.settimeout(0.0)
        try:
            return self.ssock.recv_into(buf, nbytes)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError("no data") from None
        finally:
            self.ssock.settimeout(self.timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.ssock.close()
