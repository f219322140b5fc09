"""``bdr``: the admin tool — set up and remove bdr targets, show their state (``bdr status``: the kernel's
counters joined with what each daemon reports on its control socket), run an online verification
(``bdr verify``), and create the credentials the daemons authenticate each other with (``bdr certs``,
``bdr secret``).

The daemons are separate commands (``bdr_client``, ``bdr_server``); this tool talks to them only through their
control sockets (``bdr.status``).
"""

from __future__ import annotations

import argparse
import json
import logging
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
from typing import Any

from bdr import abi
from bdr import status as daemon_status
from bdr.progress import Progress  # tqdm on a terminal, log lines otherwise

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


def kernel_targets() -> list[dict[str, object]]:
    """The bdr targets of this host: ``dmsetup status`` counters and the device and chardev of each table."""
    if shutil.which("dmsetup") is None or not module_loaded():
        return []
    res = _run(["dmsetup", "status", "--target", "bdr"])
    if res.returncode != 0:
        raise SetupError(f"dmsetup status failed: {res.stderr.strip()}")
    targets = [parse_status_line(line) for line in res.stdout.splitlines() if "bdr" in line.split()[3:4]]
    tables = _run(["dmsetup", "table", "--target", "bdr"])
    where: dict[str, tuple[str, str]] = {}
    for line in tables.stdout.splitlines() if tables.returncode == 0 else []:
        name, _, rest = line.partition(":")
        fields = rest.split()
        if len(fields) >= 5 and fields[2] == "bdr":
            where[name.strip()] = (fields[3], fields[4])
    for t in targets:
        dev, chardev = where.get(str(t["name"]), (None, None))
        t["device"], t["chardev"] = _device_path(dev), chardev
    return targets


def _device_path(dev: str | None) -> str | None:
    """A table's device as a path: dmsetup prints MAJOR:MINOR."""
    if dev is None or not re.fullmatch(r"\d+:\d+", dev):
        return dev
    try:
        return "/dev/" + os.path.basename(os.readlink(f"/sys/dev/block/{dev}"))
    except OSError:
        return dev


def daemons(run_dir: Path) -> list[dict[str, object]]:
    """The snapshot of every daemon answering on a control socket in ``run_dir``."""
    found = []
    for sock in sorted(run_dir.glob("*.sock")) if run_dir.is_dir() else []:
        try:
            snap = daemon_status.query(sock)
        except (daemon_status.StatusUnavailable, OSError, ValueError):
            continue  # a daemon that is gone, or not ours
        snap["socket"] = str(sock)
        found.append(snap)
    return found


def target_state(kernel: dict[str, object] | None, client: dict[str, object] | None) -> str:
    """replicating, resyncing, overflow, disconnected or inconsistent (plus the client's own transitions)."""
    if client is None:
        return "overflow" if kernel is not None and kernel.get("state") == "overflow" else "disconnected"
    state = str(client.get("state"))
    if state == "connecting":
        state = "disconnected"
    if state == "replicating" and kernel is not None and kernel.get("state") == "overflow":
        state = "overflow"
    if state == "replicating" and client.get("replica_consistent") is False:
        state = "inconsistent"
    return state


def status(run_dir: Path = daemon_status.RUN_DIR) -> dict[str, list[dict[str, object]]]:
    """Every target (kernel counters + its client daemon) and every server daemon of this host."""
    targets = kernel_targets()
    clients: dict[str, dict[str, object]] = {}
    servers = []
    for snap in daemons(run_dir):
        if snap.get("role") == "client":
            ring = snap.get("control_device") or snap.get("source_device")
            clients[Path(str(ring)).name] = snap
        elif snap.get("role") == "server":
            servers.append(snap)
    out = []
    for t in targets:
        client = clients.pop(str(t.get("chardev")), None)
        out.append({"name": t["name"], "state": target_state(t, client), "kernel": t, "client": client})
    for ring, client in clients.items():  # a client of a ring file (tests, benchmarks) or one-shot sync
        out.append({"name": ring, "state": target_state(None, client), "kernel": None, "client": client})
    return {"targets": out, "servers": servers}


def _size(n: object) -> str:
    value = float(n) if isinstance(n, int | float) else 0.0
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "?"


