"""The transport's errors, for both daemons: the peer or the network gone, which is not a protocol error."""

from __future__ import annotations


class ConnectionLost(Exception):
    """The peer or the network closed the connection without a GOODBYE, or went silent past a timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
