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
from .errors import LocalProtocolError, PeerError, RemoteProtocolError
from .frames import _AUTH_ORDER, NEED_DATA, FrameDecoder, FrameStart, NeedData
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


# Which messages each side may send in each phase of the conversation.
_CLIENT_MAY_SEND: dict[Phase, frozenset[MsgType]] = {
    Phase.AUTH: frozenset({MsgType.AUTH_BEGIN, MsgType.AUTH_PROOF, MsgType.ERROR}),
    Phase.HANDSHAKE: frozenset({MsgType.HELLO, MsgType.ERROR}),
    Phase.READY: frozenset({MsgType.STREAM, MsgType.SCAN_BEGIN, MsgType.ERROR, MsgType.GOODBYE}),
    Phase.STREAMING: frozenset(
        {
            MsgType.DATA,
            MsgType.SYNC,
            MsgType.RESYNC_PENDING,
            MsgType.SCAN_BEGIN,
            MsgType.SCAN_REQUEST,  # VERIFY_SCAN_ID only (the server refuses another id outside a scan)
            MsgType.ERROR,
            MsgType.GOODBYE,
        }
    ),
    Phase.SCANNING: frozenset(
        {MsgType.SCAN_REQUEST, MsgType.SCAN_DATA, MsgType.SCAN_END, MsgType.ERROR, MsgType.GOODBYE}
    ),
    Phase.CLOSED: frozenset(),
}

# Server replies lag behind the client's phase (a SCAN_DONE may arrive while the client already streams).
_SERVER_AFTER_HANDSHAKE = frozenset(
    {MsgType.ACK, MsgType.SCAN_HASHES, MsgType.SCAN_DONE, MsgType.ERROR, MsgType.GOODBYE}
)


