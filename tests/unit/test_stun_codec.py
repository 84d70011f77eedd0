"""STUN codec: RFC 5769 test vectors byte for byte, Binding requests and responses, and
strict rejection of everything malformed."""

from __future__ import annotations

import struct

import pytest
from aioice import stun as aioice_stun

from natkit.errors import ProtocolError
from natkit.stun import codec
from natkit.stun.errors import StunDecodeError


def hexb(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# RFC 5769 (c) IETF Trust. The SOFTWARE/USERNAME padding is 0x20 in the RFC, on purpose.
TID = hexb("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")
PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
SAMPLE_REQUEST = hexb("""
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf
""")
SAMPLE_IPV4_RESPONSE = hexb("""
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96
""")
SAMPLE_IPV6_RESPONSE = hexb("""
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c
""")
V6 = "2001:db8:1234:5678:11:2233:4455:6677"

# ---------------------------------------------------------------------------------------
# RFC 5769
# ---------------------------------------------------------------------------------------


def test_rfc5769_sample_request_decodes_and_authenticates() -> None:
    decoded = codec.decode(SAMPLE_REQUEST)
    msg = decoded.message
    assert msg.message_method == aioice_stun.Method.BINDING
    assert msg.message_class == aioice_stun.Class.REQUEST
    assert msg.transaction_id == TID
    assert msg.attributes["SOFTWARE"] == "STUN test client"
    assert msg.attributes["PRIORITY"] == 0x6E0001FF
    assert msg.attributes["ICE-CONTROLLED"] == 0x932FF9B151263B36
    assert msg.attributes["USERNAME"] == "evtj:h6vY"
    assert msg.check_message_integrity(PASSWORD)  # the FINGERPRINT was checked by decode
    assert not msg.check_message_integrity(b"wrong password")
    assert decoded.unknown_required == ()


def test_rfc5769_sample_request_encodes_byte_for_byte() -> None:
    msg = aioice_stun.Message(
        aioice_stun.Method.BINDING,
        aioice_stun.Class.REQUEST,
        transaction_id=TID,
        attributes={
            "SOFTWARE": "STUN test client",
            "PRIORITY": 0x6E0001FF,
            "ICE-CONTROLLED": 0x932FF9B151263B36,
            "USERNAME": "evtj:h6vY",
        },
    )
    # MESSAGE-INTEGRITY and FINGERPRINT are computed here, over space padding as in the RFC.
    assert codec.encode(msg, integrity_key=PASSWORD, fingerprint=True, padding=b" ") == (
        SAMPLE_REQUEST
    )


@pytest.mark.parametrize(
    ("vector", "mapped"),
    [(SAMPLE_IPV4_RESPONSE, ("192.0.2.1", 32853)), (SAMPLE_IPV6_RESPONSE, (V6, 32853))],
    ids=["ipv4", "ipv6"],
)
def test_rfc5769_responses(vector: bytes, mapped: tuple[str, int]) -> None:
    decoded = codec.decode(vector)
    assert decoded.message.check_message_integrity(PASSWORD)
    response = codec.parse_binding_response(vector, TID)
    assert response.mapped == mapped
    assert response.ok
    assert response.software == "test vector"
    assert response.other_address is None

    # Built from its parts, the response comes out byte for byte.
    msg = aioice_stun.Message(
        aioice_stun.Method.BINDING,
        aioice_stun.Class.RESPONSE,
        transaction_id=TID,
        attributes={"SOFTWARE": "test vector", "XOR-MAPPED-ADDRESS": mapped},
    )
    assert codec.encode(msg, integrity_key=PASSWORD, fingerprint=True, padding=b" ") == vector
    # And the decoded message re-encodes to the same bytes, stored MI and FP included.
    assert codec.encode(decoded.message, padding=b" ") == vector


@pytest.mark.parametrize("vector", [SAMPLE_REQUEST, SAMPLE_IPV4_RESPONSE, SAMPLE_IPV6_RESPONSE])
def test_rfc5769_every_flipped_bit_of_the_fingerprinted_part_is_caught(vector: bytes) -> None:
    # FINGERPRINT covers everything before it (the frame checks the rest of the header):
    # a single flipped bit must never pass.
    for pos in range(len(vector) - 8):
        for bit in (0x01, 0x80):
            bad = bytearray(vector)
            bad[pos] ^= bit
            try:
                decoded = codec.decode(bytes(bad))
            except StunDecodeError:
                continue
            pytest.fail(f"flip at byte {pos} accepted: {decoded}")


# ---------------------------------------------------------------------------------------
# Binding requests
# ---------------------------------------------------------------------------------------


def test_binding_request_bytes() -> None:
    tid = bytes(range(12))
    data = codec.encode(codec.binding_request(transaction_id=tid))
    assert data == hexb("0001 0000 2112a442") + tid


@pytest.mark.parametrize(
    ("change_ip", "change_port", "flags"),
    [(True, True, 6), (False, True, 2), (True, False, 4)],
)
def test_change_request(change_ip: bool, change_port: bool, flags: int) -> None:
    tid = bytes(12)
    req = codec.binding_request(change_ip=change_ip, change_port=change_port, transaction_id=tid)
    data = codec.encode(req)
    # RFC 5780 7.2: type 0x0003, length 4, flags in the last byte (A=0x4 IP, B=0x2 port).
    assert data == hexb("0001 0008 2112a442") + tid + hexb("0003 0004 000000") + bytes([flags])


def test_binding_request_with_fingerprint_round_trips() -> None:
    req = codec.binding_request(change_ip=True, change_port=True)
    data = codec.encode(req, fingerprint=True)
    assert len(data) == 20 + 8 + 8
    decoded = codec.decode(data)
    assert decoded.transaction_id == req.transaction_id
    assert decoded.message.attributes["CHANGE-REQUEST"] == 6
    assert "FINGERPRINT" in decoded.message.attributes


def test_transaction_ids_are_random_and_12_bytes() -> None:
    ids = {codec.binding_request().transaction_id for _ in range(100)}
    assert len(ids) == 100
    assert all(len(t) == 12 for t in ids)
    with pytest.raises(ValueError):
        codec.binding_request(transaction_id=b"short")


# ---------------------------------------------------------------------------------------
# Responses as servers send them
# ---------------------------------------------------------------------------------------


def response(
    attrs: dict[str, object], cls: aioice_stun.Class = aioice_stun.Class.RESPONSE
) -> bytes:
    msg = aioice_stun.Message(aioice_stun.Method.BINDING, cls, transaction_id=TID, attributes=attrs)
    return codec.encode(msg, fingerprint=True)


def test_rfc5780_response_fields() -> None:
    data = response(
        {
            "XOR-MAPPED-ADDRESS": ("203.0.113.7", 40000),
            "MAPPED-ADDRESS": ("203.0.113.7", 40000),
            "RESPONSE-ORIGIN": ("198.51.100.1", 3478),
            "OTHER-ADDRESS": ("198.51.100.2", 3479),
            "SOFTWARE": "Coturn-4.6.1 'Gorst'",
        }
    )
    r = codec.parse_binding_response(data, TID)
    assert r.mapped == ("203.0.113.7", 40000)
    assert r.other_address == ("198.51.100.2", 3479)
    assert r.response_origin == ("198.51.100.1", 3478)
    assert r.software == "Coturn-4.6.1 'Gorst'"


def test_mapped_address_alone_is_accepted() -> None:
    r = codec.parse_binding_response(response({"MAPPED-ADDRESS": ("192.0.2.9", 5)}), TID)
    assert r.mapped == ("192.0.2.9", 5)


def test_xor_mapped_address_wins_over_mapped_address() -> None:
    # An ALG may rewrite MAPPED-ADDRESS; the XORed one is what RFC 8489 trusts.
    data = response(
        {"MAPPED-ADDRESS": ("10.0.0.1", 1), "XOR-MAPPED-ADDRESS": ("203.0.113.7", 40000)}
    )
    assert codec.parse_binding_response(data, TID).mapped == ("203.0.113.7", 40000)


def test_coturn_420_with_nul_padded_reason() -> None:
    # What coturn 4.6.1 with one listening IP answers to CHANGE-REQUEST (captured here).
    reason = "Unknown attribute: TURN server was configured without RFC 5780 support\x00\x00"
    data = response({"ERROR-CODE": (420, reason)}, aioice_stun.Class.ERROR)
    r = codec.parse_binding_response(data, TID)
    assert not r.ok
    assert r.error_code == 420
    assert r.error_reason == reason.rstrip("\x00")
    assert r.mapped is None


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (response({}), "without XOR-MAPPED-ADDRESS"),
        (response({}, aioice_stun.Class.ERROR), "without ERROR-CODE"),
        (response({"ERROR-CODE": (200, "OK")}, aioice_stun.Class.ERROR), "invalid code 200"),
        (response({"ERROR-CODE": (700, "x")}, aioice_stun.Class.ERROR), "invalid code 700"),
        (response({}, aioice_stun.Class.REQUEST), "where a response was due"),
        (response({}, aioice_stun.Class.INDICATION), "where a response was due"),
    ],
)
def test_unusable_binding_responses(data: bytes, match: str) -> None:
    with pytest.raises(StunDecodeError, match=match):
        codec.parse_binding_response(data, TID)


