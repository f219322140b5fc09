"""Wire errors, by who is at fault: ours (LocalProtocolError: our side broke the protocol), the peer's
(RemoteProtocolError), and an ERROR the peer sent (PeerError).  The peer gone is the transport's news, not a
wire error: ``bdr.daemon.errors.ConnectionLost``."""

from __future__ import annotations

from .constants import ErrorCode


class ProtocolError(Exception):
    """Base of every BDR protocol error; ``code`` is an ``ErrorCode``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (or our side failed): our fault."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid, broke the connection, or reported an error: the peer's fault."""


class PeerError(RemoteProtocolError):
    """The peer sent an ERROR message."""


def _fail(code: ErrorCode, message: str) -> RemoteProtocolError:
    return RemoteProtocolError(code, message)
