"""Sealed signalling messages, fingerprints and the QUIC secret proofs (natkit.p2p.auth)."""

from __future__ import annotations

import base64
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


L, C = "listen", "connect"


def test_seal_round_trip() -> None:
    sid = auth.new_session_nonce()
    text = auth.seal(SECRET, OFFER, session=sid, sender=C)
    assert auth.unseal(SECRET, text, session=sid, sender=C) == OFFER
    assert auth.unseal(SECRET.encode(), text, session=sid, sender=C) == OFFER  # str or bytes


def test_two_seals_of_one_message_differ() -> None:
    # A per-message nonce: equal messages do not give equal texts (replay detection needs it).
    one, two = (auth.seal(SECRET, OFFER, session="s", sender=L) for _ in range(2))
    assert one != two


def _decoded_parts(text: str) -> list[bytes]:
    return [base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)) for p in text.split(".")[1:]]


def test_a_sealed_message_cannot_be_read_without_the_secret() -> None:
    # Issue 16: signalling was signed but readable by the relay (addresses, ICE
    # credentials, fingerprints). Nothing of the body shows in the sealed text.
    text = auth.seal(SECRET, OFFER, session="s", sender=L)
    for part in [text.encode(), *_decoded_parts(text)]:
        for secret_bit in (b"abcd", b"xxxxxxxx", b"ab" * 8, b"ufrag", b"fingerprint", b"listen"):
            assert secret_bit not in part


def test_wrong_secret_is_refused() -> None:
    text = auth.seal(SECRET, OFFER, session="s", sender=C)
    with pytest.raises(auth.WrongSecretError, match="same secret"):
        auth.unseal("another secret", text, session="s", sender=C)


def test_a_message_sent_back_to_its_sender_is_refused() -> None:
    # Reflection: the listener's own offer returned to it by a token holder in the room.
    text = auth.seal(SECRET, OFFER, session="s", sender=L)
    with pytest.raises(auth.ReflectedMessageError, match="reflected"):
        auth.unseal(SECRET, text, session="s", sender=C)
    assert auth.unseal(SECRET, text, session="s", sender=L) == OFFER


def test_roles_are_checked() -> None:
    with pytest.raises(ValueError, match="role"):
        auth.seal(SECRET, OFFER, session="s", sender="relay")


@pytest.mark.parametrize("part", [1, 2])
def test_flipped_character_is_refused(part: int) -> None:
    text = auth.seal(SECRET, OFFER, session="s", sender=C)
    pieces = text.split(".")
    c = pieces[part][5]
    pieces[part] = pieces[part][:5] + ("A" if c != "A" else "B") + pieces[part][6:]
    with pytest.raises(ProtocolError):
        auth.unseal(SECRET, ".".join(pieces), session="s", sender=C)


def test_replay_into_another_session_is_refused() -> None:
    old, new = auth.new_session_nonce(), auth.new_session_nonce()
    text = auth.seal(SECRET, OFFER, session=old, sender=C)
    with pytest.raises(ProtocolError, match="another session"):
        auth.unseal(SECRET, text, session=new, sender=C)


def test_replay_within_a_session_is_refused_by_the_guard() -> None:
    guard = auth.ReplayGuard()
    first = auth.seal(SECRET, OFFER, session="s", sender=C)
    second = auth.seal(SECRET, OFFER, session="s", sender=C)
    auth.unseal(SECRET, first, session="s", sender=C, guard=guard)
    auth.unseal(SECRET, second, session="s", sender=C, guard=guard)
    with pytest.raises(ProtocolError, match="replayed"):
        auth.unseal(SECRET, first, session="s", sender=C, guard=guard)


def test_replay_guard_is_bounded() -> None:
    guard = auth.ReplayGuard(size=2)
    for mid in ("a", "b", "c"):
        guard.check(mid)
    guard.check("a")  # forgotten: the memory holds the last two only
    with pytest.raises(ProtocolError):
        guard.check("c")


@pytest.mark.parametrize(
    "text",
    ["", "nk2", "nk2.abc", "nk1.abc.def", "nk2.a.b.c", "nk2.!!!.abc", "nk2.abc.%%%",
     "nk2.AAAAAAAAAAAAAAAA.AAAA", "x" * 70000],
)  # fmt: skip
def test_malformed_texts_raise_protocol_error(text: str) -> None:
    with pytest.raises(ProtocolError):
        auth.unseal(SECRET, text, session="s", sender=C)


@given(st.text(max_size=300))
def test_open_sealed_raises_only_protocol_error(text: str) -> None:
    with pytest.raises(ProtocolError):
        auth.unseal(SECRET, text, session="s", sender=C)


def test_empty_secret_is_refused() -> None:
    with pytest.raises(P2PAuthError, match="empty"):
        auth.seal("", OFFER, session="s", sender=C)


@pytest.mark.parametrize("secret", [None, "", "short", "x" * 15])
def test_a_missing_or_short_secret_is_refused(secret: str | None) -> None:
    with pytest.raises(P2PAuthError, match=r"16 characters|offline"):
        auth.check_peer_secret(secret)
    auth.check_peer_secret("x" * 16)


def test_new_secrets_are_long_and_fresh() -> None:
    made = {auth.new_secret() for _ in range(100)}
    assert len(made) == 100 and all(len(s) >= 32 for s in made)


def test_room_ids_hide_the_name_and_depend_on_the_secret() -> None:
    one = auth.room_id(SECRET, "office")
    assert one == auth.room_id(SECRET, "office") and "office" not in one
    assert one != auth.room_id(SECRET + "!", "office") != auth.room_id(SECRET, "office2")
    assert len(one) <= 128  # the relay's room-name limit


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
