"""Errors and exit codes of bdr_server."""

from __future__ import annotations

import logging

from .. import wire as p

log = logging.getLogger("bdr.server")


EXIT_USAGE, EXIT_STORAGE = 2, 4


class ServerError(Exception):
    """Configuration problem the operator must fix (paths, sizes): the daemon exits with a message."""


class SessionClosed(Exception):
    """The session is over; ``reply`` holds the last bytes to send (an ERROR or GOODBYE) before closing.
    ``fatal``: the replica or the journal failed, the daemon must stop."""

    def __init__(self, reason: str, reply: bytes = b"", clean: bool = False, fatal: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply
        self.clean = clean
        self.fatal = fatal


class Refusal(Exception):
    """The server refuses what the client asked, on purpose (another source, a resume point it lacks, a journal
    too small...): the session ends with an ERROR carrying ``code``, and the daemon goes on serving."""

    def __init__(self, code: p.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
