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


def _lan(rtr: str, hosts: dict[str, tuple[str, str]]) -> None:
    """The home network: a bridge on the router, one veth per LAN host (node -> ns, address)."""
    ip(rtr, "link", "add", C.RTR_LAN_BRIDGE, "type", "bridge", "mcast_snooping", "0")
    ip(rtr, "addr", "add", f"{C.RTR_LAN_IP}/{C.LAN_PREFIX}", "dev", C.RTR_LAN_BRIDGE)
    ip(rtr, "link", "set", C.RTR_LAN_BRIDGE, "up")
    for node, (ns, addr) in hosts.items():
        port = f"{node}-p"
        _veth(rtr, port, ns, C.HOST_IF)
        ip(rtr, "link", "set", port, "master", C.RTR_LAN_BRIDGE)
        ip(ns, "addr", "add", f"{addr}/{C.LAN_PREFIX}", "dev", C.HOST_IF)
        ip(ns, "route", "add", "default", "via", C.RTR_LAN_IP)


def build(cfg: LabConfig) -> None:
    """Create every namespace of ``cfg`` and wire them (no daemons, no rtr ruleset)."""
    ns = {node: cfg.netns(node) for node in cfg.nodes}
    for name in ns.values():
        _add_netns(name)
    rtr, wan = ns["rtr"], ns["wan"]
    _lan(rtr, {"lan": (ns["lan"], C.LAN_IP), "dev": (ns["dev"], C.DEV_IP)})

    # The public address 100.200.0.1 sits on whatever faces wan: rtr, or isp in front of it.
    edge = ns.get(C.UPSTREAM_NODE, rtr)
    _veth(edge, C.RTR_WAN_IF, wan, C.HOST_IF)
    ip(edge, "addr", "add", f"{C.RTR_WAN_IP}/{C.WAN_PREFIX}", "dev", C.RTR_WAN_IF)
    for addr in C.WAN_IPS:
        ip(wan, "addr", "add", f"{addr}/{C.WAN_PREFIX}", "dev", C.HOST_IF)
    # A default route keeps daemons from seeing "network unreachable"; it leads nowhere.
    ip(wan, "route", "add", "default", "dev", C.HOST_IF)

    if cfg.upstream_nat:
        isp = ns[C.UPSTREAM_NODE]
        _veth(rtr, C.RTR_WAN_IF, isp, C.ISP_CPE_IF)
        ip(rtr, "addr", "add", f"{C.RTR_ISP_IP}/{C.ISP_PREFIX}", "dev", C.RTR_WAN_IF)
        ip(isp, "addr", "add", f"{C.ISP_CPE_IP}/{C.ISP_PREFIX}", "dev", C.ISP_CPE_IF)
        ip(isp, "route", "add", "default", "via", C.WAN_IPS[0])
        in_netns(isp, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        in_netns(isp, "nft", "-f", "-", input=C.isp_ruleset())
    ip(rtr, "route", "add", "default", "via", cfg.rtr_gateway)
    in_netns(rtr, "sysctl", "-qw", "net.ipv4.ip_forward=1")
