"""What a lab is made of: its nodes, addresses, firewall and router daemon settings.

Pure data and text generation, no side effects, so that the rules can be read and tested.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Literal

NatBehaviour = Literal["eim", "random"]
PortmapProtocol = Literal["upnp", "natpmp", "pcp"]

PORTMAP_PROTOCOLS: tuple[PortmapProtocol, ...] = ("upnp", "natpmp", "pcp")
NAT_BEHAVIOURS: tuple[NatBehaviour, ...] = ("eim", "random")

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
RTR_WAN_IP = "100.200.0.1"
WAN_IPS = ("100.200.0.2", "100.200.0.3")

# Interface names inside the namespaces (each namespace has its own name space for them).
RTR_WAN_IF = "wan0"
RTR_LAN_BRIDGE = "br-lan"
HOST_IF = "eth0"

UPNP_HTTP_PORT = 5000
NODES = ("lan", "dev", "rtr", "wan")

# Every subnet a lab uses: the test suite's network guard allows exactly these.
LAB_SUBNETS = (f"{LAN_NET}/{LAN_PREFIX}", f"{WAN_NET}/{WAN_PREFIX}")


@dataclasses.dataclass(frozen=True)
class LabConfig:
    name: str = "natkit"
    portmap: frozenset[PortmapProtocol] = frozenset(PORTMAP_PROTOCOLS)
    nat: NatBehaviour = "eim"
    upnp_port: int = UPNP_HTTP_PORT
    router_uuid: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4()))

    def netns(self, node: str) -> str:
        return f"{self.name}-{node}"

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "portmap": sorted(self.portmap),
            "nat": self.nat,
            "upnp_port": self.upnp_port,
            "router_uuid": self.router_uuid,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> LabConfig:
        portmap = data.get("portmap", [])
        assert isinstance(portmap, list)
        return cls(
            name=str(data["name"]),
            portmap=frozenset(p for p in PORTMAP_PROTOCOLS if p in portmap),
            nat="random" if data.get("nat") == "random" else "eim",
            upnp_port=int(str(data.get("upnp_port", UPNP_HTTP_PORT))),
            router_uuid=str(data.get("router_uuid", uuid.uuid4())),
        )


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


def router_ruleset(cfg: LabConfig) -> str:
    """The router's whole nftables ruleset: a home-router firewall, NAT, miniupnpd's chains.

    Unsolicited packets from the WAN are dropped (not merely left unanswered): otherwise the
    first one leaves an UNREPLIED conntrack entry that pushes the next outbound mapping onto a
    new port, and a port-keeping NAT starts to look symmetric.
    """
    wan = RTR_WAN_IF
    masquerade = "masquerade random" if cfg.nat == "random" else "masquerade"
    pmp_filter = ""
    # miniupnpd serves NAT-PMP (version 0) and PCP (version 2) on one socket; the first
    # payload byte tells them apart, so the firewall can switch each off on its own.
    if "natpmp" in cfg.portmap and "pcp" not in cfg.portmap:
        pmp_filter = "udp dport 5351 @th,64,8 2 drop"
    elif "pcp" in cfg.portmap and "natpmp" not in cfg.portmap:
        pmp_filter = "udp dport 5351 @th,64,8 0 drop"
    return f"""\
flush ruleset
table inet filter {{
    chain input {{
        type filter hook input priority 0; policy accept;
        {pmp_filter}
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
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        jump postrouting_miniupnpd
        oifname "{wan}" {masquerade}
    }}
    chain prerouting_miniupnpd {{
    }}
    chain postrouting_miniupnpd {{
    }}
}}
"""


def miniupnpd_conf(cfg: LabConfig) -> str:
    """miniupnpd.conf for the router (keys that miniupnpd 2.3.1 accepts)."""
    pmp = "yes" if ("natpmp" in cfg.portmap or "pcp" in cfg.portmap) else "no"
    upnp = "yes" if "upnp" in cfg.portmap else "no"
    return f"""\
ext_ifname={RTR_WAN_IF}
listening_ip={RTR_LAN_BRIDGE}
port={cfg.upnp_port}
enable_upnp={upnp}
enable_natpmp={pmp}
secure_mode=yes
system_uptime=no
uuid={cfg.router_uuid}
friendly_name=natkit lab router ({cfg.name})
notify_interval=30
clean_ruleset_interval=600
allow 1024-65535 {LAN_NET}/{LAN_PREFIX} 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"""
