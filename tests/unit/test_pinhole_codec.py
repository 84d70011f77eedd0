"""WANIPv6FirewallControl:1 requests byte for byte, replies as miniupnpd 2.3.1 sent them in
the lab (docs/miniupnpd-ipv6.md), and hostile replies."""

from __future__ import annotations

import pytest

from natkit.errors import ProtocolError, UPnPError
from natkit.portmap import pinhole

HEAD = (
    b'<?xml version="1.0"?>\r\n'
    b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
    b's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
)
TAIL = b"</s:Body></s:Envelope>\r\n"
NS = b'xmlns:u="urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"'
WHERE = {"host": "2001:db8:77::1", "port": 5000, "path": "/ctl/IP6FCtl"}


def _reply(inner: bytes) -> bytes:
    # miniupnpd's own framing (captured in the lab): XML declaration, one line. The first
    # element gets the service's namespace declared for its u: prefix.
    inner = inner.replace(b"Response>", b"Response " + NS + b">", 1) if NS not in inner else inner
    return (
        b'<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"'
        b' s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
        + inner
        + b"</s:Body></s:Envelope>\r\n"
    )


def _fault(code: int, text: bytes) -> bytes:
    return (
        b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        b's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><s:Fault>'
        b"<faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
        b'<UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>%d</errorCode>'
        b"<errorDescription>%s</errorDescription></UPnPError></detail></s:Fault></s:Body>"
        b"</s:Envelope>" % (code, text)
    )


def test_add_pinhole_request_byte_for_byte() -> None:
    headers, body = pinhole.add_pinhole("2001:db8:77::10", 8080, "tcp", 3600).encode(**WHERE)
    assert body == (
        HEAD + b"<u:AddPinhole " + NS + b"><RemoteHost></RemoteHost><RemotePort>0</RemotePort>"
        b"<InternalClient>2001:db8:77::10</InternalClient><InternalPort>8080</InternalPort>"
        b"<Protocol>6</Protocol><LeaseTime>3600</LeaseTime></u:AddPinhole>" + TAIL
    )
    assert headers == [
        ("Host", "[2001:db8:77::1]:5000"),
        ("Content-Type", 'text/xml; charset="utf-8"'),
        ("SOAPAction", '"urn:schemas-upnp-org:service:WANIPv6FirewallControl:1#AddPinhole"'),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        ("User-Agent", "natkit/0.1 UPnP/1.1"),
    ]


