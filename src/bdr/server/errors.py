"""Errors and exit codes of bdr_server."""

from __future__ import annotations

import logging

log = logging.getLogger("bdr.server")


EXIT_USAGE, EXIT_STORAGE = 2, 4


class ServerError(Exception):
    """Configuration problem the operator must fix (paths, sizes): the daemon exits with a message."""
