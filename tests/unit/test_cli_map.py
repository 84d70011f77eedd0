"""``natkit map list`` merges the router's UPnP table with natkit's records: a mapping made
with PCP or NAT-PMP is listed as such (issue 14: a PCP mapping was shown as UPnP)."""

from __future__ import annotations

from natkit.cli.map import with_recorded
from natkit.portmap.mapping import PortMapping

WAN = "100.200.0.1"


def mapping(method: str, external: int, internal: int = 8080, lease: int = 300,
            ip: str = "192.168.77.10", protocol: str = "tcp") -> PortMapping:  # fmt: skip
    return PortMapping(method, protocol, ip, internal, WAN, external, lease)  # type: ignore[arg-type]


def test_the_upnp_table_row_of_a_pcp_mapping_is_listed_as_pcp() -> None:
    recorded = [mapping("pcp", 8080, lease=3600), mapping("natpmp", 9090, internal=9090)]
    # The router's table shows both, as UPnP rows with the time left, and one of its own.
    table = [mapping("upnp", 8080, lease=3500), mapping("upnp", 9090, internal=9090, lease=10),
             mapping("upnp", 7000, internal=7000)]  # fmt: skip
    merged = with_recorded(recorded, table)
    assert [(m.external_port, m.method, m.lease) for m in merged] == [
        (8080, "pcp", 3500), (9090, "natpmp", 10), (7000, "upnp", 300)
    ]  # fmt: skip


def test_a_record_the_table_does_not_show_is_listed_once() -> None:
    recorded = [mapping("pcp", 8080)]
    assert with_recorded(recorded, []) == recorded
    assert with_recorded(recorded, [mapping("upnp", 8080)]) == recorded


def test_another_hosts_row_on_the_same_port_keeps_its_own_method() -> None:
    # Same external port and protocol, but another internal host: not natkit's mapping
    # (its record is stale: the router gave the port to someone else since).
    recorded = [mapping("pcp", 8080)]
    theirs = mapping("upnp", 8080, ip="192.168.77.11")
    assert with_recorded(recorded, [theirs]) == [theirs]


def test_udp_and_tcp_are_not_confused() -> None:
    recorded = [mapping("pcp", 8080, protocol="udp")]
    tcp = mapping("upnp", 8080)
    assert with_recorded(recorded, [tcp]) == [tcp, recorded[0]]
