"""``bdr verify``: ask the client daemon of a target for an online verification pass and print its result."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from bdr import status as daemon_status
from bdr.progress import Progress  # tqdm on a terminal, log lines otherwise

from .status import kernel_targets, size
from .targets import SetupError


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
            f"verify {name}: {size(result['compared_bytes'])} compared in {result['seconds']:.1f}s: {verdict}"
        )
    return 1 if result["mismatch_ranges"] else 0
