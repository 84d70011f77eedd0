"""NAT-PMP (RFC 6886) codec: requests byte for byte, replies decoded strictly."""

from __future__ import annotations

import struct

import pytest

from natkit.errors import NatkitError, NatPmpError, ProtocolError
from natkit.portmap import natpmp

# ---------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------


def test_constants() -> None:
    assert natpmp.VERSION == 0
    assert natpmp.SERVER_PORT == 5351
    assert natpmp.CLIENT_PORT == 5350
    assert (natpmp.OP_EXTERNAL_ADDRESS, natpmp.OP_MAP_UDP, natpmp.OP_MAP_TCP) == (0, 1, 2)
    assert natpmp.RESPONSE_BIT == 128


def test_retransmit_schedule_rfc6886_3_1() -> None:
    # 250 ms, doubling each time, nine attempts in all (the last waits 64 s).
    assert natpmp.RETRANSMIT_SCHEDULE == (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def test_build_external_address_request() -> None:
    # version 0, opcode 0 — two bytes, nothing more.
    assert natpmp.build_external_address_request() == bytes.fromhex("0000")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # version 00 | op 01 (UDP) | reserved 0000 | internal 1388 (5000)
        # | suggested external 1770 (6000) | lifetime 00001c20 (7200)
        (("udp", 5000, 6000, 7200), "00 01 0000 1388 1770 00001c20"),
        # op 02 (TCP), internal 0016 (22), suggested 0 (any), lifetime 0e10 (3600)
        (("tcp", 22, 0, 3600), "00 02 0000 0016 0000 00000e10"),
        # delete a TCP mapping: external port 0, lifetime 0
        (("tcp", 8080, 0, 0), "00 02 0000 1f90 0000 00000000"),
        # extremes: port 1 / 65535, lifetime 2**32 - 1
        (("udp", 1, 65535, 0xFFFFFFFF), "00 01 0000 0001 ffff ffffffff"),
        (("udp", 65535, 1, 1), "00 01 0000 ffff 0001 00000001"),
    ],
)
def test_build_map_request(args: tuple[str, int, int, int], expected: str) -> None:
    out = natpmp.build_map_request(*args)
    assert out == bytes.fromhex(expected)
    assert len(out) == 12


@pytest.mark.parametrize(
    "args",
    [
        ("tcp", 0, 80, 60),  # internal port 0 is not a port
        ("tcp", -1, 80, 60),
        ("tcp", 65536, 80, 60),
        ("tcp", 80, -1, 60),
        ("tcp", 80, 65536, 60),
        ("tcp", 80, 80, -1),
        ("tcp", 80, 80, 2**32),
        ("sctp", 80, 80, 60),
        ("TCP", 80, 80, 60),
        ("", 80, 80, 60),
    ],
)
def test_build_map_request_rejects_bad_input(args: tuple[str, int, int, int]) -> None:
    with pytest.raises(ValueError):
        natpmp.build_map_request(*args)


def test_map_opcode() -> None:
    assert natpmp.map_opcode("udp") == 1
    assert natpmp.map_opcode("tcp") == 2
    with pytest.raises(ValueError, match="tcp or udp"):
        natpmp.map_opcode("icmp")


# ---------------------------------------------------------------------------------------
# External address reply
# ---------------------------------------------------------------------------------------

# version 00 | op 80 (128) | result 0000 | epoch 00000e10 (3600) | address cb007107
EXT_REPLY = bytes.fromhex("00 80 0000 00000e10 cb007107")


def test_parse_external_address_response() -> None:
    got = natpmp.parse_external_address_response(EXT_REPLY)
    assert got == natpmp.ExternalAddress(epoch=3600, address="203.0.113.7")


def test_parse_external_address_response_extremes() -> None:
    data = bytes.fromhex("00 80 0000 ffffffff 00000000")
    assert natpmp.parse_external_address_response(data) == natpmp.ExternalAddress(
        0xFFFFFFFF, "0.0.0.0"
    )


