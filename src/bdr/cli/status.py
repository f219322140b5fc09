"""``bdr status``: the kernel's counters of each bdr target joined with what its daemons report."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from bdr import status as daemon_status
from bdr.generations import fmt_bytes

from .targets import SetupError, module_loaded, run


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
    res = run(["dmsetup", "status", "--target", "bdr"])
    if res.returncode != 0:
        raise SetupError(f"dmsetup status failed: {res.stderr.strip()}")
    targets = [parse_status_line(line) for line in res.stdout.splitlines() if "bdr" in line.split()[3:4]]
    tables = run(["dmsetup", "table", "--target", "bdr"])
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


def size(n: object) -> str:
    return fmt_bytes(n if isinstance(n, int | float) else 0)


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
        lag_text = f"{lag['records']} rec {size(lag['bytes'])} {lag['seconds']:.0f}s" if lag else "-"
        durable = c.get("durable_seq")
        rate = f"{size(c.get('throughput_bytes_per_s', 0))}/s" if c else "-"
        dirty = max(int(k.get("dirty_regions", 0) or 0), int(c.get("dirty_regions", 0) or 0))
        print(
            f"{t['name']!s:<16} {t['state']!s:<13} {f'{used}/{slots}':>13} {lag_text:>22} "
            f"{'-' if durable is None else durable!s:>9} {rate:>11} {dirty:>6}  {c.get('server', '-')}"
        )
        rs = c.get("resync") or {}
        if rs.get("active"):
            direct = ", direct writes: the replica is inconsistent until it ends" if rs.get("direct") else ""
            print(f"{'':<16} resync {size(rs['done_bytes'])} of {size(rs['total_bytes'])}{direct}")
        if rs.get("journal_full"):
            print(f"{'':<16} the server's journal is too small for resyncs: {rs['journal_full']}")
        if c.get("generations"):
            g = c["generations"]
            written = f", {size(g['written'])} written in it" if g.get("written") is not None else ""
            print(f"{'':<16} role source, generation {g['current']}{written}")
    for srv in servers:
        print(
            f"server {srv.get('listen')}: {srv.get('state')}, replica {srv.get('replica')} "
            f"{'consistent' if srv.get('consistent') else 'INCONSISTENT'}, durable seq {srv.get('durable_seq')}, "
            f"client {srv.get('peer') or '-'}"
        )
        hist = srv.get("history")
        if isinstance(hist, dict):
            print(f"{'':<7}{history_line(hist)}")
        gens, peer = srv.get("generations"), srv.get("peer_generations")
        if isinstance(gens, dict) or isinstance(peer, dict):
            mine = gens["current"] if isinstance(gens, dict) else "none"
            theirs = peer["current"] if isinstance(peer, dict) else "none"
            print(f"{'':<7}role replica, generation {mine}, last client's generation {theirs}")
        if srv.get("generations_decision"):
            print(f"{'':<7}at the last connect: {srv['generations_decision']}")
        split = srv.get("split_brain")
        if isinstance(split, dict):
            print(
                f"{'':<7}at the last connect, SPLIT BRAIN: written since the split: source's side "
                f"{written_text(split['source_written'])}, this replica's {written_text(split['replica_written'])}"
            )


def written_text(n: int | None) -> str:
    return size(n) if n is not None else "not counted"


def history_line(h: dict[str, Any]) -> str:
    """The server's history in one line: range of points, space used, the last gap."""
    if h.get("points"):
        from bdr.history import fmt_time  # the history package is not needed for anything else here

        span = (
            f"{h['points']} points from {fmt_time(int(h['oldest_time'] * 1e9))} (seq {h['oldest_seq']}) "
            f"to {fmt_time(int(h['newest_time'] * 1e9))} (seq {h['newest_seq']})"
        )
    else:
        span = "no point offered yet"
    gap = f"; last gap {h['last_gap']}" if h.get("last_gap") else ""
    return f"history {h.get('path')}: {span}, {size(h.get('bytes'))} used{gap}"
