"""``natkit check`` in the lab: the real NAT (nftables) in each behaviour, real miniupnpd,
real coturn with RFC 5780, a double NAT, a real relay; and Debian's ``stun`` client as the
reference classifier that natkit must agree with."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from natkit.check.run import DEFAULT_STUN_SERVERS
from natkit.lab import Lab
from natkit.lab import config as C
from tests.conftest import IN_CI
from tests.lab.relay_helpers import natkit_env, start_relay
from tests.lab.test_lab_nat import stun_client

pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not IN_CI, reason="the lab needs root")

NATKIT = str(Path(sys.executable).parent / "natkit")
STUN = f"{C.STUN_PRIMARY[0]}:{C.STUN_PRIMARY[1]}"
PUBLIC = C.RTR_WAN_IP  # what the Internet sees of the lab's LAN (the router, or the isp)
EIM, ADM, APDM = "endpoint-independent", "address-dependent", "address-and-port-dependent"

# What natkit must find per router behaviour: (mapping, filtering, port preserving).
EXPECTED = {
    "eim": (EIM, APDM, True),
    "random": (APDM, APDM, False),
    "full-cone": (EIM, EIM, True),
}


def check(lab: Lab, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    r = lab.run("lan", [NATKIT, "check", "--json", *args], timeout=30, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    report: dict[str, Any] = json.loads(r.stdout)
    assert report["event"] == "report"
    return report


@pytest.fixture
def nat_lab(request: pytest.FixtureRequest, make_lab: Callable[..., Lab]) -> Iterator[Lab]:
    nat = request.param
    yield request.getfixturevalue("lab") if nat == "eim" else make_lab(f"ck-{nat}", nat=nat)


def stun_client_terms(code: int) -> tuple[str, str | None, bool]:
    """Debian's RFC 3489 verdict (its exit code) in RFC 4787 terms, as far as it can tell:
    it does not tell an address-dependent mapping from an address-and-port-dependent one."""
    nat_type, preserves = code & 0x0E, bool(code & 0x01)
    return {
        0x02: (EIM, EIM, preserves),  # independent mapping, independent filter
        0x04: (EIM, ADM, preserves),  # independent mapping, address dependent filter
        0x06: (EIM, APDM, preserves),  # independent mapping, port dependent filter
        0x08: ("dependent", None, preserves),  # dependent mapping (filter not tested)
    }[nat_type]


@pytest.mark.parametrize("nat_lab", ["eim", "random", "full-cone"], indirect=True)
def test_each_nat_behaviour_is_classified_and_agrees_with_debian_stun(nat_lab: Lab) -> None:
    report = check(nat_lab, "--stun", STUN)
    mapping, filtering, preserving = EXPECTED[nat_lab.cfg.nat]
    assert report["udp"] is True
    assert report["public_ipv4"] == PUBLIC and report["local_ipv4"] == C.LAN_IP
    assert (report["mapping"], report["filtering"]) == (mapping, filtering), report
    assert report["port_preserving"] is preserving
    assert report["hairpinning"] is False  # Linux NAT does not hairpin
    assert report["double_nat"] is False
    for method in ("upnp", "natpmp", "pcp"):
        assert report["port_mapping"][method] == {"external_ip": PUBLIC, "public": True}
    assert report["verdict"]["inbound_tcp"].startswith("router port mapping (PCP)")
    direct = report["verdict"]["direct_udp"]
    assert direct.startswith("likely") if mapping == EIM else "port mapping" in direct
    # The reference classifier, asked from the same host through the same NAT.
    ref_mapping, ref_filtering, ref_preserving = stun_client_terms(stun_client(nat_lab)[0])
    assert (mapping == EIM) == (ref_mapping == EIM)
    if ref_filtering is not None:
        assert filtering == ref_filtering
    assert preserving == ref_preserving


def test_a_router_without_port_mapping_needs_the_relay(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab("ck-nopm", portmap=frozenset())
    report = check(lab, "--stun", STUN)
    assert report["port_mapping"] == {"upnp": None, "natpmp": None, "pcp": None}
    assert report["double_nat"] is None
    assert report["verdict"]["inbound_tcp"].startswith("relay: the router offers no port mapping")
    assert report["mapping"] == EIM  # the NAT is still measured


@pytest.mark.parametrize("only", ["upnp", "natpmp", "pcp"])
def test_each_protocol_is_reported_alone(make_lab: Callable[..., Lab], only: str) -> None:
    lab = make_lab(f"ck-{only}", portmap=frozenset({only}))
    report = check(lab, "--stun", STUN)
    offered = {m for m, v in report["port_mapping"].items() if v is not None}
    assert offered == {only}
    assert report["port_mapping"][only] == {"external_ip": PUBLIC, "public": True}
    if only == "pcp":  # the PCP probe's short mapping is removed again
        rules = lab.router_rules()
        assert "dnat" not in rules.split("prerouting_miniupnpd", 1)[1].split("}", 1)[0]


def test_double_nat_is_reported(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab("ck-dnat", upstream_nat=True)
    report = check(lab, "--stun", STUN)
    assert report["public_ipv4"] == PUBLIC  # the isp's address
    for method in ("upnp", "natpmp", "pcp"):
        # The router reports its own WAN address: public-looking, but not what STUN sees.
        assert report["port_mapping"][method] == {"external_ip": C.RTR_ISP_IP, "public": True}
    assert report["double_nat"] is True
    assert report["verdict"]["inbound_tcp"].startswith("relay: the router is behind another NAT")


def test_a_server_without_rfc5780_leaves_filtering_unknown(lab: Lab) -> None:
    """coturn's alternate address alone names itself as OTHER-ADDRESS (no usable RFC 5780
    primary): one such server can tell neither behaviour; natkit says so, guessing nothing."""
    alt = f"{C.STUN_ALTERNATE[0]}:{C.STUN_PRIMARY[1]}"
    report = check(lab, "--stun", alt, "--no-portmap")
    assert report["udp"] is True and report["public_ipv4"] == PUBLIC
    assert report["filtering"] is None
    assert report["notes"]


def test_the_relay_round_trip_is_reported(lab: Lab, tmp_path: Path) -> None:
    token = "check-token-0123456789abcdef"
    with start_relay(lab, tmp_path / "relay", token=token) as relay:
        env = natkit_env(tmp_path / "agent")
        report = check(
            lab, "--stun", STUN, "--relay", relay.address, "--token", token, "--no-portmap", env=env
        )
        assert report["relay"]["address"] == relay.address
        assert report["relay"]["error"] is None
        assert 0 < report["relay"]["rtt_ms"] < 1000
        bad = check(
            lab,
            "--stun",
            STUN,
            "--relay",
            relay.address,
            "--token",
            "wrong-token-0123456789abcdef",
            env=env,
        )
        assert bad["relay"]["rtt_ms"] is None and "rejected the token" in bad["relay"]["error"]


def test_check_without_any_server_named_uses_configuration(lab: Lab) -> None:
    """NATKIT_STUN names the servers when --stun is not given (the public defaults are
    never reached in tests: the network guard fails any test that tries)."""
    env = {**os.environ, "NATKIT_STUN": STUN}
    report = check(lab, "--no-portmap", env=env)
    assert report["stun_servers"] == [STUN] and report["mapping"] == EIM


def test_human_output_is_a_table(lab: Lab) -> None:
    r = lab.run("lan", [NATKIT, "check", "--stun", STUN], timeout=30)
    assert r.returncode == 0, r.stderr
    for label in ("public IPv4", "mapping", "filtering", "double NAT", "inbound TCP"):
        assert label in r.stdout
    assert "100.200.0.1" in r.stdout


def test_a_malformed_server_name_is_a_usage_error(lab: Lab) -> None:
    r = lab.run("lan", [NATKIT, "check", "--stun", "bad:host:name:x"], timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.trips_network_guard
def test_the_public_default_servers_are_stopped_by_the_network_guard(lab: Lab) -> None:
    """With no server named, check would ask public servers: the guard that every test
    process runs under refuses the lookup, so no test can reach them."""
    env = {k: v for k, v in os.environ.items() if k != "NATKIT_STUN"}
    report = check(lab, "--no-portmap", env=env)
    assert report["stun_servers"] == list(DEFAULT_STUN_SERVERS)
    assert report["udp"] is False and report["public_ipv4"] is None
