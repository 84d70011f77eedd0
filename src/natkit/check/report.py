"""What ``natkit check`` found, and what it means: pure data and the verdict, no I/O.

The verdict follows from RFC 4787/5780 behaviour and from what the router offers:
- inbound TCP: a public address needs no help; a router mapping works when the router's
  external address is the public one (no second NAT above it); otherwise only a relay.
- direct UDP between two peers: endpoint-independent mapping makes hole punching work
  against most peers; a dependent mapping needs a port mapping on the router, a peer with
  an easy NAT, or TURN.
"""

from __future__ import annotations

import dataclasses
from typing import Any

EIM = "endpoint-independent"

METHODS = ("upnp", "natpmp", "pcp")
METHOD_NAMES = {"upnp": "UPnP IGD", "natpmp": "NAT-PMP", "pcp": "PCP"}


@dataclasses.dataclass(frozen=True)
class PortMapOffer:
    """A port-mapping protocol the gateway answered, with the external address it claims."""

    external_ip: str | None
    public: bool

    def to_json(self) -> dict[str, Any]:
        return {"external_ip": self.external_ip, "public": self.public}


@dataclasses.dataclass
class CheckReport:
    local_ipv4: str | None = None
    local_ipv6: list[str] = dataclasses.field(default_factory=list)
    gateway: str | None = None
    stun_servers: list[str] = dataclasses.field(default_factory=list)
    udp: bool = False
    public_ipv4: str | None = None
    public_ipv6: str | None = None
    behind_nat: bool | None = None
    mapping: str | None = None
    filtering: str | None = None
    port_preserving: bool | None = None
    hairpinning: bool | None = None
    port_mapping: dict[str, PortMapOffer | None] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(METHODS)
    )
    relay: str | None = None
    relay_rtt_ms: float | None = None
    relay_error: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    elapsed_ms: float = 0.0

    @property
    def double_nat(self) -> bool | None:
        """The router's own external address is not the public one (a NAT above it)."""
        offers = [o for o in self.port_mapping.values() if o is not None and o.external_ip]
        if not offers:
            return None
        if self.public_ipv4 is None:  # no STUN answer: judge by the address alone
            return any(not o.public for o in offers)
        return any(o.external_ip != self.public_ipv4 for o in offers)

    @property
    def usable_mapping(self) -> str | None:
        """The first protocol (in natkit's order of preference) whose mapping would be
        reachable from the Internet."""
        for method in ("pcp", "natpmp", "upnp"):
            offer = self.port_mapping.get(method)
            if offer is None or not offer.public:
                continue
            if self.public_ipv4 is None or offer.external_ip in (None, self.public_ipv4):
                return method
        return None

    def verdict(self) -> dict[str, str]:
        return {"inbound_tcp": self._inbound(), "direct_udp": self._direct_udp()}

    def _inbound(self) -> str:
        if self.behind_nat is False:
            return "direct: this host has a public address (open its firewall for the port)"
        method = self.usable_mapping
        if method is not None:
            return f"router port mapping ({METHOD_NAMES[method]}): natkit expose maps a port"
        if self.double_nat:
            return "relay: the router is behind another NAT, its port mappings are not public"
        if any(self.port_mapping.values()):
            return "relay: the router maps ports, but not on a public address"
        return "relay: the router offers no port mapping (UPnP, NAT-PMP and PCP all silent)"

    def _direct_udp(self) -> str:
        if not self.udp:
            return "unknown: no STUN server answered over UDP (UDP blocked?): use the relay"
        if self.behind_nat is False:
            return "likely: no NAT on this side"
        if self.mapping == EIM:
            if self.filtering == EIM:
                return "likely: endpoint-independent mapping and filtering (full cone)"
            return "likely: endpoint-independent mapping, hole punching works with most peers"
        if self.mapping is None:
            return "unknown: mapping behaviour not measured (give an RFC 5780 server or two)"
        if self.usable_mapping is not None:
            return "likely via a router port mapping; hole punching alone would fail (" + (
                f"{self.mapping} mapping)"
            )
        return f"needs TURN or the relay unless the peer's NAT is easy ({self.mapping} mapping)"

    def to_json(self) -> dict[str, Any]:
        return {
            "udp": self.udp,
            "public_ipv4": self.public_ipv4,
            "public_ipv6": self.public_ipv6,
            "local_ipv4": self.local_ipv4,
            "local_ipv6": self.local_ipv6,
            "gateway": self.gateway,
            "behind_nat": self.behind_nat,
            "mapping": self.mapping,
            "filtering": self.filtering,
            "port_preserving": self.port_preserving,
            "hairpinning": self.hairpinning,
            "port_mapping": {
                m: (o.to_json() if o is not None else None) for m, o in self.port_mapping.items()
            },
            "double_nat": self.double_nat,
            "stun_servers": self.stun_servers,
            "relay": (
                None
                if self.relay is None
                else {"address": self.relay, "rtt_ms": self.relay_rtt_ms, "error": self.relay_error}
            ),
            "verdict": self.verdict(),
            "notes": self.notes,
            "elapsed_ms": round(self.elapsed_ms, 1),
        }
