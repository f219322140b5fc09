"""The daemons start without the libraries only some configurations use: a start-up (and with it every resync
after a restart) does not pay for prometheus_client, tqdm or cryptography unless it uses them."""

from __future__ import annotations

import subprocess
import sys

LAZY = ("prometheus_client", "tqdm", "cryptography")


def test_daemon_modules_do_not_import_optional_libraries() -> None:
    code = (
        "import sys, bdr.client.daemon, bdr.server.daemon, bdr.client.options, bdr.server.options\n"
        f"print(' '.join(m for m in {LAZY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_a_server_without_history_does_not_load_it() -> None:
    code = "import sys, bdr.server.daemon, bdr.server.options\nprint('bdr.history' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_metrics_endpoint_imports_prometheus_when_opened() -> None:
    code = (
        "import sys\n"
        "from bdr.status import Board, MetricsEndpoint, SERVER_METRICS, SERVER_STATES\n"
        "m = MetricsEndpoint('127.0.0.1:0', Board(), SERVER_METRICS, SERVER_STATES, 'bdr_server')\n"
        "m.close()\n"
        "print('prometheus_client' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_the_admin_tool_loads_only_the_command_it_runs() -> None:
    """`bdr status` (called in loops by monitoring and scripts) does not load the daemons, the journal or the
    history writer: in a slow guest each of those costs about a second per call."""
    heavy = ("bdr.client.daemon", "bdr.server.daemon", "bdr.journal", "bdr.history", "bdr.cli.roles")
    code = (
        "import sys\n"
        "from bdr.cli import main\n"
        "main(['status', '--run-dir', sys.argv[1]])\n"
        f"print('loaded:', *(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "/nonexistent-bdr-run-dir"], capture_output=True, text=True
    ).stdout
    assert out.splitlines()[-1] == "loaded:", out
