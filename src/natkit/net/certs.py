"""TLS identities: the relay's, peers' (P2P), and an agent's memory of relays (trust on
first use, like ssh).

A relay without ``--cert/--key`` makes a self-signed ECDSA certificate once and keeps it.
An agent that is given no CA and no ``--fingerprint`` pins the fingerprint it sees first in
``known_relays`` and refuses a different one later, loudly.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from natkit.atomic import write_atomic
from natkit.errors import RelayError


class RelayTrustError(RelayError):
    """The relay's certificate is not the one this agent trusts."""


def self_signed(name: str, *, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh self-signed ECDSA P-256 certificate for ``name`` and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))  # tolerate skewed clocks
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def ensure_self_signed(directory: Path, name: str = "natkit-relay") -> tuple[Path, Path]:
    """Return (cert, key) paths in ``directory``, creating a self-signed pair if missing."""
    cert_path, key_path = directory / "relay-cert.pem", directory / "relay-key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert, key = self_signed(name, days=3650)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))  # fmt: skip
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def fingerprint_der(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def fingerprint_file(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return fingerprint_der(cert.public_bytes(serialization.Encoding.DER))


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    # No TLS 1.3 session tickets: agents do not resume (one long control connection each).
    ctx.num_tickets = 0
    return ctx


def client_context(cafile: Path | None) -> ssl.SSLContext:
    """With a CA: full verification. Without: no chain check here; the caller pins the
    certificate's fingerprint instead (see :class:`KnownRelays`)."""
    if cafile is not None:
        # The name (or IP address) the agent connects to must be in the certificate: a CA
        # vouches for names, not for whoever holds some certificate it signed.
        return ssl.create_default_context(cafile=str(cafile))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class KnownRelays:
    """``known_relays``: relay address → pinned certificate fingerprint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, str]:
        """The pins; none when the file does not exist. A file that cannot be read or is
        not ours is an error: forgetting every pin silently would trust anyone next."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise RelayTrustError(
                f"cannot read the pinned relays in {self.path}: {exc.strerror}"
            ) from None
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise RelayTrustError(
                f"{self.path} (the pinned relay certificates) is damaged: fix it, or remove it "
                "to pin every relay afresh on its next use"
            )
        return dict(data)

    def check(self, relay: str, seen: str, expected: str | None = None) -> bool:
        """Verify ``seen`` for ``relay``; True if it was pinned just now (first use)."""
        if expected is not None:
            if seen != expected:
                raise RelayTrustError(
                    f"relay {relay} presented {seen}, not the expected {expected}"
                )
            return False
        known = self._load()
        pinned = known.get(relay)
        if pinned is None:
            known[relay] = seen
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(self.path, json.dumps(known, indent=1))  # never a damaged file
            return True
        if pinned != seen:
            raise RelayTrustError(
                f"relay {relay} presented certificate {seen}, but {pinned} was pinned on first "
                f"use (in {self.path}). If the relay really changed its certificate, remove that "
                "line; otherwise someone may be intercepting the connection."
            )
        return False
