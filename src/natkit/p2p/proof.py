"""The in-QUIC proof (version 3): each peer proves the secret and its announced key, bound
to this one QUIC connection.

The two peers learned each other's certificate fingerprint through sealed, role-bound
signalling (:mod:`natkit.p2p.auth`). On the server's first stream, once QUIC has keys:

1. server → client: a fresh 32-byte nonce;
2. client → server (then FIN): its own fresh nonce, its certificate (DER), an ECDSA
   signature with that certificate's key and an HMAC under the secret;
3. server → client (then FIN): its signature and HMAC.

Signature and HMAC cover one transcript (:meth:`ProofContext.transcript`): the proof's
version, the signer's role, both fingerprints, both nonces and the *channel binding*, a
value both ends of this QUIC connection derive from its TLS 1.3 key schedule
(:meth:`natkit.p2p.quicconn.NatkitQuic.channel_binding`; qh3 has no RFC 5705/8446 exporter,
see there).

What each check stops:

- The client pins the server's certificate in TLS (and checks the server's signature over
  the transcript): nobody without the server's private key can be the server.
- HMAC under the secret: a relay or token holder without the secret can produce neither
  proof. Both nonces: a proof recorded on an earlier connection fails on a new one.
- The channel binding: a proof is worth something on one QUIC connection only. A party in
  the middle that splices two connections (plays the server to the client, with the
  server's stolen key, and the client to the server) and forwards the nonces and proofs
  byte for byte can make nonces, connection IDs and everything else it chooses equal on
  both connections, but not their TLS secrets (each comes from its own ECDHE exchange): the
  server refuses the forwarded proof. Without the binding the server's acceptance would
  rest on the client's pin alone.
- The client's certificate and signature: TLS (qh3's server asks for no client
  certificate) does not show the server who holds the client's end. The server checks the
  certificate the client sends against the fingerprint announced in signalling and the
  signature against that certificate's key, so a peer that announces one certificate and
  uses another, or that holds the secret and a copy of the (public) certificate but not
  its key, is refused, as TLS client authentication would refuse it.

Nothing here is secret on the wire (it travels inside QUIC anyway): the secret and the
binding only ever enter a MAC or a signature.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from natkit.net.certs import fingerprint_der
from natkit.p2p.auth import PeerIdentity, key_for, normalize_fingerprint
from natkit.p2p.errors import P2PAuthError

VERSION = 3  # 2: HMAC over fingerprints and the server's nonce only
NONCE_SIZE = 32
MAC_SIZE = 32  # HMAC-SHA256
MAX_CERTIFICATE = 4096  # natkit's self-signed P-256 certificates are about 400 bytes
MAX_SIGNATURE = 160  # a DER ECDSA signature on P-521 is at most 139 bytes
#: The most the client sends on the proof stream (the server's answer is smaller).
MAX_CLIENT_MESSAGE = NONCE_SIZE + 2 + MAX_CERTIFICATE + 2 + MAX_SIGNATURE + MAC_SIZE
_LABEL = b"natkit-p2p proof v%d" % VERSION


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


@dataclass(frozen=True)
class ProofContext:
    """What both ends of one QUIC connection must agree on for a proof to pass."""

    server_fp: str
    client_fp: str
    server_nonce: bytes
    client_nonce: bytes
    binding: bytes

    def transcript(self, role: str) -> bytes:
        """The bytes ``role`` ("client" or "server") signs and MACs: each field length-
        prefixed, so no two different contexts give the same bytes."""
        fields = (
            _LABEL,
            role.encode(),
            normalize_fingerprint(self.server_fp).encode(),
            normalize_fingerprint(self.client_fp).encode(),
            self.server_nonce,
            self.client_nonce,
            self.binding,
        )
        return b"".join(struct.pack("!H", len(f)) + f for f in fields)


@dataclass(frozen=True)
class ClientProof:
    """The client's message: its nonce, its certificate, its signature and its MAC."""

    nonce: bytes
    certificate_der: bytes
    signature: bytes
    mac: bytes

    def encode(self) -> bytes:
        return b"".join((
            self.nonce, _prefixed(self.certificate_der), _prefixed(self.signature), self.mac
        ))  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> ClientProof:
        reader = _Reader(data)
        nonce = reader.take(NONCE_SIZE)
        cert = reader.prefixed(MAX_CERTIFICATE, "certificate")
        signature = reader.prefixed(MAX_SIGNATURE, "signature")
        mac = reader.take(MAC_SIZE)
        reader.end()
        return cls(nonce, cert, signature, mac)


