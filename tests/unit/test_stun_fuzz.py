"""Fuzz the STUN decoder: whatever arrives, the result is a parsed message or
StunDecodeError — never another exception; and valid responses round-trip exactly."""

from __future__ import annotations

import ipaddress
import struct

from aioice import stun as aioice_stun
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natkit.stun import codec
from natkit.stun.client import StunUdp
from natkit.stun.errors import StunDecodeError

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")

# Types aioice decodes (its unpackers are what the fuzzing must reach), plus a few it does not.
ATTRIBUTE_TYPES = [a[0] for a in aioice_stun.ATTRIBUTES] + [0x000A, 0x0030, 0x8023, 0xFFFF]
# Values that sit on the unpackers' boundaries (address families, lengths, UTF-8).
NASTY = [
    b"",
    b"\x00",
    b"\x00\x01",
    b"\x00\x01\x00\x00",
    b"\x00\x01\xa1\x47\xe1\x12\xa6\x43",
    b"\x00\x02\xa1\x47" + bytes(16),
    b"\x00\x03\x00\x00\x00\x00\x00\x00",
    b"\x00\x00\x04\x14\xff",
    b"\x00\x00\x06\x63",
    b"\xff" * 8,
]


@st.composite
def attribute(draw: st.DrawFn) -> bytes:
    attr_type = draw(st.sampled_from(ATTRIBUTE_TYPES))
    value = draw(st.one_of(st.sampled_from(NASTY), st.binary(max_size=40)))
    length = len(value)
    if draw(st.integers(0, 9)) == 0:  # now and then, a length that lies
        length = draw(st.integers(0, 0xFFFF))
    return struct.pack("!HH", attr_type, length) + value + bytes(-len(value) % 4)


@st.composite
def framed(draw: st.DrawFn) -> bytes:
    """A header that passes the frame checks most of the time, so that aioice's parser and
    natkit's attribute walk are what get fuzzed."""
    body = b"".join(draw(st.lists(attribute(), max_size=6)))
    msg_type = draw(st.sampled_from([0x0001, 0x0101, 0x0111, 0x0011, 0x0003, 0x0103, 0x0FFF]))
    data = struct.pack("!HHI12s", msg_type, len(body), codec.MAGIC_COOKIE, TID) + body
    if draw(st.booleans()):  # a valid FINGERPRINT makes the message reach further
        fp = aioice_stun.message_fingerprint(data)
        data = codec._append(data, struct.pack("!HHI", 0x8028, 4, fp))
    return data


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(framed()))
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "flip", "truncate"]))
        if kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif kind == "flip" and pos < len(data):
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[pos:]
    return bytes(data)


INPUTS = st.one_of(st.binary(max_size=600), framed(), mutated())


@FUZZ
@given(INPUTS)
def test_decode_returns_a_message_or_raises_stun_decode_error(data: bytes) -> None:
    try:
        decoded = codec.decode(data)
    except StunDecodeError as exc:
        assert str(exc)
        return
    # What gets through is well framed.
    assert len(data) >= 20 and len(data) % 4 == 0
    assert struct.unpack_from("!I", data, 4)[0] == codec.MAGIC_COOKIE
    assert decoded.transaction_id == data[8:20]


@FUZZ
@given(INPUTS)
def test_binding_response_reader_only_raises_stun_decode_error(data: bytes) -> None:
    try:
        response = codec.parse_binding_response(data, TID)
    except StunDecodeError:
        return
    if response.ok:
        assert response.mapped is not None
        ipaddress.ip_address(response.mapped[0])
        assert 0 <= response.mapped[1] <= 0xFFFF
    else:
        assert response.error_code is not None and 300 <= response.error_code <= 699


@FUZZ
@given(st.binary(min_size=20, max_size=20))
def test_frame_length_only_raises_stun_decode_error(header: bytes) -> None:
    try:
        n = codec.frame_length(header)
    except StunDecodeError:
        return
    assert 20 <= n <= codec.MAX_MESSAGE and n % 4 == 0


@FUZZ
@given(st.lists(INPUTS, max_size=8))
def test_udp_endpoint_counts_garbage_and_never_raises(datagrams: list[bytes]) -> None:
    # The protocol object alone (no socket): nothing is pending, so nothing may match.
    endpoint = StunUdp()
    for data in datagrams:
        endpoint.datagram_received(data, ("127.0.0.1", 3478))
    assert endpoint.foreign == len(datagrams)


addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)
ports = st.integers(0, 0xFFFF)


@FUZZ
@given(st.binary(min_size=12, max_size=12), addresses, ports, addresses, ports, st.booleans())
def test_roundtrip_rfc5780_response(
    tid: bytes, ip: str, port: int, other_ip: str, other_port: int, fingerprint: bool
) -> None:
    msg = aioice_stun.Message(
        aioice_stun.Method.BINDING,
        aioice_stun.Class.RESPONSE,
        transaction_id=tid,
        attributes={
            "XOR-MAPPED-ADDRESS": (ip, port),
            "OTHER-ADDRESS": (other_ip, other_port),
            "RESPONSE-ORIGIN": (other_ip, other_port),
        },
    )
    got = codec.parse_binding_response(codec.encode(msg, fingerprint=fingerprint), tid)
    assert got.mapped == (ip, port)
    assert got.other_address == (other_ip, other_port)
    assert got.response_origin == (other_ip, other_port)


@FUZZ
@given(st.integers(300, 699), st.text(max_size=100))
def test_roundtrip_error_response(code: int, reason: str) -> None:
    msg = aioice_stun.Message(
        aioice_stun.Method.BINDING,
        aioice_stun.Class.ERROR,
        transaction_id=TID,
        attributes={"ERROR-CODE": (code, reason)},
    )
    got = codec.parse_binding_response(codec.encode(msg), TID)
    assert got.error_code == code
    assert got.error_reason == reason.rstrip("\x00").strip()