def test_other_requests_byte_for_byte() -> None:
    def body(req: pinhole.Request) -> bytes:
        return req.encode(**WHERE)[1]

    assert body(pinhole.get_firewall_status()) == (
        HEAD + b"<u:GetFirewallStatus " + NS + b"></u:GetFirewallStatus>" + TAIL
    )
    assert body(pinhole.update_pinhole(7, 600)) == (
        HEAD + b"<u:UpdatePinhole " + NS + b"><UniqueID>7</UniqueID>"
        b"<NewLeaseTime>600</NewLeaseTime></u:UpdatePinhole>" + TAIL
    )
    assert body(pinhole.delete_pinhole(65535)) == (
        HEAD + b"<u:DeletePinhole " + NS + b"><UniqueID>65535</UniqueID></u:DeletePinhole>" + TAIL
    )
    assert body(pinhole.check_pinhole_working(0)) == (
        HEAD + b"<u:CheckPinholeWorking " + NS + b"><UniqueID>0</UniqueID>"
        b"</u:CheckPinholeWorking>" + TAIL
    )
    udp = body(pinhole.add_pinhole("2001:DB8::0:1", 53, "UDP", 1, remote_host="2001:db8::9",
                                   remote_port=4000))  # fmt: skip
    assert b"<RemoteHost>2001:db8::9</RemoteHost><RemotePort>4000</RemotePort>" in udp
    assert b"<InternalClient>2001:db8::1</InternalClient>" in udp  # normalised
    assert b"<Protocol>17</Protocol><LeaseTime>1</LeaseTime>" in udp


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (("192.168.77.10", 80, "tcp", 60), "IPv6"),
        (("::ffff:192.168.77.10", 80, "tcp", 60), "global"),
        (("fe80::1%eth0", 80, "tcp", 60), "global"),
        (("2001:db8::1", 0, "tcp", 60), "ports"),
        (("2001:db8::1", 65536, "tcp", 60), "ports"),
        (("2001:db8::1", 80, "sctp", 60), "tcp or udp"),
        (("2001:db8::1", 80, "tcp", 0), "lease"),
        (("2001:db8::1", 80, "tcp", 86401), "lease"),
        (("2001:db8::1<x/>", 80, "tcp", 60), "IPv6"),
    ],
)
def test_add_pinhole_refuses_bad_arguments(args: tuple[str, int, str, int], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        pinhole.add_pinhole(*args)


def test_unique_id_and_lease_bounds() -> None:
    for bad in (-1, 65536):
        with pytest.raises(ValueError, match="UniqueID"):
            pinhole.delete_pinhole(bad)
    with pytest.raises(ValueError, match="lease"):
        pinhole.update_pinhole(1, 0)


def test_replies_from_miniupnpd() -> None:
    status = pinhole.parse_firewall_status(
        200,
        _reply(b"<u:GetFirewallStatusResponse " + NS + b"><FirewallEnabled>1</FirewallEnabled>"
               b"<InboundPinholeAllowed>1</InboundPinholeAllowed></u:GetFirewallStatusResponse>"),
    )  # fmt: skip
    assert status == pinhole.FirewallStatus(enabled=True, inbound_pinhole_allowed=True)
    added = _reply(
        b"<u:AddPinholeResponse " + NS + b"><UniqueID>1</UniqueID></u:AddPinholeResponse>"
    )
    assert pinhole.parse_add_pinhole(200, added) == 1
    empty = _reply(b"<u:UpdatePinholeResponse " + NS + b"></u:UpdatePinholeResponse>")
    pinhole.parse_empty(200, empty, "UpdatePinhole")
    working = _reply(b"<u:CheckPinholeWorkingResponse " + NS + b"><IsWorking>0</IsWorking>"
                     b"</u:CheckPinholeWorkingResponse>")  # fmt: skip
    assert pinhole.parse_check_pinhole_working(200, working) is False


@pytest.mark.parametrize(
    ("code", "text", "action"),
    [
        (606, b"Action not authorized", "AddPinhole"),  # asked over IPv4 (secure mode)
        (709, b"NoPacketSent", "CheckPinholeWorking"),
        (402, b"Invalid Args", "DeletePinhole"),  # a UniqueID miniupnpd does not hold
    ],
)
def test_faults_from_miniupnpd_raise_upnp_errors(code: int, text: bytes, action: str) -> None:
    with pytest.raises(UPnPError) as caught:
        pinhole.parse_empty(500, _fault(code, text), action)
    assert caught.value.code == code


@pytest.mark.parametrize(
    "inner",
    [
        b"<u:AddPinholeResponse><UniqueID>65536</UniqueID></u:AddPinholeResponse>",
        b"<u:AddPinholeResponse><UniqueID>-1</UniqueID></u:AddPinholeResponse>",
        b"<u:AddPinholeResponse><UniqueID>\xd9\xa3</UniqueID></u:AddPinholeResponse>",  # Arabic 3
        b"<u:AddPinholeResponse><UniqueID></UniqueID></u:AddPinholeResponse>",
        b"<u:AddPinholeResponse></u:AddPinholeResponse>",
        b"<u:OtherResponse><UniqueID>1</UniqueID></u:OtherResponse>",
    ],
)
def test_bad_add_pinhole_replies_are_protocol_errors(inner: bytes) -> None:
    with pytest.raises(ProtocolError):
        pinhole.parse_add_pinhole(200, _reply(inner))


def test_bad_booleans_are_protocol_errors() -> None:
    body = _reply(b"<u:GetFirewallStatusResponse><FirewallEnabled>maybe</FirewallEnabled>"
                  b"<InboundPinholeAllowed>1</InboundPinholeAllowed></u:GetFirewallStatusResponse>")  # fmt: skip
    with pytest.raises(ProtocolError, match="FirewallEnabled"):
        pinhole.parse_firewall_status(200, body)
