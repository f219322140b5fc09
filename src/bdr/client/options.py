"""The client daemon's command line and configuration: its flags (``--config`` TOML files use the same names)
and the TLS context and shared secret they name."""

from __future__ import annotations

import argparse
import logging
import ssl

from .. import status
from ..daemon.options import add_output_options, add_service_options, check_key_pair, load_secret
from ..security import tls
from .errors import ClientError

log = logging.getLogger("bdr.client")

DEFAULT_PORT = 7788


def load_security(args: argparse.Namespace) -> tuple[ssl.SSLContext | None, bytes | None]:
    """The TLS context and the shared secret from the flags; ClientError if they do not fit together."""
    for name in (
        "tls_cert",
        "tls_key",
        "tls_ca",
        "tls_server_name",
        "secret_file",
    ):  # callers that build args
        if not hasattr(args, name):
            setattr(args, name, None)
    check_key_pair(args, ClientError)
    if (args.tls_cert or args.tls_server_name) and not args.tls_ca:
        raise ClientError("TLS needs --tls-ca, the CA that issued the server's certificate")
    ctx = None
    try:
        if args.tls_ca:
            ctx = tls.client_context(args.tls_ca, args.tls_cert, args.tls_key)
    except tls.TlsError as exc:
        raise ClientError(str(exc)) from exc
    secret = load_secret(args, ClientError)
    return ctx, secret


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bdr_client",
        description="BDR client daemon: ships every write captured by the bdr device-mapper target to bdr_server, "
        "so the replica stays a crash-consistent copy of the source.  At start it resumes where the server's "
        "replica is durable if the ring still holds those writes, otherwise it resyncs with a checksum scan.",
        epilog="Exit status: 0 after a clean stop (SIGTERM / SIGINT), 2 for a usage or configuration error, "
        "3 when the server refuses the source for good (replica too small, protocol version), 4 when the source "
        "device cannot be read during a scan.",
    )
    ap.add_argument("--address", required=True, help="server (receiver) IP address or host name (required)")
    ap.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"server TCP port (default {DEFAULT_PORT})"
    )
    ap.add_argument(
        "--control-device",
        default=None,
        help="BDR control character device /dev/<name> of the target; a ring file with the same layout is "
        "accepted too (tests, benchmarks).  Without it: one-shot mode, a scan-based sync of --source-device (any "
        "device or image file) that exits 0 once the replica is identical",
    )
    ap.add_argument(
        "--source-device",
        required=True,
        help="the BDR device-mapper device /dev/mapper/<name> (required); scans read it",
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument(
        "--full-scan",
        action="store_true",
        help="at start, compare every block of source and replica by checksum and send the differing ones "
        "directly to the replica (it is inconsistent until the scan ends)",
    )
    mode.add_argument(
        "--full-replication",
        action="store_true",
        help="at start, send the whole source device (initial seeding of a new replica)",
    )
    mode.add_argument(
        "--no-replication",
        action="store_true",
        help="at start, skip the initial scan and only stream new writes (the replica must already equal the source)",
    )
    ap.add_argument(
        "--journal-full",
        choices=("direct", "stop"),
        default="direct",
        help="when the server's journal is too small to stage a resync (the replica would stay the old "
        "consistent state until the commit): 'direct' (default) resyncs again writing the replica directly, so "
        "it converges but is inconsistent until the scan ends; 'stop' exits with status 3 and leaves the "
        "replica as it is",
    )
    ap.add_argument(
        "--metadata",
        metavar="FILE",
        help="the source's metadata file: its generation history, created at the first start (keep it with the "
        "source; bdr promote writes it on a promoted replica).  With it the server refuses a split brain and "
        "resyncs a replica that is behind after a failback; without it generations are not checked",
    )
    add_output_options(
        ap,
        verbose="log connections, resumes, scans and flushes, one line each",
        debug="log every batch and acknowledgement (very chatty)",
        benchmark="print throughput, record rate and lag (records captured but not yet sent / not yet durable) every second",
    )
    sec = ap.add_argument_group(
        "security", "Use the same scheme as the server: mutual TLS and/or a shared secret (docs: Security)."
    )
    sec.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="TLS: connect with TLS and accept only a server certificate this CA issued (PEM)",
    )
    sec.add_argument("--tls-cert", metavar="FILE", help="TLS: our client certificate (PEM), for mutual TLS")
    sec.add_argument("--tls-key", metavar="FILE", help="TLS: the private key of --tls-cert (PEM)")
    sec.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="TLS: the name the server certificate must carry (default: --address)",
    )
    sec.add_argument(
        "--secret-file",
        metavar="FILE",
        help="shared secret, the same file as the server's: both sides prove they know it; it never crosses "
        "the network",
    )
    add_service_options(
        ap,
        "bdr_client",
        f"control socket for bdr status and bdr verify (default {status.RUN_DIR}/client-<chardev>.sock)",
        "127.0.0.1:9788",
    )
    return ap
