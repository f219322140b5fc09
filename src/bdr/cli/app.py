"""The ``bdr`` command line: its parser, and main, which dispatches to each command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bdr import status as daemon_status
from bdr.kernel import abi

from . import targets
from .targets import SetupError, SetupPlan, parse_buffer


def _daemon_options(p: argparse.ArgumentParser, json_help: str) -> None:
    """--json and --run-dir, for the commands that ask the daemons."""
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument(
        "--run-dir",
        type=Path,
        default=daemon_status.RUN_DIR,
        help=f"where the daemons' control sockets are (default {daemon_status.RUN_DIR})",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bdr", description="Administer BDR replicated devices.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser(
        "setup",
        help="create a bdr target over a block device",
        description="Create /dev/mapper/NAME over DEVICE, capturing its writes into a ring at /dev/CHARDEV. "
        "Run with no flags on a terminal to be asked each value.",
    )
    s.add_argument("--device", help="block device to replicate, e.g. /dev/sda1")
    s.add_argument("--name", help="mapper name: the device appears as /dev/mapper/NAME")
    s.add_argument("--chardev", help="control device name: /dev/CHARDEV, for bdr_client --control-device")
    s.add_argument(
        "--buffer",
        default="64M",
        help="ring size as a number of writes (10000) or as memory (64M, 1G); "
        f"each write costs {abi.SLOT_BYTES} bytes (default: 64M)",
    )
    s.add_argument(
        "--region-size", type=int, help="dirty bitmap region in sectors (power of two, default 128)"
    )
    s.add_argument(
        "--meta-device",
        metavar="DEV",
        help="persistent change tracking on this small block device (4 KiB plus one bit per region): after a "
        "crash or reboot of this host only the regions written since the replica was last in sync are resynced",
    )
    s.add_argument(
        "--new-meta",
        action="store_true",
        help="zero the header of --meta-device first: a new tracking area (the next client start scans the "
        "whole device)",
    )
    r = sub.add_parser("remove", help="remove a bdr target", description="Remove /dev/mapper/NAME.")
    r.add_argument("name")
    st = sub.add_parser(
        "status",
        help="show the bdr targets and daemons",
        description="State of each bdr target of this host (the kernel's counters joined with what its "
        "bdr_client reports: state, ring fill, lag, durable sequence, throughput) and of each bdr_server.",
    )
    _daemon_options(st, "machine-readable output")
    v = sub.add_parser(
        "verify",
        help="compare source and replica online, report differing ranges",
        description="Ask the running bdr_client of target NAME to compare every block of the source with the "
        "replica by checksum while replication goes on. Nothing is repaired: differing ranges are printed (a "
        "restart of bdr_client with --full-scan repairs them). Exit status: 0 identical, 1 ranges differ, "
        "2 the pass could not be done. Suitable for cron.",
    )
    v.add_argument("name", help="mapper name or chardev name of the target (or the path of a control socket)")
    _daemon_options(v, "print the result as JSON")
    c = sub.add_parser(
        "certs",
        help="create a CA and TLS certificates for a server and a client",
        description="Create DIR/ca.pem, ca.key, server.pem, server.key, client.pem and client.key: a private CA "
        "and two certificates it signed, for mutual TLS between bdr_client and bdr_server. If DIR already holds "
        "ca.pem and ca.key, that CA signs the new certificates. Keys are written with mode 0600.",
    )
    c.add_argument("--out", required=True, metavar="DIR", help="directory for the files (created if missing)")
    c.add_argument(
        "--server-name",
        required=True,
        action="append",
        metavar="NAME",
        help="host name or IP address the client connects to (bdr_client --address or --tls-server-name); "
        "repeat for more names",
    )
    c.add_argument("--client-name", default="bdr-client", help="common name of the client certificate")
    c.add_argument("--days", type=int, default=1825, help="validity of the server and client certificates")
    c.add_argument("--force", action="store_true", help="replace existing files")
    sc = sub.add_parser(
        "secret",
        help="create a shared-secret file",
        description="Write 32 random bytes (as 64 hex digits) to FILE with mode 0600, for --secret-file on "
        "both daemons. Copy the same file to both hosts over a trusted channel.",
    )
    sc.add_argument("file", metavar="FILE")
    sc.add_argument("--force", action="store_true", help="replace an existing file")
    at_help = (
        "the moment: a time (2026-12-04T09:30:00, local time unless it names a zone), @UNIX_SECONDS, or a "
        "sequence number; the newest checkpoint at or before it is used"
    )
    hi = sub.add_parser(
        "history",
        help="show what a replica's point-in-time history can give back",
        description="On the replica host: the checkpoints a bdr_server --history directory holds (the oldest and "
        "the newest), the space it uses, and its gaps (times no restore can reach, and why). Works while the "
        "server runs.",
    )
    hi.add_argument("directory", metavar="DIR", help="the history directory (bdr_server --history)")
    hi.add_argument("--json", action="store_true", help="machine-readable output, with every checkpoint")
    rs = sub.add_parser(
        "restore",
        help="write the replica as it was at a past moment to another device or file",
        description="On the replica host: copy the replica to DEST and undo, from the history, every write "
        "applied after the newest checkpoint at or before --at. Replication goes on meanwhile. DEST is a block "
        "device at least as large as the replica, or a file (created, or overwritten). Exit status: 0 done, "
        "1 the moment cannot be given back exactly (the message names the nearest points) or an error.",
    )
    rs.add_argument("directory", metavar="DIR", help="the history directory (bdr_server --history)")
    rs.add_argument("--at", required=True, metavar="TIME|SEQ", help=at_help)
    rs.add_argument("--to", required=True, metavar="DEST", help="device or file to write")
    ex = sub.add_parser(
        "export",
        help="serve the replica as it was at a past moment read-only over NBD, without copying it",
        description="On the replica host: serve the replica as of the newest checkpoint at or before --at as a "
        "read-only NBD export (the network block device protocol), until stopped (Ctrl-C, SIGTERM). Reads "
        "take the replica's bytes where nothing was written since the point and the history's before-images "
        "where something was; replication goes on meanwhile. Connect with the kernel's NBD client: "
        "modprobe nbd; nbd-client -N NAME HOST PORT /dev/nbd0; mount -o ro /dev/nbd0 /mnt. Reads fail (EIO) "
        "once retention drops the point. Exit status: 0 stopped, 1 the moment cannot be given back exactly (the "
        "message names the nearest points) or an error.",
    )
    ex.add_argument("directory", metavar="DIR", help="the history directory (bdr_server --history)")
    ex.add_argument("--at", required=True, metavar="TIME|SEQ", help=at_help)
    ex.add_argument(
        "--listen",
        default="127.0.0.1:10809",
        metavar="ADDR",
        help="HOST:PORT, or the path of a Unix socket (default 127.0.0.1:10809, NBD's port, this host only)",
    )
    ex.add_argument("--name", default="bdr", help="the export's name (nbd-client -N NAME; default bdr)")
    rb = sub.add_parser(
        "rollback",
        help="turn the replica itself back to a past moment (bdr_server stopped)",
        description="On the replica host, with its bdr_server stopped: undo on the replica every write applied "
        "after the newest checkpoint at or before --at. The replica is then the source as it was at that "
        "moment; the next bdr_client start resyncs it forward to the source's present, so copy what you need "
        "first (or use bdr restore to look without changing the replica).",
    )
    rb.add_argument("directory", metavar="DIR", help="the history directory (bdr_server --history)")
    rb.add_argument("--at", required=True, metavar="TIME|SEQ", help=at_help)
    pr = sub.add_parser(
        "promote",
        help="make a replica a source, in a new generation (bdr_server stopped)",
        description="On the replica host, with its bdr_server stopped: replay a committed journal resync or "
        "drop an unfinished one, end the replica's generation at its last durable sequence number and begin a "
        "new one, written to --metadata (the new source's bdr_client --metadata) and to the journal (no "
        "bdr_server serves the device until bdr demote). Then put the device behind a bdr target. A replica "
        "that is not a consistent copy (a direct resync was writing it) needs --force.",
    )
    pr.add_argument("--journal", required=True, help="the replica's journal (bdr_server --journal)")
    pr.add_argument("--target-device", required=True, help="the replica (bdr_server --target-device)")
    pr.add_argument(
        "--metadata", required=True, metavar="FILE", help="the new source's metadata file to write"
    )
    pr.add_argument("--force", action="store_true", help="promote even an inconsistent replica")
    pr.add_argument(
        "--name", help="then put the device behind a bdr target: /dev/mapper/NAME (as bdr setup --name)"
    )
    pr.add_argument("--chardev", help="the target's control device /dev/CHARDEV (with --name)")
    pr.add_argument("--buffer", default="64M", help="the target's ring size (with --name; default 64M)")
    pr.add_argument(
        "--meta-device",
        metavar="DEV",
        help="the target's persistent change tracking (with --name; as bdr setup --meta-device); its header "
        "is zeroed first: the record starts with the new generation",
    )
    de = sub.add_parser(
        "demote",
        help="make a source a replica (bdr_client stopped)",
        description="On the source host, with its bdr_client stopped and its data no longer written: store the "
        "source's generation history (--metadata) in the journal its bdr_server will use. The next client "
        "(the promoted side) brings it up to date from the generation both share: with --name, after a stop "
        "in sync and nothing written since, by streaming its writes since its promotion; otherwise by a "
        "resync. A split brain is refused.",
    )
    de.add_argument("--journal", required=True, help="the journal the device's bdr_server will use")
    de.add_argument(
        "--metadata", required=True, metavar="FILE", help="this source's metadata (bdr_client --metadata)"
    )
    de.add_argument(
        "--name",
        help="the source's bdr target (mapper name), still set up: bdr demote removes it, and if nothing was "
        "written since bdr_client stopped in sync, the promoted side needs no resync (a planned switchover)",
    )
    de.add_argument(
        "--meta-device",
        metavar="DEV",
        help="the source's change tracking (bdr setup --meta-device), when its target is gone (a crash or a "
        "reboot; with --name, the target's own is read): its marks are kept in the journal, and the promoted "
        "side resyncs only the regions they mark instead of the whole device",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "setup":
            given = [args.device, args.name, args.chardev]
            if not any(given) and sys.stdin.isatty():
                plan = targets.interactive_plan()
            elif not all(given):
                raise SetupError(
                    "--device, --name and --chardev are all required (or run on a terminal to be asked)"
                )
            else:
                plan = SetupPlan(
                    args.device,
                    args.name,
                    args.chardev,
                    parse_buffer(args.buffer),
                    args.region_size,
                    args.meta_device,
                    args.new_meta,
                )
            targets.setup(plan)
        elif args.command == "remove":
            targets.remove(args.name)
        elif args.command == "certs":
            from . import credentials

            credentials.make_certs(args)
        elif args.command == "secret":
            from . import credentials

            credentials.make_secret(args)
        elif args.command == "status":
            from . import status

            report = status.status(args.run_dir)
            if args.json:
                print(json.dumps(report, indent=2, sort_keys=True))
            else:
                status.print_status(report)
        elif args.command == "history":
            from . import history

            return history.show(args.directory, args.json)
        elif args.command == "restore":
            from . import history

            return history.do_restore(args.directory, args.at, args.to)
        elif args.command == "export":
            from . import history

            return history.do_export(args.directory, args.at, args.listen, args.name)
        elif args.command == "rollback":
            from . import history

            return history.do_rollback(args.directory, args.at)
        elif args.command == "promote":
            from . import roles

            if bool(args.name) != bool(args.chardev):
                raise SetupError("--name and --chardev go together")
            if args.meta_device and not args.name:
                raise SetupError("--meta-device needs --name and --chardev")
            new_target = (
                SetupPlan(
                    args.target_device,
                    args.name,
                    args.chardev,
                    parse_buffer(args.buffer),
                    meta_device=args.meta_device,
                    new_meta=bool(args.meta_device),
                )
                if args.name
                else None
            )
            return roles.do_promote(args.journal, args.target_device, args.metadata, args.force, new_target)
        elif args.command == "demote":
            from . import roles

            return roles.do_demote(args.journal, args.metadata, args.name, args.meta_device)
        elif args.command == "verify":
            from . import verify

            try:
                return verify.verify(args.name, args.run_dir, args.json)
            except SetupError as exc:
                print(f"bdr: {exc}", file=sys.stderr)
                return 2
    except SetupError as exc:
        print(f"bdr: {exc}", file=sys.stderr)
        return 1
    except (EOFError, KeyboardInterrupt):
        print("\nbdr: aborted", file=sys.stderr)
        return 130
    return 0
