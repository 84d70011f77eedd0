from __future__ import annotations

from pathlib import Path

import pytest

from natkit.lab import config as C
from natkit.lab.config import (
    LAB_SUBNETS,
    LabConfig,
    isp_ruleset,
    miniupnpd_conf,
    parse_nat,
    parse_portmap,
    router_ruleset,
)
from natkit.lab.coturn import binding_request, is_binding_success, turnserver_argv


def test_parse_portmap() -> None:
    assert parse_portmap("none") == frozenset()
    assert parse_portmap("upnp,natpmp,pcp") == frozenset({"upnp", "natpmp", "pcp"})
    assert parse_portmap(" UPnP , pcp") == frozenset({"upnp", "pcp"})
    with pytest.raises(ValueError, match="unknown port-mapping protocol"):
        parse_portmap("upnp,stun")


def test_ruleset_home_router_firewall_and_nat() -> None:
    rules = router_ruleset(LabConfig(name="x"))
    assert 'iifname "wan0" ct state established,related accept' in rules
    assert 'iifname "wan0" drop' in rules
    assert 'oifname "wan0" masquerade\n' in rules
    assert "jump miniupnpd" in rules and "jump prerouting_miniupnpd" in rules
    assert "masquerade random" in router_ruleset(LabConfig(name="x", nat="random"))


def test_natpmp_and_pcp_can_be_switched_off_separately() -> None:
    only_pmp = router_ruleset(LabConfig(name="x", portmap=frozenset({"natpmp"})))
    assert "udp dport 5351 @th,64,8 2 drop" in only_pmp  # PCP (version 2) dropped
    only_pcp = router_ruleset(LabConfig(name="x", portmap=frozenset({"pcp"})))
    assert "udp dport 5351 @th,64,8 0 drop" in only_pcp  # NAT-PMP (version 0) dropped
    both = router_ruleset(LabConfig(name="x"))
    assert "5351" not in both


def test_miniupnpd_conf() -> None:
    conf = miniupnpd_conf(LabConfig(name="x", portmap=frozenset({"upnp"})))
    assert "enable_upnp=yes" in conf and "enable_natpmp=no" in conf
    assert "ext_ifname=wan0" in conf and "listening_ip=br-lan" in conf
    assert "allow 1024-65535 192.168.77.0/24 1024-65535" in conf


def test_config_round_trip() -> None:
    cfg = LabConfig(name="y", portmap=frozenset({"pcp"}), nat="random")
    assert LabConfig.from_json(cfg.to_json()) == cfg


def test_full_cone_forwards_inbound_udp_to_lan_after_miniupnpd() -> None:
    rules = router_ruleset(LabConfig(name="x", nat="full-cone"))
    assert 'oifname "wan0" masquerade\n' in rules
    forward = 'iifname "wan0" udp dport 1024-65535 dnat ip to 192.168.77.10'
    assert rules.index("jump prerouting_miniupnpd") < rules.index(forward)
    # The home-router firewall stays: only established/related and forwarded traffic enters.
    assert 'iifname "wan0" ct status dnat accept' in rules and 'iifname "wan0" drop' in rules
    assert "dnat" not in router_ruleset(LabConfig(name="x")).split("chain prerouting {")[1]


def test_isp_is_a_carrier_nat() -> None:
    rules = isp_ruleset()
    assert 'oifname "wan0" masquerade\n' in rules and "dnat" not in rules
    assert rules.count('iifname "wan0" ct state established,related accept') == 2
    assert rules.count('iifname "wan0" drop') == 2


def test_upstream_nat_moves_the_router_wan_side() -> None:
    plain, double = LabConfig(name="x"), LabConfig(name="x", upstream_nat=True)
    assert (plain.rtr_wan_ip, plain.rtr_gateway) == ("100.200.0.1", "100.200.0.2")
    assert (double.rtr_wan_ip, double.rtr_gateway) == ("100.201.0.2", "100.201.0.1")
    assert plain.nodes == ("lan", "dev", "rtr", "wan")
    assert double.nodes == ("lan", "dev", "rtr", "wan", "isp") and double.netns("isp") == "x-isp"
    assert "100.201.0.0/24" in LAB_SUBNETS


def test_parse_nat_and_new_fields_round_trip() -> None:
    assert parse_nat(" Full-Cone ") == "full-cone" and parse_nat("random") == "random"
    with pytest.raises(ValueError, match="unknown NAT behaviour"):
        parse_nat("cone")
    cfg = LabConfig(name="z", nat="full-cone", coturn=False, upstream_nat=True)
    assert LabConfig.from_json(cfg.to_json()) == cfg
    # A state file written before these fields existed still reads.
    old = {"name": "z", "portmap": ["upnp"], "nat": "eim", "upnp_port": 5000, "router_uuid": "u"}
    assert LabConfig.from_json(old) == LabConfig(
        name="z", portmap=frozenset({"upnp"}), router_uuid="u"
    )


