"""The pure parts of issue 13's UPnP work: WAN service variants and their ranking, recovery
from a broken description, the search plan, refusals without a UPnP code."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natkit.errors import NatkitError, ProtocolError
from natkit.net.routes_model import Route
from natkit.portmap import description, soap
from natkit.portmap.description import (
    DeviceDescription,
    Service,
    WanServiceType,
    parse_description,
    wan_service_type,
)
from natkit.portmap.discovery import _router_on, _search_plan
from natkit.portmap.igd import router_label
from natkit.portmap.ssdp import build_msearch

LOCATION = "http://192.168.1.1:49000/igddesc.xml"


@pytest.mark.parametrize(
    ("service_type", "parsed"),
    [
        ("urn:schemas-upnp-org:service:WANIPConnection:1", ("schemas-upnp-org", "WANIPConnection", 1)),
        ("urn:schemas-upnp-org:service:WANIPConnection:2", ("schemas-upnp-org", "WANIPConnection", 2)),
        ("urn:schemas-upnp-org:service:WANPPPConnection:1", ("schemas-upnp-org", "WANPPPConnection", 1)),
        ("urn:schemas-upnp-org:service:WANPPPConnection:2", ("schemas-upnp-org", "WANPPPConnection", 2)),
        ("urn:dslforum-org:service:WANPPPConnection:1", ("dslforum-org", "WANPPPConnection", 1)),
        ("urn:dslforum-org:service:WANIPConnection:1", ("dslforum-org", "WANIPConnection", 1)),
        ("urn:schemas-upnp-org:service:WANIPConnection:10", ("schemas-upnp-org", "WANIPConnection", 10)),
    ],
)  # fmt: skip
def test_wan_service_variants(service_type: str, parsed: tuple[str, str, int]) -> None:
    assert wan_service_type(service_type) == WanServiceType(*parsed)


@pytest.mark.parametrize(
    "service_type",
    [
        "urn:schemas-upnp-org:service:WANIPConnection:0",
        "urn:schemas-upnp-org:service:WANIPConnection:01",
        "urn:schemas-upnp-org:service:WANIPConnection:",
        "urn:schemas-upnp-org:service:WANIPConnection:1 ",
        "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1",
        "urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1",
        "urn:example-org:service:WANIPConnection:1",
        "urn:schemas-upnp-org:device:WANConnectionDevice:1",
        "",
    ],
)
def test_not_wan_services(service_type: str) -> None:
    assert wan_service_type(service_type) is None


def _svc(service_type: str, sid: str) -> Service:
    return Service(service_type, sid, f"http://192.168.1.1/{sid}", "", "", "")


def test_ranking_newest_then_ip_then_upnp_forum_then_document_order() -> None:
    services = (
        _svc("urn:dslforum-org:service:WANPPPConnection:1", "dsl-ppp1"),
        _svc("urn:schemas-upnp-org:service:WANPPPConnection:1", "ppp1"),
        _svc("urn:schemas-upnp-org:service:Layer3Forwarding:1", "l3f"),
        _svc("urn:dslforum-org:service:WANIPConnection:1", "dsl-ip1"),
        _svc("urn:schemas-upnp-org:service:WANIPConnection:1", "ip1-a"),
        _svc("urn:schemas-upnp-org:service:WANPPPConnection:2", "ppp2"),
        _svc("urn:schemas-upnp-org:service:WANIPConnection:1", "ip1-b"),
        _svc("urn:schemas-upnp-org:service:WANIPConnection:2", "ip2"),
    )
    desc = DeviceDescription("", "", "", "", "", services)
    assert [s.service_id for s in desc.wan_services()] == [
        "ip2", "ppp2", "ip1-a", "ip1-b", "dsl-ip1", "ppp1", "dsl-ppp1",
    ]  # fmt: skip


# ---- recovery from a broken description -------------------------------------------------

BROKEN = b"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
<URLBase>http://192.168.1.1:37215/</URLBase>
<device><deviceType>urn:dslforum-org:device:InternetGatewayDevice:1</deviceType>
<friendlyName>HG531 V1</friendlyName><manufacturer>Huawei &amp; Co</manufacturer>
<modelName>HG531</modelname>
<UDN>uuid:1</UDN>
<deviceList><device><serviceList>
<service><serviceType>urn:dslforum-org:service:WANPPPConnection:1</serviceType>
<serviceId>urn:dslforum-org:serviceId:WANPPPConnection1</serviceId>
<controlURL>ctrlu/WANPPPConnection_1</controlURL><eventSubURL>/evtu/1</eventSubURL>
<SCPDURL>/WANPPPConnection.xml</SCPDURL></service>
</serviceList></device></deviceList></device></root>
"""