def test_other_method_is_refused() -> None:
    msg = aioice_stun.Message(
        aioice_stun.Method.ALLOCATE, aioice_stun.Class.RESPONSE, transaction_id=TID
    )
    with pytest.raises(StunDecodeError, match="ALLOCATE"):
        codec.parse_binding_response(codec.encode(msg), TID)


def test_other_transaction_is_refused() -> None:
    with pytest.raises(StunDecodeError, match="another transaction"):
        codec.parse_binding_response(SAMPLE_IPV4_RESPONSE, bytes(12))


def with_attribute(attr_type: int, value: bytes) -> bytes:
    """SAMPLE_IPV4_RESPONSE's header and XOR-MAPPED-ADDRESS plus one raw attribute."""
    body = hexb("0020 0008 0001 a147 e112 a643")
    body += struct.pack("!HH", attr_type, len(value)) + value + bytes(-len(value) % 4)
    return struct.pack("!HHI12s", 0x0101, len(body), codec.MAGIC_COOKIE, TID) + body


def test_unknown_comprehension_required_attribute_fails_a_success_response() -> None:
    data = with_attribute(0x0030, b"\x01\x02\x03\x04")
    assert codec.decode(data).unknown_required == (0x0030,)
    with pytest.raises(StunDecodeError, match="0x0030"):
        codec.parse_binding_response(data, TID)


