"""Wire errors, by who is at fault: ours (LocalProtocolError, a deliberate refusal or our own bug), the peer's
(RemoteProtocolError), an ERROR the peer sent (PeerError), and the peer gone (ConnectionLost).

ConnectionLost is the transport's news, but the daemons catch it with the peer's errors (a frame cut short by a
close is both), so it stays a RemoteProtocolError here."""

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


class ConnectionLost(RemoteProtocolError):
    """The peer or the network closed the connection without a GOODBYE."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.CONNECTION_LOST, message)


def _fail(code: ErrorCode, message: str) -> RemoteProtocolError:
    return RemoteProtocolError(code, message)
