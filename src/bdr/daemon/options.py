"""The command-line pieces both daemons have: output flags, the status / metrics / config / version flags, and
the shared secret and TLS key pair their security flags name."""

from __future__ import annotations

import argparse
import logging

from ..security import auth

log = logging.getLogger("bdr")


def add_output_options(ap: argparse.ArgumentParser, verbose: str, debug: str, benchmark: str) -> None:
    """--no-print, --verbose, --debug, --benchmark (the help of the last three says what this daemon logs)."""
    ap.add_argument(
        "--no-print", action="store_true", help="disable standard output (errors still go to stderr)"
    )
    ap.add_argument("--verbose", action="store_true", help=verbose)
    ap.add_argument("--debug", action="store_true", help=debug)
    ap.add_argument("--benchmark", action="store_true", help=benchmark)


def add_service_options(
    ap: argparse.ArgumentParser, prog: str, status_help: str, metrics_example: str
) -> None:
    """--status-socket, --metrics-address, --config and --version."""
    ap.add_argument("--status-socket", metavar="PATH", help=status_help)
    ap.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help=f"serve Prometheus metrics at http://HOST:PORT/metrics (for example {metrics_example})",
    )
    ap.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file with any of these options (keys are the long flag names); flags given here override it",
    )
    from .. import __version__

    ap.add_argument("--version", action="version", version=f"{prog} {__version__}")


def check_key_pair(args: argparse.Namespace, error: type[Exception]) -> None:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise error("--tls-cert and --tls-key go together")


def load_secret(args: argparse.Namespace, error: type[Exception]) -> bytes | None:
    """The shared secret of --secret-file (None without it); ``error`` if it cannot be used."""
    if not args.secret_file:
        return None
    try:
        secret, warning = auth.load_secret(args.secret_file)
    except auth.SecretError as exc:
        raise error(str(exc)) from exc
    if warning:
        log.warning("%s", warning)
    return secret
