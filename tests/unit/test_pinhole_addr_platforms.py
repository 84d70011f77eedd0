"""The IPv6 router and global address on macOS and Windows, from recorded outputs (see
``routes_samples/README.md`` for what each is modelled on) and made-up interface lists.
Runs on Linux: ``sys.platform`` is set to the platform under test, the command runner
answers with the recorded output, ifaddr answers with the adapters given, and opening
anything under /proc fails the test."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import ifaddr
import pytest
from hypothesis import given
from hypothesis import strategies as st

from natkit.errors import DiscoveryError
from natkit.net.routes6 import (
    Address6,
    Router6,
    interface_addresses,
    parse_ifconfig6,
    parse_route_get6,
    parse_route_print6,
    with_flags,
)
from natkit.portmap import pinhole_addr, pinhole_mappers
from tests.unit.test_routes_platforms import SAMPLES, fake_commands, no_proc, sample

__all__ = ["no_proc"]  # the fixture, shared with the IPv4 reader's tests

ROUTER = "fe80::a2b5:3cff:fe12:3456"
STABLE = "2001:db8:1234:5600:1c2b:3d4e:5f60:7182"
TEMPORARY = "2001:db8:1234:5600:a1b2:c3d4:e5f6:789a"
DEPRECATED = "2001:db8:1234:5600:9f8e:7d6c:5b4a:3921"


def adapter(name: str, index: int, *addresses: str) -> ifaddr.Adapter:
    """An interface as ifaddr lists it: IPv6 as (address, flowinfo, scope id)."""
    ips = [
        ifaddr.IP(a, 24, name) if "." in a else ifaddr.IP((a, 0, 0), 64, name) for a in addresses
    ]
    return ifaddr.Adapter(name, name, ips, index=index)


# What getifaddrs gives on the Mac of the samples: the temporary address listed first.
MAC_ADAPTERS = [
    adapter("lo0", 1, "127.0.0.1", "::1", "fe80::1"),
    adapter(
        "en0",
        6,
        "192.168.1.37",
        "fe80::1c2b:3d4e:5f60:7182",
        TEMPORARY,
        DEPRECATED,
        STABLE,
        "fd12:3456:789a:1::37",
    ),
    adapter("utun4", 19, "fe80::ce81:b1c:bd2c:69e", "2001:db8:ffff::2"),  # a VPN's own
]


@pytest.fixture
def mac(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(ifaddr, "get_adapters", lambda: MAC_ADAPTERS)
    return fake_commands(
        monkeypatch,
        {
            "route": sample("darwin_route_get_inet6_default.txt"),
            "ifconfig": sample("darwin_ifconfig_en0_inet6.txt"),
        },
    )


# ---- parsers -------------------------------------------------------------------------------


def test_macos_route_get_inet6_default() -> None:
    assert parse_route_get6(sample("darwin_route_get_inet6_default.txt")) == [
        Router6(f"{ROUTER}%en0", "en0", 0)
    ]
    # A link-local gateway printed without its zone gets the interface's.
    assert parse_route_get6("destination: default\ngateway: fe80::1\ninterface: en5\n") == [
        Router6("fe80::1%en5", "en5", 0)
    ]
    assert parse_route_get6("destination: ::\ngateway: 2001:db8::1\ninterface: en0\n") == [
        Router6("2001:db8::1", "en0", 0)
    ]
    # No default (route prints only an error, on stderr); a point-to-point default.
    assert parse_route_get6("") == []
    assert parse_route_get6("destination: default\n    gateway: utun3\ninterface: utun3") == []
    assert parse_route_get6("destination: 2001:db8::\ngateway: fe80::1%en0\n") == []


def test_windows_route_print6_english() -> None:
    # The Teredo default is on-link (no router); the persistent route is configuration.
    assert parse_route_print6(sample("windows_route_print6_en.txt")) == [
        Router6(f"{ROUTER}%14", "14", 281)
    ]


def test_windows_route_print6_german_code_page_850() -> None:
    raw = (SAMPLES / "windows_route_print6_de.txt").read_bytes()
    assert "Ständige".encode("cp850") in raw
    # The gateway sits alone on the next line; a global router address needs no zone.
    assert parse_route_print6(raw.decode("utf-8", "replace")) == [
        Router6("2001:db8:1234:5600::1", "14", 281)
    ]


def test_windows_route_print6_best_metric_first() -> None:
    text = (
        " If Metric Network Destination      Gateway\n"
        " 22    291 ::/0                     fe80::5\n"
        " 14     25 ::/0                     fe80::1\n"
        "==========\n"
    )
    assert parse_route_print6(text) == [
        Router6("fe80::1%14", "14", 25),
        Router6("fe80::5%22", "22", 291),
    ]


def test_macos_ifconfig_flags() -> None:
    flags = parse_ifconfig6(sample("darwin_ifconfig_en0_inet6.txt"))
    assert flags[STABLE] == {"autoconf", "secured"}
    assert flags[TEMPORARY] == {"autoconf", "temporary"}
    assert "deprecated" in flags[DEPRECATED]
    assert flags["fe80::1c2b:3d4e:5f60:7182"] == {"secured"}  # scopeid's value is no flag


def test_interface_addresses_keep_only_publishable_ones() -> None:
    found = interface_addresses(MAC_ADAPTERS)
    assert [a.address for a in found if a.iface == "en0"] == [TEMPORARY, DEPRECATED, STABLE]
    assert Address6("2001:db8:ffff::2", "utun4", False) in found
    # Windows names interfaces by index, as its routing table does.
    assert {a.iface for a in interface_addresses(MAC_ADAPTERS, windows=True)} == {"6", "19"}
    flagged = with_flags(found, parse_ifconfig6(sample("darwin_ifconfig_en0_inet6.txt")))
    assert [(a.address, a.temporary) for a in flagged if a.iface == "en0"] == [
        (STABLE, False),
        (TEMPORARY, True),
    ]


# ---- the readers ---------------------------------------------------------------------------


@pytest.mark.usefixtures("no_proc")
def test_macos_router_and_address(mac: list[list[str]]) -> None:
    assert pinhole_addr.ipv6_gateway() == (f"{ROUTER}%en0", "en0")
    assert mac[0] == ["/sbin/route", "-n", "get", "-inet6", "default"]
    # The stable address, though getifaddrs lists the temporary one first.
    assert pinhole_addr.global_ipv6("en0") == STABLE
    assert ["/sbin/ifconfig", "en0", "inet6"] in mac
    assert ["/sbin/ifconfig", "utun4", "inet6"] not in mac  # only the interface asked about
    # What a pinhole is opened for: the default route's router and interface.
    assert pinhole_mappers._where(None, None) == (f"{ROUTER}%en0", STABLE)
    assert pinhole_mappers._where("fe80::9%en0", None)[0] == "fe80::9%en0"


@pytest.mark.usefixtures("no_proc")
def test_macos_address_without_ifconfig(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(ifaddr, "get_adapters", lambda: MAC_ADAPTERS)
    fake_commands(monkeypatch, {"ifconfig": DiscoveryError("cannot run /sbin/ifconfig")})
    # Nothing tells temporary ones apart: the first global address listed.
    assert pinhole_addr.global_ipv6("en0") == TEMPORARY
    assert pinhole_addr.global_ipv6("utun4") == "2001:db8:ffff::2"


@pytest.mark.usefixtures("no_proc")
def test_windows_router_and_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("SYSTEMROOT", r"C:\Windows")
    ethernet = adapter("{4D36E972-E325-11CE}", 14, "192.168.1.37", "fe80::1c2b:3d4e:5f60:7182",
                       STABLE, TEMPORARY)  # fmt: skip
    teredo = adapter("{E2B9C3F1-0D6A-4B5E}", 19, "2001:0:2851:782c:1c2b:3d4e:a0b1:c2d3")
    monkeypatch.setattr(ifaddr, "get_adapters", lambda: [teredo, ethernet])
    ran = fake_commands(monkeypatch, {"route.exe": sample("windows_route_print6_en.txt")})
    assert pinhole_addr.ipv6_gateway() == (f"{ROUTER}%14", "14")
    assert ran[0][0].startswith("C:\\Windows") and ran[0][0].endswith("route.exe")
    assert ran[0][1:] == ["print", "-6"]
    # On the router's interface, not Teredo's (listed first).
    assert pinhole_mappers._where(None, None) == (f"{ROUTER}%14", STABLE)


@pytest.mark.usefixtures("no_proc")
@pytest.mark.parametrize(
    ("platform", "answers", "message"),
    [
        # route(8) exits 1 when there is no IPv6 default: it cannot tell "none" from "failed".
        (
            "darwin",
            {
                "route": DiscoveryError(
                    "cannot read the routing table with route: it exited with status 1"
                )
            },
            r"cannot find the IPv6 default router: .*status 1, as it does when there is no IPv6 "
            r"default route; name the IPv6 router with --gateway",
        ),
        (
            "win32",
            {"route.exe": DiscoveryError("cannot run C:\\Windows\\System32\\route.exe")},
            r"cannot find the IPv6 default router: cannot run .*route.exe; name the IPv6 router "
            r"with --gateway",
        ),
        (
            "win32",
            {"route.exe": sample("windows_route_print_en.txt")},  # only IPv4 rows
            r"no IPv6 default route: .*\(if there is one, name the IPv6 router with --gateway",
        ),
        (
            "darwin",
            {"route": "destination: default\ngateway: utun3\ninterface: utun3\n"},
            r"no IPv6 default route",
        ),
    ],
)
def test_a_router_that_cannot_be_found_is_named_in_the_error(
    monkeypatch: pytest.MonkeyPatch, platform: str, answers: dict[str, str | DiscoveryError],
    message: str,
) -> None:  # fmt: skip
    monkeypatch.setattr(sys, "platform", platform)
    fake_commands(monkeypatch, answers)
    with pytest.raises(DiscoveryError, match=message):
        pinhole_addr.ipv6_gateway()


@pytest.mark.usefixtures("no_proc")
def test_no_global_address_on_the_interfaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    local_only = adapter("{4D36E972}", 14, "192.168.1.37", "fe80::1", "fd12::37", "::1")
    monkeypatch.setattr(ifaddr, "get_adapters", lambda: [local_only])
    with pytest.raises(DiscoveryError, match="no global IPv6 address on 14"):
        pinhole_addr.global_ipv6("14")


def test_linux_without_a_readable_table_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(pinhole_addr, "ROUTE6_FILES", ("/nonexistent/ipv6_route",))
    with pytest.raises(DiscoveryError, match=r"cannot read /nonexistent/ipv6_route.*--gateway"):
        pinhole_addr.ipv6_gateway()


def test_linux_still_reads_proc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    table = tmp_path / "ipv6_route"
    table.write_text(
        "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
        "fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n"
    )
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(pinhole_addr, "ROUTE6_FILES", (str(table),))
    monkeypatch.setattr(ifaddr, "get_adapters", lambda: pytest.fail("ifaddr used on Linux"))
    assert pinhole_addr.ipv6_gateway() == ("fe80::1%eth0", "eth0")


# ---- no text makes a parser fail -----------------------------------------------------------

_TOKENS = sorted(
    {
        token
        for name in (
            "darwin_route_get_inet6_default.txt",
            "windows_route_print6_en.txt",
            "darwin_ifconfig_en0_inet6.txt",
        )
        for token in sample(name).split()
    }
    | {"::/0", "fe80::1%", "%", ":", "====", "gateway:", "destination:", "default", "14", ""}
)


@given(
    st.one_of(
        st.text(),
        st.lists(st.lists(st.sampled_from(_TOKENS), max_size=6).map(" ".join), max_size=20).map(
            "\n".join
        ),
    )
)
def test_the_parsers_take_any_text(text: str) -> None:
    for router in parse_route_get6(text) + parse_route_print6(text):
        ipaddress.IPv6Address(router.address.split("%")[0])
    for address in parse_ifconfig6(text):
        ipaddress.IPv6Address(address)
