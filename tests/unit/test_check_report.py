"""The verdict of ``natkit check`` from its findings (pure: no network)."""

from __future__ import annotations

import json

from natkit.check.report import CheckReport, PortMapOffer
from natkit.check.run import DEFAULT_STUN_SERVERS, STUN_ENV, stun_servers

EIM, APDM = "endpoint-independent", "address-and-port-dependent"
PUBLIC = "100.200.0.1"


def report(**kw: object) -> CheckReport:
    base: dict[str, object] = dict(
        udp=True, public_ipv4=PUBLIC, local_ipv4="192.168.1.2", behind_nat=True,
        mapping=EIM, filtering=APDM,
    )  # fmt: skip
    base.update(kw)
    return CheckReport(**base)  # type: ignore[arg-type]


def offers(ip: str | None, public: bool, *methods: str) -> dict[str, PortMapOffer | None]:
    out: dict[str, PortMapOffer | None] = {"upnp": None, "natpmp": None, "pcp": None}
    for m in methods:
        out[m] = PortMapOffer(ip, public)
    return out


def test_a_public_mapping_equal_to_what_stun_sees_is_used() -> None:
    r = report(port_mapping=offers(PUBLIC, True, "upnp", "natpmp"))
    assert r.double_nat is False
    assert r.usable_mapping == "natpmp"  # preferred over UPnP
    assert r.verdict()["inbound_tcp"].startswith("router port mapping (NAT-PMP)")


def test_a_router_whose_address_differs_from_stun_is_double_nat() -> None:
    r = report(port_mapping=offers("100.201.0.2", True, "pcp"))
    assert r.double_nat is True and r.usable_mapping is None
    assert r.verdict()["inbound_tcp"].startswith("relay: the router is behind another NAT")


def test_a_private_router_address_without_stun_is_double_nat() -> None:
    r = report(public_ipv4=None, udp=False, port_mapping=offers("10.0.0.2", False, "upnp"))
    assert r.double_nat is True
    assert r.verdict()["direct_udp"].startswith("unknown: no STUN server answered")


def test_no_port_mapping_at_all() -> None:
    r = report()
    assert r.double_nat is None
    assert "offers no port mapping" in r.verdict()["inbound_tcp"]


def test_no_nat() -> None:
    r = report(behind_nat=False, local_ipv4=PUBLIC)
    v = r.verdict()
    assert v["inbound_tcp"].startswith("direct") and v["direct_udp"].startswith("likely")


def test_symmetric_nat_needs_turn_unless_the_router_maps() -> None:
    assert report(mapping=APDM).verdict()["direct_udp"].startswith("needs TURN")
    mapped = report(mapping=APDM, port_mapping=offers(PUBLIC, True, "pcp"))
    assert "port mapping" in mapped.verdict()["direct_udp"]


def test_unknown_mapping_is_said_not_guessed() -> None:
    assert report(mapping=None).verdict()["direct_udp"].startswith("unknown")


def test_json_has_the_documented_keys() -> None:
    data = json.loads(json.dumps(report(port_mapping=offers(PUBLIC, True, "pcp")).to_json()))
    for key in ("udp", "public_ipv4", "mapping", "filtering", "port_preserving",
                "hairpinning", "port_mapping", "double_nat"):  # fmt: skip
        assert key in data
    assert data["port_mapping"] == {
        "upnp": None, "natpmp": None, "pcp": {"external_ip": PUBLIC, "public": True},
    }  # fmt: skip


def test_servers_come_from_the_user_then_configuration_then_defaults(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(STUN_ENV, "a.example:1, b.example:2")
    assert stun_servers(["x:3478"]) == ["x:3478"]
    assert stun_servers([]) == ["a.example:1", "b.example:2"]
    monkeypatch.delenv(STUN_ENV)
    assert stun_servers([]) == list(DEFAULT_STUN_SERVERS)
