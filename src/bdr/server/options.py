"""The bdr_server command line, and main."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from .. import config, status
from ..daemon.options import add_output_options, add_service_options
from ..journal import FaultPlan
from ..log import setup_logging
from .daemon import Server
from .errors import ServerError

log = logging.getLogger("bdr.server")


DEFAULT_PORT = 7788


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bdr_server",
        description="BDR server daemon: receives the writes captured on the source and applies them to a replica "
        "device, keeping the replica a crash-consistent copy of the source.",
        epilog="Exit status: 0 after a clean stop (SIGTERM / SIGINT), 2 for a usage or configuration error "
        "(including a refused insecure set-up), 4 after a replica or journal I/O error (the replica is marked "
        "inconsistent; fix the device, then start again).",
    )
    ap.add_argument("--address", required=True, help="IP address to listen on (required), e.g. 0.0.0.0 or ::")
    ap.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"TCP port to listen on (default {DEFAULT_PORT})"
    )
    ap.add_argument(
        "--target-device",
        required=True,
        help="replica: block device or image file the writes are applied to (required); it must be at least as "
        "large as the source",
    )
    ap.add_argument(
        "--journal",
        required=True,
        help="journal: block device or file holding the replica metadata (source identity, last durable "
        "sequence number, consistency); a missing file is created (required)",
    )
    ap.add_argument(
        "--journal-size",
        type=int,
        default=None,
        metavar="BYTES",
        help="largest size of a journal file (headers and the staged records of a resync; default: the file "
        "grows as needed; a journal device is as large as the device)",
    )
    add_output_options(
        ap,
        verbose="log connections, scans and resyncs, one line each",
        debug="log every frame and durability point (very chatty)",
        benchmark="print applied throughput, record rate and sync figures every second",
    )
    sec = ap.add_argument_group(
        "security",
        "A server on a non-loopback address must authenticate its clients: mutual TLS (--tls-cert, --tls-key, "
        "--tls-ca) and/or a shared secret (--secret-file); otherwise it refuses to start unless --insecure.",
    )
    sec.add_argument(
        "--tls-cert", metavar="FILE", help="TLS: this server's certificate (PEM, may hold the chain)"
    )
    sec.add_argument("--tls-key", metavar="FILE", help="TLS: the private key of --tls-cert (PEM)")
    sec.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="TLS: accept only clients whose certificate this CA issued (PEM; mutual TLS)",
    )
    sec.add_argument(
        "--secret-file",
        metavar="FILE",
        help="shared secret (at least 16 bytes; 'bdr secret FILE' makes one): clients must prove they know it "
        "and the server proves it too; the secret never crosses the network",
    )
    sec.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --address without client authentication (trusted, isolated networks only)",
    )
    add_service_options(
        ap,
        "bdr_server",
        f"control socket for bdr status (default {status.RUN_DIR}/server-<port>.sock)",
        "127.0.0.1:9789",
    )
    return ap


def main(argv: list[str] | None = None, ready: Callable[[Server], None] | None = None) -> int:
    args = config.parse_args(build_parser(), argv)
    setup_logging("bdr_server", args.verbose, args.debug, args.no_print)
    if not 0 < args.port < 65536:
        log.error("--port %d is not a TCP port", args.port)
        return 2
    try:
        server = Server(args, FaultPlan.from_environment())  # crash points: only the crash tests set them
    except ServerError as exc:
        log.error("%s", exc)
        return 2
    try:
        server.install_signals()  # before listening: whoever can connect can also stop us cleanly
        server.listen()
        server.open_status()
        if ready is not None:
            ready(server)
        return server.run()
    except ServerError as exc:
        log.error("%s", exc)
        return 2
    finally:
        server.close()
