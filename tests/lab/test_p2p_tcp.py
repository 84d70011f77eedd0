"""The direct TCP path of ``natkit p2p`` between two LANs behind two real routers
(nftables NAT, real miniupnpd): forwarded connections go over kernel TCP to the listener's
router TCP mapping when it gives one, through a TCP hole punched by a simultaneous open
when both NATs keep a port's public address, and over QUIC streams when no TCP path
exists. (Every NAT pair's route: test_p2p.py's success matrix.)

Peers as in test_p2p.py: ``listen`` on lan2 (behind rtr2), ``connect`` on lan (behind rtr).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from natkit.lab import Lab
from natkit.lab import config as C
from tests.lab.test_p2p import WEB_PORT, Peers, p2p_lab, peers_factory, pytestmark

__all__ = ["p2p_lab", "peers_factory", "pytestmark"]  # fixtures of test_p2p.py, used here too
RTR2_WAN = C.RTR2_WAN_IP


def _flows(lab: Lab, router: str, *match: str) -> int:
    """TCP flows in ``router``'s conntrack that match (conntrack's own filter options)."""
    r = lab.run(router, ["conntrack", "-L", "-p", "tcp", *match], timeout=10)
    return sum(1 for line in r.stdout.splitlines() if line.startswith("tcp"))


def _tcp_flows_to(lab: Lab, port: int) -> int:
    """TCP flows rtr2's conntrack holds towards its own WAN address and ``port``."""
    return _flows(lab, "rtr2", "--orig-dst", RTR2_WAN, "--orig-port-dst", str(port))


@pytest.mark.parametrize(
    "p2p_lab", [(("eim", False), ("eim", True)), (("random", False), ("random", True))],
    ids=["eim-eim+pm", "random-random+pm"], indirect=True,
)  # fmt: skip
def test_forwards_take_the_listeners_router_tcp_mapping(
    p2p_lab: Lab, peers_factory: Callable[..., Peers]
) -> None:
    peers = peers_factory(p2p_lab, extra=[])
    ready_c, ready_l = peers.ready()
    served = ready_l["tcp"]
    assert isinstance(served, int), peers.why()
    offered = ready_c["tcp"]
    assert isinstance(offered, list), peers.why()
    mapped = [e for e in offered if str(e).startswith(f"{RTR2_WAN}:")]
    assert len(mapped) == 1, (offered, peers.why())
    public_port = int(mapped[0].rpartition(":")[2])
    before = _tcp_flows_to(p2p_lab, public_port)
    for _ in range(3):
        assert peers.get() == f"hello from 127.0.0.1:{WEB_PORT}\n"
    # each forwarded connection was a TCP connection through rtr2's mapping
    assert _tcp_flows_to(p2p_lab, public_port) - before >= 3, peers.why()
    assert peers.connect.wait_event("tcp_path", 5)["via"] == "direct", peers.why()


@pytest.mark.parametrize("p2p_lab", [(("eim", False), ("eim", False))], indirect=True)
def test_without_mappings_the_peers_punch_a_tcp_path(
    p2p_lab: Lab, peers_factory: Callable[..., Peers]
) -> None:
    """No router maps anything: the listener, asked inside the session, connects from its
    TCP port to the connector's while the connector's SYN is out — one TCP connection per
    forward, made by both routers' NATs from two outbound SYNs."""
    peers = peers_factory(p2p_lab, extra=[])
    ready_c, ready_l = peers.ready()
    port = ready_l["tcp"]
    assert isinstance(port, int), peers.why()
    assert not [e for e in ready_c["tcp"] or [] if str(e).startswith(f"{RTR2_WAN}:")]
    # outbound flows from the listener's TCP port through rtr2, to rtr's public address
    out_of_rtr2 = (
        "--orig-src",
        C.LAN2_IP,
        "--orig-port-src",
        str(port),
        "--orig-dst",
        C.RTR_WAN_IP,
    )
    # and the connector's flows through rtr to that port on rtr2's public address
    out_of_rtr = ("--orig-src", C.LAN_IP, "--orig-dst", RTR2_WAN, "--orig-port-dst", str(port))
    before = _flows(p2p_lab, "rtr2", *out_of_rtr2), _flows(p2p_lab, "rtr", *out_of_rtr)
    for _ in range(3):
        assert peers.get() == f"hello from 127.0.0.1:{WEB_PORT}\n"
    assert peers.connect.wait_event("tcp_path", 5)["via"] == "punch", peers.why()
    after = _flows(p2p_lab, "rtr2", *out_of_rtr2), _flows(p2p_lab, "rtr", *out_of_rtr)
    assert after[0] - before[0] >= 3 and after[1] - before[1] >= 3, (before, after, peers.why())


@pytest.mark.parametrize("p2p_lab", [(("random", False), ("random", False))], indirect=True)
def test_without_a_tcp_path_forwards_go_over_quic(
    p2p_lab: Lab, peers_factory: Callable[..., Peers]
) -> None:
    """Random NATs give the punch's port another public address than STUN saw, and no
    router maps: every forward goes over QUIC (the first after the TCP attempts failed)."""
    peers = peers_factory(p2p_lab, extra=[])
    ready_c, _ = peers.ready(60)
    assert not [e for e in ready_c["tcp"] or [] if str(e).startswith(f"{RTR2_WAN}:")]
    for _ in range(2):  # the first waits for the TCP attempts to fail, the next does not
        assert peers.get() == f"hello from 127.0.0.1:{WEB_PORT}\n"
    assert peers.connect.wait_event("tcp_path", 5)["via"] == "none", peers.why()


@pytest.mark.parametrize("p2p_lab", [(("random", False), ("eim", False))], indirect=True)
def test_ipv6_punches_through_a_stateful_firewall(
    p2p_lab: Lab, peers_factory: Callable[..., Peers]
) -> None:
    """The listener on lan: IPv4 behind a random NAT with no mapping (no IPv4 TCP path),
    IPv6 global behind rtr's firewall (unsolicited inbound dropped); the connector on the
    Internet host. The forward's TCP connection is a simultaneous open over IPv6: no STUN
    (no NAT), both SYNs outbound, rtr's conntrack holding the listener's flow."""
    peers = peers_factory(p2p_lab, extra=[], nodes=("lan", "wan"))
    _, ready_l = peers.ready()
    port = ready_l["tcp"]
    assert isinstance(port, int), peers.why()
    v6_flows = ("-f", "ipv6", "--orig-src", C.LAN_IP6, "--orig-port-src", str(port))
    before = _flows(p2p_lab, "rtr", *v6_flows)
    for _ in range(2):
        assert peers.get() == f"hello from 127.0.0.1:{WEB_PORT}\n"
    found = peers.connect.wait_event("tcp_path", 5)
    assert found["via"] == "punch" and found["remote"] == f"[{C.LAN_IP6}]:{port}", found
    assert _flows(p2p_lab, "rtr", *v6_flows) - before >= 2, peers.why()