@pytest.mark.parametrize("length", range(12))
def test_external_address_truncated(length: int) -> None:
    with pytest.raises(ProtocolError):
        natpmp.parse_external_address_response(EXT_REPLY[:length])


@pytest.mark.parametrize("extra", [b"\x00", b"\x00" * 4, b"\x00" * 4 + b"\x01\x02\x03\x04"])
def test_external_address_too_long(extra: bytes) -> None:
    with pytest.raises(ProtocolError, match="expected 12"):
        natpmp.parse_external_address_response(EXT_REPLY + extra)


@pytest.mark.parametrize("version", [1, 2, 255])
def test_external_address_wrong_version(version: int) -> None:
    with pytest.raises(ProtocolError, match="version"):
        natpmp.parse_external_address_response(bytes([version]) + EXT_REPLY[1:])


@pytest.mark.parametrize("op", [0, 1, 2, 129, 130, 255])
def test_external_address_wrong_opcode(op: int) -> None:
    # 0 is our own request echoed back; 129/130 answer a mapping request.
    with pytest.raises(ProtocolError, match="opcode"):
        natpmp.parse_external_address_response(bytes([0, op]) + EXT_REPLY[2:])


# ---------------------------------------------------------------------------------------
# Mapping reply
# ---------------------------------------------------------------------------------------

# version 00 | op 82 (128+2, TCP) | result 0000 | epoch 00000e10 (3600)
# | internal 1f90 (8080) | mapped external 2328 (9000) | lifetime 00001c20 (7200)
TCP_REPLY = bytes.fromhex("00 82 0000 00000e10 1f90 2328 00001c20")


def map_reply(
    op: int = 130,
    result: int = 0,
    epoch: int = 3600,
    internal: int = 8080,
    external: int = 9000,
    lifetime: int = 7200,
) -> bytes:
    return struct.pack("!BBHIHHI", 0, op, result, epoch, internal, external, lifetime)


def test_map_reply_helper_matches_hand_written_bytes() -> None:
    assert map_reply() == TCP_REPLY


def test_parse_map_response_tcp() -> None:
    got = natpmp.parse_map_response(TCP_REPLY, "tcp", 8080)
    assert got == natpmp.MapResult(
        epoch=3600, protocol="tcp", internal_port=8080, external_port=9000, lifetime=7200
    )


def test_parse_map_response_udp() -> None:
    # op 81 (128+1, UDP), internal 1388 (5000), external 1388, lifetime 0000003c (60)
    data = bytes.fromhex("00 81 0000 00000001 1388 1388 0000003c")
    got = natpmp.parse_map_response(data, "udp", 5000)
    assert got == natpmp.MapResult(1, "udp", 5000, 5000, 60)


def test_parse_map_response_deletion_ack() -> None:
    # a deletion is acknowledged with external port 0 and lifetime 0
    got = natpmp.parse_map_response(map_reply(external=0, lifetime=0), "tcp", 8080)
    assert (got.external_port, got.lifetime) == (0, 0)


def test_parse_map_response_lifetime_without_port() -> None:
    with pytest.raises(ProtocolError, match="no external port"):
        natpmp.parse_map_response(map_reply(external=0, lifetime=60), "tcp", 8080)


@pytest.mark.parametrize("length", range(16))
def test_map_truncated(length: int) -> None:
    with pytest.raises(ProtocolError):
        natpmp.parse_map_response(TCP_REPLY[:length], "tcp", 8080)


@pytest.mark.parametrize("extra", [1, 4, 8])
def test_map_too_long(extra: int) -> None:
    with pytest.raises(ProtocolError, match="expected 16"):
        natpmp.parse_map_response(TCP_REPLY + b"\x00" * extra, "tcp", 8080)


