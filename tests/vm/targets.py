"""Helpers of the kernel target's VM tests: create a bdr target, run a guest command that prints JSON, read
`dmsetup status` fields.  The ring itself is read with tests/vm/ringtool.py (TOOL)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PY = f"{REPO}/.venv/bin/python"
TOOL = f"{PY} {REPO}/tests/vm/ringtool.py"


def create(g: Any, name: str, dev: str, chardev: str, slots: int, extra: str = "") -> None:
    g.run(f'echo "0 $(blockdev --getsz {dev}) bdr {dev} {chardev} {slots} {extra}" | dmsetup create {name}')


def jrun(g: Any, cmd: str) -> Any:
    """The JSON document on the last line of a guest command's output."""
    return json.loads(g.run(cmd).output.strip().splitlines()[-1])


def status_fields(g: Any, name: str) -> dict[str, str]:
    out = g.run(f"dmsetup status {name}").output.split()
    assert out[2] == "bdr", out
    return dict(kv.split("=", 1) for kv in out[3:])
