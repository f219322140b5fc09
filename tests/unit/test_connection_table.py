"""The connection's transition table against the conversation the protocol documents: what each side may send
in each state, and where it leads."""

from __future__ import annotations

from bdr.wire.connection import TRANSITIONS, Role, State
from bdr.wire.constants import MsgType as M

C, S = Role.CLIENT, Role.SERVER


def allowed(state: State, role: Role) -> dict[M, State]:
    return {t: nxt for (st, r, t), nxt in TRANSITIONS.items() if st is state and r is role}


def test_the_client_may_send() -> None:
    assert allowed(State.AUTH_BEGIN, C) == {M.AUTH_BEGIN: State.AUTH_CHALLENGE, M.ERROR: State.CLOSED}
    assert allowed(State.AUTH_PROOF, C) == {M.AUTH_PROOF: State.AUTH_OK, M.ERROR: State.CLOSED}
    assert allowed(State.AUTH_CHALLENGE, C) == allowed(State.AUTH_OK, C) == {M.ERROR: State.CLOSED}
    assert allowed(State.HELLO, C) == {M.HELLO: State.WELCOME, M.ERROR: State.CLOSED}
    assert allowed(State.WELCOME, C) == {M.ERROR: State.CLOSED}  # one HELLO only
    assert allowed(State.READY, C) == {
        M.STREAM: State.STREAMING,
        M.SCAN_BEGIN: State.SCANNING,
        M.ERROR: State.CLOSED,
        M.GOODBYE: State.CLOSED,
    }
    assert allowed(State.STREAMING, C) == {
        M.DATA: State.STREAMING,
        M.SYNC: State.STREAMING,
        M.RESYNC_PENDING: State.STREAMING,
        M.SCAN_BEGIN: State.SCANNING,
        M.SCAN_REQUEST: State.STREAMING,
        M.ERROR: State.CLOSED,
        M.GOODBYE: State.CLOSED,
    }
    assert allowed(State.SCANNING, C) == {
        M.SCAN_REQUEST: State.SCANNING,
        M.SCAN_DATA: State.SCANNING,
        M.SCAN_END: State.STREAMING,
        M.ERROR: State.CLOSED,
        M.GOODBYE: State.CLOSED,
    }
    assert allowed(State.CLOSED, C) == {}


def test_the_server_may_send() -> None:
    assert allowed(State.AUTH_CHALLENGE, S) == {M.AUTH_CHALLENGE: State.AUTH_PROOF, M.ERROR: State.CLOSED}
    assert allowed(State.AUTH_OK, S) == {M.AUTH_OK: State.HELLO, M.ERROR: State.CLOSED}
    assert allowed(State.AUTH_BEGIN, S) == allowed(State.AUTH_PROOF, S) == {M.ERROR: State.CLOSED}
    assert allowed(State.HELLO, S) == {M.ERROR: State.CLOSED}  # no WELCOME before HELLO
    assert allowed(State.WELCOME, S) == {M.WELCOME: State.READY, M.ERROR: State.CLOSED}
    for st in (State.READY, State.STREAMING, State.SCANNING):  # replies lag behind the client's state
        assert allowed(st, S) == {
            M.ACK: st,
            M.SCAN_HASHES: st,
            M.SCAN_DONE: st,
            M.ERROR: State.CLOSED,
            M.GOODBYE: State.CLOSED,
            **({M.MARKS: State.READY} if st is State.READY else {}),  # after WELCOME, before STREAM or a scan
        }
    assert allowed(State.CLOSED, S) == {}
