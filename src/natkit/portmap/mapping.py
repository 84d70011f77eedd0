"""A port mapping on a router, as natkit reports it whatever protocol made it."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal
from typing import Protocol as TypingProtocol

from natkit.net.routes import is_cgnat, is_public_ipv4

Method = Literal["upnp", "natpmp", "pcp"]
Protocol = Literal["tcp", "udp"]


def normalize_protocol(protocol: str) -> Protocol:
    p = protocol.strip().lower()
    if p == "tcp":
        return "tcp"
    if p == "udp":
        return "udp"
    raise ValueError(f"protocol must be tcp or udp, not {protocol!r}")


@dataclasses.dataclass(frozen=True)
class PortMapping:
    method: Method
    protocol: Protocol
    internal_ip: str
    internal_port: int
    external_ip: str
    external_port: int
    lease: int  # seconds granted; 0 = permanent (natkit then deletes it itself on exit)
    description: str = ""
    nonce: str = dataclasses.field(default="", repr=False)  # PCP: hex nonce that owns it

    @property
    def public_address(self) -> str:
        """``IP:PORT`` on the router's external side."""
        return f"{self.external_ip}:{self.external_port}"

    @property
    def publicly_reachable(self) -> bool:
        """False when the router's external address is private or CGNAT (double NAT)."""
        return is_public_ipv4(self.external_ip)

    @property
    def reachability_note(self) -> str:
        if not self.external_ip:
            return "the router did not say its external address"
        if is_cgnat(self.external_ip):
            return (
                f"not publicly reachable: the router's external address {self.external_ip} is "
                "carrier-grade NAT (100.64.0.0/10); your ISP's NAT sits in front of it"
            )
        if not self.publicly_reachable:
            return (
                f"not publicly reachable: the router's external address {self.external_ip} is "
                "private; another router (double NAT) sits in front of it"
            )
        return "public"

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "protocol": self.protocol,
            "internal_ip": self.internal_ip,
            "internal_port": self.internal_port,
            "external_ip": self.external_ip,
            "external_port": self.external_port,
            "public_address": self.public_address,
            "publicly_reachable": self.publicly_reachable,
            "lease": self.lease,
            "description": self.description,
        }


class Mapper(TypingProtocol):
    """What every port-mapping protocol offers natkit (UPnP, NAT-PMP, PCP)."""

    method: Method

    @property
    def internal_ip(self) -> str: ...

    async def add(
        self,
        internal_port: int,
        *,
        external_port: int | None = None,
        protocol: str = "tcp",
        lease: int = 3600,
        description: str = "natkit",
    ) -> PortMapping: ...

    async def renew(self, mapping: PortMapping) -> PortMapping: ...

    async def remove(self, mapping: PortMapping) -> None: ...

    async def check(self, mapping: PortMapping) -> bool:
        """False if the router has visibly lost the mapping (rebooted, purged it)."""
        ...

    def close(self) -> None: ...