def print_status(report: dict[str, list[dict[str, object]]]) -> None:
    targets, servers = report["targets"], report["servers"]
    if not targets and not servers:
        print("no bdr targets and no bdr daemons on this host")
        return
    if targets:
        print(
            f"{'NAME':<16} {'STATE':<13} {'RING':>13} {'LAG':>22} {'DURABLE':>9} {'RATE':>11} {'DIRTY':>6}  PEER"
        )
    for t in targets:
        k: dict[str, Any] = t["kernel"] or {}  # type: ignore[assignment]
        c: dict[str, Any] = t["client"] or {}  # type: ignore[assignment]
        fill = k.get("fill")
        ring = c.get("ring") or {}
        used, slots = (
            (fill["used"], fill["slots"]) if isinstance(fill, dict) else (ring.get("used"), ring.get("slots"))
        )
        lag = c.get("lag")
        lag_text = f"{lag['records']} rec {_size(lag['bytes'])} {lag['seconds']:.0f}s" if lag else "-"
        durable = c.get("durable_seq")
        rate = f"{_size(c.get('throughput_bytes_per_s', 0))}/s" if c else "-"
        dirty = max(int(k.get("dirty_regions", 0) or 0), int(c.get("dirty_regions", 0) or 0))
        print(
            f"{t['name']!s:<16} {t['state']!s:<13} {f'{used}/{slots}':>13} {lag_text:>22} "
            f"{'-' if durable is None else durable!s:>9} {rate:>11} {dirty:>6}  {c.get('server', '-')}"
        )
        rs = c.get("resync") or {}
        if rs.get("active"):
            direct = ", direct writes: the replica is inconsistent until it ends" if rs.get("direct") else ""
            print(f"{'':<16} resync {_size(rs['done_bytes'])} of {_size(rs['total_bytes'])}{direct}")
        if rs.get("journal_full"):
            print(f"{'':<16} the server's journal is too small for resyncs: {rs['journal_full']}")
    for srv in servers:
        print(
            f"server {srv.get('listen')}: {srv.get('state')}, replica {srv.get('replica')} "
            f"{'consistent' if srv.get('consistent') else 'INCONSISTENT'}, durable seq {srv.get('durable_seq')}, "
            f"client {srv.get('peer') or '-'}"
        )


def control_socket(name: str, run_dir: Path) -> Path:
    """The control socket of the client daemon of target ``name`` (mapper name, chardev name or a path)."""
    if "/" in name:
        return Path(name)
    direct = run_dir / f"client-{name}.sock"
    if direct.exists():
        return direct
    for t in kernel_targets():
        if t["name"] == name and t.get("chardev"):
            return run_dir / f"client-{t['chardev']}.sock"
    raise SetupError(f"no client daemon found for {name!r} in {run_dir} (is bdr_client running?)")


def verify(name: str, run_dir: Path, as_json: bool) -> int:
    """Ask the client daemon of ``name`` for a verification pass; 0: identical, 1: mismatches, 2: not verified."""
    sock = control_socket(name, run_dir)
    result: dict[str, Any] | None = None
    prog: Progress | None = None
    done = 0
    try:
        for msg in daemon_status.request(sock, "verify", timeout=None):
            if "progress" in msg and not as_json:
                p = msg["progress"]
                if prog is None:
                    prog = Progress(f"verify {name}", int(p["device_bytes"]), logging.getLogger("bdr"))
                prog.update(int(p["compared_bytes"]) - done)
                done = int(p["compared_bytes"])
            elif "result" in msg:
                result = msg["result"]
            elif "error" in msg:
                raise SetupError(str(msg["error"]))
    except daemon_status.StatusUnavailable as exc:
        raise SetupError(f"cannot reach the client daemon: {exc}") from exc
    finally:
        if prog is not None:
            prog.close()
    if result is None:
        raise SetupError("the client daemon closed the connection without a result")
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
    if result.get("error"):
        if not as_json:
            print(f"bdr: verify of {name} not done: {result['error']}", file=sys.stderr)
        return 2
    if not as_json:
        for off, ln in result["mismatch_ranges"]:
            print(
                f"mismatch: bytes {off}-{off + ln - 1} (sectors {off // 512}-{(off + ln) // 512 - 1}, {ln} bytes)"
            )
        for off, ln in result["busy_ranges"]:
            print(f"not verified (written during the whole pass): bytes {off}-{off + ln - 1}")
        verdict = (
            "identical"
            if not result["mismatch_ranges"]
            else f"{len(result['mismatch_ranges'])} ranges differ"
        )
        print(
            f"verify {name}: {_size(result['compared_bytes'])} compared in {result['seconds']:.1f}s: {verdict}"
        )
    return 1 if result["mismatch_ranges"] else 0


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
            report = status(args.run_dir)
            if args.json:
                print(json.dumps(report, indent=2, sort_keys=True))
            else:
                print_status(report)
        elif args.command == "verify":
            try:
                return verify(args.name, args.run_dir, args.json)
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


if __name__ == "__main__":
    sys.exit(main())
