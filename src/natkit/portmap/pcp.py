"""PCP (RFC 6887) messages, sans-I/O: ANNOUNCE and MAP, IPv4 and IPv6.

Addresses travel as 16 bytes, IPv4 in the IPv4-mapped form ``::ffff:a.b.c.d``. A MAP reply
is trusted only if its version, opcode, nonce, protocol and internal port match the request.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import random
import struct

from natkit.errors import PcpError, ProtocolError

VERSION = 2
SERVER_PORT = 5351
OP_ANNOUNCE = 0
OP_MAP = 1
RESPONSE_BIT = 0x80
HEADER_LEN = 24
MAP_PAYLOAD_LEN = 36
MAX_MESSAGE = 1100  # RFC 6887 section 7
PROTOCOLS = {"tcp": 6, "udp": 17}
# Result codes whose replies may come from a NAT-PMP-only server (version negotiation).
UNSUPP_VERSION = 1
NOT_AUTHORIZED = 2  # also: a delete under another mapping's nonce (RFC 6887 11.3)
NO_RESOURCES = 8
# RFC 6887 8.1.1: IRT 3 s, doubling, MRT 1024 s, each scaled by a random factor in ±10 %.
IRT, MRT = 3.0, 1024.0


@dataclasses.dataclass(frozen=True)
class Header:
    opcode: int
    result: int
    lifetime: int
    epoch: int


@dataclasses.dataclass(frozen=True)
class MapResult:
    epoch: int
    lifetime: int
    nonce: bytes
    protocol: str
    internal_port: int
    external_port: int
    external_ip: str


def new_nonce() -> bytes:
    return os.urandom(12)


def retransmit_schedule(count: int = 8, rng: random.Random | None = None) -> list[float]:
    """Intervals between retransmissions per RFC 6887 8.1.1 (first ``count`` of them)."""
    r = rng or random.Random()
    out: list[float] = []
    rt = (1 + r.uniform(-0.1, 0.1)) * IRT
    for _ in range(count):
        out.append(rt)
        rt = (1 + r.uniform(-0.1, 0.1)) * min(2 * rt, MRT)
    return out


def encode_address(ip: str) -> bytes:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv4Address):
        return b"\x00" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


def decode_address(raw: bytes) -> str:
    addr = ipaddress.IPv6Address(raw)
    return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)


def _request_header(opcode: int, lifetime: int, client_ip: str) -> bytes:
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise ValueError("lifetime out of range")
    return struct.pack("!BBHI", VERSION, opcode, 0, lifetime) + encode_address(client_ip)


def build_announce(client_ip: str) -> bytes:
    """ANNOUNCE: a cheap way to learn whether PCP is there and the server's epoch."""
    return _request_header(OP_ANNOUNCE, 0, client_ip)


def build_map(
    *,
    client_ip: str,
    nonce: bytes,
    protocol: str,
    internal_port: int,
    lifetime: int,
    suggested_port: int = 0,
    suggested_ip: str | None = None,
) -> bytes:
    """MAP request. ``lifetime`` 0 deletes the mapping (same nonce as when created)."""
    if len(nonce) != 12:
        raise ValueError("a PCP nonce is 12 bytes")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be tcp or udp, not {protocol!r}")
    if not 0 < internal_port < 65536 or not 0 <= suggested_port < 65536:
        raise ValueError("ports must be 1-65535 (0 allowed for the suggested port)")
    if suggested_ip is None:
        # "Any address of the same family as the client's": all zeros, or ::ffff:0.0.0.0.
        # (An IPv4-mapped client address such as ::ffff:192.0.2.1 is IPv4 on the wire.)
        is_v4 = encode_address(client_ip)[:12] == b"\x00" * 10 + b"\xff\xff"
        suggested_ip = "0.0.0.0" if is_v4 else "::"
    payload = nonce + struct.pack("!B3xHH", PROTOCOLS[protocol], internal_port, suggested_port)
    return _request_header(OP_MAP, lifetime, client_ip) + payload + encode_address(suggested_ip)