def test_one_broken_tag_is_recovered_service_by_service() -> None:
    desc = parse_description(BROKEN, LOCATION)
    assert desc.repaired.startswith(f"device description from {LOCATION} is not valid XML:")
    assert "mismatched tag" in desc.repaired
    assert (desc.friendly_name, desc.manufacturer, desc.model_name, desc.udn) == (
        "HG531 V1", "Huawei & Co", "", "uuid:1",
    )  # fmt: skip
    assert desc.device_type == "urn:dslforum-org:device:InternetGatewayDevice:1"
    assert desc.wan_services() == [
        Service(
            service_type="urn:dslforum-org:service:WANPPPConnection:1",
            service_id="urn:dslforum-org:serviceId:WANPPPConnection1",
            control_url="http://192.168.1.1:37215/ctrlu/WANPPPConnection_1",  # via URLBase
            event_sub_url="http://192.168.1.1:37215/evtu/1",
            scpd_url="http://192.168.1.1:37215/WANPPPConnection.xml",
            device_type="",
        )
    ]


def test_sound_document_is_not_marked_repaired() -> None:
    assert (
        parse_description(BROKEN.replace(b"</modelname>", b"</modelName>"), LOCATION).repaired == ""
    )


def test_prefixed_fragments_are_recovered() -> None:
    body = (
        BROKEN.replace(b"<service>", b"<d:service>")
        .replace(b"</service>", b"</d:service>")
        .replace(b"<controlURL>", b"<d:controlURL>")
        .replace(b"</controlURL>", b"</d:controlURL>")
    )
    (service,) = parse_description(body, LOCATION).services
    assert service.control_url == "http://192.168.1.1:37215/ctrlu/WANPPPConnection_1"


@pytest.mark.parametrize(
    ("prolog", "reason"),
    [
        (b'<!DOCTYPE root [<!ENTITY e SYSTEM "file:///etc/passwd">]>', "contains a DTD; refused"),
        # Not even XML (lower case), so defusedxml never sees a DTD: recovery must refuse it.
        (b'<!doctype root SYSTEM "http://192.168.1.1/x.dtd">', "is not valid XML"),
    ],
)
def test_a_broken_document_with_a_dtd_is_never_recovered(prolog: bytes, reason: str) -> None:
    body = BROKEN.replace(b'<?xml version="1.0"?>', b'<?xml version="1.0"?>' + prolog)
    with pytest.raises(ProtocolError, match=reason):
        parse_description(body, LOCATION)


def test_entity_in_a_fragment_loses_only_that_fragment() -> None:
    other = (
        b"<service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>"
        b"<controlURL>/ip&e;</controlURL></service>"
    )
    body = BROKEN.replace(b"<serviceList>", b"<serviceList>" + other)
    desc = parse_description(body, LOCATION)
    assert [s.service_id for s in desc.services] == ["urn:dslforum-org:serviceId:WANPPPConnection1"]


def test_recovery_is_bounded() -> None:
    one = b"<service><serviceType>x</serviceType><controlURL>/c</controlURL></service>"
    many = BROKEN.replace(b"<serviceList>", b"<serviceList>" + one * 500)
    assert len(parse_description(many, LOCATION).services) == description.MAX_RECOVERED_SERVICES
    huge = (
        b"<service><controlURL>/big</controlURL><x>"
        + b"a" * description.MAX_FRAGMENT_BYTES
        + b"</x></service>"
    )
    desc = parse_description(BROKEN.replace(b"<serviceList>", b"<serviceList>" + huge), LOCATION)
    assert [s.control_url.rsplit("/", 1)[1] for s in desc.services] == ["WANPPPConnection_1"]


def test_unclosed_services_are_not_paired_with_a_later_close() -> None:
    # Linear pairing: each opening takes the next closing after it, once.
    body = BROKEN.replace(b"<serviceList>", b"<serviceList>" + b"<service><controlURL>/a" * 2000)
    # The only closing tag ends a broken fragment: nothing is recovered.
    with pytest.raises(ProtocolError, match="not valid XML"):
        parse_description(body, LOCATION)


