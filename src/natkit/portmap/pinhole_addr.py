"""Which IPv6 router and which global IPv6 address of ours.

Linux: from the kernel, ``/proc/thread-self/net`` rather than ``/proc/net`` so that a thread
that entered a network namespace sees that namespace's routes and addresses. macOS and
Windows: the router from ``route -n get -inet6 default`` / ``route print -6`` (bounded, parsed
in :mod:`natkit.net.routes6`), the addresses from the interfaces (ifaddr).
"""

from __future__ import annotations

import ipaddress
import logging

from natkit.errors import DiscoveryError
from natkit.net import routes
from natkit.net.routes6 import (
    Address6,
    Router6,
    interface_addresses,
    parse_ifconfig6,
    parse_route_get6,
    parse_route_print6,
    with_flags,
)

__all__ = ["Address6", "global_ipv6", "ipv6_gateway"]
log = logging.getLogger("natkit.portmap")

ROUTE6_FILES = ("/proc/thread-self/net/ipv6_route", "/proc/net/ipv6_route")
ADDR6_FILES = ("/proc/thread-self/net/if_inet6", "/proc/net/if_inet6")
# if_inet6 flags (IFA_F_*) that make an address unfit to be published.
_TEMPORARY, _DADFAILED, _DEPRECATED, _TENTATIVE = 0x01, 0x08, 0x20, 0x40
_RTF_UP, _RTF_GATEWAY = 0x0001, 0x0002
_UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")
NAME_IT = "name the IPv6 router with --gateway (e.g. --gateway fe80::1%en0)"


def _hex6(field: str) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(bytes.fromhex(field))


def _read(paths: tuple[str, ...]) -> str | None:
    for path in paths:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            continue
    return None


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


def _routers() -> list[Router6]:
    """The IPv6 default routers, best first; :class:`DiscoveryError` if the table cannot
    be read (which is not the same as a table without a default)."""
    platform = routes.table_source()
    if platform == "linux":
        text = _read(ROUTE6_FILES)
        if text is None:
            raise DiscoveryError(f"cannot read {' or '.join(ROUTE6_FILES)}")
        return [Router6(gw, iface, m) for gw, iface, m in parse_ipv6_default_gateways(text)]
    if platform == "win32":
        argv = [routes.system_command("route.exe"), "print", "-6"]
        return parse_route_print6(routes.run_command(argv))
    try:
        return parse_route_get6(
            routes.run_command(["/sbin/route", "-n", "get", "-inet6", "default"])
        )
    except DiscoveryError as exc:
        if "exited with status" not in str(exc):
            raise
        # route(8) exits 1 ("not in table") when there is no IPv6 default route, and also
        # when the routing socket fails: its status cannot tell which.
        raise DiscoveryError(f"{exc}, as it does when there is no IPv6 default route") from None


def ipv6_gateway() -> tuple[str, str]:
    """The IPv6 default router and its interface; a link-local router comes with its zone
    (``fe80::1%eth0``; Windows: ``fe80::1%14``, the interface index) so that a socket can
    reach it."""
    try:
        routers = _routers()
    except DiscoveryError as exc:
        raise DiscoveryError(f"cannot find the IPv6 default router: {exc}; {NAME_IT}") from None
    if not routers:
        raise DiscoveryError(
            "no IPv6 default route: this machine has no IPv6 router to open a pinhole on "
            f"(if there is one, {NAME_IT})"
        )
    best = routers[0]
    if routes.table_source() == "linux" and ipaddress.IPv6Address(best.address).is_link_local:
        return f"{best.address}%{best.iface}", best.iface
    return best.address, best.iface


def _addresses(iface: str | None) -> list[Address6]:
    """The publishable addresses (on ``iface`` if given), stable ones first."""
    platform = routes.table_source()
    if platform == "linux":
        found = parse_global_addresses(_read(ADDR6_FILES) or "")
        return [a for a in found if iface is None or a.iface == iface]
    import ifaddr  # getifaddrs / GetAdaptersAddresses; a dependency of natkit's and aioice's

    try:
        adapters = ifaddr.get_adapters()
    except OSError as exc:
        raise DiscoveryError(f"cannot list this machine's IPv6 addresses: {exc}") from None
    found = interface_addresses(adapters, windows=platform == "win32")
    found = [a for a in found if iface is None or a.iface == iface]
    if platform != "darwin":
        return found  # Windows: ifaddr does not say which are temporary; taken as listed
    flags: dict[str, frozenset[str]] = {}
    for name in sorted({a.iface for a in found}):
        try:
            flags.update(parse_ifconfig6(routes.run_command(["/sbin/ifconfig", name, "inet6"])))
        except DiscoveryError as exc:
            log.info("cannot tell temporary IPv6 addresses on %s apart: %s", name, exc)
    return with_flags(found, flags)


def global_ipv6(iface: str | None = None) -> str:
    """This host's global IPv6 address (on ``iface`` if given), a stable one if there is."""
    addrs = _addresses(iface)
    if not addrs:
        where = f" on {iface}" if iface else ""
        raise DiscoveryError(
            f"no global IPv6 address{where}: the router gives this host no IPv6 the Internet "
            "could reach, so there is nothing to open a pinhole for"
        )
    return addrs[0].address
