"""Reading the IPv6 default router and our global addresses from /proc (text as Linux writes
it: captured in the lab's LAN namespace, plus made-up lines for the cases it lacks)."""

from __future__ import annotations

from natkit.portmap.pinhole_addr import (
    Address6,
    parse_global_addresses,
    parse_ipv6_default_gateways,
)

# /proc/net/ipv6_route of the lab's lan node.
ROUTES = """\
20010db8007700000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000003 00000000 00000001     eth0
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 20010db8007700000000000000000001 00000400 00000001 00000000 00000003     eth0
00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 80200001       lo
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
"""
# /proc/net/if_inet6 of the lab's lan node.
ADDRS = """\
00000000000000000000000000000001 01 80 10 80       lo
20010db8007700000000000000000010 02 40 00 82     eth0
fe8000000000000050d856fffe2ee4d6 02 40 20 80     eth0
"""


def test_default_router_from_the_lab() -> None:
    assert parse_ipv6_default_gateways(ROUTES) == [("2001:db8:77::1", "eth0", 0x400)]


def test_best_metric_first_and_link_local_routers() -> None:
    text = ROUTES.replace("00000400", "00000500") + (
        "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
        "fe800000000000000000000000000001 00000064 00000001 00000000 00000003    wlan0\n"
        "garbage line\n"
        "zz000000000000000000000000000000 00 00000000000000000000000000000000 00 "
        "fe800000000000000000000000000001 00000064 00000001 00000000 00000003    wlan0\n"
    )
    assert parse_ipv6_default_gateways(text) == [
        ("fe80::1", "wlan0", 100),
        ("2001:db8:77::1", "eth0", 0x500),
    ]


def test_global_address_from_the_lab() -> None:
    assert parse_global_addresses(ADDRS) == [Address6("2001:db8:77::10", "eth0", False)]


def test_unusable_addresses_are_skipped_and_stable_ones_come_first() -> None:
    text = (
        "20010db8000000000000000000000001 02 40 00 01     eth0\n"  # temporary (privacy)
        "20010db8000000000000000000000002 02 40 00 00     eth0\n"  # stable
        "20010db8000000000000000000000003 02 40 00 40     eth0\n"  # tentative
        "20010db8000000000000000000000004 02 40 00 20     eth0\n"  # deprecated
        "20010db8000000000000000000000005 02 40 00 08     eth0\n"  # DAD failed
        "fd000000000000000000000000000001 02 40 00 00     eth0\n"  # unique local
        "ff020000000000000000000000000001 02 40 00 00     eth0\n"  # multicast
        "not hex at all 02 40 00 00 eth0\n"
    )
    assert parse_global_addresses(text) == [
        Address6("2001:db8::2", "eth0", False),
        Address6("2001:db8::1", "eth0", True),
    ]
