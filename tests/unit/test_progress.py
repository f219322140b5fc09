"""Scan progress: a bar on a terminal, periodic log lines otherwise, nothing on a terminal with --no-print."""

from __future__ import annotations

import io
import logging

import pytest

from bdr import progress


def test_log_lines_without_a_terminal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    log = logging.getLogger("bdr.test")
    with caplog.at_level(logging.INFO, logger="bdr.test"):
        pr = progress.Progress("scan 1 (hash)", 64 << 20, log)
        assert pr.bar is None
        pr.update(16 << 20)
        pr.close()
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert msg.startswith("scan 1 (hash): 16 of 64 MiB (25%), ")
    assert "MiB/s, ETA " in msg


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    err = Tty()
    monkeypatch.setattr("sys.stderr", err)
    pr = progress.Progress("scan 2 (full)", 1 << 20, logging.getLogger("bdr.test"))
    assert pr.bar is not None
    pr.update(1 << 20)
    pr.close()
    assert "scan 2 (full)" in err.getvalue()
    quiet = progress.Progress("scan 3", 1 << 20, logging.getLogger("bdr.test"), quiet=True)
    assert quiet.bar is None
