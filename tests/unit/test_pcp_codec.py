"""PCP (RFC 6887) codec: requests byte for byte, replies decoded strictly."""

from __future__ import annotations

import itertools
import random
import struct

import pytest

from natkit.errors import NatkitError, PcpError, ProtocolError
from natkit.portmap import pcp

NONCE = bytes.fromhex("000102030405060708090a0b")
OTHER_NONCE = bytes.fromhex("ffeeddccbbaa998877665544")

# 16-byte address fields
V4_CLIENT = "00000000 00000000 0000ffff c0a80102"  # ::ffff:192.168.1.2
V4_ANY = "00000000 00000000 0000ffff 00000000"  # ::ffff:0.0.0.0
V4_PUBLIC = "00000000 00000000 0000ffff cb007107"  # ::ffff:203.0.113.7
V6_CLIENT = "20010db8 00000000 00000000 00000002"  # 2001:db8::2
V6_SUGGESTED = "20010db8 00000000 00000000 00000100"  # 2001:db8::100
V6_ANY = "00000000 00000000 00000000 00000000"  # ::


def hexb(*parts: str) -> bytes:
    return bytes.fromhex(" ".join(parts))


# ---------------------------------------------------------------------------------------
# Addresses
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "raw"),
    [
        ("192.168.1.2", V4_CLIENT),
        ("::ffff:192.168.1.2", V4_CLIENT),  # the IPv4-mapped spelling, same bytes
        ("0.0.0.0", V4_ANY),
        ("203.0.113.7", V4_PUBLIC),
        ("2001:db8::2", V6_CLIENT),
        ("::", V6_ANY),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "ff" * 16),
    ],
)
def test_encode_address(text: str, raw: str) -> None:
    assert pcp.encode_address(text) == bytes.fromhex(raw)


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (V4_CLIENT, "192.168.1.2"),
        (V4_ANY, "0.0.0.0"),  # all-zeros IPv4 is still shown as IPv4
        (V4_PUBLIC, "203.0.113.7"),
        (V6_CLIENT, "2001:db8::2"),
        (V6_ANY, "::"),
        # ::fffe:... and ::1:ffff:... are not IPv4-mapped
        ("00000000 00000000 0000fffe c0a80102", "::fffe:c0a8:102"),
        ("00000000 00000000 0001ffff c0a80102", "::1:ffff:c0a8:102"),
    ],
)
def test_decode_address(raw: str, text: str) -> None:
    assert pcp.decode_address(bytes.fromhex(raw)) == text


@pytest.mark.parametrize("bad", ["", "192.168.1", "300.1.1.1", "example.com", "fe80::1::2"])
def test_encode_address_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError):
        pcp.encode_address(bad)


# ---------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------


def test_build_announce_ipv4() -> None:
    # version 02 | R=0, opcode 00 | reserved 0000 | lifetime 00000000 | client IP (16)
    out = pcp.build_announce("192.168.1.2")
    assert out == hexb("02 00 0000 00000000", V4_CLIENT)
    assert len(out) == 24


def test_build_announce_ipv4_mapped_spelling() -> None:
    assert pcp.build_announce("::ffff:192.168.1.2") == pcp.build_announce("192.168.1.2")


def test_build_announce_ipv6() -> None:
    assert pcp.build_announce("2001:db8::2") == hexb("02 00 0000 00000000", V6_CLIENT)


def test_build_map_ipv4_defaults() -> None:
    out = pcp.build_map(
        client_ip="192.168.1.2", nonce=NONCE, protocol="tcp", internal_port=8080, lifetime=7200
    )
    assert out == hexb(
        # version 02 | opcode 01 (MAP) | reserved 0000 | lifetime 00001c20 (7200)
        "02 01 0000 00001c20",
        V4_CLIENT,
        # nonce (12)
        "000102030405060708090a0b",
        # protocol 06 (TCP) | reserved 000000 | internal 1f90 (8080) | suggested port 0000
        "06 000000 1f90 0000",
        # suggested external IP: the IPv4 all-zeros address ::ffff:0.0.0.0
        V4_ANY,
    )
    assert len(out) == 60


def test_build_map_ipv4_with_suggestions_udp() -> None:
    out = pcp.build_map(
        client_ip="192.168.1.2",
        nonce=NONCE,
        protocol="udp",
        internal_port=5000,
        lifetime=3600,
        suggested_port=6000,
        suggested_ip="203.0.113.7",
    )
    assert out == hexb(
        "02 01 0000 00000e10",  # lifetime 3600
        V4_CLIENT,
        "000102030405060708090a0b",
        "11 000000 1388 1770",  # protocol 17 (UDP), internal 5000, suggested 6000
        V4_PUBLIC,
    )