def test_unknown_comprehension_optional_attribute_is_ignored() -> None:
    data = with_attribute(0x8123, b"\x01\x02\x03")
    assert codec.parse_binding_response(data, TID).mapped == ("192.0.2.1", 32853)


# ---------------------------------------------------------------------------------------
# Malformed input: always StunDecodeError (a ProtocolError), with a message that says why
# ---------------------------------------------------------------------------------------


def mutate(data: bytes, pos: int, value: bytes) -> bytes:
    return data[:pos] + value + data[pos + len(value) :]


def test_decode_error_is_a_protocol_error() -> None:
    assert issubclass(StunDecodeError, ProtocolError)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "truncated"),
        (SAMPLE_IPV4_RESPONSE[:19], "truncated"),
        (mutate(SAMPLE_IPV4_RESPONSE, 0, b"\xc1"), "first two bits"),
        (mutate(SAMPLE_IPV4_RESPONSE, 4, b"\x00"), "magic cookie"),
        (SAMPLE_IPV4_RESPONSE + b"\0\0\0\0", "announces 80 bytes but the message has 84"),
        (SAMPLE_IPV4_RESPONSE[:-4], "announces 80 bytes but the message has 76"),
        (mutate(SAMPLE_IPV4_RESPONSE, 2, b"\x00\x3d"), "not a multiple of 4"),
        (SAMPLE_IPV4_RESPONSE[:-1], "announces"),
        (bytes(2100), "exceeds the 2048-byte limit"),
        (mutate(SAMPLE_IPV4_RESPONSE, 38, b"\x00\x40"), "runs past the message end"),
        (mutate(SAMPLE_IPV4_RESPONSE, len(SAMPLE_IPV4_RESPONSE) - 1, b"\x00"), "fingerprint"),
        (with_attribute(0x0020, hexb("0001 a147 e112 a643")), "XOR-MAPPED-ADDRESS twice"),
        (with_attribute(0x0001, hexb("0003 0001 7f00 0001")), "unknown protocol"),
        (with_attribute(0x0001, hexb("0001 0001 7f00")), "invalid length for IPv4"),
        (with_attribute(0x8028, b"\x01"), "malformed STUN message"),
        (with_attribute(0x0009, b"\x00\x00\x04\x14\xff\xfe"), "malformed STUN message"),
        (with_attribute(0x0009, b"\x00"), "malformed STUN message"),
        (mutate(SAMPLE_IPV4_RESPONSE, 0, b"\x01\x0f"), "unknown STUN method 0x000f"),
    ],
)
def test_malformed_messages(data: bytes, match: str) -> None:
    with pytest.raises(StunDecodeError, match=match):
        codec.decode(data)


def test_size_limit_is_a_parameter() -> None:
    with pytest.raises(StunDecodeError, match="exceeds the 64-byte limit"):
        codec.decode(SAMPLE_IPV4_RESPONSE, max_size=64)
    assert codec.decode(SAMPLE_IPV4_RESPONSE, max_size=len(SAMPLE_IPV4_RESPONSE))


def test_frame_length_for_tcp() -> None:
    assert codec.frame_length(SAMPLE_IPV6_RESPONSE[:20]) == len(SAMPLE_IPV6_RESPONSE)
    huge = mutate(SAMPLE_IPV6_RESPONSE[:20], 2, b"\xff\xfc")
    with pytest.raises(StunDecodeError, match="exceeds"):
        codec.frame_length(huge)
    with pytest.raises(StunDecodeError, match="not a STUN message"):
        codec.frame_length(b"GET / HTTP/1.1\r\nHost: ")
    with pytest.raises(StunDecodeError, match="truncated"):
        codec.frame_length(b"\x01\x01")
