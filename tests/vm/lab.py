"""BDR test lab: boots the installed 6.12 kernel (or the newest kernel of the lab's trixie chroot) in QEMU and
runs shell commands in it.

The guest is a small busybox initramfs that mounts the host root read-only over 9p and chroots into it for
every command, so the host's dmsetup, fio, Python and this repository (at the same path) are all available in
the guest.  A second, writable 9p share (a host temp dir) carries the commands and their results:

    host writes                                 guest agent (bash, PID 1, chrooted into the host root)
    .agent/job-<n>.sh   the script
    .agent/cmd-<n>.sh   prologue (env, cd),     -> seen by a 50 ms poll; in a forked subshell:
                        renamed into place last    . cmd-<n>.sh; . job-<n>.sh   >out-<n> 2>&1
    .agent/out-<n>      <-                         stdout + stderr
    .agent/rc-<n>       <-                         exit code, one write ending in a newline

Usage (no pytest needed, so demo scripts can use it too):

    with Guest(disks={"src": "64M", "dst": "64M"}) as g:
        g.run(f"blockdev --getsize64 {g.disk('src')}")
        g.check_kernel_log()

The second kernel (``check_prerequisites(NEWER_SERIES)``, series "7.x") comes from a Debian trixie chroot with
the newest trixie-backports kernel, its headers and compiler (tests/vm/mkchroot.sh, `make lab-chroot`): the guest
boots its image, the initramfs takes its modules, the guest sees its /lib/modules in place of the host's, and
modules for it are built inside the chroot.

Only TCG is used: KVM hangs guests on the development machines.  The guest CPU is a Nehalem (SSE4.2, no AVX)
with RDRAND rather than QEMU's "max", under which the same guest work ran slower: a large memcpy in the guest's
Python took 1.7 times as long, the test_history module 13 % longer (most likely glibc's string functions for
the newer vector extensions, which TCG emulates at a higher cost).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parents[2]
LAB_DIR = Path(__file__).resolve().parent / ".lab"
KERNEL_SERIES = "6.12"
# The lab's second kernel: the newest 7.x kernel (else the newest one that is not 6.12) of the trixie chroot.
NEWER_SERIES = "7.x"
LAB_SERIES = (KERNEL_SERIES, NEWER_SERIES)
CHROOT = LAB_DIR / "trixie"
CHROOT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# A directory laid out like kernel/ whose module the lab builds and tests instead of the repository's kernel/.
MODULE_SRC_ENV = "BDR_LAB_MODULE_SRC"
GUEST_CPU = "Nehalem,+rdrand"  # see the module's docstring; RDRAND for random.trust_cpu=on
# Modules the initramfs needs (their dependencies are added from modules.dep).
INITRAMFS_MODULES = ("virtio_blk", "netfs", "9pnet", "9pnet_virtio", "9p")
# Bump when the initramfs layout changes in a way the cache key would not see.
INITRAMFS_FORMAT = 2
DEPS_HINT = "run `make deps` to install the 6.12 kernel, its headers, qemu-system-x86 and busybox-static"
CHROOT_HINT = "run `make lab-chroot` to make the trixie chroot with the newest trixie-backports kernel"
# Where the writable share appears inside the chroot: the first of these that is an empty directory on the
# host (the host root is read-only in the guest, so the mount point must already exist), else a tmpfs path.
SHARE_MOUNT_CANDIDATES = ("/media", "/srv")
SHARE_MOUNT_FALLBACK = "/run/bdr-lab-share"
# Commands' PATH in the guest.  /run/lab/bin comes first: `sleep` and `grep` there are the initramfs's static
# busybox, which starts in a sixth (grep) to a fifth (sleep) of the time the host's dynamically linked ones take
# under TCG (about 20 ms against 100-120 ms): the tests' wait loops run them several times a second.
GUEST_FAST_APPLETS = ("sleep", "grep")
GUEST_PATH = "/run/lab/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONSOLE_TAIL_LINES = 60
OUTPUT_TAIL_LINES = 60
_POLL = 0.01

# --------------------------------------------------------------------------------------------------------------
# Errors


class LabError(Exception):
    """Base class of every test lab error."""


class LabSetupError(LabError):
    """The host lacks something the lab needs (QEMU, the 6.12 kernel or its headers, busybox, the chroot)."""


class BuildError(LabError):
    """A kernel module did not build."""


class GuestError(LabError):
    """Base class of errors about a running guest."""


class GuestBootError(GuestError):
    """The guest did not come up."""


class GuestBootHung(GuestBootError):
    """The guest kernel stopped before it started the lab's init (QEMU killed)."""


class GuestDied(GuestError):
    """QEMU exited or the guest kernel panicked, or the guest was used after it was killed or closed."""


class GuestTimeout(GuestError):
    """A guest command did not finish in time; the guest has been killed."""


class GuestKernelError(GuestError):
    """The guest kernel log shows an oops, BUG, WARN, stall or similar."""


class GuestCommandFailed(GuestError):
    """A guest command exited with a non-zero status."""

    def __init__(self, script: str, result: Result) -> None:
        self.script = script
        self.result = result
        super().__init__(
            f"guest command failed with rc={result.rc}:\n{_indent(_head(script, 30))}\n"
            f"--- output (last {OUTPUT_TAIL_LINES} lines) ---\n{_tail(result.output, OUTPUT_TAIL_LINES)}"
        )


@dataclasses.dataclass(frozen=True)
class Result:
    """Outcome of one guest command: exit code, combined stdout+stderr, wall time on the host."""

    rc: int
    output: str
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.rc == 0


# --------------------------------------------------------------------------------------------------------------
# Small helpers


def _tail(text: str, lines: int) -> str:
    parts = text.rstrip("\n").splitlines()
    return "\n".join(parts[-lines:])


