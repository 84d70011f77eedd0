"""What a lab is made of: its nodes, addresses, firewall and router daemon settings.

Pure data and text generation, no side effects, so that the rules can be read and tested.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Literal

NatBehaviour = Literal["eim", "random", "full-cone"]
PortmapProtocol = Literal["upnp", "natpmp", "pcp"]
RouterNode = Literal["rtr", "rtr2"]

PORTMAP_PROTOCOLS: tuple[PortmapProtocol, ...] = ("upnp", "natpmp", "pcp")
# eim: port-keeping masquerade (endpoint-independent mapping, address-and-port-dependent
# filtering); random: a new port per destination ("symmetric"); full-cone: eim plus
# endpoint-independent filtering towards the lan host.
NAT_BEHAVIOURS: tuple[NatBehaviour, ...] = ("eim", "random", "full-cone")

# The LAN is a home network. The "Internet" must use addresses outside every reserved
# block, or miniupnpd refuses to forward (see shared/lab-facts.md): 100.200/16 is not
# inside 100.64/10 (CGNAT). None of these ever leaves the lab's namespaces.
LAN_PREFIX = 24
LAN_NET = "192.168.77.0"
RTR_LAN_IP = "192.168.77.1"
LAN_IP = "192.168.77.10"
DEV_IP = "192.168.77.20"
WAN_PREFIX = 24
WAN_NET = "100.200.0.0"
RTR_WAN_IP = "100.200.0.1"  # the lab's public address (held by isp when there is one)
WAN_IPS = ("100.200.0.2", "100.200.0.3")
# Double NAT (--upstream-nat): isp sits between rtr and wan. rtr's WAN side moves to
# 100.201.0.0/24, also outside every reserved block, so miniupnpd still maps and reports
# 100.201.0.2 as its external address while STUN sees 100.200.0.1: the mismatch is how a
# client detects the second NAT.
ISP_PREFIX = 24
ISP_NET = "100.201.0.0"
ISP_CPE_IP = "100.201.0.1"  # isp's side towards the customer's router; rtr's gateway
RTR_ISP_IP = "100.201.0.2"  # rtr's WAN address behind isp
# The second LAN (--second-lan): a peer host lan2 behind its own router rtr2, whose WAN side
# shares the Internet segment with rtr (or isp), so traffic between the two LANs crosses the
# segment and both NATs. Its WAN address, like rtr's, lies outside every reserved block.
LAN2_NET = "192.168.78.0"
RTR2_LAN_IP = "192.168.78.1"
LAN2_IP = "192.168.78.10"
RTR2_WAN_IP = "100.200.0.4"  # .1 is rtr (or isp), .2 and .3 are wan

# IPv6 (dual stack), from the documentation prefix 2001:db8::/32: the LAN is a global /64 with
# no IPv6 NAT, so a LAN host is reachable from the Internet only through a pinhole in rtr's
# firewall. miniupnpd 2.3.1 makes pinholes for these addresses (shared/lab-facts.md,
# docs/miniupnpd-ipv6.md). Only rtr and its side (lan, dev, wan) get IPv6; isp and rtr2 do
# not, so a lab with --upstream-nat is IPv4 only.
LAN6_PREFIX = 64
LAN6_NET = "2001:db8:77::"
RTR_LAN_IP6 = "2001:db8:77::1"
LAN_IP6 = "2001:db8:77::10"
DEV_IP6 = "2001:db8:77::20"
WAN6_PREFIX = 64
WAN6_NET = "2001:db8:201::"
RTR_WAN_IP6 = "2001:db8:201::1"
WAN_IPS6 = ("2001:db8:201::2", "2001:db8:201::3")

# Interface names inside the namespaces (each namespace has its own name space for them).
RTR_WAN_IF = "wan0"
RTR_LAN_BRIDGE = "br-lan"
HOST_IF = "eth0"
ISP_WAN_IF = RTR_WAN_IF  # isp's port towards wan
ISP_CPE_IF = "cpe0"  # isp's port towards rtr

UPNP_HTTP_PORT = 5000
NATPMP_PORT = 5351
NODES = ("lan", "dev", "rtr", "wan")  # every lab
UPSTREAM_NODE = "isp"  # only with --upstream-nat
ALL_NODES = (*NODES, UPSTREAM_NODE)  # the first LAN's side, as before there was a second one
SECOND_LAN_NODES = ("lan2", "rtr2")  # only with --second-lan
# Every node any lab may have: what down() and `make clean-labs` look for.
EVERY_NODE = (*ALL_NODES, *SECOND_LAN_NODES)
ROUTERS: tuple[RouterNode, ...] = ("rtr", "rtr2")

# coturn on wan: STUN (RFC 5389/5780) and TURN (RFC 5766). RFC 5780 needs two addresses; the
# alternate port is the port + 1. coturn 4.6.1 pairs only the *first* listening address with
# the second: asked on WAN_IPS[1], it names WAN_IPS[1] itself as OTHER-ADDRESS and answers a
# change-IP request from there. So behaviour discovery must start at STUN_PRIMARY.
STUN_PORT = 3478
STUN_ALT_PORT = STUN_PORT + 1
STUN_PRIMARY = (WAN_IPS[0], STUN_PORT)
STUN_ALTERNATE = (WAN_IPS[1], STUN_ALT_PORT)
TURN_USER = "natkit"
TURN_PASSWORD = "natkit-lab-turn"
TURN_REALM = "lab.natkit"
TURN_RELAY_IP = WAN_IPS[0]
TURN_RELAY_PORTS = (49160, 49200)

# Every subnet a lab uses: the test suite's network guard allows exactly these.
LAB_SUBNETS = (
    f"{LAN_NET}/{LAN_PREFIX}",
    f"{WAN_NET}/{WAN_PREFIX}",
    f"{ISP_NET}/{ISP_PREFIX}",
    f"{LAN2_NET}/{LAN_PREFIX}",
    f"{LAN6_NET}/{LAN6_PREFIX}",
    f"{WAN6_NET}/{WAN6_PREFIX}",
)


@dataclasses.dataclass(frozen=True)
class Router:
    """One home router of a lab as the ruleset, miniupnpd.conf and the status see it."""

    node: RouterNode
    host: str  # the LAN host a full cone forwards to ("lan" or "lan2")
    lan_net: str
    lan_ip: str  # the router's own LAN address: gateway, UPnP and NAT-PMP server
    host_ip: str
    wan_ip: str  # what miniupnpd reports as the external address
    gateway: str
    nat: NatBehaviour
    portmap: frozenset[PortmapProtocol]
    upnp_port: int
    uuid: str

    @property
    def lan_subnet(self) -> str:
        return f"{self.lan_net}/{LAN_PREFIX}"


@dataclasses.dataclass(frozen=True)
class LabConfig:
    name: str = "natkit"
    portmap: frozenset[PortmapProtocol] = frozenset(PORTMAP_PROTOCOLS)
    nat: NatBehaviour = "eim"
    upnp_port: int = UPNP_HTTP_PORT
    router_uuid: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4()))
    coturn: bool = True  # a STUN/TURN server on wan
    upstream_nat: bool = False  # double NAT: a carrier NAT (isp) between rtr and wan
    # A second LAN for peer-to-peer tests: lan2 behind rtr2, each setting on its own.
    second_lan: bool = False
    nat2: NatBehaviour = "eim"
    portmap2: frozenset[PortmapProtocol] = frozenset(PORTMAP_PROTOCOLS)
    upnp_port2: int = UPNP_HTTP_PORT

    def netns(self, node: str) -> str:
        return f"{self.name}-{node}"

    @property
    def nodes(self) -> tuple[str, ...]:
        first = ALL_NODES if self.upstream_nat else NODES
        return (*first, *SECOND_LAN_NODES) if self.second_lan else first

    @property
    def routers(self) -> tuple[RouterNode, ...]:
        return ROUTERS if self.second_lan else ("rtr",)

    def router(self, node: RouterNode = "rtr") -> Router:
        """``rtr`` or (with ``second_lan``) ``rtr2``; ValueError for one the lab lacks."""
        if node == "rtr":
            return Router(
                node="rtr",
                host="lan",
                lan_net=LAN_NET,
                lan_ip=RTR_LAN_IP,
                host_ip=LAN_IP,
                wan_ip=self.rtr_wan_ip,
                gateway=self.rtr_gateway,
                nat=self.nat,
                portmap=self.portmap,
                upnp_port=self.upnp_port,
                uuid=self.router_uuid,
            )
        if node == "rtr2" and self.second_lan:
            return Router(
                node="rtr2",
                host="lan2",
                lan_net=LAN2_NET,
                lan_ip=RTR2_LAN_IP,
                host_ip=LAN2_IP,
                wan_ip=RTR2_WAN_IP,
                gateway=WAN_IPS[0],  # rtr2 is never behind isp: --upstream-nat is rtr's
                nat=self.nat2,
                portmap=self.portmap2,
                upnp_port=self.upnp_port2,
                # Derived, so that the two IGDs differ and a state file needs no new key.
                uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"natkit-lab:{self.router_uuid}:rtr2")),
            )
        raise ValueError(f"lab {self.name!r} has no router {node!r} (rtr2 needs --second-lan)")

    @property
    def ipv6(self) -> bool:
        """Dual stack on rtr's side: every lab but one with a carrier NAT (isp has no IPv6)."""
        return not self.upstream_nat

    @property
    def rtr_wan_ip(self) -> str:
        """The home router's WAN address: what miniupnpd reports as its external address."""
        return RTR_ISP_IP if self.upstream_nat else RTR_WAN_IP

    @property
    def rtr_gateway(self) -> str:
        return ISP_CPE_IP if self.upstream_nat else WAN_IPS[0]

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "portmap": sorted(self.portmap),
            "nat": self.nat,
            "upnp_port": self.upnp_port,
            "router_uuid": self.router_uuid,
            "coturn": self.coturn,
            "upstream_nat": self.upstream_nat,
            "second_lan": self.second_lan,
            "nat2": self.nat2,
            "portmap2": sorted(self.portmap2),
            "upnp_port2": self.upnp_port2,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> LabConfig:
        portmap = data.get("portmap", [])
        portmap2 = data.get("portmap2", list(PORTMAP_PROTOCOLS))
        assert isinstance(portmap, list) and isinstance(portmap2, list)
        return cls(
            name=str(data["name"]),
            portmap=frozenset(p for p in PORTMAP_PROTOCOLS if p in portmap),
            nat=parse_nat(str(data.get("nat", "eim"))),
            upnp_port=int(str(data.get("upnp_port", UPNP_HTTP_PORT))),
            router_uuid=str(data.get("router_uuid", uuid.uuid4())),
            coturn=data.get("coturn", True) is True,
            upstream_nat=data.get("upstream_nat", False) is True,
            second_lan=data.get("second_lan", False) is True,
            nat2=parse_nat(str(data.get("nat2", "eim"))),
            portmap2=frozenset(p for p in PORTMAP_PROTOCOLS if p in portmap2),
            upnp_port2=int(str(data.get("upnp_port2", UPNP_HTTP_PORT))),
        )


