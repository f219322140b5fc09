"""Crash points of the record area, as an injectable plan: the crash-safety tests stop the server on purpose
at a named point of a journal resync -- "receive" (scan blocks are being staged), "commit" (the COMMIT record
is durable, the commit point not yet written) or "apply" (half of the records are applied) -- by SIGKILL, or
by a pause with everything synced so far (for a test that then cuts the power of the whole machine).

The record area never reads the environment: the server's ``main`` builds the plan with ``from_environment``
(the variables the tests set on the daemon), every other user of the area has no faults.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("bdr.journal")

CRASH_ENV = "BDR_TEST_CRASH_AT"  # the point
CRASH_MODE_ENV = "BDR_TEST_CRASH_MODE"  # "pause": sync and stop there instead of SIGKILL (power-cut tests)
POINTS = ("receive", "commit", "apply")
RECEIVE_POINT_AFTER = 1 << 20  # the "receive" point: after this many bytes of scan blocks were staged

Action = Callable[[str], None]


def kill(point: str) -> None:
    """SIGKILL this process at ``point``."""
    log.error("test hook %s=%s: killing the server", CRASH_ENV, point)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


def pause(point: str) -> None:
    """Sync everything, then stop at ``point`` for good (the test cuts the power)."""
    os.sync()  # what was applied so far is on the disks
    log.error("test hook %s=%s: server paused, everything so far synced", CRASH_ENV, point)
    logging.shutdown()
    while True:
        time.sleep(3600)


class FaultPlan:
    """Point name -> what to do there.  The empty plan (the default) does nothing anywhere."""

    def __init__(self, actions: Mapping[str, Action] | None = None) -> None:
        unknown = set(actions or {}) - set(POINTS)
        if unknown:
            raise ValueError(f"unknown crash point(s) {sorted(unknown)}: use {', '.join(POINTS)}")
        self.actions = dict(actions or {})

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> FaultPlan:
        """The plan the crash tests ask for on the daemon's environment (none when the variable is unset; a
        point name no code has is ignored, as before)."""
        point = environ.get(CRASH_ENV)
        if point not in POINTS:
            return cls()
        return cls({point: pause if environ.get(CRASH_MODE_ENV) == "pause" else kill})

    def hit(self, point: str) -> None:
        """The area reached ``point``: act if the plan says so."""
        action = self.actions.get(point)
        if action is not None:
            action(point)
