"""One side of a conversation: which messages each role may send in each phase, checked on what is sent and on
what is received, and the events a received frame becomes."""

from __future__ import annotations

import enum

from .constants import (
    HANDSHAKE_MAX_PAYLOAD,
    MAX_BATCH_RECORDS,
    MAX_PAYLOAD,
    VERIFY_SCAN_ID,
    ErrorCode,
    MsgType,
)
from .errors import LocalProtocolError, PeerError, ProtocolError, RemoteProtocolError
from .frames import NEED_DATA, FrameDecoder, FrameStart, NeedData
from .handshake import Error, Hello
from .messages import Message, encode, parse_payload
from .scan import ScanRequest, scan_data_header
from .stream import data_frame_header


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class Phase(enum.Enum):
    AUTH = "auth"  # shared-secret challenge-response, before HELLO (only when a secret is configured)
    HANDSHAKE = "handshake"  # before HELLO / WELCOME
    READY = "ready"  # handshake done, neither streaming nor scanning
    STREAMING = "streaming"
    SCANNING = "scanning"
    CLOSED = "closed"


class State(enum.Enum):
    """Where a conversation is, finer than its Phase: the AUTH exchange step by step, and HELLO sent or not."""

    AUTH_BEGIN = "auth: client to send AUTH_BEGIN"
    AUTH_CHALLENGE = "auth: server to send AUTH_CHALLENGE"
    AUTH_PROOF = "auth: client to send AUTH_PROOF"
    AUTH_OK = "auth: server to send AUTH_OK"
    HELLO = "handshake: client to send HELLO"
    WELCOME = "handshake: server to send WELCOME"
    READY = "ready"
    STREAMING = "streaming"
    SCANNING = "scanning"
    CLOSED = "closed"


PHASE_OF: dict[State, Phase] = {
    State.AUTH_BEGIN: Phase.AUTH,
    State.AUTH_CHALLENGE: Phase.AUTH,
    State.AUTH_PROOF: Phase.AUTH,
    State.AUTH_OK: Phase.AUTH,
    State.HELLO: Phase.HANDSHAKE,
    State.WELCOME: Phase.HANDSHAKE,
    State.READY: Phase.READY,
    State.STREAMING: Phase.STREAMING,
    State.SCANNING: Phase.SCANNING,
    State.CLOSED: Phase.CLOSED,
}

C, S = Role.CLIENT, Role.SERVER
M = MsgType
_AFTER_HANDSHAKE = (State.READY, State.STREAMING, State.SCANNING)

# (state, who sends, message type) -> next state.  Anything not here is refused (see Connection._refuse).
# The phase advances on what the client sends (STREAM, SCAN_BEGIN, SCAN_END); the server's replies lag behind
# (a SCAN_DONE may arrive while the client already streams), so it may send them in any state after WELCOME.
TRANSITIONS: dict[tuple[State, Role, MsgType], State] = {
    (State.AUTH_BEGIN, C, M.AUTH_BEGIN): State.AUTH_CHALLENGE,
    (State.AUTH_CHALLENGE, S, M.AUTH_CHALLENGE): State.AUTH_PROOF,
    (State.AUTH_PROOF, C, M.AUTH_PROOF): State.AUTH_OK,
    (State.AUTH_OK, S, M.AUTH_OK): State.HELLO,
    (State.HELLO, C, M.HELLO): State.WELCOME,
    (State.WELCOME, S, M.WELCOME): State.READY,
    (State.READY, S, M.MARKS): State.READY,  # right after a WELCOME with MARKED
    (State.READY, C, M.STREAM): State.STREAMING,
    (State.READY, C, M.SCAN_BEGIN): State.SCANNING,
    (State.STREAMING, C, M.DATA): State.STREAMING,
    (State.STREAMING, C, M.SYNC): State.STREAMING,
    (State.STREAMING, C, M.RESYNC_PENDING): State.STREAMING,
    (State.STREAMING, C, M.SCAN_BEGIN): State.SCANNING,
    (State.STREAMING, C, M.SCAN_REQUEST): State.STREAMING,  # VERIFY_SCAN_ID only: checked in _advance
    (State.SCANNING, C, M.SCAN_REQUEST): State.SCANNING,
    (State.SCANNING, C, M.SCAN_DATA): State.SCANNING,
    (State.SCANNING, C, M.SCAN_END): State.STREAMING,
    **{(st, C, M.GOODBYE): State.CLOSED for st in _AFTER_HANDSHAKE},
    **{(st, S, t): st for st in _AFTER_HANDSHAKE for t in (M.ACK, M.SCAN_HASHES, M.SCAN_DONE)},
    **{(st, S, M.GOODBYE): State.CLOSED for st in _AFTER_HANDSHAKE},
    # ERROR ends the conversation from any state but the end
    **{(st, r, M.ERROR): State.CLOSED for st in State if st is not State.CLOSED for r in Role},
}


