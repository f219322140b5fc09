"""Shared-secret authentication: the exchange in memory, its failure modes, the secret file, and the server
session refusing everything before the exchange is over (the replica and its metadata untouched)."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
from pathlib import Path

import pytest

from bdr import wire as p
from bdr.journal import Journal
from bdr.security import auth
from bdr.server import Applier, Replica, ServerError, ServerSession, SessionClosed, is_loopback, load_security

SECRET = b"0123456789abcdef-shared"
BINDING = auth.server_end_point(b"certificate bytes")


def exchange(
    client: auth.ClientAuth, server: auth.ServerAuth
) -> tuple[p.AuthBegin, p.AuthChallenge, p.AuthProof, p.AuthOk]:
    begin = client.begin()
    challenge = server.on_begin(begin)
    proof = client.on_challenge(challenge)
    ok = server.on_proof(proof)
    client.on_ok(ok)
    return begin, challenge, proof, ok


@pytest.mark.parametrize("binding", [b"", BINDING])
def test_both_sides_prove_knowledge(binding: bytes) -> None:
    c, s = auth.ClientAuth(SECRET, binding), auth.ServerAuth(SECRET, binding)
    begin, challenge, proof, ok = exchange(c, s)
    assert c.done and s.done
    assert bool(begin.flags & p.AuthFlag.TLS_BOUND) is bool(binding)
    assert SECRET not in p.encode(begin) + p.encode(challenge) + p.encode(proof) + p.encode(ok)
    # the proofs are the documented HMACs over the transcript
    transcript = p.encode(begin) + p.encode(challenge)
    assert proof.mac == auth.client_mac(SECRET, transcript, binding)
    assert ok.mac == auth.server_mac(SECRET, transcript, binding, proof.mac)
    assert proof.mac != ok.mac


def test_wrong_secret_is_refused_by_the_server() -> None:
    c, s = auth.ClientAuth(b"not the right secret!"), auth.ServerAuth(SECRET)
    proof = c.on_challenge(s.on_begin(c.begin()))
    with pytest.raises(p.RemoteProtocolError) as ei:
        s.on_proof(proof)
    assert ei.value.code is p.ErrorCode.AUTH_FAILED and "wrong shared secret" in ei.value.message
    assert not s.done


def test_an_impostor_server_is_refused_by_the_client() -> None:
    """A server that does not know the secret cannot produce AUTH_OK, even after seeing the client's proof."""
    c, impostor = auth.ClientAuth(SECRET), auth.ServerAuth(b"a guess at the secret")
    proof = c.on_challenge(impostor.on_begin(c.begin()))
    forged = p.AuthOk(hashlib.sha256(proof.mac).digest())
    with pytest.raises(p.RemoteProtocolError) as ei:
        c.on_ok(forged)
    assert ei.value.code is p.ErrorCode.AUTH_FAILED and not c.done


def test_a_recorded_proof_is_useless_on_another_connection() -> None:
    c1, s1 = auth.ClientAuth(SECRET), auth.ServerAuth(SECRET)
    _, _, proof, _ = exchange(c1, s1)
    attacker, s2 = auth.ClientAuth(b"attacker knows nothing"), auth.ServerAuth(SECRET)
    s2.on_begin(attacker.begin())
    with pytest.raises(p.RemoteProtocolError):
        s2.on_proof(proof)  # replayed: the server's nonce differs


def test_a_man_in_the_middle_with_another_certificate_cannot_relay_the_proofs() -> None:
    """The client sees the MITM's certificate, the server its own: the bindings differ, so do the MACs."""
    c = auth.ClientAuth(SECRET, auth.server_end_point(b"mitm certificate"))
    s = auth.ServerAuth(SECRET, BINDING)
    proof = c.on_challenge(s.on_begin(c.begin()))
    with pytest.raises(p.RemoteProtocolError):
        s.on_proof(proof)


def test_tls_disagreement_is_refused_with_a_reason() -> None:
    c, s = auth.ClientAuth(SECRET, BINDING), auth.ServerAuth(SECRET)
    with pytest.raises(p.RemoteProtocolError) as ei:
        s.on_begin(c.begin())
    assert "disagree about TLS" in ei.value.message


def test_the_server_reflecting_our_nonce_is_refused() -> None:
    c = auth.ClientAuth(SECRET)
    begin = c.begin()
    with pytest.raises(p.RemoteProtocolError):
        c.on_challenge(p.AuthChallenge(p.AuthMethod.HMAC_SHA256, p.AuthFlag.NONE, begin.nonce))


def test_proofs_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    exchange(auth.ClientAuth(SECRET), auth.ServerAuth(SECRET))
    assert len(calls) == 2  # the server's check of the client proof, the client's check of the server's


def test_unknown_methods_only_are_refused() -> None:
    s = auth.ServerAuth(SECRET)
    with pytest.raises(p.RemoteProtocolError) as ei:
        s.on_begin(p.AuthBegin(1, p.AuthFlag.NONE, 0x100, os.urandom(32)))
    assert ei.value.code is p.ErrorCode.AUTH_FAILED


# -- the secret file -----------------------------------------------------------------------------------------------


