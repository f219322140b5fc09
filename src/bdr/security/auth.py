"""Shared-secret authentication: a mutual challenge-response bound to the connection.  No sockets here.

Both daemons read the same secret file (``--secret-file``).  The secret never crosses the wire; each side
proves it knows it with an HMAC-SHA256 over a transcript of the exchange::

    client                                                     server
    AUTH_BEGIN(flags, methods, nonce_c)           ------------->
                                                  <-------------  AUTH_CHALLENGE(method, flags, nonce_s)
    AUTH_PROOF(mac_c)                              ------------->  checks mac_c (constant time)
                                                  <-------------  AUTH_OK(mac_s) | ERROR(AUTH_FAILED)
    checks mac_s, then HELLO ...

    transcript = AUTH_BEGIN frame || AUTH_CHALLENGE frame          (both nonces, versions, flags, method)
    binding    = "tls-server-end-point:" || SHA-256(server certificate, DER)   with TLS, else empty
    mac_c = HMAC-SHA256(secret, "BDR auth v1 client\\0" || u32 len || transcript || u32 len || binding)
    mac_s = HMAC-SHA256(secret, "BDR auth v1 server\\0" || u32 len || transcript || u32 len || binding || mac_c)

Fresh 32-byte nonces from both sides make every proof single-use: a recorded proof is worthless on another
connection, and neither side can be made to compute the other's proof (the labels differ).  The server answers
only after the client proved itself, so a connecting stranger learns nothing it could test guesses against.
With TLS the binding is the RFC 5929 ``tls-server-end-point`` value (it works with TLS 1.3, unlike
``tls-unique``): a man in the middle who terminates TLS with another certificate cannot relay the proofs.

Without TLS the secret authenticates the peers but protects neither the secrecy nor the integrity of what
follows the exchange; docs/bdr-user-manual.md says so.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .. import wire as p

SECRET_MIN = 16  # bytes; `bdr secret` writes 32 random bytes as 64 hex digits
SECRET_MAX = 4096
_LABEL_CLIENT = b"BDR auth v1 client\0"
_LABEL_SERVER = b"BDR auth v1 server\0"
_LEN = struct.Struct("<I")


class SecretError(Exception):
    """The secret file cannot be used; the message says why and how to fix it."""


def load_secret(path: str | os.PathLike[str]) -> tuple[bytes, str | None]:
    """The secret in ``path`` (surrounding whitespace stripped) and a warning if others may read the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise SecretError(f"secret file {path} is not a regular file")
            data = f.read(SECRET_MAX + 1)
    except OSError as exc:
        raise SecretError(f"cannot read secret file {path}: {exc.strerror}") from exc
    if len(data) > SECRET_MAX:
        raise SecretError(f"secret file {path} is larger than {SECRET_MAX} bytes: is it the right file?")
    secret = data.strip()
    if len(secret) < SECRET_MIN:
        raise SecretError(
            f"secret in {path} has {len(secret)} bytes, needs at least {SECRET_MIN}: "
            "create one with 'bdr secret FILE' (32 random bytes)"
        )
    warning = None
    if st.st_mode & 0o077:
        warning = f"secret file {path} is readable by others (mode {st.st_mode & 0o777:o}): chmod 600 it"
    return secret, warning


def new_secret() -> bytes:
    """A secret for a new file: 32 random bytes as hex, newline-terminated."""
    return secrets.token_hex(32).encode() + b"\n"


def server_end_point(cert_der: bytes) -> bytes:
    """The TLS channel binding both sides can compute: the server certificate's SHA-256 (RFC 5929)."""
    return b"tls-server-end-point:" + hashlib.sha256(cert_der).digest()


def _mac(secret: bytes, label: bytes, transcript: bytes, binding: bytes, extra: bytes = b"") -> bytes:
    msg = label + _LEN.pack(len(transcript)) + transcript + _LEN.pack(len(binding)) + binding + extra
    return hmac.new(secret, msg, hashlib.sha256).digest()


def client_mac(secret: bytes, transcript: bytes, binding: bytes) -> bytes:
    return _mac(secret, _LABEL_CLIENT, transcript, binding)


def server_mac(secret: bytes, transcript: bytes, binding: bytes, client_proof: bytes) -> bytes:
    return _mac(secret, _LABEL_SERVER, transcript, binding, client_proof)


def _failed(message: str) -> p.RemoteProtocolError:
    return p.RemoteProtocolError(p.ErrorCode.AUTH_FAILED, message)


def _flags(binding: bytes) -> p.AuthFlag:
    return p.AuthFlag.TLS_BOUND if binding else p.AuthFlag.NONE


@dataclass
class ServerAuth:
    """The server's side of one exchange.  ``binding``: the TLS channel binding, or b"" without TLS."""

    secret: bytes
    binding: bytes = b""
    _begin: p.AuthBegin | None = None
    _challenge: p.AuthChallenge | None = None
    done: bool = False

    def on_begin(self, msg: p.AuthBegin) -> p.AuthChallenge:
        if not msg.methods & p.AuthMethod.HMAC_SHA256:
            raise _failed(f"the client offers authentication methods {msg.methods:#x}, this server knows 0x1")
        if bool(msg.flags & p.AuthFlag.TLS_BOUND) != bool(self.binding):
            raise _failed(
                "the client and the server disagree about TLS (one side sees a TLS connection, the other not): "
                "is something in between terminating TLS?"
            )
        self._begin = msg
        self._challenge = p.AuthChallenge(
            p.AuthMethod.HMAC_SHA256, _flags(self.binding), secrets.token_bytes(32)
        )
        return self._challenge

    def on_proof(self, msg: p.AuthProof) -> p.AuthOk:
        assert self._begin is not None and self._challenge is not None  # the Connection enforces the order
        transcript = p.encode(self._begin) + p.encode(self._challenge)
        if not hmac.compare_digest(client_mac(self.secret, transcript, self.binding), msg.mac):
            raise _failed(
                "wrong shared secret: the client's proof does not match (compare the --secret-file files)"
            )
        self.done = True
        return p.AuthOk(server_mac(self.secret, transcript, self.binding, msg.mac))


@dataclass
class ClientAuth:
    """The client's side of one exchange.  ``binding``: the TLS channel binding, or b"" without TLS."""

    secret: bytes
    binding: bytes = b""
    _begin: p.AuthBegin | None = None
    _transcript: bytes = b""
    _proof: bytes = b""
    nonce: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    done: bool = False

    def begin(self) -> p.AuthBegin:
        self._begin = p.AuthBegin(
            p.PROTOCOL_VERSION, _flags(self.binding), int(p.AuthMethod.HMAC_SHA256), self.nonce
        )
        return self._begin

    def on_challenge(self, msg: p.AuthChallenge) -> p.AuthProof:
        assert self._begin is not None
        if bool(msg.flags & p.AuthFlag.TLS_BOUND) != bool(self.binding):
            raise _failed(
                "the client and the server disagree about TLS (one side sees a TLS connection, the other not): "
                "is something in between terminating TLS?"
            )
        if msg.nonce == self.nonce:
            raise _failed("the server echoed our nonce")
        self._transcript = p.encode(self._begin) + p.encode(msg)
        self._proof = client_mac(self.secret, self._transcript, self.binding)
        return p.AuthProof(self._proof)

    def on_ok(self, msg: p.AuthOk) -> None:
        assert self._proof
        want = server_mac(self.secret, self._transcript, self.binding, self._proof)
        if not hmac.compare_digest(want, msg.mac):
            raise _failed(
                "the server's proof does not match: it does not know the shared secret (wrong server, or "
                "someone in between)"
            )
        self.done = True
