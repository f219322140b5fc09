"""The test lab itself: results come back, and every failure path makes a test fail with a readable message."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.vm import lab

VM_DISKS = {"src": "64M", "dst": "32M"}
VM_MEMORY = "1024M"


@pytest.fixture(scope="module")
def warn_ko(lab_kernel: str) -> Path:
    """Helper module whose init emits one kernel WARN and fails, so it can be inserted again and again."""
    try:
        return lab.build_helper_module("warn_mod", lab_kernel)
    except lab.BuildError as exc:
        problem = str(exc)
    pytest.fail(f"the lab's WARN helper module does not build:\n{problem}", pytrace=False)


def test_output_and_exit_code_come_back(guest: lab.Guest) -> None:
    res = guest.run("echo to-stdout; echo to-stderr >&2; exit 3", check=False)
    assert res.rc == 3
    assert not res.ok
    assert "to-stdout" in res.output
    assert "to-stderr" in res.output
    assert guest.run("printf 'a\\nb\\n'").output == "a\nb\n"


def test_guest_runs_the_lab_kernel_in_the_repo(guest: lab.Guest, lab_kernel: str) -> None:
    out = guest.run('uname -r; pwd; echo "$DM_DISABLE_UDEV $HOME"; test -w /tmp && echo tmp-writable').output
    assert out.splitlines() == [lab_kernel, str(lab.REPO), "1 /tmp", "tmp-writable"]
    assert guest.run("pwd", cwd="/usr").output.strip() == "/usr"
    assert guest.run('echo "$LAB_X"', env={"LAB_X": "a b'c"}).output.strip() == "a b'c"


def test_disks_have_the_requested_sizes(guest: lab.Guest) -> None:
    assert guest.disk("src") != guest.disk("dst")
    for name, size in VM_DISKS.items():
        dev = guest.disk(name)
        assert guest.run(f"blockdev --getsize64 {dev}").output.strip() == str(lab.parse_size(size))
        assert guest.disk_image(name).stat().st_size == lab.parse_size(size)
    # what the guest writes to a disk is in its image on the host
    guest.run(
        f"echo lab-disk-marker | dd of={guest.disk('dst')} bs=512 seek=5 conv=sync oflag=direct status=none"
    )
    with guest.disk_image("dst").open("rb") as f:
        f.seek(5 * 512)
        assert f.read(16) == b"lab-disk-marker\n"


def test_share_is_writable_both_ways(guest: lab.Guest) -> None:
    (guest.share / "from-host").write_text("host data\n")
    guest.run(
        f"cat {guest.guest_share}/from-host > {guest.guest_share}/from-guest; echo more >> {guest.guest_share}/from-guest"
    )
    assert (guest.share / "from-guest").read_text() == "host data\nmore\n"
    assert guest.guest_path(guest.share / "x") == f"{guest.guest_share}/x"


def test_the_host_root_is_read_only_in_the_guest(guest: lab.Guest) -> None:
    res = guest.run(f"touch {lab.REPO}/lab-must-not-exist", check=False)
    assert res.rc != 0
    assert "Read-only file system" in res.output
    assert not (lab.REPO / "lab-must-not-exist").exists()


def test_failed_command_raises_with_command_rc_and_output(guest: lab.Guest) -> None:
    with pytest.raises(lab.GuestCommandFailed) as info:
        guest.run("echo some-diagnostic-output\nfalse-marker-cmd() { return 7; }\nfalse-marker-cmd")
    msg = str(info.value)
    assert "rc=7" in msg
    assert "some-diagnostic-output" in msg
    assert "false-marker-cmd" in msg
    assert info.value.result.rc == 7
    assert guest.alive, "a failed command must not end the guest"


def test_commands_can_run_concurrently(guest: lab.Guest) -> None:
    results: dict[int, lab.Result] = {}

    def worker(i: int) -> None:
        results[i] = guest.run(f"sleep 2; echo job{i}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: r.output.strip() for i, r in results.items()} == {i: f"job{i}" for i in range(4)}
    assert time.monotonic() - t0 < 6, "commands must run side by side (one after another takes over 8 s)"


def test_kernel_warn_fails_the_kernel_log_check(guest: lab.Guest, warn_ko: Path) -> None:
    guest.check_kernel_log()  # clean so far (also consumes the boot log)
    res = guest.run(f"insmod {warn_ko}", check=False)
    assert res.rc != 0, "the helper refuses to stay loaded"
    with pytest.raises(lab.GuestKernelError) as info:
        guest.check_kernel_log()
    msg = str(info.value)
    assert "WARNING:" in msg
    assert "bdr-lab: deliberate warning from lab_warn" in msg
    assert "Call Trace" in msg
    guest.check_kernel_log()  # the report was consumed: the next check only sees newer messages


def test_a_kernel_warn_fails_the_test_that_caused_it(tmp_path: Path, warn_ko: Path) -> None:
    """The conftest's per-test kernel log check, seen from a pytest run of its own."""
    (tmp_path / "conftest.py").write_text("from tests.vm.conftest import *  # noqa: F403\n")
    (tmp_path / "test_inner.py").write_text(
        f"""
VM_DISKS = {{}}
VM_MEMORY = "512M"


def test_clean(guest):
    guest.run("true")


def test_provokes_warn(guest):
    guest.run("insmod {warn_ko}", check=False)


def test_after(guest):
    guest.run("true")
"""
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(lab.REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout
    assert "3 passed, 1 error" in proc.stdout, proc.stdout
    assert "ERROR at teardown of test_provokes_warn" in proc.stdout, proc.stdout
    assert "GuestKernelError" in proc.stdout
    assert "bdr-lab: deliberate warning from lab_warn" in proc.stdout


def test_module_build_errors_are_reported(tmp_path: Path, lab_kernel: str) -> None:
    with pytest.raises(lab.BuildError, match="no Kbuild or Makefile"):
        lab.build_module(tmp_path, lab_kernel)
    kdir = tmp_path / "kernel"
    kdir.mkdir()
    (kdir / "Kbuild").write_text("obj-m := bdr.o\n")
    (kdir / "bdr.c").write_text('#include <linux/module.h>\nint lab_broken = ;\nMODULE_LICENSE("GPL");\n')
    with pytest.raises(lab.BuildError) as info:
        lab.build_module(tmp_path, lab_kernel)
    msg = str(info.value)
    assert f"M={kdir}" in msg
    assert "bdr.c:2" in msg and "error:" in msg


def test_module_taint_and_userspace_traps_are_not_kernel_errors() -> None:
    log = [
        "[   12.000000] lab_warn: loading out-of-tree module taints kernel.",
        "[   12.000001] lab_warn: module verification failed: signature and/or required key missing - tainting kernel",
        "[   12.000002] Kernel command line: console=ttyS0 sysctl.kernel.hung_task_timeout_secs=60",
        "[   12.000003] device-mapper: ioctl: 4.48.0-ioctl (2023-03-01) initialised: dm-devel@lists.linux.dev",
        "[   12.000004] traps: python3[301] general protection fault ip:7f0000001000 sp:7ffd00000000 error:0",
        "[   12.000005] traps: fio[302] trap invalid opcode ip:55d000001000 sp:7ffd00000000 error:0 in fio",
    ]
    assert lab.find_kernel_errors(log) == []


@pytest.mark.parametrize(
    "line",
    [
        "WARNING: CPU: 1 PID: 301 at drivers/md/dm-bdr.c:123 bdr_map+0x1/0x2 [bdr]",
        "BUG: unable to handle page fault for address: ffffffffc0000000",
        "BUG: KASAN: slab-out-of-bounds in bdr_end_io+0x10/0x20",
        "kernel BUG at drivers/md/dm-bdr.c:77!",
        "Oops: general protection fault, probably for non-canonical address 0xdead000000000100: 0000 [#1] SMP",
        "INFO: task dmsetup:412 blocked for more than 60 seconds.",
        "rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
        "list_add corruption. prev->next should be next (ffff888003c3a9c8), but was 0000000000000000.",
        "watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [kworker/0:1:33]",
        "BUG: sleeping function called from invalid context at kernel/locking/mutex.c:580",
        "refcount_t: underflow; use-after-free.",
        "Oops: invalid opcode: 0000 [#1] PREEMPT SMP NOPTI",
        "general protection fault, probably for non-canonical address 0xdead000000000122: 0000 [#1] SMP",
        " Call Trace:",
    ],
)
def test_kernel_error_patterns_are_recognised(line: str) -> None:
    log = [f"[    1.00000{i}] ok" for i in range(6)] + [f"[    2.000000] {line}", "[    2.000001] details"]
    assert lab.find_kernel_errors(log, before=1, after=1) == [
        "[    1.000005] ok",
        f"[    2.000000] {line}",
        "[    2.000001] details",
    ]


def test_kernel_error_report_keeps_context_and_marks_gaps() -> None:
    log = [f"line {i}" for i in range(100)]
    log[10] = "WARNING: CPU: 0 PID: 1 at x.c:1 f+0x0/0x1"
    log[80] = "BUG: unable to handle page fault for address: 0000000000000008"
    report = lab.find_kernel_errors(log, before=2, after=3)
    assert report == [*log[8:14], "...", *log[78:84]]


def test_hanging_command_times_out_and_kills_the_guest() -> None:
    with lab.Guest(disks={}, memory="512M", cpus=1) as g:
        t0 = time.monotonic()
        with pytest.raises(lab.GuestTimeout) as info:
            g.run("echo started-hanging; sleep 600", timeout=5)
        assert time.monotonic() - t0 < 30
        msg = str(info.value)
        assert "did not finish within 5s" in msg
        assert "sleep 600" in msg
        assert "started-hanging" in msg
        assert "console" in msg
        assert "Show Blocked State" in msg, "the blocked-task dump is part of the report"
        assert not g.alive
        assert not g.qemu_running, "QEMU must be killed after a timeout"
        t1 = time.monotonic()
        with pytest.raises(lab.GuestDied, match="dead"):
            g.run("true")
        assert time.monotonic() - t1 < 5, "a dead guest must refuse commands at once, not wait for a timeout"
    assert not Path(g.tmpdir).exists(), "close() removes disks, share and logs"


def test_kernel_panic_is_reported_at_once_with_the_console() -> None:
    with lab.Guest(disks={"d": "1M"}, memory="512M", cpus=1) as g:
        image = g.disk_image("d")
        t0 = time.monotonic()
        with pytest.raises(lab.GuestDied) as info:
            g.run("echo c > /proc/sysrq-trigger; sleep 600", timeout=300)
        assert time.monotonic() - t0 < 60, "a panic must not wait for the command timeout"
        msg = str(info.value)
        assert "Kernel panic" in msg
        assert "sysrq" in msg.lower()
        # the start of the report is shown on its own, whatever the console tail still holds of it
        assert "--- console: first kernel reports ---" in msg
        assert not g.qemu_running
    assert not image.exists()


def test_boot_timeout_kills_qemu_and_shows_the_console() -> None:
    with pytest.raises(lab.GuestBootError) as info:
        lab.Guest(disks={}, memory="512M", cpus=1, boot_timeout=1)
    msg = str(info.value)
    assert "not ready after 1s" in msg
    assert "--- console (last 60 lines) ---" in msg


def test_a_kernel_that_stops_before_init_is_booted_again(capsys: pytest.CaptureFixture[str]) -> None:
    # No kernel reaches init within 10 ms: both boots count as stopped in the kernel.
    t0 = time.monotonic()
    with pytest.raises(lab.GuestBootHung) as info:
        lab.boot(disks={}, memory="512M", cpus=1, kernel_timeout=0.01, retries=1)
    assert time.monotonic() - t0 < 60, "a kernel stopped before init is found long before the boot timeout"
    assert "did not start init within 0.01s" in str(info.value)
    assert "--- console (last 60 lines) ---" in str(info.value)
    assert capsys.readouterr().out.count("guest kernel stopped while booting, booting again") == 1


def test_the_console_shows_when_init_starts(guest: lab.Guest) -> None:
    assert lab.INIT_STARTED in guest.console()


def test_sleep_and_grep_are_the_static_busybox_and_behave(guest: lab.Guest) -> None:
    for applet in lab.GUEST_FAST_APPLETS:
        path = guest.run(f"command -v {applet}").output.strip()
        assert path == f"/run/lab/bin/{applet}", path
        assert guest.run(f"readlink -f {path}").output.strip() == "/run/lab/bin/busybox"
    t0 = time.monotonic()
    guest.run("sleep 0.5")
    assert time.monotonic() - t0 >= 0.5  # a fraction of a second is slept, not refused or rounded down
    assert guest.run("echo 'scan 12 done' | grep -Eq 'scan [0-9]+ done'", check=False).rc == 0
    assert guest.run("echo 'scan x done' | grep -q 'scan [0-9]'", check=False).rc == 1


def test_close_powers_off_and_cleans_up() -> None:
    g = lab.Guest(disks={"d": "1M"}, memory="512M", cpus=1)
    pid, tmpdir = g.qemu_pid, g.tmpdir
    t0 = time.monotonic()
    g.close()
    assert time.monotonic() - t0 < 20, "close() must not wait for a hung guest"
    assert not g.qemu_running
    assert not Path(tmpdir).exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(lab.GuestDied, match="closed"):
        g.run("true")
    g.close()  # idempotent


def _fake_kernel(root: Path, ver: str, headers: bool = True) -> None:
    (root / "boot").mkdir(parents=True, exist_ok=True)
    (root / "boot" / f"vmlinuz-{ver}").write_bytes(b"")
    mod_dir = root / "lib" / "modules" / ver
    mod_dir.mkdir(parents=True)
    (mod_dir / "modules.dep").write_text("")
    if headers:  # absolute in the chroot, as Debian's linux-headers packages make it
        (root / "usr" / "src" / f"linux-headers-{ver}").mkdir(parents=True)
        (mod_dir / "build").symlink_to(f"/usr/src/linux-headers-{ver}")


def test_the_newer_kernel_is_the_chroots_newest_7x(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "chroot"
    monkeypatch.setattr(lab, "CHROOT", root)
    with pytest.raises(lab.LabSetupError, match="make lab-chroot"):
        lab.find_newer_kernel()
    for ver in ("6.12.99+deb13-amd64", "8.1.0+deb14-amd64"):
        _fake_kernel(root, ver)
    assert lab.find_newer_kernel() == "8.1.0+deb14-amd64", "with no 7.x, the newest other than 6.12"
    for ver in ("7.2.9+deb13-amd64", "7.10.1+deb13-amd64"):
        _fake_kernel(root, ver)
    _fake_kernel(root, "7.11.0+deb13-amd64", headers=False)
    kver = lab.find_newer_kernel()
    assert kver == "7.10.1+deb13-amd64", "the newest 7.x with image, modules and headers"
    assert lab.kernel_root(kver) == root
    assert lab.kernel_image(kver) == root / "boot" / f"vmlinuz-{kver}"
    assert lab.kernel_headers(kver) == root / "usr" / "src" / f"linux-headers-{kver}"
    assert lab.kernel_root(lab.find_kernel()) == Path("/")


def test_a_warning_fails_the_newer_kernel_build_every_time(tmp_path: Path) -> None:
    kver = lab.check_prerequisites(lab.NEWER_SERIES)
    kdir = tmp_path / "kernel"
    kdir.mkdir()
    (kdir / "Kbuild").write_text("obj-m := bdr.o\n")
    (kdir / "bdr.c").write_text(
        "#include <linux/module.h>\n"
        "static int __init lab_init(void) { int lab_unused; return 0; }\n"
        'module_init(lab_init);\nMODULE_LICENSE("GPL");\n'
    )
    try:
        for _ in range(2):  # the second, incremental build must not pass on the first one's objects
            with pytest.raises(lab.BuildError, match="has compiler warnings") as info:
                lab.build_module(tmp_path, kver)
            assert "lab_unused" in str(info.value)
    finally:
        shutil.rmtree(lab.module_build_dir(kdir, kver), ignore_errors=True)