def _head(text: str, lines: int) -> str:
    parts = text.strip("\n").splitlines()
    if len(parts) <= lines:
        return "\n".join(parts)
    return "\n".join([*parts[:lines], f"... ({len(parts) - lines} more lines)"])


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _version_key(version: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.+~-]", version)]


def parse_size(size: str | int) -> int:
    """'64M' / '1G' / '512K' / 4096 -> bytes (binary units)."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", size, re.IGNORECASE)
        if not m:
            raise ValueError(f"bad size {size!r} (expected e.g. 64M, 1G, 4096)")
        value = int(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")
    if value <= 0 or value % 512:
        raise ValueError(f"bad size {size!r}: must be a positive multiple of 512 bytes")
    return value


# --------------------------------------------------------------------------------------------------------------
# Host prerequisites and builds


def find_kernel() -> str:
    """Newest installed 6.12 kernel with both an image in /boot and headers in /lib/modules/<ver>/build."""
    found = []
    for mod_dir in Path("/lib/modules").glob(f"{KERNEL_SERIES}.*"):
        ver = mod_dir.name
        if (Path("/boot") / f"vmlinuz-{ver}").is_file() and (mod_dir / "build").is_dir():
            found.append(ver)
    if not found:
        raise LabSetupError(
            f"no {KERNEL_SERIES} kernel with both /boot/vmlinuz-<ver> and /lib/modules/<ver>/build: {DEPS_HINT}"
        )
    return max(found, key=_version_key)


def find_newer_kernel() -> str:
    """Newest kernel of the trixie chroot with an image, modules and headers: the newest 7.x one, or with none,
    the newest one that is not 6.12."""
    found = []
    for mod_dir in (CHROOT / "lib" / "modules").glob("*"):
        ver = mod_dir.name
        if ver.startswith(f"{KERNEL_SERIES}."):
            continue
        if (
            (CHROOT / "boot" / f"vmlinuz-{ver}").is_file()
            and (mod_dir / "modules.dep").is_file()
            and kernel_headers(ver).is_dir()
        ):
            found.append(ver)
    if not found:
        raise LabSetupError(
            f"no kernel with image, modules and headers in the lab chroot {CHROOT}: {CHROOT_HINT}"
        )
    major = NEWER_SERIES.split(".")[0] + "."
    return max([v for v in found if v.startswith(major)] or found, key=_version_key)


def kernel_root(kver: str) -> Path:
    """Root of kver's image, modules and headers: the host's root, or the lab chroot for its kernels."""
    if not (Path("/boot") / f"vmlinuz-{kver}").exists() and (CHROOT / "boot" / f"vmlinuz-{kver}").exists():
        return CHROOT
    return Path("/")


def _in_chroot(kver: str) -> bool:
    return kernel_root(kver) != Path("/")


def kernel_image(kver: str) -> Path:
    return kernel_root(kver) / "boot" / f"vmlinuz-{kver}"


def modules_dir(kver: str) -> Path:
    """kver's /lib/modules/<kver>, seen from the host."""
    return kernel_root(kver) / "lib" / "modules" / kver


def kernel_headers(kver: str) -> Path:
    """kver's /lib/modules/<kver>/build, seen from the host (a chroot's absolute link is followed in the chroot)."""
    root = kernel_root(kver)
    build = root / "lib" / "modules" / kver / "build"
    if root != Path("/") and build.is_symlink() and os.readlink(build).startswith("/"):
        return root / os.readlink(build).lstrip("/")
    return build


def _hint(kver: str) -> str:
    return CHROOT_HINT if _in_chroot(kver) else DEPS_HINT


def _find_busybox() -> Path:
    for cand in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox")):
        if cand and Path(cand).is_file() and _is_static_elf(Path(cand)):
            return Path(cand)
    raise LabSetupError(f"no statically linked busybox found: {DEPS_HINT}")