def parse_header(data: bytes, opcode: int) -> Header:
    """Check a reply's common header. Raises PcpError for a well-formed error reply."""
    if len(data) < 4:
        raise ProtocolError(f"PCP reply of {len(data)} bytes is truncated")
    if len(data) > MAX_MESSAGE or len(data) % 4:
        raise ProtocolError(f"PCP reply of {len(data)} bytes has an invalid length")
    version, op = data[0], data[1]
    if version == 0 and len(data) >= 4 and struct.unpack_from("!H", data, 2)[0] == UNSUPP_VERSION:
        raise PcpError(UNSUPP_VERSION)  # a NAT-PMP-only server: RFC 6887 section 9
    if version != VERSION:
        raise ProtocolError(f"PCP reply has version {version}, not {VERSION}")
    if op != RESPONSE_BIT | opcode:
        raise ProtocolError(f"PCP reply has opcode {op:#x}, expected {RESPONSE_BIT | opcode:#x}")
    if len(data) < HEADER_LEN:
        raise ProtocolError(f"PCP reply of {len(data)} bytes is truncated")
    result = data[3]
    lifetime, epoch = struct.unpack_from("!II", data, 4)
    if result != 0:
        raise PcpError(result, lifetime)
    return Header(opcode, result, lifetime, epoch)


def parse_announce_response(data: bytes) -> Header:
    return parse_header(data, OP_ANNOUNCE)


def parse_map_response(
    data: bytes, *, nonce: bytes, protocol: str, internal_port: int
) -> MapResult:
    """Decode a MAP reply that must answer *our* request (nonce, protocol, port)."""
    try:
        head = parse_header(data, OP_MAP)
    except PcpError:
        # RFC 6887 7.2/11.4: an error reply copies the request's payload; when it carries
        # one, it is matched like a success reply (a stray answer to another request is
        # ignored). A reply too short to carry one (e.g. from NAT-PMP) cannot be matched.
        if len(data) >= HEADER_LEN + MAP_PAYLOAD_LEN:
            _match(data, nonce, protocol, internal_port)
        raise
    if len(data) < HEADER_LEN + MAP_PAYLOAD_LEN:
        raise ProtocolError(f"PCP MAP reply of {len(data)} bytes is truncated")
    _check_options(data[HEADER_LEN + MAP_PAYLOAD_LEN :])
    internal, external = _match(data, nonce, protocol, internal_port)
    p = HEADER_LEN
    got_nonce = data[p : p + 12]
    if head.lifetime and not external:
        raise ProtocolError("PCP MAP reply grants a lifetime but no external port")
    ext_ip = decode_address(data[p + 20 : p + 36])
    return MapResult(head.epoch, head.lifetime, got_nonce, protocol, internal, external, ext_ip)


def _match(data: bytes, nonce: bytes, protocol: str, internal_port: int) -> tuple[int, int]:
    """Check that a MAP reply's payload answers our request; return (internal, external)."""
    p = HEADER_LEN
    if data[p : p + 12] != nonce:
        raise ProtocolError("PCP MAP reply carries another nonce: not an answer to our request")
    proto_num, internal, external = struct.unpack_from("!B3xHH", data, p + 12)
    if proto_num != PROTOCOLS[protocol]:
        raise ProtocolError(f"PCP MAP reply is for protocol {proto_num}, not {protocol}")
    if internal != internal_port:
        raise ProtocolError(f"PCP MAP reply is for internal port {internal}, not {internal_port}")
    return internal, external


def _check_options(data: bytes) -> None:
    """Walk the options, bounded; their content is not needed, only their framing."""
    pos = 0
    while pos < len(data):
        if len(data) - pos < 4:
            raise ProtocolError("PCP option header is truncated")
        length = struct.unpack_from("!H", data, pos + 2)[0]
        padded = (length + 3) & ~3
        if pos + 4 + padded > len(data):
            raise ProtocolError("PCP option runs past the end of the reply")
        pos += 4 + padded
