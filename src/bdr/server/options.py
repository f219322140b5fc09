"""The bdr_server command line, and main."""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable

from .. import config, status
from ..daemon.options import add_output_options, add_service_options
from ..journal import FaultPlan
from ..log import setup_logging
from .daemon import Server
from .errors import ServerError

log = logging.getLogger("bdr.server")


DEFAULT_PORT = 7788
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """A size in bytes: 1073741824, 512M, 10G, 1T (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use bytes or a size such as 512M, 10G")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


def parse_age(text: str) -> float:
    """A duration in seconds: 3600, 90m, 12h, 7d, 2w."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use seconds or 90m, 12h, 7d, 2w")
    return float(m.group(1)) * _AGE_UNITS[m.group(2)]


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
    ap.add_argument(
        "--discard-local-changes",
        action="store_true",
        help="after a split brain (both sides written since they last agreed), this replica is the side that "
        "loses: the client's source is resynced over it.  Only for the connection the operator chose; without "
        "it a split brain is refused and nothing is written",
    )
    hist = ap.add_argument_group(
        "point-in-time history",
        "Keep what each write overwrites, with a checkpoint at each durability point of the source (flush or "
        "FUA), so that bdr restore and bdr rollback can give back the replica as it was at any checkpoint the "
        "history still holds.  The oldest checkpoints are dropped first.",
    )
    hist.add_argument(
        "--history",
        metavar="DIR",
        help="directory of the history (created if missing; one per replica)",
    )
    hist.add_argument(
        "--history-size",
        type=parse_size,
        metavar="BYTES",
        help="keep at most this much history (e.g. 20G; at least 16M)",
    )
    hist.add_argument(
        "--history-age",
        type=parse_age,
        metavar="DURATION",
        help="drop history older than this (e.g. 7d, 12h, 90m)",
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
