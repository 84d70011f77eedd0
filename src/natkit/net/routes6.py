"""IPv6 default router and global addresses off Linux (sans-I/O: text or adapters in).

- macOS ``route -n get -inet6 default``: ``key: value`` lines; the gateway of a router on
  the link is printed with its zone (``fe80::1%en0``).
- Windows ``route print -6``: the active table's rows are ``IF METRIC DESTINATION GATEWAY``
  (IF is the interface index, the zone of a link-local gateway); a long destination pushes
  the gateway onto the next line alone. Labels are localised, so rows are told by their
  shape; the table ends at the first ``====`` line after its rows (the persistent routes
  that follow have the same shape but are configuration, not routes in use).
- macOS ``ifconfig IFACE inet6``: the address flags ifaddr does not give (``temporary``,
  ``deprecated``, ``tentative``, ``duplicated``, ``detached``).
- the interfaces' addresses as ifaddr lists them (getifaddrs, GetAdaptersAddresses).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable
from typing import Protocol

UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")
# macOS ifconfig flags of an address that must not be published.
UNUSABLE_FLAGS = frozenset({"deprecated", "tentative", "duplicated", "detached"})


@dataclasses.dataclass(frozen=True)
class Address6:
    address: str
    iface: str
    temporary: bool


@dataclasses.dataclass(frozen=True)
class Router6:
    address: str  # with its zone when link-local (fe80::1%en0, fe80::1%14)
    iface: str  # macOS: the interface's name; Windows: its index
    metric: int


def _ipv6(text: str) -> ipaddress.IPv6Address | None:
    try:
        return ipaddress.IPv6Address(text.split("%", 1)[0])
    except ValueError:
        return None


def _zoned(gateway: str, zone: str) -> str:
    """A link-local router with its zone (a socket cannot reach it without one)."""
    addr = _ipv6(gateway)
    if addr is None or not addr.is_link_local or "%" in gateway or not zone:
        return gateway
    return f"{gateway}%{zone}"


def parse_route_get6(text: str) -> list[Router6]:
    """Parse ``route -n get -inet6 default``: the default router in use (empty if none)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("destination", "gateway", "interface"):
            values.setdefault(key.strip(), value.strip())  # (the value holds colons)
    gateway, iface = values.get("gateway", ""), values.get("interface", "")
    if values.get("destination") not in ("default", "::") or _ipv6(gateway) is None:
        return []  # no default, or a point-to-point one (gateway: utun3, link#12)
    return [Router6(_zoned(gateway, iface), iface, 0)]


def _default_row(fields: list[str]) -> tuple[str, int] | None:
    """(interface index, metric) of a ``IF METRIC ::/0`` row start, else None."""
    if len(fields) < 3 or not fields[0].isdigit() or not fields[1].isdigit():
        return None
    return (fields[0], int(fields[1])) if fields[2] == "::/0" else None


def parse_route_print6(text: str) -> list[Router6]:
    """Parse ``route print -6`` (any language): the default routes (``::/0``) with a router,
    best metric first."""
    found: list[Router6] = []
    rows_seen = False
    pending: tuple[str, int] | None = None  # a ::/0 row whose gateway is on the next line
    for line in text.splitlines():
        fields = line.split()
        if line.strip().startswith("=="):
            if rows_seen:
                break  # the active table has ended
            continue
        if pending is not None and len(fields) == 1:
            fields = [pending[0], str(pending[1]), "::/0", fields[0]]
        pending = None
        if len(fields) >= 3 and fields[0].isdigit() and fields[1].isdigit() and "/" in fields[2]:
            rows_seen = True
        start = _default_row(fields)
        if start is None:
            continue
        if len(fields) == 3:
            pending = start
            continue
        if _ipv6(fields[3]) is not None:  # else On-link / Auf Verbindung: no router
            found.append(Router6(_zoned(fields[3], start[0]), start[0], start[1]))
    return sorted(found, key=lambda r: r.metric)


def parse_ifconfig6(text: str) -> dict[str, frozenset[str]]:
    """Parse macOS ``ifconfig IFACE inet6``: each address's flags (its words after the
    prefix length that are not ``key value`` pairs)."""
    flags: dict[str, frozenset[str]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "inet6" or _ipv6(fields[1]) is None:
            continue
        words: set[str] = set()
        skip = False
        for word in fields[2:]:
            if skip:
                skip = False
            elif word in ("prefixlen", "scopeid", "pltime", "vltime"):
                skip = True  # followed by its value
            else:
                words.add(word)
        flags[str(_ipv6(fields[1]))] = frozenset(words)
    return flags


class _IP(Protocol):
    @property
    def ip(self) -> str | tuple[str, int, int]: ...


class _Adapter(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def index(self) -> int | None: ...
    @property
    def ips(self) -> Iterable[_IP]: ...


def is_publishable(addr: ipaddress.IPv6Address) -> bool:
    """A global unicast address the Internet could reach: not link-local, unique local
    (fc00::/7), loopback, multicast, unspecified, site-local or IPv4-mapped. 2001:db8::/32
    (documentation) is kept: the lab uses it as its "global" prefix."""
    return not (
        addr.is_link_local or addr.is_loopback or addr.is_multicast or addr.is_unspecified
        or addr.is_site_local or addr in UNIQUE_LOCAL or addr.ipv4_mapped is not None
    )  # fmt: skip


def interface_addresses(adapters: Iterable[_Adapter], *, windows: bool = False) -> list[Address6]:
    """The publishable IPv6 addresses of ``adapters`` (ifaddr's), each named by the
    interface as the routing table names it (Windows: its index)."""
    found: list[Address6] = []
    for adapter in adapters:
        iface = str(adapter.index) if windows else adapter.name
        for entry in adapter.ips:
            if not isinstance(entry.ip, tuple):
                continue  # IPv4
            addr = _ipv6(entry.ip[0])
            if addr is not None and is_publishable(addr):
                found.append(Address6(str(addr), iface, False))
    return found


def with_flags(addrs: list[Address6], flags: dict[str, frozenset[str]]) -> list[Address6]:
    """``addrs`` with what ifconfig says: unusable ones dropped, temporary ones marked and
    put after the stable ones."""
    kept = [
        dataclasses.replace(a, temporary="temporary" in flags.get(a.address, frozenset()))
        for a in addrs
        if not flags.get(a.address, frozenset()) & UNUSABLE_FLAGS
    ]
    return sorted(kept, key=lambda a: a.temporary)
