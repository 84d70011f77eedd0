from __future__ import annotations

import pytest

from natkit.lab.config import LabConfig, miniupnpd_conf, parse_portmap, router_ruleset


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