def test_build_map_ipv6_defaults() -> None:
    out = pcp.build_map(
        client_ip="2001:db8::2", nonce=NONCE, protocol="udp", internal_port=5000, lifetime=60
    )
    assert out == hexb(
        "02 01 0000 0000003c",  # lifetime 60
        V6_CLIENT,
        "000102030405060708090a0b",
        "11 000000 1388 0000",
        V6_ANY,  # the IPv6 all-zeros address ::
    )


def test_build_map_ipv6_with_suggestions() -> None:
    out = pcp.build_map(
        client_ip="2001:db8::2",
        nonce=NONCE,
        protocol="tcp",
        internal_port=443,
        lifetime=120,
        suggested_port=443,
        suggested_ip="2001:db8::100",
    )
    assert out == hexb(
        "02 01 0000 00000078",  # lifetime 120
        V6_CLIENT,
        "000102030405060708090a0b",
        "06 000000 01bb 01bb",  # TCP, 443 -> 443
        V6_SUGGESTED,
    )


def test_build_map_ipv4_mapped_client_gets_ipv4_any_address() -> None:
    # A client given as ::ffff:a.b.c.d is an IPv4 client: its "any" suggested address is
    # ::ffff:0.0.0.0, not the IPv6 "::" (RFC 6887 section 5 / 11.1).
    out = pcp.build_map(
        client_ip="::ffff:192.168.1.2",
        nonce=NONCE,
        protocol="tcp",
        internal_port=8080,
        lifetime=7200,
    )
    assert out == pcp.build_map(
        client_ip="192.168.1.2", nonce=NONCE, protocol="tcp", internal_port=8080, lifetime=7200
    )
    assert out[-16:] == bytes.fromhex(V4_ANY)


def test_build_map_delete_and_extremes() -> None:
    out = pcp.build_map(
        client_ip="10.0.0.2",
        nonce=b"\xff" * 12,
        protocol="udp",
        internal_port=65535,
        lifetime=0,
        suggested_port=65535,
    )
    assert out == hexb(
        "02 01 0000 00000000",
        "00000000 00000000 0000ffff 0a000002",
        "ff" * 12,
        "11 000000 ffff ffff",
        V4_ANY,
    )
    big = pcp.build_map(
        client_ip="10.0.0.2", nonce=NONCE, protocol="tcp", internal_port=1, lifetime=0xFFFFFFFF
    )
    assert big[4:8] == b"\xff\xff\xff\xff"


BASE = {
    "client_ip": "192.168.1.2",
    "nonce": NONCE,
    "protocol": "tcp",
    "internal_port": 8080,
    "lifetime": 7200,
}


