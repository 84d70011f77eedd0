from __future__ import annotations

import pytest

from natkit.errors import ProtocolError
from natkit.portmap import ssdp

MINIUPNPD = (
    b"HTTP/1.1 200 OK\r\n"
    b"CACHE-CONTROL: max-age=120\r\n"
    b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
    b"USN: uuid:3ddcd1d3-2380-45f5-b069-2c4d54008cf1::"
    b"urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
    b"EXT:\r\n"
    b"SERVER: Debian/12 UPnP/1.1 MiniUPnPd/2.3.1\r\n"
    b"LOCATION: http://10.0.0.1:5000/rootDesc.xml\r\n"
    b'OPT: "http://schemas.upnp.org/upnp/1/0/"; ns=01\r\n'
    b"01-NLS: 1\r\n"
    b"BOOTID.UPNP.ORG: 1\r\n"
    b"CONFIGID.UPNP.ORG: 1337\r\n"
    b"\r\n"
)


def _answer(*headers: str, start: str = "HTTP/1.1 200 OK") -> bytes:
    return ("\r\n".join((start, *headers)) + "\r\n\r\n").encode("latin-1")


def test_build_msearch_exact_bytes() -> None:
    assert ssdp.build_msearch("urn:schemas-upnp-org:device:InternetGatewayDevice:1") == (
        b"M-SEARCH * HTTP/1.1\r\n"
        b"HOST: 239.255.255.250:1900\r\n"
        b'MAN: "ssdp:discover"\r\n'
        b"MX: 1\r\n"
        b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
        b"USER-AGENT: natkit/0.1 UPnP/1.1\r\n"
        b"\r\n"
    )


def test_build_msearch_options() -> None:
    data = ssdp.build_msearch(ssdp.ALL_TARGET, mx=3, host="[ff02::c]:1900")
    assert b"HOST: [ff02::c]:1900\r\n" in data
    assert b"MX: 3\r\n" in data
    assert b"ST: ssdp:all\r\n" in data


@pytest.mark.parametrize("st", ["", "a\r\nX-Evil: 1", "a\nb", "a\x00", "a b", "caf\u00e9"])
def test_build_msearch_rejects_bad_target(st: str) -> None:
    with pytest.raises(ValueError):
        ssdp.build_msearch(st)


@pytest.mark.parametrize("mx", [0, -1, 121])
def test_build_msearch_rejects_bad_mx(mx: int) -> None:
    with pytest.raises(ValueError):
        ssdp.build_msearch(ssdp.ALL_TARGET, mx=mx)


def test_constants() -> None:
    assert (ssdp.SSDP_GROUP, ssdp.SSDP_PORT, ssdp.MAX_DATAGRAM) == ("239.255.255.250", 1900, 8192)
    assert ssdp.IGD_SEARCH_TARGETS[0] == "urn:schemas-upnp-org:device:InternetGatewayDevice:2"
    assert len(ssdp.IGD_SEARCH_TARGETS) == 5


def test_parse_miniupnpd_response() -> None:
    response = ssdp.parse_response(MINIUPNPD)
    assert response == ssdp.SsdpResponse(
        location="http://10.0.0.1:5000/rootDesc.xml",
        st="urn:schemas-upnp-org:device:InternetGatewayDevice:1",
        usn="uuid:3ddcd1d3-2380-45f5-b069-2c4d54008cf1::"
        "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
        server="Debian/12 UPnP/1.1 MiniUPnPd/2.3.1",
        max_age=120,
    )


def test_parse_lowercase_headers_bare_newlines_and_no_reason() -> None:
    data = (
        b"HTTP/1.0 200\n"
        b"cache-control:max-age = 1800\n"
        b"st:   upnp:rootdevice  \n"
        b"location:http://192.168.1.1/desc.xml\n"
        b"this line has no colon\n"
        b"\n"
    )
    response = ssdp.parse_response(data)
    assert response.location == "http://192.168.1.1/desc.xml"
    assert response.st == "upnp:rootdevice"
    assert response.usn == ""
    assert response.server == ""
    assert response.max_age == 1800


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("no-cache, max-age=60", 60),
        ('max-age="30"', 30),
        ("max-age=", None),
        ("max-age=abc", None),
        ("no-cache", None),
    ],
)
def test_parse_max_age(value: str, expected: int | None) -> None:
    data = _answer(f"CACHE-CONTROL: {value}", "LOCATION: http://10.0.0.1/")
    assert ssdp.parse_response(data).max_age == expected


def test_first_duplicate_header_wins() -> None:
    data = _answer("LOCATION: http://10.0.0.1/a.xml", "LOCATION: http://evil.example/")
    assert ssdp.parse_response(data).location == "http://10.0.0.1/a.xml"


def test_parse_notify_alive_uses_nt() -> None:
    data = _answer(
        "HOST: 239.255.255.250:1900",
        "NT: urn:schemas-upnp-org:service:WANIPConnection:1",
        "NTS: ssdp:alive",
        "USN: uuid:x::urn:schemas-upnp-org:service:WANIPConnection:1",
        "LOCATION: http://10.0.0.1:5000/rootDesc.xml",
        start="NOTIFY * HTTP/1.1",
    )
    response = ssdp.parse_response(data)
    assert response.st == "urn:schemas-upnp-org:service:WANIPConnection:1"
    assert response.max_age is None


