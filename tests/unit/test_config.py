from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bdr import config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bdr_server")
    p.add_argument("--config")
    p.add_argument("--address", required=True)
    p.add_argument("--port", type=int, default=7788)
    p.add_argument("--target-device", required=True)
    p.add_argument("--verbose", action="store_true")
    return p


def write(tmp_path: Path, text: str) -> str:
    f = tmp_path / "server.toml"
    f.write_text(text)
    return str(f)


def test_config_file_alone_satisfies_required_flags(tmp_path: Path) -> None:
    path = write(tmp_path, 'address = "0.0.0.0"\nport = 9000\ntarget-device = "/dev/sdc"\nverbose = true\n')
    args = config.parse_args(parser(), ["--config", path])
    assert (args.address, args.port, args.target_device, args.verbose) == ("0.0.0.0", 9000, "/dev/sdc", True)


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'address = "0.0.0.0"\nport = 9000\ntarget_device = "/dev/sdc"\n')
    args = config.parse_args(parser(), ["--config", path, "--port", "9100"])
    assert args.port == 9100 and args.target_device == "/dev/sdc"


def test_without_config_flags_still_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        config.parse_args(parser(), ["--address", "127.0.0.1"])
    assert "--target-device" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('adress = "x"\n', "unknown key 'adress'"),
        ('address = "x"\nport = "ninety"\n', "key 'port'"),
        ('address = "x"\nverbose = "yes"\n', "key 'verbose': expected true or false"),
        ("address = 5\n", "key 'address': expected a string"),
        ("address = [\n", "invalid TOML"),
        ('address = "x"\nport = true\n', "key 'port'"),
    ],
)
def test_invalid_config_is_precise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SystemExit) as exc:
        config.parse_args(parser(), ["--config", path])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert path in err and message in err, err


def test_missing_config_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        config.parse_args(parser(), ["--config", "/nonexistent/bdr.toml"])
    assert "cannot read" in capsys.readouterr().err


def test_daemon_security_flags_in_a_config_file(tmp_path: Path) -> None:
    from bdr import client, server

    path = write(
        tmp_path,
        'address = "0.0.0.0"\ntarget-device = "/dev/sdc"\njournal = "/j"\ntls-cert = "/c.pem"\n'
        'tls-key = "/c.key"\ntls-ca = "/ca.pem"\nsecret-file = "/s"\ninsecure = true\n',
    )
    args = config.parse_args(server.build_parser(), ["--config", path])
    assert (args.tls_cert, args.tls_key, args.tls_ca, args.secret_file, args.insecure) == (
        "/c.pem",
        "/c.key",
        "/ca.pem",
        "/s",
        True,
    )
    path = write(
        tmp_path, 'address = "h"\nsource-device = "/dev/x"\ntls-ca = "/ca.pem"\ntls-server-name = "h"\n'
    )
    args = config.parse_args(client.build_parser(), ["--config", path])
    assert (args.tls_ca, args.tls_server_name) == ("/ca.pem", "h")
