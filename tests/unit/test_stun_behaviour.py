"""RFC 5780 classification from observations, the RFC 8489 retransmission schedule, and
STUN server names — all pure."""

from __future__ import annotations

import socket

import pytest

from natkit.stun import behaviour as bh
from natkit.stun import retransmit as rt
from natkit.stun.address import format_addr, is_usable_peer, may_probe, parse_server

Addr = tuple[str, int]
EIM = "endpoint-independent"
ADM = "address-dependent"
APDM = "address-and-port-dependent"

X = ("203.0.113.7", 40000)
Y = ("203.0.113.7", 40001)
Z = ("203.0.113.7", 40002)

# ---------------------------------------------------------------------------------------
# Mapping (RFC 5780 4.3)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x1", "x2", "x3", "expected"),
    [
        (X, X, X, EIM),  # test II equals test I
        (X, X, None, EIM),  # test III is not needed then
        (X, X, Y, EIM),
        (X, Y, Y, ADM),  # II differs, III equals II
        (X, Y, Z, APDM),  # III differs from II
        (X, Y, X, APDM),
        (X, None, X, None),  # test II unanswered: unknown
        (X, Y, None, None),  # test III unanswered: unknown, not guessed
    ],
)
def test_classify_mapping(x1: Addr, x2: Addr | None, x3: Addr | None, expected: str) -> None:
    assert bh.classify_mapping(x1, x2, x3) == expected


def test_addresses_compare_by_value() -> None:
    assert bh.classify_mapping(("2001:db8::1", 5), ("2001:db8:0::1", 5), None) == EIM
    assert bh.same_ip("::ffff:1.2.3.4", "::ffff:1.2.3.4")
    assert not bh.same_addr(("1.2.3.4", 5), ("1.2.3.4", 6))


A1, A2 = ("198.51.100.1", 3478), ("198.51.100.1", 3479)  # one IP, two ports
B1 = ("198.51.100.2", 3478)
C1 = ("192.0.2.9", 19302)


@pytest.mark.parametrize(
    ("observations", "expected"),
    [
        ([(A1, X), (B1, X)], EIM),  # same mapping at two IPs
        ([(A1, X), (B1, X), (C1, X)], EIM),
        ([(A1, X), (A2, Y)], APDM),  # the port alone changed it
        ([(A1, X), (A2, Y), (B1, X)], APDM),
        ([(A1, X), (A2, X), (B1, Y)], ADM),  # held across ports, changed across IPs
        ([(A1, X), (B1, Y)], None),  # changed across IPs: ADM or APDM, cannot tell
        ([(A1, X), (A2, X)], None),  # held across ports of one IP only: EIM or ADM
        ([(A1, X), (B1, X), (C1, Y)], None),  # held for some IPs, not others: inconsistent
        ([(A1, X)], None),  # one server
        ([(A1, X), (A1, Y)], None),  # the same server twice is one observation
        ([], None),
    ],
)
def test_classify_mapping_across_servers(
    observations: list[tuple[Addr, Addr]], expected: str | None
) -> None:
    assert bh.classify_mapping_across(observations) == expected


# ---------------------------------------------------------------------------------------
# Filtering (RFC 5780 4.4) and the rest
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change_ip_port", "change_port", "expected"),
    [
        (True, True, EIM),
        (True, False, EIM),
        (True, None, EIM),
        (False, True, ADM),
        (False, False, APDM),
        (False, None, None),  # 420 on the port-only test: unknown
        (None, True, None),  # 420 (or a server ignoring CHANGE-REQUEST): unknown
        (None, None, None),
    ],
)
def test_classify_filtering(
    change_ip_port: bool | None, change_port: bool | None, expected: str | None
) -> None:
    assert bh.classify_filtering(change_ip_port, change_port) == expected


PRIMARY = ("198.51.100.1", 3478)


@pytest.mark.parametrize(
    ("source", "change_ip", "change_port", "expected"),
    [
        (("198.51.100.2", 3479), True, True, True),
        (("198.51.100.1", 3479), False, True, True),
        (("198.51.100.1", 3478), True, True, False),  # server ignored the flags
        (("198.51.100.1", 3478), False, True, False),
        (("198.51.100.2", 3478), True, True, False),  # only the IP changed
        (("198.51.100.2", 3479), False, True, False),  # the IP changed though not asked
    ],
)
def test_changed_as_asked(source: Addr, change_ip: bool, change_port: bool, expected: bool) -> None:
    assert (
        bh.changed_as_asked(PRIMARY, source, change_ip=change_ip, change_port=change_port)
        == expected
    )


def test_port_preservation_and_nat() -> None:
    local = ("192.168.77.10", 40000)
    assert bh.port_preserving(local, X) is True
    assert bh.port_preserving(local, Y) is False
    assert bh.port_preserving(local, None) is None
    assert bh.behind_nat(local, X) is True
    assert bh.behind_nat(local, local) is False
    assert bh.behind_nat(local, None) is None