def _is_static_elf(path: Path) -> bool:
    """True for an ELF64 executable without a program interpreter (PT_INTERP)."""
    with path.open("rb") as f:
        ident = f.read(64)
        if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2:
            return False
        phoff = struct.unpack_from("<Q", ident, 32)[0]
        phentsize, phnum = struct.unpack_from("<HH", ident, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def check_prerequisites(series: str = KERNEL_SERIES) -> str:
    """Check QEMU, busybox and a kernel of ``series`` (one of LAB_SERIES) with its headers; return the kernel
    version or raise LabSetupError."""
    if series not in LAB_SERIES:
        raise ValueError(f"unknown kernel series {series!r} (the lab has {', '.join(LAB_SERIES)})")
    if shutil.which("qemu-system-x86_64") is None:
        raise LabSetupError(f"qemu-system-x86_64 not found: {DEPS_HINT}")
    _find_busybox()
    kver = find_kernel() if series == KERNEL_SERIES else find_newer_kernel()
    if not (modules_dir(kver) / "modules.dep").is_file():
        raise LabSetupError(f"{modules_dir(kver)}/modules.dep missing: {_hint(kver)}")
    return kver


def chroot_command(
    cmd: Iterable[str], root: Path = CHROOT, env: Mapping[str, str] | None = None
) -> list[str]:
    """``cmd`` run in ``root`` with a clean environment (plus ``env``) and a /proc of its own (objtool reads it):
    the proc mount lives in private mount and PID namespaces, so it is gone with the command, however that ends."""
    return [
        "unshare",
        "--fork",
        "--kill-child",
        "--pid",
        "--mount",
        f"--mount-proc={root}/proc",
        "chroot",
        str(root),
        "/usr/bin/env",
        "-i",
        f"PATH={CHROOT_PATH}",
        "HOME=/root",
        "LANG=C.UTF-8",
        *(f"{k}={v}" for k, v in (env or {}).items()),
        *cmd,
    ]


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    with (LAB_DIR / f"{name}.lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_kmod(
    src_dir: Path, kver: str | None = None, timeout: float = 540, *, fatal_warnings: bool = False
) -> str:
    """`make -C /lib/modules/<kver>/build M=<src_dir> W=1 modules`; return make's output or raise BuildError.

    For a kernel of the lab chroot, src_dir must be inside the chroot, and make runs there (with the compiler
    that built that kernel).  ``fatal_warnings``: a compiler warning fails the build, and the objects are
    removed so that the next build compiles again."""
    kver = kver or find_kernel()
    src_dir = Path(src_dir).resolve()
    if not any((src_dir / name).is_file() for name in ("Kbuild", "Makefile")):
        raise BuildError(f"cannot build kernel module: no Kbuild or Makefile in {src_dir}")
    cmd = ["make", "-C", f"/lib/modules/{kver}/build", f"M={src_dir}", "W=1", "modules"]
    if _in_chroot(kver):
        root = kernel_root(kver).resolve()
        if not src_dir.is_relative_to(root):
            raise BuildError(f"cannot build for {kver}: {src_dir} is not inside its chroot {root}")
        cmd = chroot_command([*cmd[:3], f"M=/{src_dir.relative_to(root)}", *cmd[4:]], root)
    with _lock("build"):
        try:
            proc = subprocess.run(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False
            )
        except FileNotFoundError as exc:
            raise BuildError(f"cannot run make ({exc}): {_hint(kver)}") from exc
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
            raise BuildError(f"{shlex.join(cmd)} timed out after {timeout}s:\n{_tail(out, 80)}") from exc
    if proc.returncode != 0:
        raise BuildError(f"{shlex.join(cmd)} failed (rc={proc.returncode}):\n{_tail(proc.stdout, 80)}")
    if fatal_warnings and re.search(r"\bwarning:", proc.stdout):
        for built in (*src_dir.glob("*.o"), *src_dir.glob("*.ko")):
            built.unlink(missing_ok=True)
        raise BuildError(f"{shlex.join(cmd)} has compiler warnings:\n{_tail(proc.stdout, 80)}")
    return proc.stdout


def _is_source(f: Path) -> bool:
    """A module source: *.c (not kbuild's *.mod.c), *.h, Kbuild or Makefile."""
    if not f.is_file() or f.name.endswith(".mod.c"):
        return False
    return f.suffix in (".c", ".h") or f.name in ("Kbuild", "Makefile")


def _mirror_sources(src: Path, dst: Path) -> None:
    """Make dst's module sources (*.c, *.h, Kbuild, Makefile) those of src; build products stay (make is
    incremental), a file is rewritten only when it changed."""
    dst.mkdir(parents=True, exist_ok=True)
    wanted = {f.name: f for f in src.iterdir() if _is_source(f)}
    for f in dst.iterdir():
        if _is_source(f) and f.name not in wanted:
            f.unlink()
    for name, f in wanted.items():
        data = f.read_bytes()
        target = dst / name
        if not target.exists() or target.read_bytes() != data:
            tmp = target.with_name(f".{name}.tmp{os.getpid()}")
            tmp.write_bytes(data)
            tmp.rename(target)


def _build_dir(name: str, kver: str) -> Path:
    """Where a module is built for kver: under .lab/build/, or for a chroot kernel under the chroot's /build/."""
    return (kernel_root(kver) if _in_chroot(kver) else LAB_DIR) / "build" / f"{name}-{kver}"


def module_sources() -> Path:
    """The bdr module's source directory the lab tests: $BDR_LAB_MODULE_SRC if set, else <repo>/kernel."""
    return Path(os.environ.get(MODULE_SRC_ENV) or REPO / "kernel").resolve()


def module_build_dir(kdir: Path, kver: str) -> Path:
    """Where build_module builds a copy of the module of kdir for kver."""
    name = "bdr" if kdir == REPO / "kernel" else f"bdr-{hashlib.sha256(bytes(kdir)).hexdigest()[:8]}"
    return _build_dir(name, kver)


def build_module(
    repo: Path | str = REPO, kver: str | None = None, *, kernel_dir: Path | str | None = None
) -> Path:
    """Build (incrementally) the bdr module of <repo>/kernel (or of ``kernel_dir``); return bdr.ko's path.

    For the 6.12 kernel, <repo>/kernel is built in place.  Another ``kernel_dir``, and any module for a kernel of
    the lab chroot, is built in a copy under the lab's build directory (inside the chroot for its kernels), where
    the guest sees it; for a chroot kernel a compiler warning fails the build (as `make module` does for 6.12)."""
    kdir = Path(kernel_dir).resolve() if kernel_dir is not None else Path(repo).resolve() / "kernel"
    kver = kver or find_kernel()
    if not _in_chroot(kver) and kdir == Path(repo).resolve() / "kernel":
        output = build_kmod(kdir, kver)
        ko = kdir / "bdr.ko"
    else:
        if not any((kdir / name).is_file() for name in ("Kbuild", "Makefile")):
            raise BuildError(f"cannot build kernel module: no Kbuild or Makefile in {kdir}")
        build_dir = module_build_dir(kdir, kver)
        _mirror_sources(kdir, build_dir)
        try:
            output = build_kmod(build_dir, kver, fatal_warnings=_in_chroot(kver))
        except BuildError as exc:
            raise BuildError(f"building {kdir} for {kver} (in {build_dir}):\n{exc}") from exc
        ko = build_dir / "bdr.ko"
    if not ko.is_file():
        raise BuildError(f"make succeeded but {ko} was not produced:\n{_tail(output, 40)}")
    return ko


def build_helper_module(name: str, kver: str | None = None) -> Path:
    """Build the helper module in tests/vm/<name>/ (a copy under .lab/, so the tree stays clean); return .ko."""
    src = Path(__file__).resolve().parent / name
    dst = _build_dir(name, kver or find_kernel())
    _mirror_sources(src, dst)
    build_kmod(dst, kver)
    kos = sorted(dst.glob("*.ko"))
    if len(kos) != 1:
        raise BuildError(f"expected one .ko in {dst}, found {[k.name for k in kos]}")
    return kos[0]


# --------------------------------------------------------------------------------------------------------------
# Initramfs

# The first line the lab's init prints on the console: the kernel has booted as far as user space.
INIT_STARTED = "lab-init: started"

_INIT_SCRIPT = r"""#!/bin/sh
# BDR test lab guest init: mounts the host root (9p, read-only) at /host with writable tmpfs where needed,
# binds the writable share into it, then becomes the command agent (bash, chrooted into the host root).
export PATH=/bin
echo "@INIT_STARTED@"
fail() {
    echo "lab-init: FATAL: $*"
    poweroff -f
    sleep 5
    exit 1
}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || fail "insmod $m"
done
GS=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        lab.share=*) GS="${arg#lab.share=}" ;;
        lab.repo=*) REPO="${arg#lab.repo=}" ;;
        lab.modules=*) KMODS="${arg#lab.modules=}" ;;
    esac
done
[ -n "$GS" ] || fail "no lab.share= on the kernel command line"
P9=trans=virtio,version=9p2000.L,msize=512000
H=/host
mkdir -p $H /share
mount -t 9p -o $P9,cache=loose,ro host $H || fail "mount host root over 9p"
# A second view of the host root, not covered by the tmpfs mounts below (a repo may live under /tmp).
mkdir -p /ro && mount -o bind $H /ro || fail "bind the host root to /ro"
mount -t 9p -o $P9,cache=none share /share || fail "mount share over 9p"
mount -t proc proc $H/proc || fail "mount $H/proc"
mount -t sysfs sysfs $H/sys || fail "mount $H/sys"
mount -t debugfs debugfs $H/sys/kernel/debug 2>/dev/null
mount -t configfs configfs $H/sys/kernel/config 2>/dev/null
mount -t devtmpfs devtmpfs $H/dev || fail "mount $H/dev"
mkdir -p $H/dev/pts $H/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $H/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $H/dev/shm
ln -sf /proc/self/fd $H/dev/fd
ln -sf /proc/self/fd/0 $H/dev/stdin
ln -sf /proc/self/fd/1 $H/dev/stdout
ln -sf /proc/self/fd/2 $H/dev/stderr
for d in tmp var/tmp; do
    mount -t tmpfs -o mode=1777 tmpfs $H/$d || fail "mount $H/$d"
done
mount -t tmpfs -o mode=755 tmpfs $H/run || fail "mount $H/run"
if [ -n "$KMODS" ]; then
    # A kernel of the lab chroot: its /lib/modules (from the host's view) where modprobe looks.
    mount -o bind "/ro$KMODS" $H/lib/modules || fail "bind the kernel's modules $KMODS"
fi
mkdir -p $H/run/lock && chmod 1777 $H/run/lock
case "$REPO" in
    /tmp/*|/var/tmp/*|/run/*)
        mkdir -p "$H$REPO" && mount -o bind "/ro$REPO" "$H$REPO" || fail "bind the repository $REPO"
        ;;
esac
mkdir -p "$H$GS" 2>/dev/null
mount -o bind /share "$H$GS" || fail "bind the share to $H$GS"
mkdir -p /share/.agent || fail "no agent dir in the share"
hostname bdr-lab
ip link set lo up || fail "bring up lo"
mkdir -p $H/run/lab/bin && cp /agent.sh $H/run/lab/agent.sh && mkfifo $H/run/lab/tick || fail "agent setup"
cp /bin/busybox $H/run/lab/bin/busybox || fail "copy busybox"
for a in @FAST_APPLETS@; do
    ln -s busybox $H/run/lab/bin/$a || fail "link $a"
done
[ -x $H/bin/bash ] || fail "no /bin/bash in the host root"
exec env -i PATH=@GUEST_PATH@ LAB_AGENT_DIR="$GS/.agent" chroot $H /bin/bash /run/lab/agent.sh
"""

# The command agent: PID 1 of the guest, a bash inside the chroot.  It forks (never execs) per command, so a
# command costs one fork plus a few 9p file operations; TCG makes every exec of a dynamic binary slow.
_AGENT_SCRIPT = r"""# BDR test lab command agent (see tests/vm/lab.py for the protocol).
shopt -s nullglob
cd "$LAB_AGENT_DIR" || exit 1
__lab_dir=$PWD
exec 8<>/run/lab/tick  # a FIFO nobody writes: `read -t` on it is a sleep without an exec
for b in /sys/block/vd*; do
    echo "${b##*/} $(<"$b/serial")"
done >ready.tmp
mv ready.tmp ready
declare -A __lab_started=()
while :; do
    for __lab_f in cmd-*.sh; do
        __lab_n=${__lab_f#cmd-}
        __lab_n=${__lab_n%.sh}
        [[ -n ${__lab_started[$__lab_n]:-} ]] && continue
        __lab_started[$__lab_n]=1
        (
            (
                exec 8<&- </dev/null
                shopt -u nullglob
                unset -v __lab_started __lab_f
                BASH_ARGV0=$__lab_dir/job-$__lab_n.sh
                . "$__lab_dir/cmd-$__lab_n.sh"
                . "$__lab_dir/job-$__lab_n.sh"
            ) >"out-$__lab_n" 2>&1
            echo "$?" >"rc-$__lab_n"  # one write: the host waits for the newline
        ) &
    done
    if [[ -e sysrq ]]; then
        # A command hung: dump blocked tasks into the kernel log and hand the log to the host.
        echo w >/proc/sysrq-trigger
        dmesg >sysrq-dmesg.tmp 2>&1
        mv sysrq-dmesg.tmp sysrq-dmesg
        rm -f sysrq
    fi
    if [[ -e poweroff ]]; then
        sync
        echo o >/proc/sysrq-trigger
    fi
    read -r -t 0.05 -u 8 || true
done
"""


def _modules_dep(kver: str) -> dict[str, list[str]]:
    deps: dict[str, list[str]] = {}
    for line in (modules_dir(kver) / "modules.dep").read_text().splitlines():
        if ":" in line:
            mod, rest = line.split(":", 1)
            deps[mod] = rest.split()
    return deps


def _mod_name(path: str) -> str:
    name = Path(path).name.split(".ko")[0]
    return name.replace("-", "_")


def _initramfs_modules(kver: str) -> list[str]:
    """Relative paths (as in modules.dep) of the needed modules and their dependencies, in load order."""
    deps = _modules_dep(kver)
    by_name = {_mod_name(p): p for p in deps}
    builtin_file = modules_dir(kver) / "modules.builtin"
    builtin = {_mod_name(p) for p in builtin_file.read_text().split()} if builtin_file.is_file() else set()
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in INITRAMFS_MODULES:
        if name.replace("-", "_") in builtin:
            continue
        if name.replace("-", "_") not in by_name:
            raise LabSetupError(f"module {name} not found in {modules_dir(kver)}/modules.dep: {_hint(kver)}")
        visit(by_name[name.replace("-", "_")])
    return order


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dc", str(path)], stdout=subprocess.PIPE, check=True).stdout
    return data


class _Cpio:
    """Minimal writer of the 'newc' cpio format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        self.parts.append(hdr + b"\0" * (-len(hdr) % 4))
        self.parts.append(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


def initramfs(kver: str | None = None) -> Path:
    """The lab initramfs for kver, built once and cached under tests/vm/.lab/ (keyed by a content hash)."""
    kver = kver or find_kernel()
    busybox = _find_busybox()
    mod_paths = _initramfs_modules(kver)
    mod_root = modules_dir(kver)
    names = [_mod_name(p) for p in mod_paths]
    init = (
        _INIT_SCRIPT.replace("@MODULES@", " ".join(names))
        .replace("@GUEST_PATH@", GUEST_PATH)
        .replace("@FAST_APPLETS@", " ".join(GUEST_FAST_APPLETS))
        .replace("@INIT_STARTED@", INIT_STARTED)
    )
    key = hashlib.sha256()
    for item in (
        str(INITRAMFS_FORMAT),
        kver,
        init,
        _AGENT_SCRIPT,
        hashlib.sha256(busybox.read_bytes()).hexdigest(),
    ):
        key.update(item.encode() + b"\0")
    for p in mod_paths:
        st = (mod_root / p).stat()
        key.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    out = LAB_DIR / f"initramfs-{kver}-{key.hexdigest()[:16]}.cpio"
    if out.is_file():
        return out
    with _lock("initramfs"):
        if out.is_file():
            return out
        applets = subprocess.run(
            [str(busybox), "--list"], stdout=subprocess.PIPE, text=True, check=True
        ).stdout.split()
        cpio = _Cpio()
        for d in ("bin", "dev", "proc", "sys", "host", "share", "lib", "lib/modules", "tmp"):
            cpio.dir(d)
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3)
        cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
        for applet in applets:
            if applet != "busybox" and "/" not in applet:
                cpio.symlink(f"bin/{applet}", "busybox")
        cpio.symlink("sbin", "bin")
        for p, name in zip(mod_paths, names, strict=True):
            cpio.file(f"lib/modules/{name}.ko", _read_module(mod_root / p))
        cpio.file("init", init.encode(), 0o755)
        cpio.file("agent.sh", _AGENT_SCRIPT.encode(), 0o644)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(cpio.finish())
        tmp.rename(out)
        for old in LAB_DIR.glob(f"initramfs-{kver}-*.cpio"):
            if old != out:
                old.unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------------------------------------------
# Kernel log checking

# A kernel log line matching one of these means the test must fail.
KERNEL_ERROR_PATTERNS = [
    r"\bBUG[: ]",
    r"\bWARNING:",
    r"\bOops\b",
    r"Call Trace:",
    r"general protection fault(?! ip:)",  # "traps: prog[pid] general protection fault ip:" is userspace
    r"\bKASAN\b",
    r"\bUBSAN\b",
    r"\bKFENCE\b",
    r"kernel BUG",
    r"Kernel panic",
    r"RCU stall|rcu_\w+ (self-)?detected stall|detected stalls on CPUs",
    r"blocked for more than \d+ seconds",
    r"\blist_\w+ corruption",
    r"soft lockup|hard LOCKUP",
    r"refcount_t: ",
    r"Unable to handle kernel",
    r"unable to handle page fault",
    r"invalid opcode(?! ip:)",
    r"stack-protector|stack guard page",
    r"Bad page (state|map)",
    r"double free|use-after-free|slab-out-of-bounds",
    r"possible circular locking|possible recursive locking|inconsistent lock state",
    r"scheduling while atomic|sleeping function called from invalid context",
]
_KERNEL_ERROR_RE = re.compile("|".join(f"(?:{p})" for p in KERNEL_ERROR_PATTERNS))


def find_kernel_errors(lines: Iterable[str], before: int = 3, after: int = 40) -> list[str]:
    """Kernel log lines that indicate a kernel problem, with `before` lines ahead of each (a WARN's own
    message precedes its "WARNING:" line) and up to `after` lines of its report."""
    lines = list(lines)
    hits = [i for i, line in enumerate(lines) if _KERNEL_ERROR_RE.search(line)]
    report: list[str] = []
    shown = -1
    for i in hits:
        start = max(i - before, shown + 1)
        if report and start > shown + 1:
            report.append("...")
        stop = min(len(lines), i + after + 1)
        report.extend(lines[start:stop])
        shown = max(shown, stop - 1)
    return report


def _parse_kmsg(raw: str) -> list[tuple[int, str]]:
    """Records of /dev/kmsg ('prio,seq,usec,flags;text', dictionary lines start with a space) -> (seq, line)."""
    records: list[tuple[int, str]] = []
    for line in raw.splitlines():
        if not line or line[0] == " " or ";" not in line:
            continue
        head, text = line.split(";", 1)
        fields = head.split(",")
        if len(fields) < 3 or not fields[1].isdigit():
            continue
        seq, usec = int(fields[1]), int(fields[2]) if fields[2].isdigit() else 0
        text = re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), text)
        for part in text.split("\n"):
            records.append((seq, f"[{usec // 1000000:5d}.{usec % 1000000:06d}] {part}"))
    return records


# --------------------------------------------------------------------------------------------------------------
# The guest


def _set_pdeathsig() -> None:
    """In the QEMU child: die with the process that started us, so QEMU never outlives the test run."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _reap(proc: subprocess.Popen[bytes], tmpdir: str) -> None:
    """Finalizer: kill QEMU if it still runs and remove the temp dir (disk images, share, logs)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    shutil.rmtree(tmpdir, ignore_errors=True)


def _sweep_stale_tmpdirs() -> None:
    """Remove temp dirs left by lab processes that were killed before they could clean up."""
    for d in Path(tempfile.gettempdir()).glob("bdr-lab-*"):
        try:
            owner = int((d / "owner").read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _choose_share_mount() -> str:
    for cand in SHARE_MOUNT_CANDIDATES:
        p = Path(cand)
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
                return cand
    return SHARE_MOUNT_FALLBACK


class Guest:
    """One QEMU guest running a lab kernel (the 6.12 one unless ``kver`` says otherwise); use as a context
    manager (or call close())."""

    def __init__(
        self,
        disks: Mapping[str, str | int] | None = None,
        memory: str = "1536M",
        cpus: int = 2,
        *,
        kver: str | None = None,
        cwd: Path | str = REPO,
        boot_timeout: float = 300.0,  # a TCG boot next to another busy guest on two cores can take minutes
        kernel_timeout: float = 120.0,  # the kernel alone reaches init in seconds, even so
        append: Iterable[str] = (),
        images: Mapping[str, Path] | None = None,
        cache: str = "unsafe",
        discard: Mapping[str, str] | None = None,
    ) -> None:
        """``discard``: QEMU's discard mode of the named disks ("unmap", the default: a discard punches a hole
        in the image, which then reads zeros; "ignore": the guest still sees discard support, the image keeps
        its data).  ``images``: host files to use for the named disks instead of throw-away ones (created at the size
        asked if missing, kept as they are otherwise, never removed): a second Guest booted on them sees what
        the first one wrote, e.g. after ``power_cut()``.  ``cache``: QEMU's cache mode of every disk."""
        self.kver = kver or check_prerequisites()
        self.cwd = str(cwd)
        self._lock = threading.Lock()
        self._seq = 0
        self._kmsg_seq = -1
        self._dead: str | None = None
        self._closed = False
        self._console_pos = 0
        self._panic_seen = False
        disks = dict(disks or {})
        for name in disks:
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,20}", name):
                raise ValueError(f"disk name {name!r}: use 1-20 characters of [A-Za-z0-9_-]")
        sizes = {name: parse_size(size) for name, size in disks.items()}
        initrd = initramfs(self.kver)

        _sweep_stale_tmpdirs()
        self.tmpdir = tempfile.mkdtemp(prefix="bdr-lab-")
        tmp = Path(self.tmpdir)
        (tmp / "owner").write_text(str(os.getpid()))
        self.share = tmp / "share"
        self.share.mkdir()
        self._agent = self.share / ".agent"
        self.guest_share = _choose_share_mount()
        self.console_log = tmp / "console.log"
        self.qemu_log = tmp / "qemu.log"
        self._images: dict[str, Path] = {}
        self._devices: dict[str, str] = {}

        drive_args: list[str] = []
        for i, (name, size) in enumerate(sizes.items()):
            img = Path(images[name]) if images and name in images else tmp / f"disk-{name}.img"
            if not img.exists() or img.stat().st_size != size:
                with img.open("r+b" if img.exists() else "wb") as f:
                    f.truncate(size)
            self._images[name] = img
            # cache=unsafe (default): the images are throw-away, so host-side durability is irrelevant; QEMU
            # still completes guest flushes/FUA in order and writes land in the host page cache, where the
            # host (disk_image()) reads them.  This keeps emulated I/O as fast as it gets.  Power-cut tests
            # use cache=none: what the guest did not flush may be lost, what it flushed is in the image.
            drive_args += [
                "-drive",
                f"if=none,id=d{i},file={img},format=raw,cache={cache},aio=threads,"
                f"discard={(discard or {}).get(name, 'unmap')}",
                "-device",
                f"virtio-blk-pci,drive=d{i},serial={name}",
            ]
        append_args = [
            "console=ttyS0",
            "loglevel=5",  # console shows notices and worse (WARN, BUG, hung tasks); dmesg has everything
            "panic=-1",  # reboot on panic, and -no-reboot turns that into QEMU exiting
            "mitigations=off",
            "random.trust_cpu=on",
            "rcupdate.rcu_cpu_stall_timeout=60",  # TCG on a loaded host is slow; real stalls still show
            "sysctl.kernel.hung_task_timeout_secs=60",
            f"lab.share={self.guest_share}",
            f"lab.repo={REPO}",
            *([f"lab.modules={modules_dir(self.kver).parent.resolve()}"] if _in_chroot(self.kver) else []),
            *append,
        ]
        self.qemu_cmd = [
            "qemu-system-x86_64",
            "-nodefaults",
            "-no-user-config",
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            GUEST_CPU,
            "-m",
            str(memory),
            "-smp",
            str(cpus),
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            f"file:{self.console_log}",
            "-no-reboot",
            "-kernel",
            str(kernel_image(self.kver)),
            "-initrd",
            str(initrd),
            "-append",
            " ".join(append_args),
            "-virtfs",
            "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
            "-virtfs",
            f"local,path={self.share},mount_tag=share,security_model=none",
            *drive_args,
        ]
        t0 = time.monotonic()
        try:
            with self.qemu_log.open("wb") as qlog:
                self._proc = subprocess.Popen(
                    self.qemu_cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=qlog,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_set_pdeathsig,
                )
        except OSError as exc:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            raise LabSetupError(f"cannot start qemu-system-x86_64 ({exc}): {DEPS_HINT}") from exc
        self._finalizer = weakref.finalize(self, _reap, self._proc, self.tmpdir)
        try:
            self._wait_ready(sizes, boot_timeout, kernel_timeout)
        except BaseException:
            self._kill()
            self._finalizer()
            raise
        self.boot_time = time.monotonic() - t0

    # ---- lifecycle

    def _wait_ready(self, sizes: Mapping[str, int], timeout: float, kernel_timeout: float) -> None:
        ready = self._agent / "ready"
        start = time.monotonic()
        deadline = start + timeout
        in_user_space = False
        while not ready.exists():
            self._check_alive("while booting")
            now = time.monotonic()
            if not in_user_space and now > start + kernel_timeout:
                in_user_space = INIT_STARTED in self.console()
                if not in_user_space:
                    raise GuestBootHung(
                        f"guest kernel did not start init within {kernel_timeout:g}s (QEMU killed)\n"
                        f"{self._diagnostics()}"
                    )
            if now > deadline:
                raise GuestBootError(
                    f"guest agent not ready after {timeout:.0f}s (QEMU killed)\n{self._diagnostics()}"
                )
            time.sleep(0.05)
        by_serial = {}
        for line in ready.read_text().splitlines():
            dev, _, serial = line.partition(" ")
            by_serial[serial.strip()] = f"/dev/{dev}"
        for name in sizes:
            if name not in by_serial:
                raise GuestBootError(
                    f"disk {name!r} not found in the guest (seen: {by_serial})\n{self._diagnostics()}"
                )
            self._devices[name] = by_serial[name]

    def __enter__(self) -> Guest:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        """True while the guest can run commands."""
        return self._dead is None and not self._closed and self._proc.poll() is None

    @property
    def qemu_pid(self) -> int:
        return self._proc.pid

    @property
    def qemu_running(self) -> bool:
        return self._proc.poll() is None

    def close(self, grace: float = 5.0) -> None:
        """Power the guest off (QEMU is killed after `grace` seconds) and remove all temp files."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._proc.poll() is None and self._dead is None:
                with contextlib.suppress(OSError):
                    self._write_atomic(self._agent / "poweroff", b"")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=grace)
        finally:
            self._kill()
            self._finalizer()

    def power_cut(self) -> None:
        """Kill QEMU at once (SIGKILL): the guest stops as if its power failed; its disk images stay."""
        self._dead = "power cut"
        self._kill()
        self.close()

    def _kill(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=10)

    # ---- disks and files

    def disk(self, name: str) -> str:
        """Guest device path of a named disk, e.g. '/dev/vda'."""
        return self._devices[name]

    def disk_image(self, name: str) -> Path:
        """Host path of a named disk's raw image file."""
        return self._images[name]

    @property
    def disks(self) -> dict[str, str]:
        return dict(self._devices)

    def guest_path(self, host_path: Path | str) -> str:
        """Path inside the guest of a file in the share."""
        rel = Path(host_path).resolve().relative_to(self.share.resolve())
        return f"{self.guest_share}/{rel}" if str(rel) != "." else self.guest_share

    # ---- diagnostics

    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except OSError:
            return ""

    def _diagnostics(self) -> str:
        console = self.console()
        parts = []
        report = find_kernel_errors(console.splitlines(), before=5, after=60)
        if report:  # the start of a kernel report (the tail below may hold only its end)
            parts += ["--- console: first kernel reports ---", "\n".join(report[:200])]
        parts += [
            f"--- console (last {CONSOLE_TAIL_LINES} lines) ---",
            _tail(console, CONSOLE_TAIL_LINES) or "(empty)",
        ]
        with contextlib.suppress(OSError):
            qlog = self.qemu_log.read_text(errors="replace").strip()
            if qlog:
                parts += ["--- qemu output ---", _tail(qlog, 20)]
        return "\n".join(parts)

    def _panicked(self) -> bool:
        """Scan the console output written since the last call for a kernel panic."""
        if not self._panic_seen:
            start = max(0, self._console_pos - 64)  # overlap, so a marker split across reads is found
            try:
                with self.console_log.open("rb") as f:
                    f.seek(start)
                    chunk = f.read()
            except OSError:
                return False
            self._console_pos = start + len(chunk)
            self._panic_seen = b"Kernel panic - not syncing" in chunk
        return self._panic_seen

    def _check_alive(self, doing: str) -> None:
        __tracebackhide__ = True
        if self._closed:
            raise GuestDied("guest already closed")
        if self._dead is not None:
            raise GuestDied(f"guest is dead ({self._dead}); no more commands can run in it")
        rc = self._proc.poll()
        if rc is not None or self._panicked():
            why = f"QEMU exited with status {rc}" if rc is not None else "guest kernel panicked"
            self._dead = f"{why} {doing}"
            time.sleep(0.2)  # let the console file catch up
            self._kill()
            raise GuestDied(f"{self._dead}\n{self._diagnostics()}")

    # ---- commands

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.rename(path)

    def run(
        self,
        script: str,
        timeout: float = 120,
        check: bool = True,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Result:
        """Run a bash script in the guest (chroot into the host root); stdout+stderr are combined.

        Safe to call from several threads at once (commands run concurrently in the guest).
        Raises GuestCommandFailed (check=True and rc != 0), GuestTimeout (the guest is killed) or GuestDied.
        """
        __tracebackhide__ = True  # pytest shows the caller's line, not the lab's internals
        with self._lock:
            self._check_alive("before the command")
            self._seq += 1
            n = self._seq
        agent = self._agent
        exports = {
            "PATH": GUEST_PATH,
            "DM_DISABLE_UDEV": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            **(env or {}),
        }
        # The agent sources the prologue, then the script, in a subshell of its own (see _AGENT_SCRIPT).
        prologue = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in exports.items())
        prologue += f"cd {shlex.quote(cwd or self.cwd)} || exit 125\n"
        (agent / f"job-{n}.sh").write_text(script)
        t0 = time.monotonic()
        self._write_atomic(agent / f"cmd-{n}.sh", prologue.encode())
        rc_file, out_file = agent / f"rc-{n}", agent / f"out-{n}"
        deadline = t0 + timeout
        next_alive_check = 0.0
        while True:
            with contextlib.suppress(FileNotFoundError):
                rc_text = rc_file.read_text()
                if rc_text.endswith("\n"):
                    break
            now = time.monotonic()
            if now >= next_alive_check:
                with self._lock:
                    self._check_alive("while running the command:\n" + _indent(_head(script, 30)))
                next_alive_check = now + 0.25
            if now > deadline:
                self._on_timeout(script, timeout, out_file)
            time.sleep(_POLL)
        duration = time.monotonic() - t0
        rc = int(rc_text)
        output = out_file.read_bytes().decode(errors="replace")
        for name in (f"rc-{n}", f"out-{n}", f"cmd-{n}.sh", f"job-{n}.sh"):
            with contextlib.suppress(OSError):
                (agent / name).unlink()
        result = Result(rc, output, duration)
        if check and rc != 0:
            raise GuestCommandFailed(script, result)
        return result

    def _on_timeout(self, script: str, timeout: float, out_file: Path) -> None:
        __tracebackhide__ = True
        with self._lock:
            blocked = ""
            if self._dead is None and self._proc.poll() is None:
                # Ask the agent for a blocked-task dump before killing the guest.
                dump = self._agent / "sysrq-dmesg"
                with contextlib.suppress(OSError):
                    self._write_atomic(self._agent / "sysrq", b"w")
                    end = time.monotonic() + 5
                    while not dump.exists() and time.monotonic() < end and self._proc.poll() is None:
                        time.sleep(0.05)
                    if dump.exists():
                        blocked = _tail(dump.read_text(errors="replace"), 80)
            self._dead = f"a command timed out after {timeout:g}s"
            self._kill()
        try:
            partial = out_file.read_bytes().decode(errors="replace")
        except OSError:
            partial = ""
        msg = [
            f"guest command did not finish within {timeout:g}s (guest killed):",
            _indent(_head(script, 30)),
            f"--- output so far (last {OUTPUT_TAIL_LINES} lines) ---",
            _tail(partial, OUTPUT_TAIL_LINES) or "(none)",
        ]
        if blocked:
            msg += ["--- kernel log after sysrq-w (blocked tasks, last 80 lines) ---", blocked]
        msg.append(self._diagnostics())
        raise GuestTimeout("\n".join(msg))

    # ---- kernel log

    def dmesg(self) -> str:
        """The guest kernel log (`dmesg`)."""
        return self.run("dmesg", timeout=60).output

    def _read_kmsg(self) -> list[tuple[int, str]]:
        # awk drops what was already checked and writes the rest in one go (the share is slow per write).
        out = self.run(
            "dd if=/dev/kmsg iflag=nonblock bs=65536 status=none 2>/dev/null"
            f" | awk -F, -v s={self._kmsg_seq} '/^[0-9]/ && $2 + 0 > s'",
            timeout=60,
        ).output
        return _parse_kmsg(out)

    def check_kernel_log(self) -> None:
        """Raise GuestKernelError if the kernel log since the previous check shows an oops, BUG, WARN, ..."""
        __tracebackhide__ = True
        records = [(s, line) for s, line in self._read_kmsg() if s > self._kmsg_seq]
        if records:
            self._kmsg_seq = max(s for s, _ in records)
        bad = find_kernel_errors(line for _, line in records)
        if bad:
            raise GuestKernelError("guest kernel log reports a problem:\n" + "\n".join(bad))


def boot(*args: object, retries: int = 1, **kwargs: object) -> Guest:
    """Boot a Guest, booting again (up to ``retries`` times) if the guest dies, or its kernel stops, before
    its agent is ready.

    Under multi-threaded TCG the kernel very rarely oopses while patching its own text at boot (an int3 hit
    by a vCPU that still runs the old translation), or stops early in its boot with nothing on the console.
    Nothing of a test has run by then, so a second boot is safe; the first console tail is printed so the
    event stays visible.
    """
    for attempt in range(retries + 1):
        try:
            return Guest(*args, **kwargs)  # type: ignore[arg-type]
        except (GuestDied, GuestBootHung) as exc:
            if attempt == retries:
                raise
            what = "kernel stopped" if isinstance(exc, GuestBootHung) else "died"
            print(f"bdr lab: guest {what} while booting, booting again:\n{_tail(str(exc), 25)}", flush=True)
    raise AssertionError("unreachable")
