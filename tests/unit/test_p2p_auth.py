"""Sealed signalling messages, fingerprints and the QUIC secret proofs (natkit.p2p.auth)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from natkit.errors import ProtocolError
from natkit.net.certs import ensure_self_signed, fingerprint_file
from natkit.p2p import auth
from natkit.p2p.errors import P2PAuthError

SECRET = "correct horse battery staple"
OFFER = {"ufrag": "abcd", "pwd": "x" * 22, "fingerprint": "sha256:" + "ab" * 32, "n": [1, 2]}


def test_seal_round_trip() -> None:
    sid = auth.new_session_nonce()
    text = auth.seal(SECRET, OFFER, session=sid)
    assert auth.unseal(SECRET, text, session=sid) == OFFER
    assert auth.unseal(SECRET.encode(), text, session=sid) == OFFER  # str or bytes


def test_two_seals_of_one_message_differ() -> None:
    # A per-message nonce: equal messages do not give equal texts (replay detection needs it).
    assert auth.seal(SECRET, OFFER, session="s") != auth.seal(SECRET, OFFER, session="s")


def test_wrong_secret_is_refused() -> None:
    text = auth.seal(SECRET, OFFER, session="s")
    with pytest.raises(ProtocolError, match="same secret"):
        auth.unseal("another secret", text, session="s")


def _tamper_payload(text: str) -> str:
    version, payload, mac = text.split(".")
    envelope = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    envelope["body"]["fingerprint"] = "sha256:" + "cd" * 32  # a MITM's own certificate
    forged = base64.urlsafe_b64encode(json.dumps(envelope).encode()).rstrip(b"=").decode()
    return f"{version}.{forged}.{mac}"


def test_tampered_payload_is_refused() -> None:
    text = auth.seal(SECRET, OFFER, session="s")
    with pytest.raises(ProtocolError, match="HMAC"):
        auth.unseal(SECRET, _tamper_payload(text), session="s")


@pytest.mark.parametrize("part", [1, 2])
def test_flipped_character_is_refused(part: int) -> None:
    text = auth.seal(SECRET, OFFER, session="s")
    pieces = text.split(".")
    c = pieces[part][5]
    pieces[part] = pieces[part][:5] + ("A" if c != "A" else "B") + pieces[part][6:]
    with pytest.raises(ProtocolError):
        auth.unseal(SECRET, ".".join(pieces), session="s")


def test_replay_into_another_session_is_refused() -> None:
    old, new = auth.new_session_nonce(), auth.new_session_nonce()
    text = auth.seal(SECRET, OFFER, session=old)
    with pytest.raises(ProtocolError, match="another session"):
        auth.unseal(SECRET, text, session=new)


def test_replay_within_a_session_is_refused_by_the_guard() -> None:
    guard = auth.ReplayGuard()
    first = auth.seal(SECRET, OFFER, session="s")
    second = auth.seal(SECRET, OFFER, session="s")
    auth.unseal(SECRET, first, session="s", guard=guard)
    auth.unseal(SECRET, second, session="s", guard=guard)
    with pytest.raises(ProtocolError, match="replayed"):
        auth.unseal(SECRET, first, session="s", guard=guard)


def test_replay_guard_is_bounded() -> None:
    guard = auth.ReplayGuard(size=2)
    for mid in ("a", "b", "c"):
        guard.check(mid)
    guard.check("a")  # forgotten: the memory holds the last two only
    with pytest.raises(ProtocolError):
        guard.check("c")


@pytest.mark.parametrize(
    "text",
    ["", "nk1", "nk1.abc", "nk2.abc.def", "nk1.a.b.c", "nk1.!!!.abc", "nk1.abc.%%%", "x" * 70000],
)
def test_malformed_texts_raise_protocol_error(text: str) -> None:
    with pytest.raises(ProtocolError):
        auth.unseal(SECRET, text, session="s")


@given(st.text(max_size=300))
def test_open_sealed_raises_only_protocol_error(text: str) -> None:
    with pytest.raises(ProtocolError):
        auth.unseal(SECRET, text, session="s")


def test_empty_secret_is_refused() -> None:
    with pytest.raises(P2PAuthError, match="empty"):
        auth.seal("", OFFER, session="s")


def test_fingerprints_normalize() -> None:
    digest = "AB" * 32
    colons = ":".join(["AB"] * 32)
    assert auth.normalize_fingerprint(f"SHA256:{digest}") == "sha256:" + "ab" * 32
    assert auth.normalize_fingerprint(f"sha256:{colons}") == "sha256:" + "ab" * 32
    for bad in ("", "md5:" + "ab" * 16, "sha256:abc", "sha256:" + "zz" * 32):
        with pytest.raises(P2PAuthError, match="fingerprint"):
            auth.normalize_fingerprint(bad)


def test_identity_fingerprint_and_pinning(tmp_path: Path) -> None:
    ident = auth.PeerIdentity.generate()
    der = ident.certificate.public_bytes(serialization.Encoding.DER)
    auth.check_pinned(der, ident.fingerprint)
    auth.check_pinned(der, ident.fingerprint.upper().replace("SHA256", "sha256"))
    other = auth.PeerIdentity.generate()
    with pytest.raises(P2PAuthError, match="intercepting"):
        auth.check_pinned(der, other.fingerprint)
    with pytest.raises(P2PAuthError, match="no certificate"):
        auth.check_pinned(None, ident.fingerprint)


def test_identity_loads_the_relays_cert_files(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path)
    ident = auth.PeerIdentity.load(cert, key)
    assert ident.fingerprint == fingerprint_file(cert)


def test_proofs_bind_role_fingerprints_nonce_and_secret() -> None:
    a, b = auth.PeerIdentity.generate().fingerprint, auth.PeerIdentity.generate().fingerprint
    nonce = auth.new_connection_nonce()
    proof = auth.client_proof(SECRET, a, b, nonce)
    assert len(proof) == auth.PROOF_SIZE
    assert auth.proofs_equal(proof, auth.client_proof(SECRET, a, b, nonce))
    others = [
        auth.server_proof(SECRET, a, b, nonce),  # a client proof never passes as the server's
        auth.client_proof(SECRET, b, a, nonce),
        auth.client_proof(SECRET, a, b, auth.new_connection_nonce()),
        auth.client_proof("other", a, b, nonce),
    ]
    assert not any(auth.proofs_equal(proof, o) for o in others)