def test_turnserver_command_line() -> None:
    argv = turnserver_argv("/usr/bin/turnserver", Path("/run/natkit/x"))
    assert argv[:2] == ["/usr/bin/turnserver", "-n"]  # Debian's config turns RFC 5780 off
    for arg in ("--listening-ip=100.200.0.2", "--listening-ip=100.200.0.3",
                "--listening-port=3478", "--alt-listening-port=3479", "--lt-cred-mech",
                f"--user={C.TURN_USER}:{C.TURN_PASSWORD}", f"--realm={C.TURN_REALM}",
                "--pidfile=/run/natkit/x/coturn.pid", "--db=/run/natkit/x/coturn.db"):  # fmt: skip
        assert arg in argv
    assert "no-rfc5780" not in " ".join(argv)


def test_binding_request_and_success() -> None:
    request, txid = binding_request()
    assert len(request) == 20 and request[:4] == b"\x00\x01\x00\x00" and request[8:] == txid
    success = b"\x01\x01\x00\x00" + request[4:]
    assert is_binding_success(success, txid)
    assert not is_binding_success(success, bytes(12))
    assert not is_binding_success(b"\x01\x11\x00\x00" + request[4:], txid)  # an error response
    assert not is_binding_success(success[:19], txid)


def test_second_lan_is_off_by_default_and_adds_two_nodes() -> None:
    plain = LabConfig(name="x")
    assert not plain.second_lan and plain.routers == ("rtr",)
    with pytest.raises(ValueError, match="--second-lan"):
        plain.router("rtr2")
    peer = LabConfig(name="x", second_lan=True, upstream_nat=True)
    assert peer.nodes == ("lan", "dev", "rtr", "wan", "isp", "lan2", "rtr2")
    assert peer.routers == ("rtr", "rtr2") and peer.netns("rtr2") == "x-rtr2"
    assert set(C.EVERY_NODE) == {*C.ALL_NODES, "lan2", "rtr2"}
    assert "192.168.78.0/24" in LAB_SUBNETS


def test_second_router_has_its_own_addresses_and_settings() -> None:
    cfg = LabConfig(name="x", second_lan=True, nat2="full-cone", portmap2=frozenset({"pcp"}))
    rtr, rtr2 = cfg.router("rtr"), cfg.router("rtr2")
    assert (rtr2.lan_ip, rtr2.host_ip, rtr2.wan_ip) == (
        "192.168.78.1",
        "192.168.78.10",
        "100.200.0.4",
    )
    assert rtr2.wan_ip not in (C.RTR_WAN_IP, *C.WAN_IPS)
    assert (rtr2.nat, rtr2.portmap, rtr2.gateway) == ("full-cone", {"pcp"}, C.WAN_IPS[0])
    assert (rtr.nat, rtr.portmap, rtr.host_ip) == ("eim", frozenset(C.PORTMAP_PROTOCOLS), C.LAN_IP)
    assert rtr2.uuid != rtr.uuid and rtr2.uuid == cfg.router("rtr2").uuid  # stable
    # --upstream-nat is the first router's: rtr2 stays on the Internet segment.
    double = LabConfig(name="x", second_lan=True, upstream_nat=True)
    assert double.router("rtr").wan_ip == C.RTR_ISP_IP
    assert (double.router("rtr2").wan_ip, double.router("rtr2").gateway) == (
        "100.200.0.4",
        C.WAN_IPS[0],
    )


def test_second_router_ruleset_and_miniupnpd_conf() -> None:
    cfg = LabConfig(name="x", second_lan=True, nat2="full-cone", portmap2=frozenset({"natpmp"}))
    rules = router_ruleset(cfg, "rtr2")
    # The same home-router firewall, its full cone forwarding to lan2, not lan.
    assert rules.count('iifname "wan0" drop') == 2 and "ct status dnat accept" in rules
    assert 'iifname "wan0" udp dport 1024-65535 dnat ip to 192.168.78.10' in rules
    assert "udp dport 5351 @th,64,8 2 drop" in rules  # PCP off on rtr2 only
    assert router_ruleset(cfg, "rtr") == router_ruleset(LabConfig(name="x"))
    assert "masquerade random" in router_ruleset(
        LabConfig(name="x", second_lan=True, nat2="random"), "rtr2"
    )
    conf = miniupnpd_conf(cfg, "rtr2")
    assert "allow 1024-65535 192.168.78.0/24 1024-65535" in conf
    assert "enable_upnp=no" in conf and "enable_natpmp=yes" in conf
    assert f"uuid={cfg.router('rtr2').uuid}" in conf and "ext_ifname=wan0" in conf
    assert miniupnpd_conf(cfg) == miniupnpd_conf(LabConfig(name="x", router_uuid=cfg.router_uuid))


def test_second_lan_round_trip() -> None:
    cfg = LabConfig(name="p", second_lan=True, nat2="random", portmap2=frozenset(), upnp_port2=5003)
    assert LabConfig.from_json(cfg.to_json()) == cfg
    # A state file from before the second LAN: none, and rtr2's defaults.
    old = LabConfig.from_json({"name": "p", "portmap": ["upnp"], "router_uuid": "u"})
    assert (
        not old.second_lan and old.nat2 == "eim" and old.portmap2 == frozenset(C.PORTMAP_PROTOCOLS)
    )
