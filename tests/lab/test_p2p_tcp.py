"""The direct TCP path of ``natkit p2p`` between two LANs behind two real routers
(nftables NAT, real miniupnpd): forwarded connections go over kernel TCP to the listener's
router TCP mapping when it gives one, and over QUIC streams when no TCP path exists.

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


def _tcp_flows_to(lab: Lab, port: int) -> int:
    """TCP flows rtr2's conntrack holds towards its own WAN address and ``port``."""
    r = lab.run("rtr2", ["conntrack", "-L", "-p", "tcp", "--orig-dst", RTR2_WAN,
                         "--orig-port-dst", str(port)], timeout=10)  # fmt: skip
    return sum(1 for line in r.stdout.splitlines() if line.startswith("tcp"))


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


@pytest.mark.parametrize("p2p_lab", [(("eim", False), ("eim", False))], indirect=True)
def test_without_a_tcp_path_forwards_go_over_quic(
    p2p_lab: Lab, peers_factory: Callable[..., Peers]
) -> None:
    peers = peers_factory(p2p_lab, extra=[])
    ready_c, _ = peers.ready()
    # lan2's private address is offered (lan has a private address too) but unreachable
    assert not [e for e in ready_c["tcp"] or [] if str(e).startswith(f"{RTR2_WAN}:")]
    for _ in range(2):  # the first waits for the TCP attempt to fail, the next does not
        assert peers.get() == f"hello from 127.0.0.1:{WEB_PORT}\n"
