"""Who the peer is: certificates, sealed signalling messages and the in-QUIC secret proof.

Each peer has a self-signed ECDSA certificate. Fingerprints travel through the relay's
signalling channel inside messages sealed with HMAC-SHA256 under the secret the two peers
share, so a relay (or anyone on the way) can neither forge nor alter them, and a session
nonce inside every seal stops a message of an earlier session from being replayed.

In QUIC the client pins the server's certificate to the fingerprint it received sealed; then
it proves it knows the secret on the first stream: an HMAC over both fingerprints and a
nonce the server chose for this connection, and the server answers with its own HMAC. Both
peers are then authenticated, and the secret itself never crosses the network.
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
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from natkit.errors import ProtocolError
from natkit.net.certs import fingerprint_der, self_signed
from natkit.p2p.errors import P2PAuthError

#: The largest sealed signalling message accepted (ICE candidates and fingerprints fit easily).
MAX_SEALED = 64 * 1024
NONCE_SIZE = 32  # the server's per-connection nonce in the QUIC proof
PROOF_SIZE = 32  # HMAC-SHA256
_VERSION = "nk1"


def _key(secret: bytes | str, purpose: bytes) -> bytes:
    """A key per purpose, so a MAC made for signalling can never pass as a QUIC proof."""
    raw = secret.encode() if isinstance(secret, str) else secret
    if not raw:
        raise P2PAuthError("the shared secret is empty; give both peers the same non-empty secret")
    return hmac.new(raw, b"natkit-p2p " + purpose, hashlib.sha256).digest()


def check_secret(secret: bytes | str) -> None:
    """Raise :class:`P2PAuthError` now for a secret that cannot work (an empty one)."""
    _key(secret, b"check")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"sealed signalling message: {what} is not base64url") from exc


class WrongSecretError(P2PAuthError, ProtocolError):
    """A sealed message failed its HMAC check: the peers hold different secrets."""


def new_session_nonce() -> str:
    """A fresh session nonce for :func:`seal` (both peers must use the same one)."""
    return secrets.token_urlsafe(16)


def seal(secret: bytes | str, obj: Mapping[str, Any], *, session: str) -> str:
    """Seal a JSON-able signalling message for ``session`` under ``secret``.

    The text is ``nk1.<payload>.<mac>``; the payload carries the session nonce and a
    message nonce, so :func:`unseal` can refuse other sessions and (with a
    :class:`ReplayGuard`) repeats within one.
    """
    envelope = {"sid": session, "mid": secrets.token_urlsafe(12), "body": dict(obj)}
    payload = _b64(json.dumps(envelope, separators=(",", ":"), sort_keys=True).encode())
    signed = f"{_VERSION}.{payload}"
    mac = hmac.new(_key(secret, b"signalling"), signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{_b64(mac)}"


def unseal(
    secret: bytes | str, text: str, *, session: str, guard: ReplayGuard | None = None
) -> dict[str, Any]:
    """Check and open a message made by :func:`seal`; raise :class:`ProtocolError` if it is
    malformed, sealed under another secret, altered, for another session or (with
    ``guard``) a repeat."""
    if len(text) > MAX_SEALED:
        raise ProtocolError(f"sealed signalling message of {len(text)} bytes (limit {MAX_SEALED})")
    parts = text.split(".")
    if len(parts) != 3 or parts[0] != _VERSION:
        raise ProtocolError(
            "not a natkit sealed signalling message (expected nk1.<payload>.<mac>); "
            "is the peer running a compatible natkit?"
        )
    mac = _unb64(parts[2], "the MAC")
    signed = f"{parts[0]}.{parts[1]}".encode()
    want = hmac.new(_key(secret, b"signalling"), signed, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, want):
        raise WrongSecretError(
            "signalling message failed its HMAC check: the peers do not share the same "
            "secret, or the message was altered on the way"
        )
    try:
        envelope = json.loads(_unb64(parts[1], "the payload"))
    except ValueError as exc:  # only our own seal gets here, but stay strict
        raise ProtocolError("sealed signalling message: the payload is not JSON") from exc
    if not isinstance(envelope, dict) or not isinstance(envelope.get("body"), dict):
        raise ProtocolError("sealed signalling message: the payload is not an object")
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


def new_connection_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def _proof(secret: bytes | str, who: bytes, server_fp: str, client_fp: str, nonce: bytes) -> bytes:
    msg = b"|".join(
        (
            who,
            normalize_fingerprint(server_fp).encode(),
            normalize_fingerprint(client_fp).encode(),
            nonce,
        )
    )
    return hmac.new(_key(secret, b"quic-proof"), msg, hashlib.sha256).digest()


def client_proof(secret: bytes | str, server_fp: str, client_fp: str, nonce: bytes) -> bytes:
    """The client's proof of the secret for this connection (``nonce`` is the server's)."""
    return _proof(secret, b"client", server_fp, client_fp, nonce)


def server_proof(secret: bytes | str, server_fp: str, client_fp: str, nonce: bytes) -> bytes:
    """The server's answer: it knows the secret too (and accepted the client's proof)."""
    return _proof(secret, b"server", server_fp, client_fp, nonce)


def proofs_equal(got: bytes, want: bytes) -> bool:
    return hmac.compare_digest(got, want)
