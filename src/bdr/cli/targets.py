"""``bdr setup`` and ``bdr remove``: check a plan for a bdr target, create its table with dmsetup, remove it."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bdr.kernel import abi

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


def run(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False)


def module_loaded() -> bool:
    if os.path.isdir("/sys/module/bdr"):
        return True
    res = run(["dmsetup", "targets"])
    return res.returncode == 0 and any(line.split()[:1] == ["bdr"] for line in res.stdout.splitlines())


@dataclass(frozen=True)
class SetupPlan:
    device: str
    name: str
    chardev: str
    slots: int
    region_sectors: int | None = None
    meta_device: str | None = None  # persistent change tracking (feature argument meta_device)
    new_meta: bool = False  # zero the meta device's header first

    def table(self, sectors: int) -> str:
        line = f"0 {sectors} bdr {self.device} {self.chardev} {self.slots}"
        if self.meta_device is None:
            return line + (f" {self.region_sectors}" if self.region_sectors else "")
        features = [] if self.region_sectors is None else ["region_sectors", str(self.region_sectors)]
        features += ["meta_device", self.meta_device]
        return f"{line} {len(features)} {' '.join(features)}"


def _block_device(path: str, what: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SetupError(f"{what} {path} does not exist") from None
    if not stat.S_ISBLK(st.st_mode):
        raise SetupError(f"{what} {path} is not a block device")
    return st


def check_plan(plan: SetupPlan) -> None:
    if shutil.which("dmsetup") is None:
        raise SetupError("dmsetup not found: install the dmsetup package")
    st = _block_device(plan.device, "device")
    for what, value in (("mapper name", plan.name), ("chardev name", plan.chardev)):
        if not NAME_RE.match(value) or value in (".", ".."):
            raise SetupError(f"invalid {what} {value!r}: 1-31 characters of A-Z a-z 0-9 _ . -")
    if not module_loaded():
        raise SetupError(
            "the bdr kernel module is not loaded: run 'modprobe bdr' (or 'insmod kernel/bdr.ko')"
        )
    if os.path.exists(f"/dev/mapper/{plan.name}") or run(["dmsetup", "info", plan.name]).returncode == 0:
        raise SetupError(f"a device-mapper device named {plan.name!r} already exists")
    if os.path.exists(f"/dev/{plan.chardev}"):
        raise SetupError(f"/dev/{plan.chardev} already exists: choose another chardev name")
    if plan.region_sectors is not None and (
        plan.region_sectors < 8 or plan.region_sectors & (plan.region_sectors - 1)
    ):
        raise SetupError("region size must be a power of two of at least 8 sectors (4 KiB)")
    if plan.meta_device is not None:
        if _block_device(plan.meta_device, "meta device").st_rdev == st.st_rdev:
            raise SetupError("the meta device must be another device than --device")
    elif plan.new_meta:
        raise SetupError("--new-meta needs --meta-device")


def _zero_meta_header(dev: str) -> None:
    """A new tracking area: the target formats a meta device whose first 4 KiB are zeros."""
    fd = os.open(dev, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, bytes(abi.BDR_META_BLOCK), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def setup(plan: SetupPlan, out: Callable[[str], None] = print) -> None:
    check_plan(plan)
    res = run(["blockdev", "--getsz", plan.device])
    if res.returncode != 0:
        raise SetupError(f"cannot read the size of {plan.device}: {res.stderr.strip()}")
    table = plan.table(int(res.stdout))
    if plan.meta_device is not None and plan.new_meta:
        try:
            _zero_meta_header(plan.meta_device)
        except OSError as exc:
            raise SetupError(f"cannot zero the header of {plan.meta_device}: {exc.strerror}") from exc
    res = run(["dmsetup", "create", plan.name, "--table", table])
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
    if plan.meta_device is not None:
        out(f"change tracking on {plan.meta_device}: 'dmesg | grep bdr' says whether it was new or loaded")
    out("use only /dev/mapper/" + plan.name + " from now on, not " + plan.device)


def remove(name: str, out: Callable[[str], None] = print) -> None:
    res = run(["dmsetup", "remove", name])
    if res.returncode != 0:
        raise SetupError(f"dmsetup remove {name} failed: {res.stderr.strip()}")
    out(f"removed /dev/mapper/{name}")


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
