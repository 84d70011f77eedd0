"""Linux: the text of ``/proc/net/route`` (sans-I/O)."""

from __future__ import annotations

import ipaddress
import struct

from natkit.net.routes_model import Route

RTF_UP, RTF_GATEWAY = 0x1, 0x2


def _hex_ip(field: str) -> ipaddress.IPv4Address:
    # The kernel prints addresses as host-endian (little-endian here) hex.
    return ipaddress.IPv4Address(struct.pack("<I", int(field, 16)))


def parse_proc_route(text: str) -> list[Route]:
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
        if not flags & RTF_UP:
            continue
        routes.append(Route(f[0], net, gw if flags & RTF_GATEWAY else None, metric))
    return routes