# ---------------------------------------------------------------------------------------
# Retransmission (RFC 8489 6.2.1)
# ---------------------------------------------------------------------------------------


def test_rfc8489_default_schedule() -> None:
    waits = rt.retransmit_schedule()
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 8.0]
    # The RFC's own example: requests at 0, 500, 1500, 3500, 7500, 15500 and 31500 ms,
    # failure at 39500 ms.
    assert rt.send_times(waits) == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert sum(waits) == rt.TI == 39.5


def test_schedule_parameters() -> None:
    assert rt.retransmit_schedule(0.1, rc=3, rm=4) == pytest.approx([0.1, 0.2, 0.4])
    assert rt.retransmit_schedule(1.0, rc=1, rm=16) == [16.0]
    for bad in ({"rto": 0}, {"rc": 0}, {"rm": 0}, {"rto": -1}):
        with pytest.raises(ValueError):
            rt.retransmit_schedule(**bad)


def test_lab_schedule_fits_its_budget() -> None:
    waits = rt.retransmit_schedule(0.1, timeout=1.5)
    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.8])  # 0.8 cut from 0.8: sum 1.5
    assert sum(waits) == pytest.approx(1.5)
    assert rt.send_times(waits) == pytest.approx([0.0, 0.1, 0.3, 0.7])


def test_cap_schedule() -> None:
    assert rt.cap_schedule([0.5, 1.0, 2.0], 1.0) == [0.5, 0.5]
    assert rt.cap_schedule([0.5, 1.0, 2.0], 10.0) == [0.5, 1.0, 2.0]
    assert rt.cap_schedule([0.5], 0.2) == [0.2]
    with pytest.raises(ValueError):
        rt.cap_schedule([0.5], 0)


def test_rto_from_rtt() -> None:
    assert rt.rto_from_rtt(0.1) == pytest.approx(0.3)  # RFC 6298 2.2: SRTT + 4·RTTVAR = 3R
    assert rt.rto_from_rtt(0.0001) == rt.MIN_RTO  # loopback: floored
    with pytest.raises(ValueError):
        rt.rto_from_rtt(-1)


# ---------------------------------------------------------------------------------------
# Server names (--stun HOST:PORT)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("127.0.0.1:3478", ("127.0.0.1", 3478)),
        ("127.0.0.1", ("127.0.0.1", 3478)),
        ("stun.example.org:19302", ("stun.example.org", 19302)),
        ("stun.example.org", ("stun.example.org", 3478)),
        ("[::1]:5000", ("::1", 5000)),
        ("[::1]", ("::1", 3478)),
        ("2001:db8::1", ("2001:db8::1", 3478)),
        (" 10.0.0.1:1 ", ("10.0.0.1", 1)),
        (("127.0.0.2", 3479), ("127.0.0.2", 3479)),
    ],
)
def test_parse_server(spec: str | Addr, expected: Addr) -> None:
    assert parse_server(spec) == expected


@pytest.mark.parametrize(
    "spec", ["", ":3478", "host:", "host:x", "host:0", "host:65536", "[::1", "[::1]x", ("h", 0)]
)
def test_parse_server_rejects(spec: str | Addr) -> None:
    with pytest.raises(ValueError, match="STUN server"):
        parse_server(spec)


def test_format_addr() -> None:
    assert format_addr(("127.0.0.1", 3478)) == "127.0.0.1:3478"
    assert format_addr(("::1", 3478)) == "[::1]:3478"


@pytest.mark.parametrize(
    ("addr", "ok"),
    [
        (("203.0.113.7", 3478), True),
        (("::1", 3478), True),
        (("224.0.0.1", 3478), False),
        (("255.255.255.255", 3478), False),
        (("0.0.0.0", 3478), False),
        (("ff02::1", 3478), False),
        (("203.0.113.7", 0), False),
        (("not-an-ip", 3478), False),
    ],
)
def test_server_supplied_addresses_are_vetted(addr: Addr, ok: bool) -> None:
    assert is_usable_peer(addr) is ok


@pytest.mark.parametrize(
    ("addr", "server", "ok"),
    [
        (("198.51.100.2", 3479), ("198.51.100.1", 3478), True),
        (("127.0.0.2", 3479), ("127.0.0.1", 3478), True),  # a loopback server, as in tests
        (("127.0.0.1", 22), ("198.51.100.1", 3478), False),  # remote server, our loopback
        (("::1", 3479), ("198.51.100.1", 3478), False),
        (("2001:db8::1", 3479), ("198.51.100.1", 3478), False),  # another family
        (("224.0.0.1", 3479), ("198.51.100.1", 3478), False),
    ],
)
def test_server_may_not_aim_probes_anywhere(addr: Addr, server: Addr, ok: bool) -> None:
    assert may_probe(addr, server, socket.AF_INET) is ok
