"""NAT-PMP (RFC 6886) messages, sans-I/O.

Requests are built as bytes; responses are decoded only when length, version and opcode
are exactly what the request calls for. Anything else raises :class:`ProtocolError`
(the caller ignores it and keeps waiting); a well-formed error reply raises
:class:`NatPmpError`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

from natkit.errors import NatPmpError, ProtocolError

VERSION = 0
SERVER_PORT = 5351
CLIENT_PORT = 5350  # where gateways multicast address-change announcements
OP_EXTERNAL_ADDRESS = 0
OP_MAP_UDP = 1
OP_MAP_TCP = 2
RESPONSE_BIT = 128
# RFC 6886 3.1: first retransmission after 250 ms, doubling, nine tries in all.
RETRANSMIT_SCHEDULE = tuple(0.25 * 2**i for i in range(9))
RECOMMENDED_LIFETIME = 7200


@dataclasses.dataclass(frozen=True)
class ExternalAddress:
    epoch: int  # seconds since the gateway's start of epoch
    address: str


@dataclasses.dataclass(frozen=True)
class MapResult:
    epoch: int
    protocol: str  # "tcp" | "udp"
    internal_port: int
    external_port: int
    lifetime: int


def map_opcode(protocol: str) -> int:
    if protocol == "tcp":
        return OP_MAP_TCP
    if protocol == "udp":
        return OP_MAP_UDP
    raise ValueError(f"protocol must be tcp or udp, not {protocol!r}")


def build_external_address_request() -> bytes:
    return bytes((VERSION, OP_EXTERNAL_ADDRESS))


def build_map_request(
    protocol: str, internal_port: int, external_port: int, lifetime: int
) -> bytes:
    """A mapping request; ``lifetime`` 0 with ``external_port`` 0 deletes the mapping."""
    if not 0 < internal_port < 65536 or not 0 <= external_port < 65536:
        raise ValueError("ports must be 1-65535 (0 allowed for the suggested external port)")
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise ValueError("lifetime out of range")
    return struct.pack(
        "!BBHHHI", VERSION, map_opcode(protocol), 0, internal_port, external_port, lifetime
    )


def _header(data: bytes, opcode: int, length: int) -> tuple[int, int]:
    """Validate version/opcode; return (result code, epoch). Error replies may be short."""
    if len(data) < 8:
        raise ProtocolError(f"NAT-PMP reply of {len(data)} bytes is truncated")
    version, op, result, epoch = struct.unpack_from("!BBHI", data)
    if version != VERSION:
        raise ProtocolError(f"NAT-PMP reply has version {version}, not {VERSION}")
    if op != RESPONSE_BIT + opcode:
        raise ProtocolError(f"NAT-PMP reply has opcode {op}, expected {RESPONSE_BIT + opcode}")
    if result != 0:
        raise NatPmpError(result)
    if len(data) != length:
        raise ProtocolError(f"NAT-PMP reply is {len(data)} bytes, expected {length}")
    return result, epoch


def parse_external_address_response(data: bytes) -> ExternalAddress:
    _, epoch = _header(data, OP_EXTERNAL_ADDRESS, 12)
    return ExternalAddress(epoch, str(ipaddress.IPv4Address(data[8:12])))


def parse_map_response(data: bytes, protocol: str, internal_port: int) -> MapResult:
    """Decode a mapping reply, which must be for ``protocol`` and ``internal_port``."""
    _, epoch = _header(data, map_opcode(protocol), 16)
    internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
    if internal != internal_port:
        raise ProtocolError(f"NAT-PMP reply is for internal port {internal}, not {internal_port}")
    if lifetime and not external:
        raise ProtocolError("NAT-PMP reply grants a lifetime but no external port")
    return MapResult(epoch, protocol, internal, external, lifetime)
