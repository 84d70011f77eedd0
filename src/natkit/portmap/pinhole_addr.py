"""Which IPv6 router and which global IPv6 address of ours: read from the kernel (Linux).

``/proc/thread-self/net`` rather than ``/proc/net`` so that a thread that entered a network
namespace sees that namespace's routes and addresses.
"""

from __future__ import annotations

import dataclasses
import ipaddress

from natkit.errors import DiscoveryError

ROUTE6_FILES = ("/proc/thread-self/net/ipv6_route", "/proc/net/ipv6_route")
ADDR6_FILES = ("/proc/thread-self/net/if_inet6", "/proc/net/if_inet6")
# if_inet6 flags (IFA_F_*) that make an address unfit to be published.
_TEMPORARY, _DADFAILED, _DEPRECATED, _TENTATIVE = 0x01, 0x08, 0x20, 0x40
_RTF_UP, _RTF_GATEWAY = 0x0001, 0x0002
_UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")


@dataclasses.dataclass(frozen=True)
class Address6:
    address: str
    iface: str
    temporary: bool


def _hex6(field: str) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(bytes.fromhex(field))


def _read(paths: tuple[str, ...]) -> str:
    for path in paths:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            continue
    return ""


def parse_ipv6_default_gateways(text: str) -> list[tuple[str, str, int]]:
    """(gateway, interface, metric) of each IPv6 default route in ``/proc/net/ipv6_route``,
    best metric first; malformed lines are skipped."""
    found: list[tuple[str, str, int]] = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 10:
            continue
        try:
            dest, dest_len, gw = _hex6(f[0]), int(f[1], 16), _hex6(f[4])
            metric, flags = int(f[5], 16), int(f[8], 16)
        except ValueError:
            continue
        if dest_len or int(dest) or not flags & _RTF_UP or not flags & _RTF_GATEWAY:
            continue
        found.append((str(gw), f[9], metric))
    return sorted(found, key=lambda g: g[2])


def parse_global_addresses(text: str) -> list[Address6]:
    """Global unicast addresses in ``/proc/net/if_inet6`` that can be published: not
    tentative, deprecated or failed; stable ones before temporary (privacy) ones."""
    found: list[Address6] = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 6:
            continue
        try:
            addr, scope, flags = _hex6(f[0]), int(f[3], 16), int(f[4], 16)
        except ValueError:
            continue
        # The kernel's scope 0 is "global", which includes unique local addresses (fc00::/7):
        # those never reach the Internet, so they are skipped. 2001:db8::/32 (documentation)
        # is kept: the lab uses it as its "global" prefix.
        if scope != 0 or addr in _UNIQUE_LOCAL or addr.ipv4_mapped or addr.is_multicast:
            continue
        if flags & (_DADFAILED | _DEPRECATED | _TENTATIVE):
            continue
        found.append(Address6(str(addr), f[5], bool(flags & _TEMPORARY)))
    return sorted(found, key=lambda a: a.temporary)


def ipv6_gateway() -> tuple[str, str]:
    """The IPv6 default router and its interface; a link-local router comes with its zone
    (``fe80::1%eth0``) so that a socket can reach it."""
    gateways = parse_ipv6_default_gateways(_read(ROUTE6_FILES))
    if not gateways:
        raise DiscoveryError(
            "no IPv6 default route: this machine has no IPv6 router to open a pinhole on"
        )
    gw, iface, _ = gateways[0]
    return (f"{gw}%{iface}" if ipaddress.IPv6Address(gw).is_link_local else gw), iface


def global_ipv6(iface: str | None = None) -> str:
    """This host's global IPv6 address (on ``iface`` if given), a stable one if there is."""
    addrs = [
        a for a in parse_global_addresses(_read(ADDR6_FILES)) if iface is None or a.iface == iface
    ]
    if not addrs:
        where = f" on {iface}" if iface else ""
        raise DiscoveryError(
            f"no global IPv6 address{where}: the router gives this host no IPv6 the Internet "
            "could reach, so there is nothing to open a pinhole for"
        )
    return addrs[0].address
