"""Fuzz the NAT-PMP and PCP codecs: whatever arrives on UDP 5351, only NatkitError escapes;
and replies built from random valid fields decode to exactly those fields."""

from __future__ import annotations

import contextlib
import ipaddress
import struct
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natkit.errors import NatkitError, NatPmpError, PcpError, ProtocolError
from natkit.portmap import natpmp, pcp
from natkit.portmap.epoch import EpochTracker

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NONCE = bytes.fromhex("000102030405060708090a0b")

PMP_EXT = struct.pack("!BBHI4s", 0, 128, 0, 3600, bytes([203, 0, 113, 7]))
PMP_MAP = struct.pack("!BBHIHHI", 0, 130, 0, 3600, 8080, 9000, 7200)
PMP_ERR = struct.pack("!BBHI", 0, 130, 3, 3600)
PCP_HEAD = struct.pack("!BBBBII12x", 2, 0x81, 0, 0, 7200, 3600)
PCP_PAYLOAD = NONCE + struct.pack("!B3xHH", 6, 8080, 9000) + pcp.encode_address("203.0.113.7")
PCP_MAP = PCP_HEAD + PCP_PAYLOAD
PCP_MAP_OPTS = PCP_MAP + struct.pack("!BxH", 2, 0) + struct.pack("!BxH", 200, 5) + b"abcde\0\0\0"
PCP_ERR = struct.pack("!BBBBII12x", 2, 0x81, 0, 8, 30, 3600) + PCP_PAYLOAD
PCP_ANNOUNCE = struct.pack("!BBBBII12x", 2, 0x80, 0, 0, 0, 1234)
PMP_UNSUPP = struct.pack("!BBHI", 0, 0x81, 1, 3600)

SAMPLES = [PMP_EXT, PMP_MAP, PMP_ERR, PCP_MAP, PCP_MAP_OPTS, PCP_ERR, PCP_ANNOUNCE, PMP_UNSUPP]

