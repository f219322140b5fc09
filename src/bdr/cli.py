"""``bdr``: the admin tool — set up and remove bdr targets, show their state, and create the credentials the
daemons authenticate each other with (``bdr certs``, ``bdr secret``).

The daemons are separate commands (``bdr_client``, ``bdr_server``); this tool never talks to them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bdr import abi

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,31}$")
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class SetupError(Exception):
    """A problem the operator can fix; the message says how."""


def parse_buffer(text: str) -> int:
    """Buffer size as a number of writes ("10000") or as memory ("64M", "1G", "512K").

    Memory sizes are converted to ring slots of ``abi.SLOT_BYTES`` each (one 4 KiB write).
    """
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise SetupError(f"invalid buffer size {text!r}: use a number of writes (10000) or a size (64M, 1G)")
    number, unit = int(m.group(1)), m.group(2).upper()
    slots = number if not unit and not m.group(3) else number * UNITS[unit] // abi.SLOT_BYTES
    if not 1 <= slots <= abi.BDR_MAX_SLOTS:
        raise SetupError(f"buffer size {text!r} gives {slots} writes; it must be 1 to {abi.BDR_MAX_SLOTS}")
    return slots


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False)


def module_loaded() -> bool:
    if os.path.isdir("/sys/module/bdr"):
        return True
    res = _run(["dmsetup", "targets"])
    return res.returncode == 0 and any(line.split()[:1] == ["bdr"] for line in res.stdout.splitlines())


@dataclass(frozen=True)
class SetupPlan:
    device: str
    name: str
    chardev: str
    slots: int
    region_sectors: int | None = None

    def table(self, sectors: int) -> str:
        line = f"0 {sectors} bdr {self.device} {self.chardev} {self.slots}"
        return line + (f" {self.region_sectors}" if self.region_sectors else "")


def check_plan(plan: SetupPlan) -> None:
    if shutil.which("dmsetup") is None:
        raise SetupError("dmsetup not found: install the dmsetup package")
    try:
        st = os.stat(plan.device)
    except FileNotFoundError:
        raise SetupError(f"device {plan.device} does not exist") from None
    if not stat.S_ISBLK(st.st_mode):
        raise SetupError(f"{plan.device} is not a block device")
    for what, value in (("mapper name", plan.name), ("chardev name", plan.chardev)):
        if not NAME_RE.match(value) or value in (".", ".."):
            raise SetupError(f"invalid {what} {value!r}: 1-31 characters of A-Z a-z 0-9 _ . -")
    if not module_loaded():
        raise SetupError(
            "the bdr kernel module is not loaded: run 'modprobe bdr' (or 'insmod kernel/bdr.ko')"
        )
    if os.path.exists(f"/dev/mapper/{plan.name}") or _run(["dmsetup", "info", plan.name]).returncode == 0:
        raise SetupError(f"a device-mapper device named {plan.name!r} already exists")
    if os.path.exists(f"/dev/{plan.chardev}"):
        raise SetupError(f"/dev/{plan.chardev} already exists: choose another chardev name")
    if plan.region_sectors is not None and (
        plan.region_sectors < 8 or plan.region_sectors & (plan.region_sectors - 1)
    ):
        raise SetupError("region size must be a power of two of at least 8 sectors (4 KiB)")


def setup(plan: SetupPlan, out: Callable[[str], None] = print) -> None:
    check_plan(plan)
    res = _run(["blockdev", "--getsz", plan.device])
    if res.returncode != 0:
        raise SetupError(f"cannot read the size of {plan.device}: {res.stderr.strip()}")
    table = plan.table(int(res.stdout))
    res = _run(["dmsetup", "create", plan.name, "--table", table])
    if res.returncode != 0:
        hint = " (see 'dmesg | grep bdr' for the reason)"
        raise SetupError(f"dmsetup create {plan.name} failed: {res.stderr.strip()}{hint}")
    for _ in range(50):  # devtmpfs creates the node at once; udev may rename or chmod it
        if os.path.exists(f"/dev/{plan.chardev}"):
            break
        time.sleep(0.1)
    memory = plan.slots * abi.SLOT_BYTES
    out(f"created /dev/mapper/{plan.name} over {plan.device} (table: {table})")
    out(f"control device /dev/{plan.chardev}: ring of {plan.slots} writes, {memory / (1 << 20):.1f} MiB")
    out("use only /dev/mapper/" + plan.name + " from now on, not " + plan.device)


def remove(name: str, out: Callable[[str], None] = print) -> None:
    res = _run(["dmsetup", "remove", name])
    if res.returncode != 0:
        raise SetupError(f"dmsetup remove {name} failed: {res.stderr.strip()}")
    out(f"removed /dev/mapper/{name}")


def parse_status_line(line: str) -> dict[str, object]:
    """One line of ``dmsetup status --target bdr``: '<name>: <start> <len> bdr key=value ...'."""
    name, _, rest = line.partition(":")
    fields = rest.split()
    info: dict[str, object] = {"name": name.strip(), "sectors": int(fields[1])}
    for kv in fields[3:]:
        key, _, value = kv.partition("=")
        info[key] = value if key == "state" else _number(value)
    return info


def _number(value: str) -> object:
    if "/" in value:
        used, total = value.split("/")
        return {"used": int(used), "slots": int(total)}
    return int(value)


def status() -> list[dict[str, object]]:
    res = _run(["dmsetup", "status", "--target", "bdr"])
    if res.returncode != 0:
        raise SetupError(f"dmsetup status failed: {res.stderr.strip()}")
    return [parse_status_line(line) for line in res.stdout.splitlines() if "bdr" in line.split()[3:4]]


def _ask(prompt: str, default: str | None = None) -> str:
    suffix = f" [{default}]" if default else ""
    answer = input(f"{prompt}{suffix}: ").strip()
    return answer or default or ""


def interactive_plan() -> SetupPlan:
    device = _ask("Path of the block device to replicate (e.g. /dev/sda1)")
    name = _ask("Name of the mapper device (/dev/mapper/<name>)", "bdr_mapper")
    chardev = _ask("Name of the control character device (/dev/<name>)", "bdr_char")
    buffer = _ask("Buffer size, in writes or as memory (K/M/G)", "64M")
    return SetupPlan(device, name, chardev, parse_buffer(buffer))


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
    r = sub.add_parser("remove", help="remove a bdr target", description="Remove /dev/mapper/NAME.")
    r.add_argument("name")
    st = sub.add_parser(
        "status", help="show the bdr targets", description="State and counters of each target."
    )
    st.add_argument("--json", action="store_true", help="machine-readable output")
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
    return p


def make_certs(args: argparse.Namespace) -> None:
    from bdr import certs  # the cryptography package is needed here only

    try:
        issued = certs.make(Path(args.out), tuple(args.server_name), args.client_name, args.days, args.force)
    except certs.CertError as exc:
        raise SetupError(str(exc)) from exc
    out = issued.out
    print(
        f"{'reused' if issued.reused_ca else 'created'} CA {out / 'ca.pem'} (key {out / 'ca.key'}: keep it offline)"
    )
    print(
        f"server certificate for {', '.join(issued.server_names)}: {out / 'server.pem'}, {out / 'server.key'}"
    )
    print(f"client certificate {issued.client_name!r}: {out / 'client.pem'}, {out / 'client.key'}")
    print("on the server:")
    print("  bdr_server ... --tls-cert server.pem --tls-key server.key --tls-ca ca.pem")
    print("on the client:")
    print(
        f"  bdr_client ... --address {issued.server_names[0]} --tls-ca ca.pem --tls-cert client.pem --tls-key client.key"
    )


def make_secret(args: argparse.Namespace) -> None:
    from bdr import auth

    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if args.force else os.O_EXCL)
    try:
        fd = os.open(args.file, flags, 0o600)
    except FileExistsError:
        raise SetupError(f"{args.file} exists; use --force to replace it") from None
    except OSError as exc:
        raise SetupError(f"cannot write {args.file}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(auth.new_secret())
    print(
        f"wrote a new shared secret to {args.file} (mode 0600); copy it to the other host over a trusted channel"
    )
    print(f"  bdr_server ... --secret-file {args.file}")
    print(f"  bdr_client ... --secret-file {args.file}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "setup":
            given = [args.device, args.name, args.chardev]
            if not any(given) and sys.stdin.isatty():
                plan = interactive_plan()
            elif not all(given):
                raise SetupError(
                    "--device, --name and --chardev are all required (or run on a terminal to be asked)"
                )
            else:
                plan = SetupPlan(
                    args.device, args.name, args.chardev, parse_buffer(args.buffer), args.region_size
                )
            setup(plan)
        elif args.command == "remove":
            remove(args.name)
        elif args.command == "certs":
            make_certs(args)
        elif args.command == "secret":
            make_secret(args)
        elif args.command == "status":
            targets = status()
            if args.json:
                print(json.dumps(targets, indent=2))
            elif not targets:
                print("no bdr targets")
            else:
                print(f"{'NAME':<16} {'STATE':<10} {'RING':>15} {'RECORDS':>10} {'DROPPED':>8} {'DIRTY':>8}")
                for t in targets:
                    fill = t.get("fill")
                    ring = f"{fill['used']}/{fill['slots']}" if isinstance(fill, dict) else "?"
                    print(
                        f"{t['name']:<16} {t.get('state', '?')!s:<10} {ring:>15} {t.get('records', 0)!s:>10}"
                        f" {t.get('dropped', 0)!s:>8} {t.get('dirty_regions', 0)!s:>8}"
                    )
    except SetupError as exc:
        print(f"bdr: {exc}", file=sys.stderr)
        return 1
    except (EOFError, KeyboardInterrupt):
        print("\nbdr: aborted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
