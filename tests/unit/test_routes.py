from __future__ import annotations

import ipaddress

import pytest

from natkit.errors import DiscoveryError
from natkit.net.routes import (
    default_gateway,
    is_cgnat,
    is_public_ipv4,
    lan_network,
    parse_route_table,
)
from natkit.portmap.mapping import PortMapping

# /proc/net/route of the lab's lan host (addresses are little-endian hex).
ROUTES = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t014DA8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t004DA8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
bad line
"""


def test_parse_route_table() -> None:
    routes = parse_route_table(ROUTES)
    assert len(routes) == 3
    assert str(routes[0].gateway) == "192.168.77.1"
    assert routes[1].destination == ipaddress.IPv4Network("192.168.77.0/24")
    assert routes[1].gateway is None


def test_default_gateway_prefers_lowest_metric() -> None:
    assert default_gateway(parse_route_table(ROUTES)) == "192.168.77.1"
    with pytest.raises(DiscoveryError, match="no IPv4 default gateway"):
        default_gateway([])


def test_lan_network() -> None:
    routes = parse_route_table(ROUTES)
    assert lan_network("192.168.77.10", routes) == ipaddress.IPv4Network("192.168.77.0/24")
    assert lan_network("10.1.2.3", routes) == ipaddress.IPv4Network("10.1.2.0/24")


@pytest.mark.parametrize(
    ("ip", "public", "cgnat"),
    [
        ("100.200.0.1", True, False),
        ("8.8.8.8", True, False),
        ("192.168.1.1", False, False),
        ("10.0.0.1", False, False),
        ("172.20.0.1", False, False),
        ("100.64.0.1", False, True),
        ("100.127.255.254", False, True),
        ("127.0.0.1", False, False),
        ("169.254.1.1", False, False),
        ("", False, False),
        ("garbage", False, False),
    ],
)
def test_public_and_cgnat(ip: str, public: bool, cgnat: bool) -> None:
    assert is_public_ipv4(ip) is public
    assert is_cgnat(ip) is cgnat


def test_double_nat_is_not_presented_as_reachable() -> None:
    m = PortMapping("upnp", "tcp", "192.168.1.10", 8080, "10.0.0.7", 8080, 3600)
    assert not m.publicly_reachable and "private" in m.reachability_note
    m = PortMapping("upnp", "tcp", "192.168.1.10", 8080, "100.72.1.2", 8080, 3600)
    assert not m.publicly_reachable and "carrier-grade NAT" in m.reachability_note
    m = PortMapping("upnp", "tcp", "192.168.1.10", 8080, "100.200.0.1", 8080, 3600)
    assert m.publicly_reachable and m.to_json()["public_address"] == "100.200.0.1:8080"