class Connection:
    """One side of a BDR conversation: ``send(msg) -> bytes``, ``feed``/``next_event`` -> messages.

    The phase advances on what the client sends (HELLO, WELCOME, STREAM, SCAN_BEGIN, SCAN_END), seen either
    as sent (client role) or as received (server role), so both ends agree on what is allowed next.  With
    ``auth`` the conversation starts with the AUTH exchange, in order (BEGIN, CHALLENGE, PROOF, OK), and HELLO
    is refused until AUTH_OK.  A received frame's type is checked against the phase before its payload is
    parsed; until the handshake is over, frames are capped at HANDSHAKE_MAX_PAYLOAD.
    """

    def __init__(self, role: Role, max_payload: int = MAX_PAYLOAD, auth: bool = False) -> None:
        self.role = role
        self.auth = auth
        self.phase = Phase.AUTH if auth else Phase.HANDSHAKE
        self.decoder = FrameDecoder(min(max_payload, HANDSHAKE_MAX_PAYLOAD))
        self._max_payload = max_payload
        self.device_size: int | None = None  # bound for record offsets, known after HELLO
        self._hello_seen = False
        self._auth_step = 0  # AUTH messages seen so far: 1 BEGIN, 2 CHALLENGE, 3 PROOF

    @property
    def authenticated(self) -> bool:
        """The AUTH exchange is over (or there is none)."""
        return self.phase is not Phase.AUTH and (not self.auth or self._auth_step == 3)

    # -- state ---------------------------------------------------------------------------------------------

    def _check_client_msg(self, t: MsgType, local: bool) -> None:
        exc = LocalProtocolError if local else RemoteProtocolError
        if self.phase is Phase.AUTH:
            if t is MsgType.HELLO:
                raise exc(ErrorCode.AUTH_REQUIRED, "the server requires shared-secret authentication first")
            if t is MsgType.ERROR or (t is MsgType.AUTH_BEGIN and self._auth_step == 0):
                return
            if t is MsgType.AUTH_PROOF and self._auth_step == 2:
                return
        elif t in _CLIENT_MAY_SEND[self.phase] and not (t is MsgType.HELLO and self._hello_seen):
            return
        elif t is MsgType.AUTH_BEGIN and not self.auth and self.phase is Phase.HANDSHAKE:
            raise exc(
                ErrorCode.AUTH_FAILED,
                "the client offers shared-secret authentication, the server has no secret: "
                "give both --secret-file or neither",
            )
        raise exc(ErrorCode.UNEXPECTED, f"client may not send {t.name} in phase {self.phase.value}")

    def _check_server_msg(self, t: MsgType, local: bool) -> None:
        if self.phase is Phase.CLOSED:
            ok = False
        elif self.phase is Phase.AUTH:
            ok = (
                t is MsgType.ERROR
                or (t is MsgType.AUTH_CHALLENGE and self._auth_step == 1)
                or (t is MsgType.AUTH_OK and self._auth_step == 3)
            )
        elif self.phase is Phase.HANDSHAKE:
            ok = t is MsgType.ERROR or (self._hello_seen and t is MsgType.WELCOME)
        else:
            ok = t in _SERVER_AFTER_HANDSHAKE
        if not ok:
            exc = LocalProtocolError if local else RemoteProtocolError
            raise exc(ErrorCode.UNEXPECTED, f"server may not send {t.name} in phase {self.phase.value}")

    def _check(self, t: MsgType, from_client: bool) -> None:
        """May ``t`` be sent now (by the client if ``from_client``)?  Local error if we are the sender."""
        if from_client:
            self._check_client_msg(t, local=self.role is Role.CLIENT)
        else:
            self._check_server_msg(t, local=self.role is Role.SERVER)

    def _advance(self, msg: Message, from_client: bool) -> None:
        t = msg.TYPE
        self._check(t, from_client)
        if isinstance(msg, ScanRequest) and self.phase is Phase.STREAMING and msg.scan_id != VERIFY_SCAN_ID:
            exc = LocalProtocolError if from_client == (self.role is Role.CLIENT) else RemoteProtocolError
            raise exc(ErrorCode.UNEXPECTED, f"SCAN_REQUEST for scan {msg.scan_id} outside a scan")
        if t is MsgType.HELLO:
            assert isinstance(msg, Hello)
            self._hello_seen = True
            self.device_size = msg.device_size
        elif t is MsgType.WELCOME:
            self.phase = Phase.READY
            self.decoder.max_payload = self._max_payload
        elif t is MsgType.STREAM or t is MsgType.SCAN_END:
            self.phase = Phase.STREAMING
        elif t is MsgType.SCAN_BEGIN:
            self.phase = Phase.SCANNING
        elif t is MsgType.ERROR or t is MsgType.GOODBYE:
            self.phase = Phase.CLOSED
        elif t is MsgType.AUTH_OK:
            self.phase = Phase.HANDSHAKE
        elif t in _AUTH_ORDER:
            self._auth_step = _AUTH_ORDER[t]

    # -- sending ---------------------------------------------------------------------------------------------

    def send(self, msg: Message) -> bytes:
        """Check that we may send ``msg`` now and return its frame."""
        self._advance(msg, from_client=self.role is Role.CLIENT)
        return encode(msg)

    def expect_data(self) -> None:
        """Check that the peer may send DATA now (for a DATA frame taken off the stream without next_event)."""
        self._check_client_msg(MsgType.DATA, local=self.role is Role.CLIENT)

    def send_data_header(self, count: int, data_len: int, sync: bool = False) -> bytes:
        """For a DATA frame sent as gathered views: check the phase and return header + DATA head."""
        self._check_client_msg(MsgType.DATA, local=True)
        if count > MAX_BATCH_RECORDS:
            raise LocalProtocolError(ErrorCode.BAD_LENGTH, f"batch of {count} records > {MAX_BATCH_RECORDS}")
        return data_frame_header(count, data_len, sync)

    def send_scan_data_header(self, scan_id: int, blocks: list[tuple[int, int, int]], data_len: int) -> bytes:
        self._check_client_msg(MsgType.SCAN_DATA, local=True)
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
