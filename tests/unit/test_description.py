from __future__ import annotations

import pytest

from natkit.errors import ProtocolError
from natkit.portmap import description
from natkit.portmap.description import DeviceDescription, Service, parse_description

LOCATION = "http://10.0.0.1:5000/rootDesc.xml"
IP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
IP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
PPP1 = "urn:schemas-upnp-org:service:WANPPPConnection:1"

# Shaped like miniupnpd 2.x's rootDesc.xml.
MINIUPNPD = b"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0" configId="1337">
<specVersion><major>1</major><minor>1</minor></specVersion>
<device>
<deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
<friendlyName>OpenWRT router</friendlyName>
<manufacturer>OpenWRT</manufacturer>
<manufacturerURL>http://www.openwrt.org/</manufacturerURL>
<modelDescription>OpenWRT router</modelDescription>
<modelName>OpenWRT router</modelName>
<modelNumber>1</modelNumber>
<modelURL>http://www.openwrt.org/</modelURL>
<serialNumber>00000000</serialNumber>
<UDN>uuid:3ddcd1d3-2380-45f5-b069-2c4d54008cf1</UDN>
<serviceList>
<service>
<serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>
<serviceId>urn:upnp-org:serviceId:L3Forwarding1</serviceId>
<SCPDURL>/L3F.xml</SCPDURL>
<controlURL>/ctl/L3F</controlURL>
<eventSubURL>/evt/L3F</eventSubURL>
</service>
</serviceList>
<deviceList>
<device>
<deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType>
<friendlyName>WANDevice</friendlyName>
<UDN>uuid:3ddcd1d3-2380-45f5-b069-2c4d54008cf2</UDN>
<serviceList>
<service>
<serviceType>urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1</serviceType>
<serviceId>urn:upnp-org:serviceId:WANCommonIFC1</serviceId>
<SCPDURL>/WANCfg.xml</SCPDURL>
<controlURL>/ctl/CmnIfCfg</controlURL>
<eventSubURL>/evt/CmnIfCfg</eventSubURL>
</service>
</serviceList>
<deviceList>
<device>
<deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
<friendlyName>WANConnectionDevice</friendlyName>
<UDN>uuid:3ddcd1d3-2380-45f5-b069-2c4d54008cf3</UDN>
<serviceList>
<service>
<serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
<SCPDURL>/WANIPCn.xml</SCPDURL>
<controlURL>/ctl/IPConn</controlURL>
<eventSubURL>/evt/IPConn</eventSubURL>
</service>
</serviceList>
</device>
</deviceList>
</device>
</deviceList>
<presentationURL>http://10.0.0.1/</presentationURL>
</device>
</root>
"""


def _doc(
    services: str, *, url_base: str = "", ns: str = "urn:schemas-upnp-org:device-1-0"
) -> bytes:
    xmlns = f' xmlns="{ns}"' if ns else ""
    base = f"<URLBase>{url_base}</URLBase>" if url_base else ""
    return (
        f"<root{xmlns}>{base}<device><deviceType>urn:x:device:Test:1</deviceType>"
        f"<serviceList>{services}</serviceList></device></root>"
    ).encode()


def _service(service_type: str, control: str, *, sid: str = "id") -> str:
    return (
        f"<service><serviceType>{service_type}</serviceType><serviceId>{sid}</serviceId>"
        f"<SCPDURL>/scpd.xml</SCPDURL><controlURL>{control}</controlURL>"
        f"<eventSubURL></eventSubURL></service>"
    )


def test_parse_miniupnpd() -> None:
    desc = parse_description(MINIUPNPD, LOCATION)
    assert desc.device_type == "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
    assert desc.friendly_name == "OpenWRT router"
    assert desc.manufacturer == "OpenWRT"
    assert desc.model_name == "OpenWRT router"
    assert desc.udn == "uuid:3ddcd1d3-2380-45f5-b069-2c4d54008cf1"
    assert [s.service_type for s in desc.services] == [
        "urn:schemas-upnp-org:service:Layer3Forwarding:1",
        "urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1",
        IP1,
    ]
    assert desc.wan_services() == [
        Service(
            service_type=IP1,
            service_id="urn:upnp-org:serviceId:WANIPConn1",
            control_url="http://10.0.0.1:5000/ctl/IPConn",
            event_sub_url="http://10.0.0.1:5000/evt/IPConn",
            scpd_url="http://10.0.0.1:5000/WANIPCn.xml",
            device_type="urn:schemas-upnp-org:device:WANConnectionDevice:1",
        )
    ]


def test_url_base_wins_over_location() -> None:
    body = _doc(_service(IP1, "ctl/IPConn"), url_base="http://192.168.0.1:49152/base/")
    (service,) = parse_description(body, LOCATION).services
    assert service.control_url == "http://192.168.0.1:49152/base/ctl/IPConn"
    assert service.scpd_url == "http://192.168.0.1:49152/scpd.xml"
    assert service.event_sub_url == ""


def test_invalid_url_base_falls_back_to_location() -> None:
    body = _doc(_service(IP1, "/ctl"), url_base="ftp://192.168.0.1/")
    (service,) = parse_description(body, LOCATION).services
    assert service.control_url == "http://10.0.0.1:5000/ctl"


def test_relative_control_urls() -> None:
    body = _doc(
        _service(IP1, "upnp/control/WANIPConn1", sid="a")
        + _service(IP2, "http://10.0.0.1:8080/abs", sid="b")
        + _service(PPP1, "  /padded  ", sid="c")
    )
    services = parse_description(body, "http://10.0.0.1:5000/dir/rootDesc.xml").services
    assert [s.control_url for s in services] == [
        "http://10.0.0.1:5000/dir/upnp/control/WANIPConn1",
        "http://10.0.0.1:8080/abs",
        "http://10.0.0.1:5000/padded",
    ]


def test_wan_services_ranking_is_by_preference_then_document_order() -> None:
    body = _doc(
        _service(PPP1, "/ppp", sid="ppp")
        + _service(IP1, "/ip1a", sid="ip1a")
        + _service("urn:schemas-upnp-org:service:Layer3Forwarding:1", "/l3f")
        + _service(IP2, "/ip2", sid="ip2")
        + _service(IP1, "/ip1b", sid="ip1b")
    )
    ranked = parse_description(body, LOCATION).wan_services()
    assert [s.service_id for s in ranked] == ["ip2", "ip1a", "ip1b", "ppp"]


@pytest.mark.parametrize(
    "control",
    [
        "",
        "https://10.0.0.1/ctl",
        "ftp://10.0.0.1/ctl",
        "http://user:pw@10.0.0.1/ctl",
        "http://[::1/ctl",
        "http://10.0.0.1:99999/ctl",
        "/ctl with space",
    ],
)
def test_service_with_bad_control_url_is_skipped(control: str) -> None:
    body = _doc(_service(IP1, control, sid="bad") + _service(PPP1, "/ok", sid="ok"))
    desc = parse_description(body, LOCATION)
    assert [s.service_id for s in desc.services] == ["ok"]


def test_nothing_usable_still_returns_description() -> None:
    body = _doc(_service(IP1, "https://10.0.0.1/ctl"))
    desc = parse_description(body, LOCATION)
    assert desc.services == ()
    assert desc.wan_services() == []
    assert desc.device_type == "urn:x:device:Test:1"


@pytest.mark.parametrize("ns", ["", "urn:schemas-upnp-org:service-1-0", "http://wrong/"])
def test_namespace_is_ignored(ns: str) -> None:
    desc = parse_description(_doc(_service(IP1, "/ctl"), ns=ns), LOCATION)
    assert [s.control_url for s in desc.wan_services()] == ["http://10.0.0.1:5000/ctl"]


def test_prefixed_namespace() -> None:
    body = MINIUPNPD.replace(b"<root xmlns=", b"<d:root xmlns:d=").replace(b"</root>", b"</d:root>")
    body = body.replace(b"<device>", b"<d:device>").replace(b"</device>", b"</d:device>")
    desc = parse_description(body, LOCATION)
    assert desc.friendly_name == "OpenWRT router"
    assert len(desc.wan_services()) == 1


def test_missing_fields_are_empty_strings() -> None:
    desc = parse_description(b"<root><device/></root>", LOCATION)
    assert desc == DeviceDescription("", "", "", "", "", ())


def test_whitespace_and_control_characters_in_text() -> None:
    body = (
        b"<root><device><friendlyName>\n  My\tRouter \xc2\x9b31m\n</friendlyName></device></root>"
    )
    desc = parse_description(body, LOCATION)
    assert desc.friendly_name == "My Router \ufffd31m"


def test_depth_limit() -> None:
    def nest(levels: int) -> bytes:
        return (
            b"<root>"
            + b"<device><deviceList>" * levels
            + b"<device/>"
            + (b"</deviceList></device>" * levels)
            + b"</root>"
        )

    parse_description(nest(description.MAX_DEVICE_DEPTH), LOCATION)
    with pytest.raises(ProtocolError, match="deep"):
        parse_description(nest(description.MAX_DEVICE_DEPTH + 1), LOCATION)


XXE = b"""<?xml version="1.0"?>
<!DOCTYPE root [<!ENTITY e SYSTEM "file:///etc/passwd">]>
<root><device><friendlyName>&e;</friendlyName></device></root>"""

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<root><device><friendlyName>&lol4;</friendlyName></device></root>"""


@pytest.mark.parametrize(
    "body", [XXE, BILLION_LAUGHS, b'<!DOCTYPE root SYSTEM "http://x/">\n<root/>']
)
def test_dtd_is_refused(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="DTD"):
        parse_description(body, LOCATION)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not xml at all",
        b"<root><device></root>",
        b"<root><device>&undefined;</device></root>",
        b"<root><d:device/></root>",  # unbound prefix
        b'<?xml version="1.0" encoding="bogus"?><root/>',
        b"\xff\xfe\x00garbage",
        MINIUPNPD[:-40].replace(b"<service>", b"<service "),  # broken, and no service left
    ],
)
def test_broken_xml(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="not valid XML"):
        parse_description(body, LOCATION)


@pytest.mark.parametrize("body", [b"<root/>", b"<root><specVersion/></root>", b"<other/>"])
def test_no_root_device(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="no root <device>"):
        parse_description(body, LOCATION)


def test_oversize() -> None:
    body = MINIUPNPD.replace(
        b"</root>", b"<!--" + b"x" * description.MAX_DESCRIPTION_BYTES + b"--></root>"
    )
    with pytest.raises(ProtocolError, match="bytes"):
        parse_description(body, LOCATION)
