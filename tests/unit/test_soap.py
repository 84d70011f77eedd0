from __future__ import annotations

import hypothesis
import pytest

from natkit.errors import MappingConflictError, NotAuthorizedError, ProtocolError, UPnPError
from natkit.portmap import soap

IP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
ENVELOPE_OPEN = (
    '<?xml version="1.0"?>\r\n'
    '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
    's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
)
ENVELOPE_CLOSE = "</s:Body></s:Envelope>\r\n"

ADD_ARGS: list[tuple[str, str | int]] = [
    ("NewRemoteHost", ""),
    ("NewExternalPort", 8080),
    ("NewProtocol", "TCP"),
    ("NewInternalPort", 8080),
    ("NewInternalClient", "10.0.0.2"),
    ("NewEnabled", 1),
    ("NewPortMappingDescription", "natkit"),
    ("NewLeaseDuration", 3600),
]


def _build(args: list[tuple[str, str | int]], action: str = "AddPortMapping") -> bytes:
    _, body = soap.build_request(IP1, action, args, host="10.0.0.1", port=5000, path="/ctl/IPConn")
    return body


def _fault(code: str, description: str) -> bytes:
    return (
        '<?xml version="1.0"?>\r\n'
        '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
        "<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring>"
        '<detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
        f"<errorCode>{code}</errorCode><errorDescription>{description}</errorDescription>"
        "</UPnPError></detail></s:Fault></s:Body></s:Envelope>\r\n"
    ).encode()


def test_add_port_mapping_exact_request() -> None:
    headers, body = soap.build_request(
        IP1, "AddPortMapping", ADD_ARGS, host="10.0.0.1", port=5000, path="/ctl/IPConn"
    )
    expected = (
        ENVELOPE_OPEN
        + '<u:AddPortMapping xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1">'
        "<NewRemoteHost></NewRemoteHost>"
        "<NewExternalPort>8080</NewExternalPort>"
        "<NewProtocol>TCP</NewProtocol>"
        "<NewInternalPort>8080</NewInternalPort>"
        "<NewInternalClient>10.0.0.2</NewInternalClient>"
        "<NewEnabled>1</NewEnabled>"
        "<NewPortMappingDescription>natkit</NewPortMappingDescription>"
        "<NewLeaseDuration>3600</NewLeaseDuration>"
        "</u:AddPortMapping>" + ENVELOPE_CLOSE
    ).encode()
    assert body == expected
    assert headers == [
        ("Host", "10.0.0.1:5000"),
        ("Content-Type", 'text/xml; charset="utf-8"'),
        ("SOAPAction", '"urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping"'),
        ("Content-Length", str(len(expected))),
        ("Connection", "close"),
        ("User-Agent", "natkit/0.1 UPnP/1.1"),
    ]


def test_no_arguments() -> None:
    body = _build([], "GetExternalIPAddress")
    assert (
        body
        == (
            ENVELOPE_OPEN
            + f'<u:GetExternalIPAddress xmlns:u="{IP1}"></u:GetExternalIPAddress>'
            + ENVELOPE_CLOSE
        ).encode()
    )


def test_escaping_of_description() -> None:
    body = _build([("NewPortMappingDescription", "a<&>\"'b é")])
    assert (
        "<NewPortMappingDescription>a&lt;&amp;&gt;\"'b é</NewPortMappingDescription>".encode()
        in body
    )


def test_escaped_values_round_trip_through_a_parser() -> None:
    import xml.etree.ElementTree as ET

    text = "x<&>\"'\r\n\ty"
    body = _build([("NewPortMappingDescription", text)])
    (value,) = ET.fromstring(body).iter("NewPortMappingDescription")
    assert value.text == text


def test_ipv6_host_header() -> None:
    headers, _ = soap.build_request(
        IP1, "GetExternalIPAddress", [], host="fe80::1", port=49152, path="/"
    )
    assert headers[0] == ("Host", "[fe80::1]:49152")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"path": "ctl/IPConn"},
        {"path": ""},
        {"path": "/a b"},
        {"action": "Add PortMapping"},
        {"action": "1Add"},
        {"action": ""},
        {"args": [("New-Arg", "x")]},
        {"args": [("<x>", "x")]},
        {"args": [("NewPortMappingDescription", "nul\x00")]},
        {"service_type": 'urn:x"evil'},
        {"service_type": "urn:x\r\nX-Evil: 1"},
        {"service_type": ""},
        {"host": "a\r\nb"},
        {"port": 0},
        {"port": 70000},
    ],
)
def test_build_request_rejects_bad_input(kwargs: dict[str, object]) -> None:
    call: dict[str, object] = {
        "service_type": IP1,
        "action": "AddPortMapping",
        "args": [],
        "host": "10.0.0.1",
        "port": 5000,
        "path": "/ctl",
    }
    call.update(kwargs)
    with pytest.raises(ValueError):
        soap.build_request(
            call["service_type"],  # type: ignore[arg-type]
            call["action"],  # type: ignore[arg-type]
            call["args"],  # type: ignore[arg-type]
            host=call["host"],  # type: ignore[arg-type]
            port=call["port"],  # type: ignore[arg-type]
            path=call["path"],  # type: ignore[arg-type]
        )


