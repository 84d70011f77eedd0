"""How an ICE agent gathers and keeps its path: its options and the TURN server it may use
(apart from :mod:`natkit.p2p.ice` so that the connection and gathering modules it drives
can use them without importing it back)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from natkit.p2p.candidates import Addr

GATHER_TIMEOUT = 2.0
RELAY_GRACE = 1.0
CONSENT_INTERVAL = 5.0  # RFC 7675 section 5.1; randomised to 0.8-1.2 times this
CONSENT_LIFETIME = 30.0  # RFC 7675 section 5.1: consent expires 30 s after the last answer


@dataclasses.dataclass(frozen=True)
class TurnServer:
    """A TURN server (RFC 8656) and the long-term credentials to allocate on it."""

    host: str
    port: int
    username: str
    password: str = dataclasses.field(repr=False)
    transport: Literal["udp", "tcp"] = "udp"


@dataclasses.dataclass(frozen=True)
class IceOptions:
    """How an :class:`IceAgent` gathers and keeps its path (shared by its restarts)."""

    stun_server: Addr | None = None  # e.g. the natkit relay's listen port, or coturn
    turn: TurnServer | None = None
    port_mapping: bool = True  # ask the router (PCP, NAT-PMP, UPnP) for a port-mapped candidate
    gateway_ip: str | None = None  # the router to ask (default: the default gateway)
    gather_timeout: float = GATHER_TIMEOUT
    relay_grace: float = RELAY_GRACE
    consent_interval: float = CONSENT_INTERVAL
    consent_lifetime: float = CONSENT_LIFETIME
    use_ipv6: bool = True  # IPv6 host candidates
    host_addresses: tuple[str, ...] | None = None  # only these local addresses (default: all)

    def __post_init__(self) -> None:
        if not 0 < self.gather_timeout <= 30:
            raise ValueError("gather_timeout must be more than 0 and at most 30 seconds")
        if self.relay_grace < 0:
            raise ValueError("relay_grace must not be negative")
        # The consent checks are the keepalives: even the randomised longest gap (1.2 times
        # the interval) must stay well under the 30 s a NAT keeps an idle UDP flow.
        if not 0.5 <= self.consent_interval <= 20:
            raise ValueError("consent_interval must be from 0.5 to 20 seconds")
        if self.consent_lifetime < 2 * self.consent_interval:
            raise ValueError("consent_lifetime must be at least twice consent_interval")
