"""The server's security settings from its flags: TLS context, shared secret, and the refusal to accept
unauthenticated clients on a non-loopback address."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import ssl

from ..daemon.options import check_key_pair, load_secret
from ..security import auth, tls
from .errors import ServerError

log = logging.getLogger("bdr.server")


def is_loopback(address: str) -> bool:
    """Whether every address ``address`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(address, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    try:
        return bool(infos) and all(
            ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos
        )
    except ValueError:
        return False


def load_security(args: argparse.Namespace) -> tuple[ssl.SSLContext | None, bytes | None, bytes]:
    """The TLS context, the shared secret and the TLS channel binding from the flags; ServerError if they do
    not fit together or if the server would accept unauthenticated clients on a non-loopback address."""
    for name in ("tls_cert", "tls_key", "tls_ca", "secret_file", "insecure"):  # callers that build args
        if not hasattr(args, name):
            setattr(args, name, False if name == "insecure" else None)
    check_key_pair(args, ServerError)
    if args.tls_ca and not args.tls_cert:
        raise ServerError("--tls-ca (check client certificates) needs TLS: give --tls-cert and --tls-key too")
    ctx = None
    binding = b""
    try:
        if args.tls_cert:
            ctx = tls.server_context(args.tls_cert, args.tls_key, args.tls_ca)
            binding = auth.server_end_point(tls.first_cert_der(args.tls_cert))
    except tls.TlsError as exc:
        raise ServerError(str(exc)) from exc
    secret = load_secret(args, ServerError)
    authenticated = bool(args.tls_ca) or secret is not None
    if not authenticated and not is_loopback(args.address):
        if not args.insecure:
            raise ServerError(
                f"refusing to listen on {args.address} without client authentication: anyone who reaches this "
                "port could overwrite the replica. Give --tls-cert, --tls-key and --tls-ca (mutual TLS; "
                "'bdr certs' creates the files) and/or --secret-file (shared secret; 'bdr secret' creates one), "
                "or --insecure on a network you fully trust."
            )
        log.warning(
            "--insecure: accepting unauthenticated clients on %s; anyone who reaches this port can "
            "overwrite the replica",
            args.address,
        )
    if secret is not None and ctx is None and not is_loopback(args.address):
        log.warning(
            "shared secret without TLS: clients are authenticated, but the data crosses the network "
            "unencrypted and unprotected after the handshake (add --tls-cert/--tls-key)"
        )
    return ctx, secret, binding