def test_parse_get_external_ip_address() -> None:
    body = (
        b'<?xml version="1.0"?>\r\n'
        b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        b's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
        b'<u:GetExternalIPAddressResponse xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1">'
        b"<NewExternalIPAddress>203.0.113.7</NewExternalIPAddress>"
        b"</u:GetExternalIPAddressResponse></s:Body></s:Envelope>\r\n"
    )
    assert soap.parse_response(200, body, "GetExternalIPAddress") == {
        "NewExternalIPAddress": "203.0.113.7"
    }


def test_parse_tolerates_prefixes_case_and_whitespace() -> None:
    body = (
        b"<SOAP-ENV:Envelope xmlns:SOAP-ENV='http://schemas.xmlsoap.org/soap/envelope/'>"
        b"<SOAP-ENV:Body><m:getspecificportmappingentryresponse xmlns:m='urn:whatever'>"
        b"<NewInternalPort>\n  8080 \n</NewInternalPort><m:NewEnabled>1</m:NewEnabled>"
        b"<NewPortMappingDescription/>"
        b"</m:getspecificportmappingentryresponse></SOAP-ENV:Body></SOAP-ENV:Envelope>"
    )
    assert soap.parse_response(200, body, "GetSpecificPortMappingEntry") == {
        "NewInternalPort": "8080",
        "NewEnabled": "1",
        "NewPortMappingDescription": "",
    }


def test_parse_without_namespaces() -> None:
    body = b"<Envelope><Body><AddPortMappingResponse/></Body></Envelope>"
    assert soap.parse_response(200, body, "AddPortMapping") == {}


@pytest.mark.parametrize(
    ("code", "cls"),
    [("718", MappingConflictError), ("606", NotAuthorizedError), (" 725 ", UPnPError)],
)
def test_parse_upnp_faults(code: str, cls: type[UPnPError]) -> None:
    with pytest.raises(cls) as info:
        soap.parse_response(500, _fault(code, "ConflictInMappingEntry"), "AddPortMapping")
    assert type(info.value) is cls
    assert info.value.code == int(code)
    assert info.value.description == "ConflictInMappingEntry"
    assert info.value.action == "AddPortMapping"


def test_fault_with_status_200_still_raises() -> None:
    with pytest.raises(MappingConflictError):
        soap.parse_response(200, _fault("718", "x"), "AddPortMapping")


def test_fault_without_upnp_code() -> None:
    body = (
        b"<Envelope><Body><Fault><faultcode>Server</faultcode>"
        b"<faultstring>Internal Error</faultstring></Fault></Body></Envelope>"
    )
    with pytest.raises(ProtocolError, match="Internal Error"):
        soap.parse_response(500, body, "AddPortMapping")


@pytest.mark.parametrize("code", ["abc", "", "-1", "1e3", "１２"])
def test_fault_with_bad_code(code: str) -> None:
    with pytest.raises(ProtocolError, match="UPnPError"):
        soap.parse_response(500, _fault(code, "x"), "AddPortMapping")


def test_fault_description_is_sanitised() -> None:
    with pytest.raises(UPnPError) as info:
        soap.parse_response(500, _fault("501", "bad\u009b31mthing"), "AddPortMapping")
    assert "\x9b" not in str(info.value)


@pytest.mark.parametrize(
    "body", [b"<html><body>Internal Server Error</body></html>", b"", b"oops", b"<x>"]
)
def test_non_200_without_fault(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="HTTP 500"):
        soap.parse_response(500, body, "AddPortMapping")


@pytest.mark.parametrize("body", [b"", b"not xml", b"<Envelope><Body>"])
def test_200_not_xml(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="not valid XML"):
        soap.parse_response(200, body, "AddPortMapping")


def test_missing_response_element() -> None:
    body = b"<Envelope><Body><OtherResponse/></Body></Envelope>"
    with pytest.raises(ProtocolError, match="AddPortMappingResponse"):
        soap.parse_response(200, body, "AddPortMapping")


@pytest.mark.parametrize("status", [200, 500])
def test_dtd_is_refused(status: int) -> None:
    body = (
        b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
        b"<Envelope><Body><GetExternalIPAddressResponse>"
        b"<NewExternalIPAddress>&e;</NewExternalIPAddress>"
        b"</GetExternalIPAddressResponse></Body></Envelope>"
    )
    with pytest.raises(ProtocolError, match="DTD"):
        soap.parse_response(status, body, "GetExternalIPAddress")


def test_oversize() -> None:
    body = (
        b"<Envelope><Body><AddPortMappingResponse/>"
        + b" " * soap.MAX_RESPONSE_BYTES
        + b"</Body></Envelope>"
    )
    with pytest.raises(ProtocolError, match="bytes"):
        soap.parse_response(200, body, "AddPortMapping")


# natkit escapes by hand (xml.sax.saxutils costs ~8 ms of start-up): the standard library's
# escape with the same extra entities is the oracle.
@hypothesis.given(hypothesis.strategies.text())
def test_escaping_matches_the_standard_library(text: str) -> None:
    from xml.sax.saxutils import escape

    assert soap._escape_text(text) == escape(text, {"\r": "&#13;"})
    attribute = {'"': "&quot;", "'": "&apos;", "\r": "&#13;", "\n": "&#10;", "\t": "&#9;"}
    assert soap._escape_attribute(text) == escape(text, attribute)
