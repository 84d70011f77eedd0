"""Fuzz the pinhole codec: whatever a router answers, only NatkitError escapes; whatever is
asked, a request is well-formed XML or refused with ValueError."""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable

import defusedxml.ElementTree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natkit.errors import NatkitError
from natkit.portmap import pinhole

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PARSERS: list[Callable[[int, bytes], object]] = [
    pinhole.parse_add_pinhole,
    pinhole.parse_firewall_status,
    pinhole.parse_check_pinhole_working,
    lambda status, body: pinhole.parse_empty(status, body, "DeletePinhole"),
]
GOOD = (
    b'<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
    b"<s:Body><u:AddPinholeResponse><UniqueID>1</UniqueID></u:AddPinholeResponse></s:Body>"
    b"</s:Envelope>"
)


def _only_natkit_errors(parse: Callable[[int, bytes], object], status: int, body: bytes) -> None:
    with contextlib.suppress(NatkitError):
        parse(status, body)


@FUZZ
@given(st.integers(0, 999), st.binary(max_size=2048))
def test_random_bytes(status: int, body: bytes) -> None:
    for parse in PARSERS:
        _only_natkit_errors(parse, status, body)


@FUZZ
@given(st.integers(0, len(GOOD)), st.binary(max_size=64), st.integers(0, 64))
def test_mutated_reply(at: int, insert: bytes, cut: int) -> None:
    body = GOOD[:at] + insert + GOOD[at + cut :]
    for parse in PARSERS:
        _only_natkit_errors(parse, 200, body)


@FUZZ
@given(
    st.ip_addresses(v=6),
    st.integers(-5, 70000),
    st.sampled_from(["tcp", "udp", "TCP", "icmp", ""]),
    st.integers(-5, 90000),
    st.text(max_size=40),
)
def test_requests_are_xml_or_refused(
    client: ipaddress.IPv6Address, port: int, proto: str, lease: int, remote: str
) -> None:
    try:
        req = pinhole.add_pinhole(str(client), port, proto, lease, remote_host=remote)
    except ValueError:
        return
    _, body = req.encode(host="2001:db8:77::1", port=5000, path="/ctl/IP6FCtl")
    root = defusedxml.ElementTree.fromstring(body)
    values = {el.tag: el.text or "" for el in root.iter()}
    assert values["InternalClient"] == str(client)
    assert values["InternalPort"] == str(port) and 0 < port < 65536
    assert 1 <= int(values["LeaseTime"]) <= pinhole.MAX_LEASE