def test_secret_file(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_bytes(b"  " + SECRET + b"\n\n")
    f.chmod(0o600)
    assert auth.load_secret(f) == (SECRET, None)
    f.chmod(0o644)
    secret, warning = auth.load_secret(f)
    assert secret == SECRET and warning is not None and "chmod 600" in warning
    f.write_bytes(b"short\n")
    with pytest.raises(auth.SecretError, match="needs at least 16"):
        auth.load_secret(f)
    with pytest.raises(auth.SecretError, match="cannot read"):
        auth.load_secret(tmp_path / "missing")
    with pytest.raises(auth.SecretError, match="Is a directory"):
        auth.load_secret(tmp_path)
    assert len(auth.new_secret().strip()) == 64


# -- the server session before and during the exchange ----------------------------------------------------------


@pytest.fixture
def session(tmp_path: Path) -> tuple[ServerSession, Path, Journal]:
    img = tmp_path / "replica.img"
    img.write_bytes(b"\x42" * (1 << 20))
    replica = Replica(img)
    journal = Journal(tmp_path / "journal")
    sess = ServerSession(replica, journal, Applier(replica, journal), auth=auth.ServerAuth(SECRET))
    yield sess, img, journal
    replica.close()
    journal.close()


def feed(sess: ServerSession, c: p.Connection, msg: p.Message) -> list[p.Message]:
    sess.conn.feed(c.send(msg))
    c.feed(sess.receive())
    out = []
    while (ev := c.next_event()) is not p.NEED_DATA:
        assert not isinstance(ev, p.NeedData)
        out.append(ev)
    return out


def test_session_authenticates_then_serves(session: tuple[ServerSession, Path, Journal]) -> None:
    sess, _, _ = session
    ca = auth.ClientAuth(SECRET)
    c = p.Connection(p.Role.CLIENT, auth=True)
    (challenge,) = feed(sess, c, ca.begin())
    assert isinstance(challenge, p.AuthChallenge)
    (ok,) = feed(sess, c, ca.on_challenge(challenge))
    assert isinstance(ok, p.AuthOk)
    ca.on_ok(ok)
    (w,) = feed(sess, c, p.Hello(1, p.ALL_FEATURES, 512, 1 << 20, b"s" * 16, b"r" * 16))
    assert isinstance(w, p.Welcome)


def test_session_refuses_wrong_secret_and_touches_nothing(
    session: tuple[ServerSession, Path, Journal],
) -> None:
    sess, img, journal = session
    before, generation = img.read_bytes(), journal.header.generation
    ca = auth.ClientAuth(b"this is the wrong secret")
    c = p.Connection(p.Role.CLIENT, auth=True)
    (challenge,) = feed(sess, c, ca.begin())
    assert isinstance(challenge, p.AuthChallenge)
    proof = ca.on_challenge(challenge)
    # the client pipelines everything it would send after a successful exchange: none of it counts
    hello = p.Hello(1, p.ALL_FEATURES, 512, 1 << 20, b"s" * 16, b"r" * 16)
    sess.conn.feed(p.encode(proof) + p.encode(hello) + p.encode(p.Stream(0, p.StreamFlag.ASSUME_IN_SYNC)))
    with pytest.raises(SessionClosed) as ei:
        sess.receive()
    assert ei.value.reason.startswith("authentication failed: wrong shared secret")
    reply = p.FrameDecoder()
    reply.feed(ei.value.reply)
    fr = reply.next_frame()
    assert isinstance(fr, p.Frame)
    err = p.parse_payload(fr.type, fr.flags, fr.payload)
    assert isinstance(err, p.Error) and err.code is p.ErrorCode.AUTH_FAILED
    assert img.read_bytes() == before and journal.header.generation == generation


def test_session_refuses_hello_without_the_exchange(session: tuple[ServerSession, Path, Journal]) -> None:
    sess, img, _ = session
    before = img.read_bytes()
    sess.conn.feed(p.encode(p.Hello(1, p.ALL_FEATURES, 512, 1 << 20, b"s" * 16, b"r" * 16)))
    with pytest.raises(SessionClosed) as ei:
        sess.receive()
    assert "authentication failed" in ei.value.reason
    assert img.read_bytes() == before


# -- the safe default ------------------------------------------------------------------------------------------------


def args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = {
        "address": "127.0.0.1",
        "tls_cert": None,
        "tls_key": None,
        "tls_ca": None,
        "secret_file": None,
        "insecure": False,
    }
    base.update(kw)
    return argparse.Namespace(**base)


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.7")
    assert not is_loopback("no-such-host.invalid")


def test_security_flags(tmp_path: Path) -> None:
    assert load_security(args()) == (None, None, b"")  # loopback: as simple as before
    with pytest.raises(ServerError, match=r"refusing to listen on 0\.0\.0\.0"):
        load_security(args(address="0.0.0.0"))
    assert load_security(args(address="0.0.0.0", insecure=True))[0] is None
    secret = tmp_path / "s"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    assert load_security(args(address="0.0.0.0", secret_file=str(secret)))[1] == SECRET
    with pytest.raises(ServerError, match="go together"):
        load_security(args(tls_cert="x"))
    with pytest.raises(ServerError, match="needs TLS"):
        load_security(args(tls_ca="x"))
    with pytest.raises(ServerError, match="cannot read"):
        load_security(args(tls_cert=str(tmp_path / "no.pem"), tls_key=str(tmp_path / "no.key")))