def parse_nat(text: str) -> NatBehaviour:
    """Parse ``--nat``: eim, random or full-cone."""
    for nat in NAT_BEHAVIOURS:
        if text.strip().lower() == nat:
            return nat
    raise ValueError(f"unknown NAT behaviour {text!r} (use {', '.join(NAT_BEHAVIOURS)})")


def parse_portmap(text: str) -> frozenset[PortmapProtocol]:
    """Parse ``--portmap``: a comma list of upnp, natpmp, pcp; or ``none``/``all``."""
    text = text.strip().lower()
    if text in ("none", ""):
        return frozenset()
    if text == "all":
        return frozenset(PORTMAP_PROTOCOLS)
    chosen: set[PortmapProtocol] = set()
    for word in text.split(","):
        word = word.strip()
        for proto in PORTMAP_PROTOCOLS:
            if word == proto:
                chosen.add(proto)
                break
        else:
            raise ValueError(
                f"unknown port-mapping protocol {word!r} (use upnp, natpmp, pcp or none)"
            )
    return frozenset(chosen)


def router_ruleset(cfg: LabConfig, node: RouterNode = "rtr") -> str:
    """A router's whole nftables ruleset: a home-router firewall, NAT, miniupnpd's chains.

    Unsolicited packets from the WAN are dropped (not merely left unanswered): otherwise the
    first one leaves an UNREPLIED conntrack entry that pushes the next outbound mapping onto a
    new port, and a port-keeping NAT starts to look symmetric.

    ``full-cone`` forwards every other inbound UDP port to the lan host (port kept), which is
    endpoint-independent filtering for it: after lan sent from port P, anyone reaches it at
    public:P. It comes after miniupnpd's chain, so port mappings still win. Both routers of a
    lab get the same rules, each with its own settings and LAN host (``node``).
    """
    router = cfg.router(node)
    wan = RTR_WAN_IF
    # IPv6 (rtr only): neighbour discovery from the WAN must reach the router itself; any other
    # unsolicited inbound IPv6 meets the forward chain's drop, which sits after the jump to
    # miniupnpd in the same base chain so that a pinhole's accept wins (an accept in another
    # base chain would not stop this drop).
    # The table is inet: IPv6 leaves before the masquerade, routed without NAT.
    nd_accept = no_nat66 = ""
    if node == "rtr" and cfg.ipv6:
        nd_accept = (
            f'iifname "{wan}" icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept'
        )
        no_nat66 = f'oifname "{wan}" meta nfproto ipv6 accept'

    masquerade = "masquerade random" if router.nat == "random" else "masquerade"
    full_cone = ""
    if router.nat == "full-cone":
        full_cone = f'iifname "{wan}" udp dport 1024-65535 dnat ip to {router.host_ip}'
    pmp_filter = ""
    # miniupnpd serves NAT-PMP (version 0) and PCP (version 2) on one socket; the first
    # payload byte tells them apart, so the firewall can switch each off on its own.
    if "natpmp" in router.portmap and "pcp" not in router.portmap:
        pmp_filter = f"udp dport {NATPMP_PORT} @th,64,8 2 drop"
    elif "pcp" in router.portmap and "natpmp" not in router.portmap:
        pmp_filter = f"udp dport {NATPMP_PORT} @th,64,8 0 drop"
    return f"""\
flush ruleset
table inet filter {{
    chain input {{
        type filter hook input priority 0; policy accept;
        {pmp_filter}
        {nd_accept}
        iifname "{wan}" ct state established,related accept
        iifname "{wan}" drop
    }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        jump miniupnpd
        iifname "{wan}" ct state established,related accept
        iifname "{wan}" ct status dnat accept
        iifname "{wan}" drop
    }}
    chain miniupnpd {{
    }}
    chain prerouting {{
        type nat hook prerouting priority -100; policy accept;
        jump prerouting_miniupnpd
        {full_cone}
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        jump postrouting_miniupnpd
        {no_nat66}
        oifname "{wan}" {masquerade}
    }}
    chain prerouting_miniupnpd {{
    }}
    chain postrouting_miniupnpd {{
    }}
}}
"""


