"""One IPv4 route, as every platform's routing-table parser returns it."""

from __future__ import annotations

import dataclasses
import ipaddress


@dataclasses.dataclass(frozen=True)
class Route:
    iface: str  # an interface name (Linux, macOS) or the interface's own address (Windows)
    destination: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None  # None: the destination is on the link itself
    metric: int  # lower is preferred


def ipv4_or_none(text: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        return None
