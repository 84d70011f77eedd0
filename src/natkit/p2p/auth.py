"""Who the peer is: certificates, sealed signalling messages and the in-QUIC secret proof.

The two peers share a secret of their own (never the relay token: anyone holding the token
could then pose as a peer). Everything they tell each other through the relay is sealed
with it: encrypted and authenticated (ChaCha20-Poly1305 under a key derived from the secret),
so the relay and other token holders can neither read (local addresses, ICE credentials,
fingerprints) nor forge nor alter it. Each sealed message names the session (both peers'
nonces) and its sender's role, so a message of an earlier session, a repeat, or a peer's
own message reflected back to it is refused. The room name the relay sees is an HMAC of
the name under the secret, so nobody without the secret can find, join or squat the room.

The relay sees sealed messages; whoever runs it could try to guess the secret offline by
trying candidates against them. That is why a secret is at least :data:`MIN_SECRET_LENGTH`
characters, and ``natkit p2p listen`` makes a random one (192 bits) when given none.

In QUIC the client pins the server's certificate to the fingerprint it received sealed; then
each peer proves, on the server's first stream, that it knows the secret and holds the key of
the certificate it announced, bound to that one QUIC connection (:mod:`natkit.p2p.proof`,
which also says what each check stops). The secret itself never crosses the network.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from natkit.errors import ProtocolError
from natkit.net.certs import fingerprint_der, self_signed
from natkit.p2p.errors import P2PAuthError

#: The largest sealed signalling message accepted (ICE candidates and fingerprints fit easily).
MAX_SEALED = 64 * 1024
#: The shortest secret accepted: the relay sees sealed messages and could test guesses of a
#: short one offline against them.
MIN_SECRET_LENGTH = 16
_AEAD_NONCE = 12
_VERSION = "nk2"
ROLES = ("listen", "connect")


def _raw(secret: bytes | str) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def check_secret(secret: bytes | str) -> None:
    """Raise :class:`P2PAuthError` now for a secret that cannot work (an empty one)."""
    key_for(secret, b"check")


def check_peer_secret(secret: bytes | str | None) -> None:
    """Raise :class:`P2PAuthError` for a peers' secret that is missing or too short to be
    safe to seal signalling with (the relay sees the sealed messages)."""
    if not secret:
        raise P2PAuthError(
            "the peers need a secret of their own (not the relay token): give both the same "
            f"secret of at least {MIN_SECRET_LENGTH} characters (natkit p2p listen makes one "
            "when given none; natkit.p2p.new_secret() in Python)"
        )
    if len(secret) < MIN_SECRET_LENGTH:
        raise P2PAuthError(
            f"the P2P secret has {len(secret)} characters; at least {MIN_SECRET_LENGTH} are "
            "needed, because the relay sees messages sealed with it and could guess a short "
            "one offline (natkit p2p listen makes a strong one when given none)"
        )


def new_secret() -> str:
    """A fresh random secret for two peers (192 bits, 32 URL-safe characters)."""
    return secrets.token_urlsafe(24)


def key_for(secret: bytes | str, purpose: bytes) -> bytes:
    """A key per purpose, so a MAC made for one use can never pass for another."""
    raw = _raw(secret)
    if not raw:
        raise P2PAuthError("the shared secret is empty; give both peers the same non-empty secret")
    return hmac.new(raw, b"natkit-p2p " + purpose, hashlib.sha256).digest()


def room_id(secret: bytes | str, name: str) -> str:
    """The room name the relay sees for ``name``: an HMAC under the secret, so only peers
    holding the secret can find (or squat) the room."""
    return (
        "p2p-" + hmac.new(key_for(secret, b"room"), name.encode(), hashlib.sha256).hexdigest()[:40]
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"sealed signalling message: {what} is not base64url") from exc


class WrongSecretError(P2PAuthError, ProtocolError):
    """A sealed message failed its authentication: the peers hold different secrets (or
    someone altered or forged it)."""


class ReflectedMessageError(ProtocolError):
    """A sealed message names the receiver's own role as its sender: it was sent back."""


def new_session_nonce() -> str:
    """A fresh session nonce for :func:`seal` (both peers must use the same one)."""
    return secrets.token_urlsafe(16)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"a peer's role is 'listen' or 'connect', not {role!r}")


def seal(secret: bytes | str, obj: Mapping[str, Any], *, session: str, sender: str) -> str:
    """Encrypt and authenticate a JSON-able signalling message of ``sender`` (its role) for
    ``session`` under ``secret``.

    The text is ``nk2.<nonce>.<ciphertext>``; the sealed envelope carries the session, the
    sender's role and a message nonce, so :func:`unseal` can refuse other sessions,
    reflected messages and (with a :class:`ReplayGuard`) repeats within one session.
    """
    _check_role(sender)
    envelope = {"sid": session, "from": sender, "mid": secrets.token_urlsafe(12), "body": dict(obj)}
    plain = json.dumps(envelope, separators=(",", ":"), sort_keys=True).encode()
    nonce = os.urandom(_AEAD_NONCE)
    sealed = ChaCha20Poly1305(key_for(secret, b"signalling aead")).encrypt(
        nonce, plain, _VERSION.encode()
    )
    return f"{_VERSION}.{_b64(nonce)}.{_b64(sealed)}"