def isp_ruleset() -> str:
    """The carrier NAT's ruleset: plain masquerade, and inbound only as replies.

    Like a carrier-grade NAT it offers no port mapping and drops unsolicited packets, so a
    mapping made on the home router is not reachable from the Internet.
    """
    wan = ISP_WAN_IF
    return f"""\
flush ruleset
table inet filter {{
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "{wan}" ct state established,related accept
        iifname "{wan}" drop
    }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        iifname "{wan}" ct state established,related accept
        iifname "{wan}" drop
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        oifname "{wan}" masquerade
    }}
}}
"""


def miniupnpd_conf(cfg: LabConfig, node: RouterNode = "rtr") -> str:
    """miniupnpd.conf for a router (keys that miniupnpd 2.3.1 accepts)."""
    router = cfg.router(node)
    pmp = "yes" if ("natpmp" in router.portmap or "pcp" in router.portmap) else "no"
    upnp = "yes" if "upnp" in router.portmap else "no"
    which = "" if node == "rtr" else f" {node}"
    return f"""\
ext_ifname={RTR_WAN_IF}
listening_ip={RTR_LAN_BRIDGE}
port={router.upnp_port}
enable_upnp={upnp}
enable_natpmp={pmp}
secure_mode=yes
system_uptime=no
uuid={router.uuid}
friendly_name=natkit lab router{which} ({cfg.name})
notify_interval=30
clean_ruleset_interval=600
allow 1024-65535 {router.lan_subnet} 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"""