# Values that tend to sit on parser boundaries.
NASTY = [
    b"\x00",
    b"\xff",
    b"\x00\x00",
    b"\xff\xff",
    b"\x00\x00\x00\x00",
    b"\xff\xff\xff\xff",
    b"\x80",
    b"\x81",
    b"\x02",
    b"\x01\x00\x04\x00",  # an option header claiming 1024 bytes
    b"\x01\x00\x00\x10",  # an option header claiming 16 bytes
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid reply with a few random cuts, insertions, overwrites or byte flips."""
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "nasty", "delete", "flip", "truncate", "set"]))
        if kind == "insert":
            data[pos:pos] = draw(st.binary(max_size=16))
        elif kind == "nasty":
            data[pos:pos] = draw(st.sampled_from(NASTY))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif kind == "flip" and pos < len(data):
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "set" and pos < len(data):
            chunk = draw(st.sampled_from(NASTY))
            data[pos : pos + len(chunk)] = chunk
    return bytes(data)


@st.composite
def pcp_framed(draw: st.DrawFn) -> bytes:
    """Random bytes that pass PCP's length rules (multiple of 4, at most 1100) and often start
    like a PCP or NAT-PMP reply, so that the deeper checks are reached."""
    n = draw(st.integers(1, 275)) * 4
    body = bytearray(draw(st.binary(min_size=n, max_size=n)))
    body[0] = draw(st.sampled_from([0, 2, body[0]]))
    body[1] = draw(st.sampled_from([0x80, 0x81, body[1]]))
    if draw(st.booleans()) and n >= 36:
        body[24:36] = NONCE
    return bytes(body)


INPUTS = st.one_of(st.binary(max_size=1200), mutated(), pcp_framed())


def decoders() -> list[tuple[str, Callable[[bytes], object]]]:
    return [
        ("natpmp ext", natpmp.parse_external_address_response),
        ("natpmp map tcp", lambda d: natpmp.parse_map_response(d, "tcp", 8080)),
        ("natpmp map udp", lambda d: natpmp.parse_map_response(d, "udp", 8080)),
        ("pcp header", lambda d: pcp.parse_header(d, pcp.OP_MAP)),
        ("pcp announce", pcp.parse_announce_response),
        (
            "pcp map tcp",
            lambda d: pcp.parse_map_response(d, nonce=NONCE, protocol="tcp", internal_port=8080),
        ),
        (
            "pcp map udp",
            lambda d: pcp.parse_map_response(d, nonce=NONCE, protocol="udp", internal_port=8080),
        ),
    ]


@FUZZ
@given(INPUTS)
def test_fuzz_every_decoder(data: bytes) -> None:
    for _name, decode in decoders():
        with contextlib.suppress(NatkitError):
            decode(data)


@FUZZ
@given(INPUTS)
def test_fuzz_natpmp_results_are_sane(data: bytes) -> None:
    try:
        ext = natpmp.parse_external_address_response(data)
    except NatkitError:
        pass
    else:
        assert len(data) == 12
        assert ipaddress.ip_address(ext.address).version == 4
    try:
        got = natpmp.parse_map_response(data, "tcp", 8080)
    except NatkitError:
        pass
    else:
        assert len(data) == 16
        assert got.internal_port == 8080
        assert 0 <= got.external_port <= 65535
        assert got.external_port or not got.lifetime


@FUZZ
@given(INPUTS)
def test_fuzz_pcp_results_are_sane(data: bytes) -> None:
    try:
        got = pcp.parse_map_response(data, nonce=NONCE, protocol="udp", internal_port=8080)
    except PcpError as exc:
        assert exc.code > 0
        # a full-length error reply is only trusted when it answers our request
        if len(data) >= 60 and data[0] == 2:
            assert data[24:36] == NONCE
        return
    except ProtocolError:
        return
    assert 60 <= len(data) <= 1100 and len(data) % 4 == 0
    assert (got.nonce, got.protocol, got.internal_port) == (NONCE, "udp", 8080)
    assert got.external_port or not got.lifetime
    ipaddress.ip_address(got.external_ip)


# ---------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
port = st.integers(1, 0xFFFF)
protocols = st.sampled_from(["tcp", "udp"])
addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))


def shown(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """How decode_address shows an address: IPv4-mapped IPv6 as plain IPv4."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


@FUZZ
@given(u32, st.ip_addresses(v=4))
def test_roundtrip_natpmp_external_address(epoch: int, addr: ipaddress.IPv4Address) -> None:
    data = struct.pack("!BBHI4s", 0, 128, 0, epoch, addr.packed)
    assert natpmp.parse_external_address_response(data) == natpmp.ExternalAddress(epoch, str(addr))


@FUZZ
@given(protocols, u32, port, u16, u32)
def test_roundtrip_natpmp_map_reply(
    protocol: str, epoch: int, internal: int, external: int, lifetime: int
) -> None:
    op = 128 + (2 if protocol == "tcp" else 1)
    data = struct.pack("!BBHIHHI", 0, op, 0, epoch, internal, external, lifetime)
    if lifetime and not external:
        try:
            natpmp.parse_map_response(data, protocol, internal)
        except ProtocolError:
            return
        raise AssertionError("a lifetime without an external port was accepted")
    got = natpmp.parse_map_response(data, protocol, internal)
    assert got == natpmp.MapResult(epoch, protocol, internal, external, lifetime)


@FUZZ
@given(protocols, st.integers(1, 0xFFFF), u32, st.booleans())
def test_roundtrip_natpmp_error(protocol: str, code: int, epoch: int, full: bool) -> None:
    op = 128 + natpmp.map_opcode(protocol)
    data = struct.pack("!BBHI", 0, op, code, epoch) + (b"\x00" * 8 if full else b"")
    try:
        natpmp.parse_map_response(data, protocol, 8080)
    except NatPmpError as exc:
        assert exc.code == code
        assert exc.name in str(exc)
    else:
        raise AssertionError("an error reply decoded")


@FUZZ
@given(protocols, port, u16, u32)
def test_roundtrip_natpmp_map_request(
    protocol: str, internal: int, external: int, lifetime: int
) -> None:
    data = natpmp.build_map_request(protocol, internal, external, lifetime)
    assert struct.unpack("!BBHHHI", data) == (
        0,
        natpmp.map_opcode(protocol),
        0,
        internal,
        external,
        lifetime,
    )


@FUZZ
@given(addresses)
def test_roundtrip_pcp_address(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    raw = pcp.encode_address(str(addr))
    assert len(raw) == 16
    assert pcp.decode_address(raw) == shown(addr)


@st.composite
def options(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        data = draw(st.binary(max_size=40))
        out += struct.pack("!BxH", draw(st.integers(0, 255)), len(data))
        out += data + b"\x00" * (-len(data) % 4)
    return out


@FUZZ
@given(
    nonce=st.binary(min_size=12, max_size=12),
    protocol=protocols,
    internal=port,
    external=u16,
    lifetime=u32,
    epoch=u32,
    addr=addresses,
    opts=options(),
)
def test_roundtrip_pcp_map_reply(
    nonce: bytes,
    protocol: str,
    internal: int,
    external: int,
    lifetime: int,
    epoch: int,
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
    opts: bytes,
) -> None:
    head = struct.pack("!BBBBII12x", 2, 0x81, 0, 0, lifetime, epoch)
    body = nonce + struct.pack("!B3xHH", pcp.PROTOCOLS[protocol], internal, external)
    data = head + body + pcp.encode_address(str(addr)) + opts

    def decode() -> pcp.MapResult:
        return pcp.parse_map_response(data, nonce=nonce, protocol=protocol, internal_port=internal)

    if lifetime and not external:
        try:
            decode()
        except ProtocolError:
            return
        raise AssertionError("a lifetime without an external port was accepted")
    assert decode() == pcp.MapResult(
        epoch, lifetime, nonce, protocol, internal, external, shown(addr)
    )


@FUZZ
@given(st.integers(1, 255), u32, u32, protocols, st.booleans())
def test_roundtrip_pcp_error(
    code: int, lifetime: int, epoch: int, protocol: str, with_payload: bool
) -> None:
    head = struct.pack("!BBBBII12x", 2, 0x81, 0, code, lifetime, epoch)
    payload = NONCE + struct.pack("!B3xHH", pcp.PROTOCOLS[protocol], 8080, 0) + b"\x00" * 16
    data = head + (payload if with_payload else b"")
    try:
        pcp.parse_map_response(data, nonce=NONCE, protocol=protocol, internal_port=8080)
    except PcpError as exc:
        assert (exc.code, exc.lifetime) == (code, lifetime)
        assert exc.name in str(exc)
    else:
        raise AssertionError("an error reply decoded")


@FUZZ
@given(
    client=addresses,
    nonce=st.binary(min_size=12, max_size=12),
    protocol=protocols,
    internal=port,
    lifetime=u32,
    suggested_port=u16,
    suggested=st.one_of(st.none(), addresses),
)
def test_roundtrip_pcp_map_request(
    client: ipaddress.IPv4Address | ipaddress.IPv6Address,
    nonce: bytes,
    protocol: str,
    internal: int,
    lifetime: int,
    suggested_port: int,
    suggested: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
) -> None:
    data = pcp.build_map(
        client_ip=str(client),
        nonce=nonce,
        protocol=protocol,
        internal_port=internal,
        lifetime=lifetime,
        suggested_port=suggested_port,
        suggested_ip=None if suggested is None else str(suggested),
    )
    assert len(data) == 60
    version, op, reserved, got_lifetime = struct.unpack_from("!BBHI", data)
    assert (version, op, reserved, got_lifetime) == (2, 1, 0, lifetime)
    assert pcp.decode_address(data[8:24]) == shown(client)
    assert data[24:36] == nonce
    proto_num, zero3, got_internal, got_port = struct.unpack_from("!B3sHH", data, 36)
    assert (proto_num, zero3, got_internal, got_port) == (
        pcp.PROTOCOLS[protocol],
        b"\x00\x00\x00",
        internal,
        suggested_port,
    )
    if suggested is not None:
        assert pcp.decode_address(data[44:60]) == shown(suggested)
    elif shown(client).count(":"):  # an IPv6 client: "::"
        assert data[44:60] == b"\x00" * 16
    else:  # an IPv4 client: ::ffff:0.0.0.0
        assert data[44:60] == b"\x00" * 10 + b"\xff\xff" + b"\x00" * 4


# ---------------------------------------------------------------------------------------
# Epoch
# ---------------------------------------------------------------------------------------


@FUZZ
@given(u32, st.lists(st.floats(0, 10**6, allow_nan=False), min_size=1, max_size=10))
def test_epoch_in_step_with_client_is_never_a_reboot(start: int, steps: list[float]) -> None:
    t = EpochTracker()
    assert t.update(start, 0.0) is False
    now = 0.0
    for step in steps:
        now += step
        # the server counts whole seconds: its epoch lags ours by less than one second
        assert t.update(start + int(now), now) is False


@FUZZ
@given(st.integers(2, 0xFFFFFFFF), st.data())
def test_epoch_going_back_more_than_one_is_a_reboot(prev: int, data: st.DataObject) -> None:
    new = data.draw(st.integers(0, prev - 2))
    t = EpochTracker()
    t.update(prev, 100.0)
    assert t.update(new, data.draw(st.floats(100.0, 10**7, allow_nan=False))) is True
