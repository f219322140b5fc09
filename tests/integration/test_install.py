"""`make install` then `make uninstall` into a temporary prefix leave nothing behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def test_install_then_uninstall_leaves_nothing(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    make = ["make", "-C", str(REPO), f"PREFIX={prefix}", "WITH_DKMS=no"]
    subprocess.run([*make, "install"], check=True, capture_output=True, timeout=300)
    for prog in ("bdr", "bdr_client", "bdr_server"):
        out = subprocess.run([prefix / "bin" / prog, "--help"], check=True, capture_output=True, text=True)
        assert "usage:" in out.stdout
    unit = (prefix / "lib/systemd/system/bdr-server@.service").read_text()
    assert f"ExecStart={prefix}/bin/bdr_server --config /etc/bdr/server-%i.toml" in unit
    assert "@BINDIR@" not in unit
    assert (prefix / "share/doc/bdr/bdr-user-manual.md").is_file()
    subprocess.run([*make, "uninstall"], check=True, capture_output=True, timeout=120)
    left = sorted(str(p.relative_to(prefix)) for p in prefix.rglob("*"))
    assert left == [], f"left behind by make uninstall: {left}"
