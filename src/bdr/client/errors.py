"""The client daemon's exceptions and exit statuses."""

from __future__ import annotations

EXIT_OK, EXIT_USAGE, EXIT_REFUSED, EXIT_SOURCE = 0, 2, 3, 4


class ClientError(Exception):
    """A configuration problem the operator must fix: the daemon exits with a message."""


class Stopping(Exception):
    """SIGTERM / SIGINT arrived while waiting."""


class SourceError(Exception):
    """Reading the source device failed (a scan cannot complete)."""
