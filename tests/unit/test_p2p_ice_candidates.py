"""ICE descriptions on the signalling channel, and path classification (sans-I/O)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aioice import Candidate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natkit.errors import ProtocolError
from natkit.p2p.candidates import (
    MAX_CANDIDATES,
    IceCandidate,
    IceDescription,
    classify_path,
    host_candidate,
    port_mapped_candidate,
    reachable_remote,
    relay_candidate,
    srflx_candidate,
    without_redundant,
)
from natkit.p2p.errors import IceDescriptionError, P2PError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UFRAG, PWD = "abcd", "a" * 22
BASE = ("192.168.77.10", 40000)
HOST = IceCandidate.from_aioice(host_candidate(BASE))
SRFLX = IceCandidate.from_aioice(srflx_candidate(("100.200.0.1", 1159), BASE))
MAPPED = IceCandidate.from_aioice(
    port_mapped_candidate(("100.200.0.1", 40000), BASE), port_mapped=True
)
RELAY = IceCandidate.from_aioice(relay_candidate(("100.200.0.2", 49160), ("100.200.0.1", 1160)))
OURS = IceDescription(UFRAG, PWD, (HOST, MAPPED, SRFLX, RELAY))

PEER_HOST = IceCandidate.from_sdp("1 1 udp 2130706431 100.200.0.2 5000 typ host")
PEER_MAPPED = IceCandidate.from_sdp(
    "2 1 udp 1694498815 100.200.0.4 6000 typ srflx raddr 192.168.78.10 rport 6000",
    port_mapped=True,
)
PEER_RELAY = IceCandidate.from_sdp(
    "3 1 udp 16777215 100.200.0.2 49170 typ relay raddr 100.200.0.4 rport 1234"
)
THEIRS = IceDescription("wxyz", "b" * 22, (PEER_HOST, PEER_MAPPED, PEER_RELAY))


def prflx(host: str, port: int) -> IceCandidate:
    return IceCandidate("x", 1845501695, host, port, "prflx")


# ---- serialisation -----------------------------------------------------------------------------


def test_a_description_survives_json_both_ways() -> None:
    wire = json.dumps(OURS.to_dict())
    back = IceDescription.from_dict(json.loads(wire))
    assert back == OURS
    assert [c.port_mapped for c in back.candidates] == [False, True, False, False]


def test_candidates_are_aioice_sdp_lines() -> None:
    line = MAPPED.to_sdp()
    assert line == Candidate.from_sdp(line).to_sdp()
    assert " typ srflx raddr 192.168.77.10 rport 40000" in line
    assert MAPPED.to_dict() == {"sdp": line, "port_mapped": True}
    assert IceCandidate.from_sdp("candidate:" + line, port_mapped=True) == MAPPED


def test_unknown_keys_and_extension_attributes_are_ignored() -> None:
    data: dict[str, Any] = OURS.to_dict()
    data["ice_lite"] = False
    cand = IceCandidate.from_sdp("1 1 UDP 2130706431 10.0.0.1 5000 typ host generation 0 x y")
    assert cand.address == ("10.0.0.1", 5000)
    assert IceDescription.from_dict(data) == OURS


def test_ipv6_addresses_are_canonical() -> None:
    cand = IceCandidate.from_sdp("1 1 udp 2130706431 2001:DB8:0:0::1 5000 typ host")
    assert cand.host == "2001:db8::1"
    assert THEIRS.find(("100.200.0.2", 5000)) == PEER_HOST
    assert IceDescription("abcd", PWD, (cand,)).find(("2001:db8::0:1", 5000)) == cand


BAD_LINES = [
    ("", "not an ICE candidate"),
    ("1 1 udp 2130706431 10.0.0.1 5000 kind host", "not an ICE candidate"),
    ("1 1 udp 2130706431 10.0.0.1 5000 typ host raddr", "dangling"),
    ("f:o 1 udp 2130706431 10.0.0.1 5000 typ host", "foundation"),
    ("1 2 udp 2130706431 10.0.0.1 5000 typ host", "component 1 only"),
    ("1 1 tcp 2130706431 10.0.0.1 5000 typ host", "natkit uses UDP"),
    ("1 1 udp 0 10.0.0.1 5000 typ host", "priority"),
    ("1 1 udp 2147483648 10.0.0.1 5000 typ host", "priority"),
    ("1 1 udp \u00b2 10.0.0.1 5000 typ host", "priority"),
    ("1 1 udp 2130706431 10.0.0.1 0 typ host", "port"),
    ("1 1 udp 2130706431 10.0.0.1 70000 typ host", "port"),
    ("1 1 udp 2130706431 10.0.0.1 -1 typ host", "port"),
    ("1 1 udp 2130706431 abcd.local 5000 typ host", "not an IP address"),
    ("1 1 udp 2130706431 224.0.0.251 5000 typ host", "multicast"),
    ("1 1 udp 2130706431 0.0.0.0 5000 typ host", "unspecified"),
    ("1 1 udp 2130706431 10.0.0.1 5000 typ prflx", "learned, not signalled"),
    ("1 1 udp 2130706431 10.0.0.1 5000 typ weird", "unknown ICE candidate type"),
    ("1 1 udp 2130706431 10.0.0.1 5000 typ srflx raddr example.org rport 1", "related address"),
    ("1 1 udp 2130706431 10.0.0.1 5000 typ srflx raddr 10.0.0.2 rport x", "related port"),
    ("1 1 udp 2130706431 10.0.0.1 5000 typ host " + "a b " * 200, "characters"),
]


@pytest.mark.parametrize(("line", "why"), BAD_LINES)
def test_bad_candidate_lines_are_refused(line: str, why: str) -> None:
    with pytest.raises(IceDescriptionError, match=why):
        IceCandidate.from_sdp(line)


def test_only_a_reflexive_candidate_can_be_port_mapped() -> None:
    with pytest.raises(IceDescriptionError, match="cannot be port-mapped"):
        IceCandidate.from_sdp(PEER_HOST.to_sdp(), port_mapped=True)


def description(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = OURS.to_dict()
    data.update(changes)
    return data


BAD_DESCRIPTIONS: list[tuple[object, str]] = [
    ([], "must be an object"),
    (description(ufrag="abc"), "username fragment"),
    (description(ufrag="ab:cd"), "username fragment"),
    (description(ufrag=None), "username fragment"),
    (description(pwd="short"), "password"),
    (description(pwd="x" * 257), "password"),
    (description(candidates="none"), "must be a list"),
    (description(candidates=[{"sdp": PEER_HOST.to_sdp()}] * (MAX_CANDIDATES + 1)), "at most"),
    (description(candidates=["1 1 udp 1 10.0.0.1 5000 typ host"]), "an object with 'sdp'"),
    (description(candidates=[{"sdp": 5}]), "'sdp' must be a string"),
    (description(candidates=[{"sdp": SRFLX.to_sdp(), "port_mapped": "yes"}]), "true or false"),
]


@pytest.mark.parametrize(("data", "why"), BAD_DESCRIPTIONS)
def test_bad_descriptions_are_refused(data: object, why: str) -> None:
    with pytest.raises(IceDescriptionError, match=why):
        IceDescription.from_dict(data)


def test_the_error_is_natkits_protocol_error_and_p2p_error() -> None:
    assert issubclass(IceDescriptionError, ProtocolError)
    assert issubclass(IceDescriptionError, P2PError)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)


@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "ufrag": st.one_of(st.just(UFRAG), JSONISH),
            "pwd": st.one_of(st.just(PWD), JSONISH),
            "candidates": st.lists(
                st.one_of(
                    JSONISH,
                    st.fixed_dictionaries({"sdp": st.text(max_size=120)}),
                    st.fixed_dictionaries(
                        {"sdp": st.sampled_from([c.to_sdp() for c in OURS.candidates])},
                        optional={"port_mapped": JSONISH},
                    ),
                ),
                max_size=4,
            ),
        },
    )
)
def test_any_description_parses_or_raises_ice_description_error(data: dict[str, Any]) -> None:
    try:
        parsed = IceDescription.from_dict(data)
    except IceDescriptionError:
        return
    assert IceDescription.from_dict(json.loads(json.dumps(parsed.to_dict()))) == parsed


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.sampled_from(["typ", "host", "srflx", "relay", "raddr", "rport", "udp", "1"]),
            st.text(max_size=12).filter(lambda t: t.strip() == t and " " not in t and t),
            st.integers(-5, 2**33).map(str),
            st.ip_addresses().map(str),
        ),
        max_size=14,
    ).map(" ".join)
)
def test_any_candidate_line_parses_or_raises_ice_description_error(line: str) -> None:
    try:
        cand = IceCandidate.from_sdp(line)
    except IceDescriptionError:
        return
    assert IceCandidate.from_sdp(cand.to_sdp()) == cand


# ---- local candidates ---------------------------------------------------------------------------


def test_priorities_prefer_host_then_port_mapped_then_stun_then_relay() -> None:
    assert HOST.priority > MAPPED.priority > SRFLX.priority > RELAY.priority
    assert MAPPED.foundation not in (HOST.foundation, SRFLX.foundation, RELAY.foundation)
    assert (MAPPED.related_address, MAPPED.related_port) == BASE


def test_redundant_reflexive_candidates_are_dropped() -> None:
    host = host_candidate(("100.200.0.2", 5000))
    same_as_host = srflx_candidate(("100.200.0.2", 5000), ("100.200.0.2", 5000))
    assert without_redundant([host], [same_as_host], []) == ([], [])
    # A port-keeping NAT whose mapping has the same port: the port-mapped one stays.
    base = host_candidate(BASE)
    stun_seen = srflx_candidate(("100.200.0.1", 40000), BASE)
    mapped = port_mapped_candidate(("100.200.0.1", 40000), BASE)
    assert without_redundant([base], [stun_seen], [mapped]) == ([], [mapped])
    other = srflx_candidate(("100.200.0.1", 1159), BASE)
    assert without_redundant([base], [other, other], [mapped]) == ([other], [mapped])
    # The router is this host: the mapping adds nothing.
    assert without_redundant([host], [], [port_mapped_candidate(("100.200.0.2", 5000), BASE)]) == (
        [],
        [],
    )


# ---- path classification ------------------------------------------------------------------------


CASES = [
    # local, remote as aioice has it, our address as the peer sees it, expected
    (HOST, PEER_HOST, ("100.200.0.1", 1200), "direct"),
    (HOST, PEER_HOST, SRFLX.address, "direct"),
    (HOST, PEER_HOST, None, "direct"),
    (HOST, prflx("100.200.0.2", 5001), ("100.200.0.1", 1200), "direct"),
    (HOST, PEER_HOST, MAPPED.address, "port-mapped"),  # the peer reached our mapping
    (HOST, PEER_MAPPED, SRFLX.address, "port-mapped"),  # we reached the peer's mapping
    (HOST, prflx(*PEER_MAPPED.address), None, "port-mapped"),  # ... learned from its check
    (RELAY, PEER_HOST, RELAY.address, "turn"),
    (HOST, PEER_RELAY, SRFLX.address, "turn"),
    (HOST, prflx(*PEER_RELAY.address), None, "turn"),  # the peer's relay, learned first
    (RELAY, PEER_MAPPED, RELAY.address, "turn"),  # a relay anywhere makes it TURN
]


@pytest.mark.parametrize(("local", "remote", "seen_as", "expected"), CASES)
def test_paths_are_classified(
    local: IceCandidate, remote: IceCandidate, seen_as: tuple[str, int] | None, expected: str
) -> None:
    assert classify_path(local, remote, seen_as, OURS, THEIRS) == expected


# ---- which of the peer's candidates are worth checks (issue 16) ----------------------------


def _cand(host: str, kind: str = "host", port: int = 5000) -> IceCandidate:
    return IceCandidate("1", 100, host, port, kind)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ours", "theirs", "kept"),
    [
        # loopback, unspecified, broadcast: this machine only, so never a remote peer's ...
        (["192.168.1.5"], "127.0.0.1", False),
        (["192.168.1.5"], "127.8.9.10", False),
        (["192.168.1.5"], "0.0.0.0", False),
        (["192.168.1.5"], "255.255.255.255", False),
        (["fd00::5"], "::1", False),
        (["fd00::5"], "::ffff:127.0.0.1", False),
        # ... unless we gather on loopback ourselves: two peers on one machine
        (["127.0.0.1"], "127.0.0.1", True),
        # a private address: only when we have one (a peer on our LAN, or one like it)
        (["100.200.0.7"], "192.168.1.1", False),
        (["100.200.0.7"], "fd12::1", False),
        (["10.0.0.2"], "192.168.1.9", True),
        # link-local: only with a link-local address of ours
        (["10.0.0.2"], "169.254.1.1", False),
        (["169.254.7.7"], "169.254.1.1", True),
        # a global address: always
        (["127.0.0.1"], "100.200.0.1", True),
        (["10.0.0.2"], "2001:db8::1", True),
    ],
)
def test_only_candidates_that_can_be_the_peers_are_checked(
    ours: list[str], theirs: str, kept: bool
) -> None:
    candidate = _cand(theirs, "srflx")
    got, dropped = reachable_remote([candidate], [_cand(a) for a in ours])
    assert got == ([candidate] if kept else [])
    assert bool(dropped) is not kept
    if dropped:
        assert theirs in dropped[0] and "scope" in dropped[0]


def test_only_our_host_candidates_decide_the_scopes_we_reach() -> None:
    # A reflexive candidate of ours on loopback (a relay on this machine) is no loopback host.
    ours = [_cand("10.0.0.2"), _cand("127.0.0.1", "srflx")]
    got, dropped = reachable_remote([_cand("127.0.0.1")], ours)
    assert got == [] and len(dropped) == 1