@dataclass(frozen=True)
class ServerProof:
    """The server's answer: its signature and its MAC."""

    signature: bytes
    mac: bytes

    def encode(self) -> bytes:
        return _prefixed(self.signature) + self.mac

    @classmethod
    def decode(cls, data: bytes) -> ServerProof:
        reader = _Reader(data)
        signature = reader.prefixed(MAX_SIGNATURE, "signature")
        mac = reader.take(MAC_SIZE)
        reader.end()
        return cls(signature, mac)


def _prefixed(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise _malformed("it ends early")
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def prefixed(self, limit: int, what: str) -> bytes:
        (size,) = struct.unpack("!H", self.take(2))
        if not 0 < size <= limit:
            raise _malformed(f"a {what} of {size} bytes (1 to {limit} expected)")
        return self.take(size)

    def end(self) -> None:
        if self.at != len(self.data):
            raise _malformed(f"{len(self.data) - self.at} bytes too many")


def _malformed(why: str) -> P2PAuthError:
    return P2PAuthError(
        f"the peer's authentication message is malformed ({why}): is it running a natkit "
        f"with the same proof version ({VERSION})?"
    )


def _mac(secret: bytes | str, transcript: bytes) -> bytes:
    return hmac.new(key_for(secret, b"quic-proof"), transcript, hashlib.sha256).digest()


def _sign(identity: PeerIdentity, transcript: bytes) -> bytes:
    return identity.private_key.sign(transcript, ec.ECDSA(hashes.SHA256()))


def _check(secret: bytes | str, ctx: ProofContext, role: str, signature: bytes, mac: bytes,
           certificate: x509.Certificate) -> None:  # fmt: skip
    transcript = ctx.transcript(role)
    if not hmac.compare_digest(mac, _mac(secret, transcript)):
        raise P2PAuthError(
            f"the {role}'s proof of the shared secret is wrong: the two peers were not given "
            "the same secret, or the proof was made on another connection (replayed or "
            "relayed)"
        )
    key = certificate.public_key()
    try:
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise InvalidSignature
        key.verify(signature, transcript, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise P2PAuthError(
            f"the {role}'s signature does not verify with the certificate it announced: it "
            "does not hold that certificate's private key"
        ) from None


def make_client_proof(
    secret: bytes | str, identity: PeerIdentity, ctx: ProofContext
) -> ClientProof:
    transcript = ctx.transcript("client")
    cert = identity.certificate.public_bytes(serialization.Encoding.DER)
    return ClientProof(
        ctx.client_nonce, cert, _sign(identity, transcript), _mac(secret, transcript)
    )


def check_client_proof(secret: bytes | str, proof: ClientProof, ctx: ProofContext) -> None:
    """Raise :class:`P2PAuthError` unless ``proof`` comes from the holder of the secret and
    of the key of the client certificate announced in signalling, on this connection."""
    if fingerprint_der(proof.certificate_der) != normalize_fingerprint(ctx.client_fp):
        raise P2PAuthError(  # the cause first: a CONNECTION_CLOSE reason is cut short
            "the client's certificate is not the one it announced through signalling "
            f"(it showed {fingerprint_der(proof.certificate_der)}, announced {ctx.client_fp})"
        )
    try:
        cert = x509.load_der_x509_certificate(proof.certificate_der)
    except ValueError:
        raise _malformed("the certificate does not parse") from None
    _check(secret, ctx, "client", proof.signature, proof.mac, cert)


def make_server_proof(
    secret: bytes | str, identity: PeerIdentity, ctx: ProofContext
) -> ServerProof:
    transcript = ctx.transcript("server")
    return ServerProof(_sign(identity, transcript), _mac(secret, transcript))


def check_server_proof(
    secret: bytes | str, proof: ServerProof, ctx: ProofContext, certificate_der: bytes
) -> None:
    """Raise :class:`P2PAuthError` unless ``proof`` comes from the holder of the secret and of
    the key of ``certificate_der`` (the server's, already pinned in TLS), on this connection."""
    _check(secret, ctx, "server", proof.signature, proof.mac,
           x509.load_der_x509_certificate(certificate_der))  # fmt: skip
