"""macOS (and the BSDs it shares ``netstat`` with): the text of ``netstat -rn -f inet``
and of ``route -n get default`` (sans-I/O: text in, routes out).

Modelled on macOS 10.x–14 output: the header names the columns (``Refs`` and ``Use`` are
gone since macOS 11), destinations are abbreviated BSD-style (``192.168.1`` is
192.168.1.0/24, ``127`` is 127.0.0.0/8, ``10.8.0/24`` names its prefix), a directly
connected network's gateway is ``link#N`` or a MAC address, and ``I`` in the flags marks an
interface-scoped route (a second default kept for one interface only: not the one used).
"""

from __future__ import annotations

import ipaddress

from natkit.net.routes_model import Route, ipv4_or_none

SCOPED_PENALTY = 1000  # an interface-scoped default ranks after every unscoped one


def _classful_prefix(first_octet: int) -> int:
    # BSD netstat leaves out the prefix when it is the address's old class mask.
    if first_octet < 128:
        return 8
    if first_octet < 192:
        return 16
    return 24 if first_octet < 224 else 4


def parse_bsd_destination(text: str, flags: str) -> ipaddress.IPv4Network | None:
    """``default``, ``192.168.1``, ``10.8.0/24``, ``127.0.0.1`` → a network (None if not one)."""
    if text == "default":
        return ipaddress.IPv4Network("0.0.0.0/0")
    address, slash, prefix = text.partition("/")
    octets = address.split(".")
    if not 1 <= len(octets) <= 4 or not all(o.isdigit() for o in octets):
        return None
    padded = ".".join(octets + ["0"] * (4 - len(octets)))
    if slash:
        if not prefix.isdigit():
            return None
        length = int(prefix)
    elif "H" in flags or len(octets) == 4:
        length = 32
    else:  # (more octets than the class has would not be printed so; take them all)
        length = max(_classful_prefix(int(octets[0])), 8 * len(octets))
    try:
        return ipaddress.IPv4Network(f"{padded}/{length}", strict=False)
    except ValueError:
        return None


def parse_netstat(text: str) -> list[Route]:
    """Parse ``netstat -rn -f inet``; lines that are not IPv4 routes are skipped."""
    routes: list[Route] = []
    columns: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if fields[0] == "Destination":
            columns = fields
            continue
        if fields[0].startswith("Internet6"):
            break  # the IPv6 table follows when -f inet was not honoured
        if not columns or "Netif" not in columns or len(fields) <= columns.index("Netif"):
            continue
        flags = fields[2]
        dest = parse_bsd_destination(fields[0], flags)
        if dest is None or "U" not in flags:
            continue
        gateway = ipv4_or_none(fields[1]) if "G" in flags else None
        metric = len(routes) + (SCOPED_PENALTY if "I" in flags else 0)
        routes.append(Route(fields[columns.index("Netif")], dest, gateway, metric))
    return routes


def parse_route_get(text: str) -> list[Route]:
    """Parse ``route -n get default``: the one default route in use (empty if none)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values.setdefault(key.strip(), value.strip())
    gateway = ipv4_or_none(values.get("gateway", ""))
    if values.get("destination") != "default" or gateway is None:
        return []
    return [Route(values.get("interface", ""), ipaddress.IPv4Network("0.0.0.0/0"), gateway, 0)]