def unseal(
    secret: bytes | str,
    text: str,
    *,
    session: str,
    sender: str,
    guard: ReplayGuard | None = None,
) -> dict[str, Any]:
    """Check and open a message made by :func:`seal` by the peer whose role is ``sender``.

    Raises :class:`WrongSecretError` when it was not sealed under ``secret`` (or was
    altered), :class:`ReflectedMessageError` when the other role sealed it (our own message
    sent back), and :class:`ProtocolError` when it is malformed, of another session or (with
    ``guard``) a repeat."""
    _check_role(sender)
    if len(text) > MAX_SEALED:
        raise ProtocolError(f"sealed signalling message of {len(text)} bytes (limit {MAX_SEALED})")
    parts = text.split(".")
    if len(parts) != 3 or parts[0] != _VERSION:
        raise ProtocolError(
            f"not a natkit sealed signalling message (expected {_VERSION}.<nonce>.<data>); "
            "is the peer running a compatible natkit?"
        )
    nonce = _unb64(parts[1], "the nonce")
    if len(nonce) != _AEAD_NONCE:
        raise ProtocolError("sealed signalling message: the nonce is not 12 bytes")
    try:
        plain = ChaCha20Poly1305(key_for(secret, b"signalling aead")).decrypt(
            nonce, _unb64(parts[2], "the data"), _VERSION.encode()
        )
    except InvalidTag:
        raise WrongSecretError(
            "signalling message failed its authentication: the peers do not share the same "
            "secret, or the message was forged or altered on the way"
        ) from None
    try:
        envelope = json.loads(plain)
    except ValueError as exc:  # only a holder of the secret gets here, but stay strict
        raise ProtocolError("sealed signalling message: the payload is not JSON") from exc
    if not isinstance(envelope, dict) or not isinstance(envelope.get("body"), dict):
        raise ProtocolError("sealed signalling message: the payload is not an object")
    if envelope.get("from") != sender:
        raise ReflectedMessageError(
            f"signalling message sealed by the {envelope.get('from')!r} peer, not the "
            f"{sender!r} one: our own message reflected back; refused"
        )
    if envelope.get("sid") != session:
        raise ProtocolError(
            "signalling message belongs to another session (replayed or stale); ignore it"
        )
    if guard is not None:
        guard.check(str(envelope.get("mid")))
    body: dict[str, Any] = envelope["body"]
    return body


class ReplayGuard:
    """Remembers the last ``size`` message nonces of one session and refuses repeats."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._seen: OrderedDict[str, None] = OrderedDict()

    def check(self, message_id: str) -> None:
        if message_id in self._seen:
            raise ProtocolError("signalling message replayed within the session; ignore it")
        self._seen[message_id] = None
        if len(self._seen) > self.size:
            self._seen.popitem(last=False)


def normalize_fingerprint(fp: str) -> str:
    """``sha256:<64 hex>`` in lower case; colons between hex pairs are accepted."""
    algo, _, digest = fp.strip().partition(":")
    digest = digest.replace(":", "").lower()
    if (
        algo.lower() != "sha256"
        or len(digest) != 64
        or not all(c in "0123456789abcdef" for c in digest)
    ):
        raise P2PAuthError(
            f"{fp!r} is not a certificate fingerprint (expected sha256:<64 hex digits>)"
        )
    return "sha256:" + digest


@dataclass(frozen=True)
class PeerIdentity:
    """A peer's certificate and key; give :attr:`fingerprint` to the other peer (sealed)."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @property
    def fingerprint(self) -> str:
        return fingerprint_der(self.certificate.public_bytes(serialization.Encoding.DER))

    @classmethod
    def generate(cls, name: str = "natkit-peer", days: int = 30) -> PeerIdentity:
        """A fresh self-signed ECDSA P-256 identity, kept in memory only."""
        cert, key = self_signed(name, days=days)
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> PeerIdentity:
        """Load a PEM pair such as :func:`natkit.net.certs.ensure_self_signed` makes."""
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise P2PAuthError(f"{key_path} does not hold an ECDSA private key")
        return cls(cert, key)


def check_pinned(seen_der: bytes | None, expected: str) -> None:
    """Raise :class:`P2PAuthError` unless the peer's certificate has fingerprint ``expected``."""
    if seen_der is None:
        raise P2PAuthError("the peer presented no certificate; it cannot be authenticated")
    seen = fingerprint_der(seen_der)
    if seen != normalize_fingerprint(expected):
        raise P2PAuthError(
            f"the peer presented certificate {seen}, not {expected} announced through "
            "signalling: someone may be intercepting the connection (or the signalling "
            "message was stale)"
        )
