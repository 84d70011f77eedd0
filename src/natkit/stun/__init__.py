"""STUN (RFC 8489) on aioice's codec, and RFC 5780 NAT behaviour discovery.

- :mod:`codec`, :mod:`retransmit`, :mod:`behaviour`: sans-I/O — messages, the
  retransmission schedule, and the classification of observations.
- :mod:`client`: Binding over asyncio UDP (many servers on one socket) and TCP.
- :mod:`discovery`: :func:`discover_behaviour` — mapping, filtering, hairpinning and port
  preservation in one concurrent run.

STUN servers are always named by the caller; natkit ships no list of public servers.
"""

from natkit.stun.address import format_addr, parse_server
from natkit.stun.behaviour import Behaviour
from natkit.stun.client import BindingResult, StunUdp, binding_tcp, binding_udp
from natkit.stun.codec import BindingResponse, Decoded, binding_request, decode, encode
from natkit.stun.discovery import NatBehaviour, discover_behaviour, discover_behaviour_sync
from natkit.stun.errors import StunDecodeError, StunTimeoutError, StunTransportError
from natkit.stun.retransmit import retransmit_schedule

__all__ = [
    "Behaviour",
    "BindingResponse",
    "BindingResult",
    "Decoded",
    "NatBehaviour",
    "StunDecodeError",
    "StunTimeoutError",
    "StunTransportError",
    "StunUdp",
    "binding_request",
    "binding_tcp",
    "binding_udp",
    "decode",
    "discover_behaviour",
    "discover_behaviour_sync",
    "encode",
    "format_addr",
    "parse_server",
    "retransmit_schedule",
]
