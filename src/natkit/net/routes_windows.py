"""Windows: the text of ``route print -4`` and of ``ipconfig`` (sans-I/O).

Both are localised (German ``Aktive Routen`` / ``Auf Verbindung``, French ``Itinéraires
actifs`` …), so rows are recognised by their shape, never by a header or label:

- ``route print``: ``DEST NETMASK GATEWAY… INTERFACE METRIC`` where DEST, NETMASK and
  INTERFACE are IPv4 addresses and METRIC a number; a GATEWAY that is not an address
  (``On-link``, ``Auf Verbindung``) means directly connected. The "Persistent Routes" table
  has four columns and no interface: it is configuration, not the active table, and is
  skipped. The Metric column already adds the interface metric (Windows 7 and later).
- ``ipconfig``: per adapter block (a line that starts at column 0), the first IPv4 value
  is the address, a value that is a netmask follows it, and an IPv4 value after the mask
  is the default gateway (it may sit alone on a continuation line, after an IPv6 one).
"""

from __future__ import annotations

import ipaddress

from natkit.net.routes_model import Route, ipv4_or_none


def _netmask_prefix(text: str) -> int | None:
    """The prefix length of a netmask such as 255.255.255.0 (None if ``text`` is not one)."""
    ip = ipv4_or_none(text)
    if ip is None:
        return None
    host_bits = ~int(ip) & 0xFFFFFFFF
    if host_bits & (host_bits + 1):  # the ones must be contiguous, then only zeros
        return None
    return 32 - host_bits.bit_length()


def parse_route_print(text: str) -> list[Route]:
    """Parse ``route print -4`` (any language); lines of another shape are skipped."""
    routes: list[Route] = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 5 or not f[-1].isdigit():
            continue
        dest, mask, iface = ipv4_or_none(f[0]), _netmask_prefix(f[1]), ipv4_or_none(f[-2])
        if dest is None or mask is None or iface is None:
            continue
        gateway = ipv4_or_none(f[2]) if len(f) == 5 else None  # else "Auf Verbindung"…
        network = ipaddress.IPv4Network(f"{dest}/{mask}", strict=False)
        routes.append(Route(str(iface), network, gateway, int(f[-1])))
    return routes


def parse_ipconfig(text: str) -> list[Route]:
    """Parse ``ipconfig`` (any language): each adapter's network, and its default gateway."""
    routes: list[Route] = []
    address: ipaddress.IPv4Address | None = None
    prefix: int | None = None
    for line in text.splitlines():
        if line[:1].strip():  # a new adapter block
            address = prefix = None
            continue
        _, colon, value = line.rpartition(" : ")
        token = (value if colon else line).split()
        ip = ipv4_or_none(token[0].split("(")[0]) if token else None
        if ip is None:
            continue
        if address is None:
            address = ip
        elif prefix is None and (mask := _netmask_prefix(str(ip))) is not None:
            prefix = mask
            net = ipaddress.IPv4Network(f"{address}/{prefix}", strict=False)
            routes.append(Route(str(address), net, None, 0))
        elif prefix is not None:
            default = ipaddress.IPv4Network("0.0.0.0/0")
            routes.append(Route(str(address), default, ip, len(routes)))
    return routes
