from __future__ import annotations

import pytest

from bdr import cli
from bdr.cli import app, targets
from bdr.kernel import abi


@pytest.mark.parametrize(
    ("text", "slots"),
    [
        ("10000", 10000),
        ("1", 1),
        ("64M", 64 * 2**20 // abi.SLOT_BYTES),
        ("64m", 64 * 2**20 // abi.SLOT_BYTES),
        ("1G", 2**30 // abi.SLOT_BYTES),
        ("1GiB", 2**30 // abi.SLOT_BYTES),
        ("512K", 512 * 1024 // abi.SLOT_BYTES),
    ],
)
def test_parse_buffer(text: str, slots: int) -> None:
    assert cli.parse_buffer(text) == slots


@pytest.mark.parametrize("text", ["", "0", "-5", "ten", "1X", "4K", str(abi.BDR_MAX_SLOTS + 1)])
def test_parse_buffer_rejects(text: str) -> None:
    with pytest.raises(cli.SetupError):
        cli.parse_buffer(text)


def test_parse_status_line() -> None:
    line = (
        "m0: 0 2048 bdr state=overflow fill=16/16 records=40 bytes=163840 dropped=3 failed=0 "
        "dirty_regions=2 overflows=1 next_seq=40"
    )
    info = cli.parse_status_line(line)
    assert info["name"] == "m0" and info["state"] == "overflow"
    assert info["fill"] == {"used": 16, "slots": 16}
    assert info["dropped"] == 3 and info["dirty_regions"] == 2 and info["sectors"] == 2048


def test_setup_refuses_missing_device(tmp_path: object) -> None:
    with pytest.raises(cli.SetupError, match="does not exist"):
        cli.check_plan(cli.SetupPlan("/dev/does-not-exist", "m", "c", 10))


def test_setup_refuses_non_block_device(tmp_path: pytest.TempPathFactory) -> None:
    with pytest.raises(cli.SetupError, match="not a block device"):
        cli.check_plan(cli.SetupPlan("/etc/hostname", "m", "c", 10))


def test_setup_flags_all_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["setup", "--device", "/dev/sda"]) == 1
    assert "required" in capsys.readouterr().err


def test_plan_table_line() -> None:
    plan = cli.SetupPlan("/dev/vdb", "m", "c", 100, 256)
    assert plan.table(2048) == "0 2048 bdr /dev/vdb c 100 256"


def test_certs_creates_a_ca_and_a_verifiable_pair(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import ssl

    out = tmp_path / "tls"
    assert (
        cli.main(["certs", "--out", str(out), "--server-name", "192.0.2.10", "--server-name", "replica"]) == 0
    )
    assert "--tls-ca ca.pem" in capsys.readouterr().out
    for key in ("ca.key", "server.key", "client.key"):
        assert (out / key).stat().st_mode & 0o777 == 0o600
    # the pair works as the daemons use it: the server context accepts the client certificate and vice versa
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(out / "server.pem", out / "server.key")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_cert_chain(out / "client.pem", out / "client.key")
    client.load_verify_locations(out / "ca.pem")
    # existing files are not replaced without --force; an existing CA is reused for new certificates
    assert cli.main(["certs", "--out", str(out), "--server-name", "replica"]) == 1
    assert "exists; use --force" in capsys.readouterr().err
    ca = (out / "ca.pem").read_bytes()
    assert cli.main(["certs", "--out", str(out), "--server-name", "replica", "--force"]) == 0
    assert (out / "ca.pem").read_bytes() == ca and "reused CA" in capsys.readouterr().out


def test_secret_writes_a_private_random_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from bdr.security import auth

    f = tmp_path / "secret"
    assert cli.main(["secret", str(f)]) == 0
    assert f.stat().st_mode & 0o777 == 0o600
    secret, warning = auth.load_secret(f)
    assert len(secret) == 64 and warning is None
    assert cli.main(["secret", str(f)]) == 1  # no silent overwrite
    assert cli.main(["secret", str(f), "--force"]) == 0 and auth.load_secret(f)[0] != secret


@pytest.fixture
def blockdev(tmp_path):  # type: ignore[no-untyped-def]
    import os
    import stat

    dev = tmp_path / "fakeblk"
    os.mknod(dev, stat.S_IFBLK | 0o600, os.makedev(7, 200))  # a block device node nobody uses
    return str(dev)


def test_setup_refuses_without_the_module(blockdev: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(targets, "module_loaded", lambda: False)
    with pytest.raises(cli.SetupError, match=r"bdr kernel module is not loaded: run 'modprobe bdr'"):
        cli.check_plan(cli.SetupPlan(blockdev, "m", "c", 10))


def test_setup_refuses_a_taken_name_and_bad_names(blockdev: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    monkeypatch.setattr(targets, "module_loaded", lambda: True)
    monkeypatch.setattr(targets.shutil, "which", lambda name: f"/sbin/{name}")
    calls: list[list[str]] = []

    def run(cmd):  # type: ignore[no-untyped-def]
        calls.append(list(cmd))
        return subprocess.CompletedProcess(cmd, 0 if cmd[:3] == ["dmsetup", "info", "taken"] else 1, "", "")

    monkeypatch.setattr(targets, "run", run)
    with pytest.raises(cli.SetupError, match="a device-mapper device named 'taken' already exists"):
        cli.check_plan(cli.SetupPlan(blockdev, "taken", "c", 10))
    assert ["dmsetup", "info", "taken"] in calls
    with pytest.raises(cli.SetupError, match="invalid chardev name"):
        cli.check_plan(cli.SetupPlan(blockdev, "free", "../evil", 10))
    cli.check_plan(cli.SetupPlan(blockdev, "free", "c_free", 10))  # all good


def test_setup_asks_each_value_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(["/dev/sdb1", "", "mychar", "1G"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    monkeypatch.setattr(app.sys.stdin, "isatty", lambda: True)
    planned: list[cli.SetupPlan] = []
    monkeypatch.setattr(targets, "setup", planned.append)
    assert cli.main(["setup"]) == 0
    assert planned == [cli.SetupPlan("/dev/sdb1", "bdr_mapper", "mychar", 2**30 // abi.SLOT_BYTES)]
