"""Which gateway, which local address, which LAN: read from the kernel's routing table.

``/proc/thread-self/net/route`` (not ``/proc/net/route``) so that a thread that entered a
network namespace sees that namespace's routes.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import struct

from natkit.errors import DiscoveryError

ROUTE_FILES = ("/proc/thread-self/net/route", "/proc/net/route")

# Addresses that cannot be a public endpoint: RFC 1918, CGNAT, loopback, link-local,
# documentation, benchmarking, multicast, reserved. A router reporting one of these as its
# "external" address sits behind another NAT.
_NOT_PUBLIC = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
]


@dataclasses.dataclass(frozen=True)
class Route:
    iface: str
    destination: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None
    metric: int


def _hex_ip(field: str) -> ipaddress.IPv4Address:
    # The kernel prints addresses as host-endian (little-endian here) hex.
    return ipaddress.IPv4Address(struct.pack("<I", int(field, 16)))


def parse_route_table(text: str) -> list[Route]:
    """Parse the text of ``/proc/net/route``; malformed lines are skipped."""
    routes: list[Route] = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 8:
            continue
        try:
            dest, gw, mask = _hex_ip(f[1]), _hex_ip(f[2]), _hex_ip(f[7])
            flags, metric = int(f[3], 16), int(f[6])
            net = ipaddress.IPv4Network(f"{dest}/{mask}", strict=False)
        except ValueError:
            continue
        if not flags & 0x1:  # RTF_UP
            continue
        routes.append(Route(f[0], net, gw if flags & 0x2 else None, metric))
    return routes


def read_routes() -> list[Route]:
    for path in ROUTE_FILES:
        try:
            with open(path) as f:
                return parse_route_table(f.read())
        except OSError:
            continue
    return []


def default_gateway(routes: list[Route] | None = None) -> str:
    """The IPv4 default gateway's address; :class:`DiscoveryError` if there is none."""
    routes = read_routes() if routes is None else routes
    defaults = [r for r in routes if r.destination.prefixlen == 0 and r.gateway is not None]
    if not defaults:
        raise DiscoveryError("no IPv4 default gateway: this machine has no route to a router")
    return str(min(defaults, key=lambda r: r.metric).gateway)


def local_address_for(remote_ip: str) -> str:
    """The local address the kernel would use to reach ``remote_ip`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((remote_ip, 9))
        except OSError as exc:
            raise DiscoveryError(f"no route to {remote_ip}: {exc}") from None
        return str(s.getsockname()[0])


def lan_network(local_ip: str, routes: list[Route] | None = None) -> ipaddress.IPv4Network:
    """The directly connected subnet that holds ``local_ip`` (a /24 if the table says nothing)."""
    routes = read_routes() if routes is None else routes
    addr = ipaddress.IPv4Address(local_ip)
    linked = [r.destination for r in routes if r.gateway is None and r.destination.prefixlen > 0]
    matching = [net for net in linked if addr in net]
    if matching:
        return max(matching, key=lambda n: n.prefixlen)
    return ipaddress.IPv4Network(f"{local_ip}/24", strict=False)


def is_public_ipv4(ip: str) -> bool:
    """True if ``ip`` can be a public Internet address (not private, CGNAT, reserved…)."""
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        return False
    return not any(addr in net for net in _NOT_PUBLIC)


def is_cgnat(ip: str) -> bool:
    try:
        return ipaddress.IPv4Address(ip) in ipaddress.IPv4Network("100.64.0.0/10")
    except ValueError:
        return False
