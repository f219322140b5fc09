"""kernel/dkms.conf: DKMS adds and builds the module from the files `make install` puts in /usr/src/bdr-<version>,
for each lab kernel: with the host's dkms for 6.12, with the lab chroot's own dkms (and compiler) for 7.x.  The
DKMS and source trees are private to the test (--dkmstree, --sourcetree; a throw-away signing key), so the host's
/var/lib/dkms and /usr/src stay untouched, and `dkms remove --all` cleans up.  The module DKMS built then loads
in a guest of that kernel and captures a write."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import lab

VM_KERNELS = ("6.12", "7.x")
VM_DISKS = {"a": "16M"}
VM_MEMORY = "1024M"
# What `make install` copies to /usr/src/bdr-<version> for DKMS.
DKMS_FILES = ("dm-bdr.c", "bdr_uapi.h", "Kbuild", "dkms.conf")


def dkms_package(conf: Path) -> tuple[str, str]:
    """(PACKAGE_NAME, PACKAGE_VERSION) of a dkms.conf."""
    fields = dict(re.findall(r'^(PACKAGE_NAME|PACKAGE_VERSION)="?([^"\n]*)"?$', conf.read_text(), re.M))
    return fields["PACKAGE_NAME"], fields["PACKAGE_VERSION"]


class Dkms:
    """dkms with private trees under ``base``, run on the host or in the chroot that holds ``kver``."""

    def __init__(self, base: Path, kver: str) -> None:
        self.base = base
        self.kver = kver
        self.root = lab.kernel_root(kver).resolve()
        self.tree = base / "dkms"
        self.sources = base / "usr-src"
        self.tree.mkdir()
        self.sources.mkdir()

    def inner(self, path: Path) -> str:
        """``path`` as dkms sees it (inside the chroot for a chroot kernel)."""
        return str(path) if self.root == Path("/") else f"/{path.relative_to(self.root)}"

    def __call__(self, *args: str) -> str:
        cmd = ["dkms", *args, "--dkmstree", self.inner(self.tree), "--sourcetree", self.inner(self.sources)]
        # dkms signs what it builds, with a key it makes when it finds none: a throw-away one here.
        keys = {
            "mok_signing_key": self.inner(self.base / "mok.key"),
            "mok_certificate": self.inner(self.base / "mok.pub"),
        }
        if self.root == Path("/"):
            full, env = cmd, {**os.environ, **keys}
        else:
            full, env = lab.chroot_command(cmd, self.root, env=keys), None
        proc = subprocess.run(
            full,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=540,
            env=env,
            check=False,
        )
        assert proc.returncode == 0, f"{' '.join(cmd)} failed (rc={proc.returncode}):\n{proc.stdout}"
        return proc.stdout


@pytest.fixture(scope="module")
def dkms_ko(lab_kernel: str) -> Iterator[Path]:
    """bdr.ko as `dkms add` + `dkms build -k <lab kernel>` made it; `dkms remove --all` afterwards."""
    kdir = lab.module_sources()
    name, version = dkms_package(kdir / "dkms.conf")
    root = lab.kernel_root(lab_kernel)
    builds = (root if root != Path("/") else lab.LAB_DIR) / "build"
    builds.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="dkms-", dir=builds))
    try:
        src = base / "src"
        src.mkdir()
        for f in DKMS_FILES:
            shutil.copyfile(kdir / f, src / f)
        dkms = Dkms(base, lab_kernel)
        dkms("add", dkms.inner(src))
        try:
            dkms("build", f"{name}/{version}", "-k", lab_kernel)
            status = dkms("status", f"{name}/{version}")
            assert re.search(rf"^{name}/{version}, {re.escape(lab_kernel)}, \S+: built$", status, re.M), (
                status
            )
            built = dkms.tree / name / version / lab_kernel
            kos = sorted(built.glob("*/module/bdr.ko*"))
            assert len(kos) == 1, f"dkms build made {kos} in {built}"
            for log in built.glob("*/log/make.log"):
                assert "warning:" not in log.read_text(errors="replace"), log.read_text(errors="replace")
            yield kos[0]
        finally:
            dkms("remove", f"{name}/{version}", "--all")
            assert not (dkms.tree / name / version).exists(), "dkms remove --all left the module in the tree"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_dkms_builds_the_module_for_the_lab_kernel(dkms_ko: Path, lab_kernel: str) -> None:
    info = subprocess.run(
        ["modinfo", "-F", "vermagic", str(dkms_ko)], stdout=subprocess.PIPE, text=True, check=True
    ).stdout
    assert info.split()[0] == lab_kernel, info


def test_the_dkms_module_loads_and_captures_a_write(dkms_ko: Path, guest: lab.Guest) -> None:
    a = guest.disk("a")
    guest.run(
        f"""set -e
        modprobe dm-mod
        insmod {dkms_ko}
        grep -q '^bdr ' /proc/modules
        echo "0 $(blockdev --getsz {a}) bdr {a} bdr_dkms 64" | dmsetup create dkms
        dd if=/dev/urandom of=/dev/mapper/dkms bs=4096 count=1 seek=3 oflag=direct status=none
        """
    )
    out = guest.run("dmsetup status dkms").output.split()
    assert out[2] == "bdr", out
    status = dict(kv.split("=", 1) for kv in out[3:])
    assert (status["records"], status["bytes"], status["dropped"]) == ("1", "4096", "0"), status
    guest.run("dmsetup remove dkms && rmmod bdr")