@pytest.mark.parametrize("version", [1, 2])
def test_map_wrong_version(version: int) -> None:
    with pytest.raises(ProtocolError, match="version"):
        natpmp.parse_map_response(bytes([version]) + TCP_REPLY[1:], "tcp", 8080)


@pytest.mark.parametrize(
    ("protocol", "op"),
    [
        ("tcp", 129),  # a UDP answer to a TCP request
        ("udp", 130),  # a TCP answer to a UDP request
        ("tcp", 128),  # an external-address answer
        ("tcp", 2),  # our own request reflected (R bit clear)
        ("udp", 1),
    ],
)
def test_map_wrong_opcode(protocol: str, op: int) -> None:
    with pytest.raises(ProtocolError, match="opcode"):
        natpmp.parse_map_response(map_reply(op=op), protocol, 8080)


def test_map_wrong_internal_port() -> None:
    with pytest.raises(ProtocolError, match="internal port 8080"):
        natpmp.parse_map_response(TCP_REPLY, "tcp", 8081)


def test_map_bad_protocol_argument_is_value_error() -> None:
    with pytest.raises(ValueError):
        natpmp.parse_map_response(TCP_REPLY, "sctp", 8080)


# ---------------------------------------------------------------------------------------
# Result codes
# ---------------------------------------------------------------------------------------

RESULT_NAMES = {
    1: "UNSUPP_VERSION",
    2: "NOT_AUTHORIZED",
    3: "NETWORK_FAILURE",
    4: "OUT_OF_RESOURCES",
    5: "UNSUPP_OPCODE",
}


@pytest.mark.parametrize(("code", "name"), sorted(RESULT_NAMES.items()))
def test_map_error_full_length(code: int, name: str) -> None:
    data = map_reply(result=code, external=0, lifetime=0)
    with pytest.raises(NatPmpError) as info:
        natpmp.parse_map_response(data, "tcp", 8080)
    assert info.value.code == code
    assert info.value.name == name
    assert name in str(info.value)
    assert str(code) in str(info.value)


@pytest.mark.parametrize(("code", "name"), sorted(RESULT_NAMES.items()))
def test_map_error_short_8_bytes(code: int, name: str) -> None:
    # version 00 | op 82 | result | epoch — the rest is optional in an error reply
    data = bytes.fromhex(f"00 82 {code:04x} 00000005")
    with pytest.raises(NatPmpError, match=name) as info:
        natpmp.parse_map_response(data, "tcp", 8080)
    assert info.value.code == code


@pytest.mark.parametrize(("code", "name"), sorted(RESULT_NAMES.items()))
def test_external_address_error(code: int, name: str) -> None:
    data = bytes.fromhex(f"00 80 {code:04x} 00000005 00000000")
    with pytest.raises(NatPmpError, match=name) as info:
        natpmp.parse_external_address_response(data)
    assert info.value.code == code
    with pytest.raises(NatPmpError):
        natpmp.parse_external_address_response(data[:8])


def test_unknown_result_code() -> None:
    with pytest.raises(NatPmpError, match="result 99") as info:
        natpmp.parse_map_response(map_reply(result=99), "tcp", 8080)
    assert info.value.code == 99


def test_error_reply_must_still_match_version_and_opcode() -> None:
    # a result code only counts once the reply is for this request
    with pytest.raises(ProtocolError):
        natpmp.parse_map_response(bytes.fromhex("01 82 0002 00000005"), "tcp", 8080)
    with pytest.raises(ProtocolError):
        natpmp.parse_map_response(bytes.fromhex("00 81 0002 00000005"), "tcp", 8080)
    with pytest.raises(ProtocolError):  # too short to carry a result code
        natpmp.parse_map_response(bytes.fromhex("00 82 0002 000000"), "tcp", 8080)


def test_natpmp_error_is_a_natkit_error() -> None:
    assert issubclass(NatPmpError, NatkitError)
    assert not issubclass(NatPmpError, ProtocolError)
