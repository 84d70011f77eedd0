"""Fuzz the UPnP codecs: whatever a hostile LAN peer sends, only NatkitError escapes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natkit.errors import NatkitError
from natkit.portmap import description, soap, ssdp

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LOCATION = "http://10.0.0.1:5000/rootDesc.xml"

SSDP_ANSWER = (
    b"HTTP/1.1 200 OK\r\n"
    b"CACHE-CONTROL: max-age=120\r\n"
    b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
    b"USN: uuid:3ddcd1d3::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
    b"EXT:\r\n"
    b"SERVER: Debian/12 UPnP/1.1 MiniUPnPd/2.3.1\r\n"
    b"LOCATION: http://10.0.0.1:5000/rootDesc.xml\r\n"
    b"\r\n"
)

ROOT_DESC = b"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
<URLBase>http://10.0.0.1:5000/</URLBase>
<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
<friendlyName>OpenWRT router</friendlyName><UDN>uuid:1</UDN>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
<serviceList><service>
<serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
<SCPDURL>/WANIPCn.xml</SCPDURL><controlURL>/ctl/IPConn</controlURL>
<eventSubURL>/evt/IPConn</eventSubURL>
</service></serviceList>
</device></deviceList></device></deviceList></device></root>
"""

FAULT = (
    b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault>'
    b"<faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
    b'<UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>CODE</errorCode>'
    b"<errorDescription>DESC</errorDescription></UPnPError></detail></s:Fault></s:Body>"
    b"</s:Envelope>"
)

GET_IP = (
    b'<?xml version="1.0"?>\r\n'
    b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
    b"<s:Body><u:GetExternalIPAddressResponse"
    b' xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1">'
    b"<NewExternalIPAddress>203.0.113.7</NewExternalIPAddress>"
    b"</u:GetExternalIPAddressResponse></s:Body></s:Envelope>\r\n"
)

# Fragments that tend to reach interesting parser states.
NASTY = [
    b"\r\n",
    b"\n",
    b"\r\n\r\n",
    b":",
    b"\x00",
    b"\xff",
    b"\xc3\x28",
    b"<",
    b">",
    b"&",
    b"&e;",
    b"&#0;",
    b"&#x1b;",
    b"]]>",
    b"<![CDATA[",
    b"<!--",
    b"<!DOCTYPE x [<!ENTITY e 'x'>]>",
    b'<?xml version="1.0" encoding="utf-16"?>',
    b"<device>",
    b"</device>",
    b"<deviceList><device>",
    b"<service><controlURL>",
    b"http://[::1",
    b"http://a@b/",
    b"http://10.0.0.1:99999/",
    b"LOCATION: http://10.0.0.1/\r\n",
    b"NOTIFY * HTTP/1.1\r\nNTS: ssdp:alive\r\n",
    b"<errorCode>718</errorCode>",
    b"<s:Fault>",
    b"xmlns:u=",
    b"\xef\xbb\xbf",
]


@st.composite
def mutated(draw: st.DrawFn, sample: bytes) -> bytes:
    """``sample`` with a few random cuts, insertions or byte flips."""
    data = bytearray(sample)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "nasty", "delete", "flip", "truncate"]))
        if kind == "insert":
            data[pos:pos] = draw(st.binary(max_size=16))
        elif kind == "nasty":
            data[pos:pos] = draw(st.sampled_from(NASTY))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 32))]
        elif kind == "flip" and pos < len(data):
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[pos:]
    return bytes(data)


def inputs(sample: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=512), mutated(sample))


def _only_natkit_errors(call: Callable[[], object]) -> None:
    with contextlib.suppress(NatkitError):
        call()


@FUZZ
@given(inputs(SSDP_ANSWER))
def test_fuzz_ssdp_parse_response(data: bytes) -> None:
    _only_natkit_errors(lambda: ssdp.parse_response(data))


@FUZZ
@given(
    st.one_of(
        st.text(max_size=80),
        st.builds(
            lambda a, b: f"http://{a}{b}",
            st.text(st.characters(codec="ascii"), max_size=30),
            st.text(max_size=30),
        ),
        mutated(b"http://[fe80::1%25eth0]:49152/rootDesc.xml?x=1#f").map(
            lambda b: b.decode("latin-1")
        ),
    )
)
def test_fuzz_parse_http_url(url: str) -> None:
    try:
        host, port, path = ssdp.parse_http_url(url)
    except NatkitError:
        return
    assert host
    assert 1 <= port <= 65535
    assert path.startswith("/")
    assert not any(c.isspace() for c in host + path)


@FUZZ
@given(inputs(ROOT_DESC))
def test_fuzz_parse_description(body: bytes) -> None:
    try:
        desc = description.parse_description(body, LOCATION)
    except NatkitError:
        return
    for service in desc.services:
        ssdp.parse_http_url(service.control_url)  # every kept control URL is usable


@FUZZ
@given(st.text(max_size=40), st.text(max_size=40))
def test_fuzz_description_text_insertion(friendly: str, control: str) -> None:
    body = ROOT_DESC.replace(b"OpenWRT router", friendly.encode("utf-8", "surrogatepass"), 1)
    body = body.replace(b"/ctl/IPConn", control.encode("utf-8", "surrogatepass"))
    _only_natkit_errors(lambda: description.parse_description(body, LOCATION))


@FUZZ
@given(
    st.sampled_from([200, 400, 500, 503]),
    st.one_of(inputs(GET_IP), inputs(FAULT.replace(b"CODE", b"718"))),
)
def test_fuzz_soap_parse_response(status: int, body: bytes) -> None:
    _only_natkit_errors(lambda: soap.parse_response(status, body, "GetExternalIPAddress"))


@FUZZ
@given(st.text(max_size=20), st.text(max_size=40))
def test_fuzz_soap_fault_fields(code: str, desc: str) -> None:
    body = FAULT.replace(b"CODE", code.encode("utf-8", "surrogatepass"))
    body = body.replace(b"DESC", desc.encode("utf-8", "surrogatepass"))
    _only_natkit_errors(lambda: soap.parse_response(500, body, "AddPortMapping"))