@pytest.mark.parametrize(
    "change",
    [
        {"nonce": b""},
        {"nonce": NONCE[:11]},
        {"nonce": NONCE + b"\x00"},
        {"protocol": "sctp"},
        {"protocol": "TCP"},
        {"internal_port": 0},
        {"internal_port": -1},
        {"internal_port": 65536},
        {"suggested_port": -1},
        {"suggested_port": 65536},
        {"lifetime": -1},
        {"lifetime": 2**32},
        {"client_ip": "not-an-address"},
        {"client_ip": "192.168.1.256"},
        {"suggested_ip": "2001:db8::zz"},
    ],
)
def test_build_map_rejects_bad_input(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        pcp.build_map(**{**BASE, **change})  # type: ignore[arg-type]


def test_build_announce_rejects_bad_address() -> None:
    with pytest.raises(ValueError):
        pcp.build_announce("gateway")


def test_new_nonce() -> None:
    a, b = pcp.new_nonce(), pcp.new_nonce()
    assert len(a) == len(b) == 12
    assert a != b


# ---------------------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------------------

# A MAP success reply, by hand:
# version 02 | R=1, opcode 81 | reserved 00 | result 00 | lifetime 00001c20 (7200)
# | epoch 00000e10 (3600) | reserved (12)
# | nonce (12) | protocol 06 | reserved 000000 | internal 1f90 (8080)
# | assigned external 2328 (9000) | assigned external IP ::ffff:203.0.113.7
MAP_REPLY = hexb(
    "02 81 00 00 00001c20 00000e10",
    "00" * 12,
    "000102030405060708090a0b",
    "06 000000 1f90 2328",
    V4_PUBLIC,
)


def map_reply(
    *,
    op: int = 0x81,
    result: int = 0,
    lifetime: int = 7200,
    epoch: int = 3600,
    nonce: bytes = NONCE,
    proto: int = 6,
    internal: int = 8080,
    external: int = 9000,
    external_ip: str = "203.0.113.7",
    options: bytes = b"",
    version: int = 2,
) -> bytes:
    head = struct.pack("!BBBBII12x", version, op, 0, result, lifetime, epoch)
    body = nonce + struct.pack("!B3xHH", proto, internal, external)
    return head + body + pcp.encode_address(external_ip) + options


def option(code: int, data: bytes) -> bytes:
    """code(1) reserved(1) length(2) data, padded to a multiple of 4."""
    pad = -len(data) % 4
    return struct.pack("!BxH", code, len(data)) + data + b"\x00" * pad


def parse(data: bytes, protocol: str = "tcp", internal_port: int = 8080) -> pcp.MapResult:
    return pcp.parse_map_response(data, nonce=NONCE, protocol=protocol, internal_port=internal_port)


def test_map_reply_helper_matches_hand_written_bytes() -> None:
    assert map_reply() == MAP_REPLY
    assert len(MAP_REPLY) == 60


def test_parse_map_response_ipv4() -> None:
    assert parse(MAP_REPLY) == pcp.MapResult(
        epoch=3600,
        lifetime=7200,
        nonce=NONCE,
        protocol="tcp",
        internal_port=8080,
        external_port=9000,
        external_ip="203.0.113.7",
    )


def test_parse_map_response_ipv6_udp() -> None:
    data = hexb(
        "02 81 00 00 0000003c 00000001",
        "00" * 12,
        "000102030405060708090a0b",
        "11 000000 1388 1389",
        V6_SUGGESTED,
    )
    got = parse(data, "udp", 5000)
    assert got == pcp.MapResult(1, 60, NONCE, "udp", 5000, 5001, "2001:db8::100")


def test_parse_map_response_deletion_ack() -> None:
    got = parse(map_reply(lifetime=0, external=0, external_ip="0.0.0.0"))
    assert (got.lifetime, got.external_port, got.external_ip) == (0, 0, "0.0.0.0")


def test_parse_map_response_lifetime_without_port() -> None:
    with pytest.raises(ProtocolError, match="no external port"):
        parse(map_reply(lifetime=60, external=0))


@pytest.mark.parametrize(
    "options",
    [
        option(1, pcp.encode_address("192.168.1.9")),  # THIRD_PARTY
        option(2, b""),  # PREFER_FAILURE
        option(3, b"\x00" * 20),  # FILTER
        option(200, b"x"),  # 1 byte of data, 3 of padding
        option(200, b"abcde"),  # 5 + 3
        option(2, b"") + option(1, b"\x00" * 16) + option(130, b"\x01\x02"),
    ],
)
def test_parse_map_response_with_options(options: bytes) -> None:
    assert parse(map_reply(options=options)) == parse(MAP_REPLY)


def test_parse_map_response_exactly_max_size() -> None:
    data = map_reply(options=option(200, b"\x00" * (1100 - 60 - 4)))
    assert len(data) == 1100
    assert parse(data).external_port == 9000


@pytest.mark.parametrize(
    "options",
    [
        struct.pack("!BxH", 1, 16),  # says 16 bytes, carries none
        struct.pack("!BxH", 1, 16) + b"\x00" * 12,  # says 16, carries 12
        struct.pack("!BxH", 200, 5) + b"abcd",  # 5 needs 8 with padding
        option(2, b"") + struct.pack("!BxH", 3, 0xFFFF),
    ],
)
def test_options_running_past_the_end(options: bytes) -> None:
    with pytest.raises(ProtocolError, match="past the end"):
        parse(map_reply(options=options))


@pytest.mark.parametrize("length", range(60))
def test_map_truncated(length: int) -> None:
    with pytest.raises(ProtocolError):
        parse(MAP_REPLY[:length])


@pytest.mark.parametrize("extra", [1, 2, 3, 5])
def test_length_not_multiple_of_4(extra: int) -> None:
    with pytest.raises(ProtocolError, match="invalid length"):
        parse(MAP_REPLY + b"\x00" * extra)


def test_oversize() -> None:
    data = map_reply(options=option(200, b"\x00" * (1104 - 60 - 4)))
    assert len(data) == 1104
    with pytest.raises(ProtocolError, match="invalid length"):
        parse(data)
    with pytest.raises(ProtocolError):
        pcp.parse_announce_response(data[:24] + b"\x00" * 1080)


@pytest.mark.parametrize("version", [1, 3, 255])
def test_wrong_version(version: int) -> None:
    with pytest.raises(ProtocolError, match="version"):
        parse(map_reply(version=version))


@pytest.mark.parametrize(
    "op",
    [
        0x01,  # our own request reflected: R bit clear
        0x80,  # an ANNOUNCE reply
        0x82,
        0x00,
        0xFF,
    ],
)
def test_wrong_opcode(op: int) -> None:
    with pytest.raises(ProtocolError, match="opcode"):
        parse(map_reply(op=op))


def test_wrong_nonce() -> None:
    with pytest.raises(ProtocolError, match="nonce"):
        parse(map_reply(nonce=OTHER_NONCE))


@pytest.mark.parametrize(("proto", "protocol"), [(17, "tcp"), (6, "udp"), (0, "tcp"), (1, "udp")])
def test_wrong_protocol(proto: int, protocol: str) -> None:
    with pytest.raises(ProtocolError, match="protocol"):
        parse(map_reply(proto=proto), protocol)


def test_wrong_internal_port() -> None:
    with pytest.raises(ProtocolError, match="internal port 8080"):
        parse(MAP_REPLY, internal_port=8081)


# ---------------------------------------------------------------------------------------
# Result codes
# ---------------------------------------------------------------------------------------

RESULT_NAMES = {
    1: "UNSUPP_VERSION",
    2: "NOT_AUTHORIZED",
    3: "MALFORMED_REQUEST",
    4: "UNSUPP_OPCODE",
    5: "UNSUPP_OPTION",
    6: "MALFORMED_OPTION",
    7: "NETWORK_FAILURE",
    8: "NO_RESOURCES",
    9: "UNSUPP_PROTOCOL",
    10: "USER_EX_QUOTA",
    11: "CANNOT_PROVIDE_EXTERNAL",
    12: "ADDRESS_MISMATCH",
    13: "EXCESSIVE_REMOTE_PEERS",
}


@pytest.mark.parametrize(("code", "name"), sorted(RESULT_NAMES.items()))
def test_map_error_reply(code: int, name: str) -> None:
    # An error reply copies the request's payload; its lifetime says how long the error lasts.
    data = map_reply(result=code, lifetime=30, external=0, external_ip="0.0.0.0")
    with pytest.raises(PcpError) as info:
        parse(data)
    assert info.value.code == code
    assert info.value.name == name
    assert info.value.lifetime == 30
    assert name in str(info.value)
    assert f"PCP error {code}" in str(info.value)


@pytest.mark.parametrize("code", [2, 8, 11])
def test_header_only_error_reply(code: int) -> None:
    # A server may answer an error with the header alone: nothing to match, still an error.
    data = hexb(f"02 81 00 {code:02x} 00000258 00000e10", "00" * 12)
    with pytest.raises(PcpError) as info:
        parse(data)
    assert (info.value.code, info.value.lifetime) == (code, 600)


@pytest.mark.parametrize(
    "change",
    [
        {"nonce": OTHER_NONCE},
        {"proto": 17},
        {"internal": 8081},
    ],
)
def test_error_reply_for_another_request_is_ignored(change: dict[str, object]) -> None:
    # RFC 6887 11.4: a MAP reply is matched (nonce, protocol, internal port) before its result
    # code counts, so a late error answering an earlier request must not fail this one.
    data = map_reply(result=2, lifetime=30, external=0, **change)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        parse(data)


def test_unknown_result_code() -> None:
    with pytest.raises(PcpError, match="result 200") as info:
        parse(map_reply(result=200))
    assert info.value.code == 200


def test_error_reply_must_still_match_version_and_opcode() -> None:
    with pytest.raises(ProtocolError):
        parse(map_reply(result=2, version=3))
    with pytest.raises(ProtocolError):
        parse(map_reply(result=2, op=0x80))
    with pytest.raises(ProtocolError):
        parse(map_reply(result=2, op=0x01))


@pytest.mark.parametrize(
    "data",
    [
        # version 00 | op 81 | result 0001 (UNSUPP_VERSION) | epoch 00000e10
        hexb("00 81 0001 00000e10"),
        hexb("00 81 0001"),
        hexb("00 80 0001 00000e10"),  # op copied from an ANNOUNCE
        hexb("00 81 0001 00000e10 00000000"),
    ],
)
def test_natpmp_server_answers_unsupported_version(data: bytes) -> None:
    # A NAT-PMP-only server answers a PCP request in NAT-PMP: version 0, result 1.
    with pytest.raises(PcpError) as info:
        parse(data)
    assert info.value.code == pcp.UNSUPP_VERSION == 1
    assert "UNSUPP_VERSION" in str(info.value)
    with pytest.raises(PcpError) as info:
        pcp.parse_announce_response(data)
    assert info.value.code == 1


@pytest.mark.parametrize(
    "data",
    [
        hexb("00 81 0002 00000e10"),  # NAT-PMP NOT_AUTHORIZED: not a version signal
        hexb("00 80 0000 00000e10 cb007107"),  # a NAT-PMP external address reply
        hexb("00 81 0001 0000"),  # 6 bytes: not a multiple of 4
        hexb("00 81 00"),
    ],
)
def test_other_version_0_replies_are_ignored(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse(data)


# ---------------------------------------------------------------------------------------
# ANNOUNCE / header
# ---------------------------------------------------------------------------------------

# version 02 | op 80 | reserved 00 | result 00 | lifetime 0 | epoch 000004d2 (1234) | reserved
ANNOUNCE_REPLY = hexb("02 80 00 00 00000000 000004d2", "00" * 12)


def test_parse_announce_response() -> None:
    assert pcp.parse_announce_response(ANNOUNCE_REPLY) == pcp.Header(
        opcode=0, result=0, lifetime=0, epoch=1234
    )


@pytest.mark.parametrize("length", range(24))
def test_announce_truncated(length: int) -> None:
    with pytest.raises(ProtocolError):
        pcp.parse_announce_response(ANNOUNCE_REPLY[:length])


def test_announce_wrong_opcode() -> None:
    with pytest.raises(ProtocolError, match="opcode"):
        pcp.parse_announce_response(MAP_REPLY)
    with pytest.raises(ProtocolError, match="opcode"):  # R bit clear: our own ANNOUNCE
        pcp.parse_announce_response(pcp.build_announce("192.168.1.2"))


def test_announce_error() -> None:
    data = hexb("02 80 00 07 0000001e 000004d2", "00" * 12)  # NETWORK_FAILURE, 30 s
    with pytest.raises(PcpError, match="NETWORK_FAILURE") as info:
        pcp.parse_announce_response(data)
    assert (info.value.code, info.value.lifetime) == (7, 30)


def test_parse_header_of_map_reply() -> None:
    assert pcp.parse_header(MAP_REPLY, pcp.OP_MAP) == pcp.Header(1, 0, 7200, 3600)


def test_pcp_error_is_a_natkit_error() -> None:
    assert issubclass(PcpError, NatkitError)
    assert not issubclass(PcpError, ProtocolError)


# ---------------------------------------------------------------------------------------
# Retransmission (RFC 6887 8.1.1)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 42, 2024, 99999])
def test_retransmit_schedule(seed: int) -> None:
    sched = pcp.retransmit_schedule(20, random.Random(seed))
    assert len(sched) == 20
    # RT = (1 + RAND) * IRT, IRT = 3 s, RAND in [-0.1, +0.1]
    assert 2.7 <= sched[0] <= 3.3
    # RT = (1 + RAND) * MIN(2 * RTprev, MRT), MRT = 1024 s
    for prev, cur in itertools.pairwise(sched):
        base = min(2 * prev, 1024.0)
        assert 0.9 * base - 1e-9 <= cur <= 1.1 * base + 1e-9
    # roughly doubling early on, and capped near 1024 s later
    assert all(1.5 < b / a < 2.5 for a, b in itertools.pairwise(sched[:6]))
    assert all(921.6 - 1e-9 <= rt <= 1126.4 + 1e-9 for rt in sched[12:])
    assert max(sched) <= 1126.4 + 1e-9


def test_retransmit_schedule_is_randomised_and_reproducible() -> None:
    a = pcp.retransmit_schedule(8, random.Random(7))
    assert a == pcp.retransmit_schedule(8, random.Random(7))
    assert a != pcp.retransmit_schedule(8, random.Random(8))
    assert len(pcp.retransmit_schedule()) == 8  # default count, default RNG
    assert pcp.retransmit_schedule(0, random.Random(1)) == []