def test_recovery_finds_nothing_is_the_parse_error() -> None:
    with pytest.raises(ProtocolError, match="not valid XML"):
        parse_description(b"<root><device><friendlyName>x</device></root>", LOCATION)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(BROKEN)), st.sampled_from([b"<", b"</x>", b"&", b"<service>", b"]]>"]))
def test_fuzz_recovery_keeps_only_usable_control_urls(pos: int, junk: bytes) -> None:
    body = BROKEN[:pos] + junk + BROKEN[pos:]
    try:
        desc = parse_description(body, LOCATION)
    except NatkitError:
        return
    for service in desc.services:
        assert service.control_url.startswith("http://192.168.1.1")


# ---- the search plan ------------------------------------------------------------------------


def test_search_plan_without_target_is_gateway_and_group() -> None:
    assert _search_plan("192.168.1.1", None) == [
        ("192.168.1.1:1900", ("192.168.1.1", 1900)),
        ("239.255.255.250:1900", ("239.255.255.250", 1900)),
    ]


def test_search_plan_without_a_known_router_is_multicast_only() -> None:
    assert _search_plan("", None) == [("239.255.255.250:1900", ("239.255.255.250", 1900))]


def test_router_on_a_chosen_interface_comes_from_the_routing_table() -> None:
    def route(dest: str, gw: str | None, metric: int = 0) -> Route:
        gateway = ipaddress.IPv4Address(gw) if gw else None
        return Route("eth1", ipaddress.IPv4Network(dest), gateway, metric)

    lan = ipaddress.IPv4Network("10.8.0.0/24")
    routes = [
        route("0.0.0.0/0", "192.168.1.1"),  # the default gateway is on another interface
        route("10.9.0.0/16", "10.8.0.254", 5),
        route("0.0.0.0/0", "10.8.0.1", 100),  # a default route via this LAN wins
        route("10.8.0.0/24", None),
    ]
    assert _router_on(lan, routes) == "10.8.0.1"
    assert _router_on(lan, routes[1:2]) == "10.8.0.254"
    assert _router_on(lan, [routes[0], routes[3]]) == ""


def test_search_plan_with_target_is_unicast_only() -> None:
    plan = _search_plan("ignored", ("127.0.0.1", 40000))
    assert plan == [
        ("127.0.0.1:40000", ("127.0.0.1", 40000)),
        ("239.255.255.250:1900", ("127.0.0.1", 40000)),  # the group's bytes, sent unicast
    ]
    assert build_msearch(
        "urn:schemas-upnp-org:device:InternetGatewayDevice:1", host=plan[1][0]
    ) == (
        b"M-SEARCH * HTTP/1.1\r\n"
        b"HOST: 239.255.255.250:1900\r\n"
        b'MAN: "ssdp:discover"\r\n'
        b"MX: 1\r\n"
        b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
        b"USER-AGENT: natkit/0.1 UPnP/1.1\r\n"
        b"\r\n"
    )


# ---- refusals without a UPnP error code -----------------------------------------------------


def test_bare_http_status_is_a_refusal_with_its_status() -> None:
    with pytest.raises(soap.HTTPStatusError) as info:
        soap.parse_response(401, b"<html>Unauthorized</html", "GetStatusInfo")
    assert (
        info.value.status == 401 and str(info.value) == "router answered HTTP 401 to GetStatusInfo"
    )


def test_fault_without_code_is_a_refusal() -> None:
    body = (
        b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault>'
        b"<faultcode>s:Client</faultcode><faultstring>Not allowed</faultstring>"
        b"</s:Fault></s:Body></s:Envelope>"
    )
    with pytest.raises(soap.RouterRefusal, match="Not allowed"):
        soap.parse_response(500, body, "AddPortMapping")


def test_router_label() -> None:
    desc = DeviceDescription("", "FRITZ!Box 7590", "", "Model", "", ())
    assert router_label("192.168.178.1", desc) == "the router at 192.168.178.1 (FRITZ!Box 7590)"
    nameless = DeviceDescription("", "", "", "", "", ())
    assert router_label("10.0.0.1", nameless) == "the router at 10.0.0.1"
    long = DeviceDescription("", "x" * 500, "", "", "", ())
    assert len(router_label("10.0.0.1", long)) < 100
