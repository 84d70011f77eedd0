"""The in-QUIC proof, version 3 (natkit.p2p.proof): wire codec and what each check refuses."""

from __future__ import annotations

import contextlib
import dataclasses
import struct

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from natkit.net.certs import fingerprint_der
from natkit.p2p import proof
from natkit.p2p.auth import PeerIdentity
from natkit.p2p.errors import P2PAuthError

SECRET = "correct horse battery staple"
CLIENT, SERVER = PeerIdentity.generate("client"), PeerIdentity.generate("server")


def context(**changes: object) -> proof.ProofContext:
    ctx = proof.ProofContext(
        server_fp=SERVER.fingerprint,
        client_fp=CLIENT.fingerprint,
        server_nonce=b"s" * proof.NONCE_SIZE,
        client_nonce=b"c" * proof.NONCE_SIZE,
        binding=b"b" * 32,
    )
    return dataclasses.replace(ctx, **changes)  # type: ignore[arg-type]


def test_client_message_layout_byte_for_byte() -> None:
    msg = proof.ClientProof(b"n" * 32, b"\x30cert", b"\x30sig", b"m" * 32)
    wire = msg.encode()
    assert wire == b"n" * 32 + b"\x00\x05\x30cert" + b"\x00\x04\x30sig" + b"m" * 32
    assert proof.ClientProof.decode(wire) == msg
    answer = proof.ServerProof(b"\x30sig", b"m" * 32)
    assert answer.encode() == b"\x00\x04\x30sig" + b"m" * 32
    assert proof.ServerProof.decode(answer.encode()) == answer


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"n" * 32,  # ends after the nonce
        b"n" * 32 + b"\x00\x00" + b"\x00\x01s" + b"m" * 32,  # an empty certificate
        b"n" * 32 + struct.pack("!H", proof.MAX_CERTIFICATE + 1) + b"c" * 5000,
        b"n" * 32 + b"\x00\x01c" + b"\x00\x01s" + b"m" * 33,  # one byte too many
    ],
)
def test_malformed_client_messages_are_refused(wire: bytes) -> None:
    with pytest.raises(P2PAuthError, match="malformed"):
        proof.ClientProof.decode(wire)


@given(st.binary(max_size=600))
def test_any_bytes_decode_or_raise_p2p_auth_error(data: bytes) -> None:
    for codec in (proof.ClientProof, proof.ServerProof):
        with contextlib.suppress(P2PAuthError):
            codec.decode(data)


def test_the_transcript_names_every_field_and_the_role() -> None:
    base = context()
    variants = [
        context(server_fp=CLIENT.fingerprint),
        context(client_fp=SERVER.fingerprint),
        context(server_nonce=b"x" * 32),
        context(client_nonce=b"x" * 32),
        context(binding=b"x" * 32),
    ]
    seen = {base.transcript("client"), base.transcript("server")}
    seen |= {v.transcript("client") for v in variants}
    assert len(seen) == 2 + len(variants)
    assert b"natkit-p2p proof v3" in base.transcript("client")


def test_the_normal_proofs_pass() -> None:
    ctx = context()
    sent = proof.make_client_proof(SECRET, CLIENT, ctx)
    proof.check_client_proof(SECRET, proof.ClientProof.decode(sent.encode()), ctx)
    answer = proof.make_server_proof(SECRET, SERVER, ctx)
    server_der = SERVER.certificate.public_bytes(serialization.Encoding.DER)
    proof.check_server_proof(SECRET, proof.ServerProof.decode(answer.encode()), ctx, server_der)


@pytest.mark.parametrize(
    ("checked_with", "why"),
    [
        (context(binding=b"B" * 32), "another connection"),  # a proof relayed from elsewhere
        (context(server_nonce=b"S" * 32), "another connection"),
        (context(client_nonce=b"C" * 32), "another connection"),
        (context(server_fp=CLIENT.fingerprint), "another connection"),
    ],
)
def test_a_client_proof_made_for_another_context_is_refused(
    checked_with: proof.ProofContext, why: str
) -> None:
    sent = proof.make_client_proof(SECRET, CLIENT, context())
    with pytest.raises(P2PAuthError, match=why):
        proof.check_client_proof(SECRET, sent, checked_with)


def test_a_client_proof_under_another_secret_is_refused() -> None:
    sent = proof.make_client_proof("another secret entirely", CLIENT, context())
    with pytest.raises(P2PAuthError, match="same secret"):
        proof.check_client_proof(SECRET, sent, context())


def test_a_client_with_another_certificate_than_announced_is_refused() -> None:
    other = PeerIdentity.generate("other")
    sent = proof.make_client_proof(SECRET, other, context(client_fp=other.fingerprint))
    with pytest.raises(P2PAuthError, match="not the one it announced"):
        proof.check_client_proof(SECRET, sent, context())


def test_a_client_with_the_announced_certificate_but_not_its_key_is_refused() -> None:
    # It holds the secret and a copy of the (public) certificate, signs with its own key.
    impostor = PeerIdentity(CLIENT.certificate, PeerIdentity.generate("x").private_key)
    sent = proof.make_client_proof(SECRET, impostor, context())
    with pytest.raises(P2PAuthError, match="does not hold that certificate's private key"):
        proof.check_client_proof(SECRET, sent, context())


def test_a_certificate_that_does_not_parse_is_malformed() -> None:
    garbage = b"\x30\x03abc"
    sent = dataclasses.replace(proof.make_client_proof(SECRET, CLIENT, context()),
                               certificate_der=garbage)  # fmt: skip
    with pytest.raises(P2PAuthError, match="does not parse"):
        proof.check_client_proof(SECRET, sent, context(client_fp=fingerprint_der(garbage)))


def test_the_server_answer_is_bound_to_role_key_and_connection() -> None:
    ctx = context()
    server_der = SERVER.certificate.public_bytes(serialization.Encoding.DER)
    # the client's own proof reflected back as the server's answer
    mine = proof.make_client_proof(SECRET, CLIENT, ctx)
    with pytest.raises(P2PAuthError, match="another connection"):
        proof.check_server_proof(SECRET, proof.ServerProof(mine.signature, mine.mac), ctx,
                                 server_der)  # fmt: skip
    answer = proof.make_server_proof(SECRET, SERVER, context(binding=b"B" * 32))
    with pytest.raises(P2PAuthError, match="another connection"):
        proof.check_server_proof(SECRET, answer, ctx, server_der)
    impostor = PeerIdentity(SERVER.certificate, CLIENT.private_key)
    with pytest.raises(P2PAuthError, match="private key"):
        proof.check_server_proof(SECRET, proof.make_server_proof(SECRET, impostor, ctx), ctx,
                                 server_der)  # fmt: skip