class Connection:
    """One side of a BDR conversation: ``send(msg) -> bytes``, ``feed``/``next_event`` -> messages.

    One state machine, driven by TRANSITIONS on every message sent or received, so both ends agree on what is
    allowed next.  With ``auth`` the conversation starts with the AUTH exchange, in order (BEGIN, CHALLENGE,
    PROOF, OK), and HELLO is refused until AUTH_OK.  A received frame's type is checked against the phase before its payload is
    parsed; until the handshake is over, frames are capped at HANDSHAKE_MAX_PAYLOAD.
    """

    def __init__(self, role: Role, max_payload: int = MAX_PAYLOAD, auth: bool = False) -> None:
        self.role = role
        self.auth = auth
        self.state = State.AUTH_BEGIN if auth else State.HELLO
        self.decoder = FrameDecoder(min(max_payload, HANDSHAKE_MAX_PAYLOAD))
        self._max_payload = max_payload
        self.device_size: int | None = None  # bound for record offsets, known after HELLO
        self.authenticated = not auth  # the AUTH exchange is over (or there is none)

    @property
    def phase(self) -> Phase:
        return PHASE_OF[self.state]

    # -- state ---------------------------------------------------------------------------------------------

    def _next(self, t: MsgType, sender: Role) -> State:
        """The state after ``sender`` sends ``t`` now; raises (Local if we are the sender) if it may not."""
        nxt = TRANSITIONS.get((self.state, sender, t))
        if nxt is None:
            raise self._refuse(t, sender)
        return nxt

    def _refuse(self, t: MsgType, sender: Role) -> ProtocolError:
        exc = LocalProtocolError if sender is self.role else RemoteProtocolError
        phase = self.phase
        if sender is Role.CLIENT and phase is Phase.AUTH and t is MsgType.HELLO:
            return exc(ErrorCode.AUTH_REQUIRED, "the server requires shared-secret authentication first")
        if sender is Role.CLIENT and phase is Phase.HANDSHAKE and t is MsgType.AUTH_BEGIN and not self.auth:
            return exc(
                ErrorCode.AUTH_FAILED,
                "the client offers shared-secret authentication, the server has no secret: "
                "give both --secret-file or neither",
            )
        return exc(ErrorCode.UNEXPECTED, f"{sender.value} may not send {t.name} in phase {phase.value}")

    def _check(self, t: MsgType, from_client: bool) -> None:
        """May ``t`` be sent now (by the client if ``from_client``)?  Local error if we are the sender."""
        self._next(t, Role.CLIENT if from_client else Role.SERVER)

    def _advance(self, msg: Message, from_client: bool) -> None:
        t = msg.TYPE
        sender = Role.CLIENT if from_client else Role.SERVER
        nxt = self._next(t, sender)
        if isinstance(msg, ScanRequest) and self.state is State.STREAMING and msg.scan_id != VERIFY_SCAN_ID:
            exc = LocalProtocolError if sender is self.role else RemoteProtocolError
            raise exc(ErrorCode.UNEXPECTED, f"SCAN_REQUEST for scan {msg.scan_id} outside a scan")
        if isinstance(msg, Hello):
            self.device_size = msg.device_size
        elif t is MsgType.WELCOME:
            self.decoder.max_payload = self._max_payload
        elif t is MsgType.AUTH_OK:
            self.authenticated = True
        self.state = nxt

    # -- sending ---------------------------------------------------------------------------------------------

    def send(self, msg: Message) -> bytes:
        """Check that we may send ``msg`` now and return its frame."""
        self._advance(msg, from_client=self.role is Role.CLIENT)
        return encode(msg)

    def expect_data(self) -> None:
        """Check that the peer may send DATA now (for a DATA frame taken off the stream without next_event)."""
        self._check(MsgType.DATA, from_client=True)

    def send_data_header(self, count: int, data_len: int, sync: bool = False) -> bytes:
        """For a DATA frame sent as gathered views: check the phase and return header + DATA head."""
        self._check(MsgType.DATA, from_client=True)
        if count > MAX_BATCH_RECORDS:
            raise LocalProtocolError(ErrorCode.BAD_LENGTH, f"batch of {count} records > {MAX_BATCH_RECORDS}")
        return data_frame_header(count, data_len, sync)

    def send_scan_data_header(self, scan_id: int, blocks: list[tuple[int, int, int]], data_len: int) -> bytes:
        self._check(MsgType.SCAN_DATA, from_client=True)
        return scan_data_header(scan_id, blocks, data_len)

    # -- receiving -------------------------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.decoder.feed(data)

    def writable(self, min_free: int = 65536) -> memoryview:
        return self.decoder.writable(min_free)

    def commit(self, n: int) -> None:
        self.decoder.commit(n)

    def frame_start(self) -> FrameStart | None:
        """The frame being received, once its header is there (the decoder's streamed-body event)."""
        return self.decoder.frame_start()

    def body_taken(self, n: int) -> None:
        """The caller took the rest of the current frame's body (``n`` bytes) off the stream itself."""
        self.decoder.body_taken(n)

    @property
    def mid_frame(self) -> bool:
        """Part of a frame has arrived and the rest has not."""
        return self.decoder.buffered > 0

    def next_event(self) -> Message | NeedData:
        """The next message from the peer, or NEED_DATA.  Raises RemoteProtocolError (PeerError for ERROR)."""
        frame = self.decoder.next_frame()
        if frame is NEED_DATA:
            return NEED_DATA
        from_client = self.role is Role.SERVER
        self._check(MsgType(frame.type), from_client)  # not allowed now: refused before its payload is parsed
        bound = self.device_size if from_client else None
        msg = parse_payload(frame.type, frame.flags, frame.payload, bound)
        self._advance(msg, from_client)
        if isinstance(msg, Error):
            raise PeerError(msg.code, msg.message)
        return msg