def test_parse_notify_byebye_is_refused() -> None:
    data = _answer(
        "NT: upnp:rootdevice",
        "NTS: ssdp:byebye",
        "LOCATION: http://10.0.0.1/",
        start="NOTIFY * HTTP/1.1",
    )
    with pytest.raises(ProtocolError):
        ssdp.parse_response(data)


def test_control_characters_are_neutralised() -> None:
    data = _answer("SERVER: evil\x1b[2J\x9b31m", "LOCATION: http://10.0.0.1/")
    server = ssdp.parse_response(data).server
    assert "\x1b" not in server
    assert "\x9b" not in server


@pytest.mark.parametrize(
    "data",
    [
        _answer("ST: upnp:rootdevice"),  # no LOCATION
        _answer("LOCATION:"),
        _answer("LOCATION: ftp://10.0.0.1/desc.xml"),
        _answer("LOCATION: https://10.0.0.1/desc.xml"),
        _answer("LOCATION: http://admin:pw@10.0.0.1/desc.xml"),
        _answer("LOCATION: http://10.0.0.1:99999/desc.xml"),
        _answer("LOCATION: http://10.0.0.1:port/desc.xml"),
        _answer("LOCATION: /rootDesc.xml"),
        _answer("LOCATION: http://10.0.0.1/", start="HTTP/1.1 404 Not Found"),
        _answer("LOCATION: http://10.0.0.1/", start='M-SEARCH * HTTP/1.1\r\nMAN: "ssdp:discover"'),
        b"",
        b"\x00\xff garbage \r\n\r\n",
        b"HTTP/1.1 200 OK",
    ],
)
def test_parse_rejects(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        ssdp.parse_response(data)


def test_parse_rejects_oversize() -> None:
    data = _answer("LOCATION: http://10.0.0.1/", "X-Pad: " + "a" * ssdp.MAX_DATAGRAM)
    with pytest.raises(ProtocolError, match="exceeds"):
        ssdp.parse_response(data)


def test_datagram_at_limit_is_accepted() -> None:
    head = b"HTTP/1.1 200 OK\r\nLOCATION: http://10.0.0.1/\r\nX-Pad: "
    data = head + b"a" * (ssdp.MAX_DATAGRAM - len(head) - 4) + b"\r\n\r\n"
    assert len(data) == ssdp.MAX_DATAGRAM
    assert ssdp.parse_response(data).location == "http://10.0.0.1/"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://10.0.0.1:5000/rootDesc.xml", ("10.0.0.1", 5000, "/rootDesc.xml")),
        ("http://10.0.0.1", ("10.0.0.1", 80, "/")),
        ("HTTP://Router.lan/", ("Router.lan", 80, "/")),
        ("http://10.0.0.1:/x", ("10.0.0.1", 80, "/x")),
        ("http://10.0.0.1?a=b", ("10.0.0.1", 80, "/?a=b")),
        ("http://10.0.0.1/d.xml?a=b#frag", ("10.0.0.1", 80, "/d.xml?a=b")),
        ("http://[fe80::1]:49152/igd.xml", ("fe80::1", 49152, "/igd.xml")),
        ("http://[::1]/", ("::1", 80, "/")),
        ("http://[fe80::1%25eth0]:80/", ("fe80::1%eth0", 80, "/")),
        ("http://10.0.0.1:65535/", ("10.0.0.1", 65535, "/")),
    ],
)
def test_parse_http_url(url: str, expected: tuple[str, int, str]) -> None:
    assert ssdp.parse_http_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "",
        "http://",
        "http:///path",
        "http://:80/",
        "https://10.0.0.1/",
        "ftp://10.0.0.1/",
        "file:///etc/passwd",
        "10.0.0.1/desc.xml",
        "http:10.0.0.1/",
        "http://user@10.0.0.1/",
        "http://user:pw@10.0.0.1/",
        "http://10.0.0.1:0/",
        "http://10.0.0.1:65536/",
        "http://10.0.0.1:-1/",
        "http://10.0.0.1:+80/",
        "http://10.0.0.1:8_0/",
        "http://10.0.0.1:１２/",
        "http://10.0.0.1:80:80/",
        "http://10.0.0.1 /",
        "http://10.0.0.1/a b",
        "http://10.0.0.1/\r\nHost: evil",
        "http://10.0.0.1/\x00",
        "http://ex\u00e4mple/",
        "http://fe80::1/",
        "http://[fe80::1/",
        "http://[not-ipv6]/",
        "http://[::1]x/",
        "http://[::1]:x/",
        "http://[]/",
        "http://a%20b/",
    ],
)
def test_parse_http_url_rejects(url: str) -> None:
    with pytest.raises(ProtocolError):
        ssdp.parse_http_url(url)
