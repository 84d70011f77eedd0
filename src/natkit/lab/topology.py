"""Wiring a lab: namespaces, veth links, addresses, routes (and the carrier NAT's rules).

Every veth joins two namespaces of the same lab; nothing touches the host's own network.
"""

from __future__ import annotations

from natkit.lab import config as C
from natkit.lab.config import LabConfig
from natkit.lab.procs import in_netns, ip, run


def _veth(ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
    """A veth pair from ``ns_a`` (``if_a``) to ``ns_b`` (``if_b``), both ends up."""
    ip(ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
    ip(ns_a, "link", "set", if_a, "up")
    ip(ns_b, "link", "set", if_b, "up")


def _add_netns(name: str) -> None:
    run(["ip", "netns", "add", name])
    ip(name, "link", "set", "lo", "up")
    # No duplicate address detection on the links made next: while a link-local address is
    # tentative (a second or two), the kernel sends no neighbour solicitation for a forwarded
    # packet, so rtr could not reach wan over IPv6 at first (seen: the first connection of a
    # fresh lab timed out). Every address in a lab is unique by construction.
    dad_off = (f"net.ipv6.conf.{scope}.accept_dad=0" for scope in ("all", "default"))
    in_netns(name, "sysctl", "-qw", *dad_off)


def _lan(rtr: str, rtr_ip: str, hosts: dict[str, tuple[str, str]]) -> None:
    """A home network: a bridge on the router (``rtr_ip``), one veth per LAN host
    (node -> ns, address)."""
    ip(rtr, "link", "add", C.RTR_LAN_BRIDGE, "type", "bridge", "mcast_snooping", "0")
    ip(rtr, "addr", "add", f"{rtr_ip}/{C.LAN_PREFIX}", "dev", C.RTR_LAN_BRIDGE)
    ip(rtr, "link", "set", C.RTR_LAN_BRIDGE, "up")
    for node, (ns, addr) in hosts.items():
        port = f"{node}-p"
        _veth(rtr, port, ns, C.HOST_IF)
        ip(rtr, "link", "set", port, "master", C.RTR_LAN_BRIDGE)
        ip(ns, "addr", "add", f"{addr}/{C.LAN_PREFIX}", "dev", C.HOST_IF)
        ip(ns, "route", "add", "default", "via", rtr_ip)


def _wan_segment(wan: str, routers: dict[str, str]) -> None:
    """The Internet segment shared by several routers (node -> ns): wan's ``eth0`` becomes a
    bridge with a port per router, so that traffic between the routers crosses the segment
    as on a real one instead of being routed by wan (which would need forwarding there).
    """
    ip(wan, "link", "add", C.HOST_IF, "type", "bridge", "mcast_snooping", "0")
    ip(wan, "link", "set", C.HOST_IF, "up")
    for node, ns in routers.items():
        port = f"{node}-p"
        _veth(ns, C.RTR_WAN_IF, wan, port)
        ip(wan, "link", "set", port, "master", C.HOST_IF)


def _router(ns: str, wan_ip: str, prefix: int, gateway: str) -> None:
    """A router's WAN address, default route and forwarding (its wan0 exists already)."""
    ip(ns, "addr", "add", f"{wan_ip}/{prefix}", "dev", C.RTR_WAN_IF)
    ip(ns, "route", "add", "default", "via", gateway)
    in_netns(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")


def _addr6(ns: str, addr: str, prefix: int, dev: str) -> None:
    # nodad: usable at once (miniupnpd must see the LAN's address when it starts, or it
    # disables IPv6), and nothing else in an isolated lab could hold the same address.
    ip(ns, "-6", "addr", "add", f"{addr}/{prefix}", "dev", dev, "nodad")


def _dual_stack(ns: dict[str, str]) -> None:
    """IPv6 on rtr's side of a lab: a global /64 on the LAN routed (no NAT) to the Internet
    segment; rtr forwards it, and its firewall (config.router_ruleset) drops what is
    unsolicited. wan reaches the LAN through rtr, as the Internet reaches a home's prefix."""
    rtr, wan = ns["rtr"], ns["wan"]
    _addr6(rtr, C.RTR_LAN_IP6, C.LAN6_PREFIX, C.RTR_LAN_BRIDGE)
    _addr6(rtr, C.RTR_WAN_IP6, C.WAN6_PREFIX, C.RTR_WAN_IF)
    in_netns(rtr, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    for node, addr in (("lan", C.LAN_IP6), ("dev", C.DEV_IP6)):
        _addr6(ns[node], addr, C.LAN6_PREFIX, C.HOST_IF)
        ip(ns[node], "-6", "route", "add", "default", "via", C.RTR_LAN_IP6)
    for addr in C.WAN_IPS6:
        _addr6(wan, addr, C.WAN6_PREFIX, C.HOST_IF)
    ip(wan, "-6", "route", "add", f"{C.LAN6_NET}/{C.LAN6_PREFIX}", "via", C.RTR_WAN_IP6)


def build(cfg: LabConfig) -> None:
    """Create every namespace of ``cfg`` and wire them (no daemons, no router rulesets)."""
    ns = {node: cfg.netns(node) for node in cfg.nodes}
    for name in ns.values():
        _add_netns(name)
    rtr, wan = ns["rtr"], ns["wan"]
    _lan(rtr, C.RTR_LAN_IP, {"lan": (ns["lan"], C.LAN_IP), "dev": (ns["dev"], C.DEV_IP)})

    # The public address 100.200.0.1 sits on whatever faces wan: rtr, or isp in front of it.
    edge_node = C.UPSTREAM_NODE if cfg.upstream_nat else "rtr"
    edge = ns[edge_node]
    if cfg.second_lan:
        _wan_segment(wan, {edge_node: edge, "rtr2": ns["rtr2"]})
    else:
        _veth(edge, C.RTR_WAN_IF, wan, C.HOST_IF)  # one router: a plain point-to-point link
    for addr in C.WAN_IPS:
        ip(wan, "addr", "add", f"{addr}/{C.WAN_PREFIX}", "dev", C.HOST_IF)
    # A default route keeps daemons from seeing "network unreachable"; it leads nowhere.
    ip(wan, "route", "add", "default", "dev", C.HOST_IF)

    if cfg.upstream_nat:
        isp = ns[C.UPSTREAM_NODE]
        _veth(rtr, C.RTR_WAN_IF, isp, C.ISP_CPE_IF)
        ip(isp, "addr", "add", f"{C.ISP_CPE_IP}/{C.ISP_PREFIX}", "dev", C.ISP_CPE_IF)
        _router(isp, C.RTR_WAN_IP, C.WAN_PREFIX, C.WAN_IPS[0])
        in_netns(isp, "nft", "-f", "-", input=C.isp_ruleset())
        _router(rtr, C.RTR_ISP_IP, C.ISP_PREFIX, cfg.rtr_gateway)
    else:
        _router(rtr, C.RTR_WAN_IP, C.WAN_PREFIX, cfg.rtr_gateway)

    if cfg.second_lan:
        rtr2 = ns["rtr2"]
        _lan(rtr2, C.RTR2_LAN_IP, {"lan2": (ns["lan2"], C.LAN2_IP)})
        _router(rtr2, C.RTR2_WAN_IP, C.WAN_PREFIX, cfg.router("rtr2").gateway)

    if cfg.ipv6:
        _dual_stack(ns)
