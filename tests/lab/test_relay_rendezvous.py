"""The relay as a P2P rendezvous and STUN server across a real NAT: ``natkit relay serve``
on wan (the Internet), one agent on lan behind the lab router's NAT, one on wan.

* STUN to the relay's UDP port from lan returns the NAT's public address and port (the
  router keeps ports in ``eim``), which is what a peer puts in its ICE candidates.
* The two agents meet, signal both ways, and the relay-fallback path carries bytes both
  ways through the NAT, with half-close.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
import socket
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from natkit.errors import NatkitError
from natkit.lab import Lab
from natkit.lab import config as C
from natkit.relay.agent import Agent
from natkit.rendezvous.client import P2PRoom
from natkit.stun import binding_udp
from tests.lab.relay_helpers import (
    RELAY_IP,
    SERVICE_IP,
    NodeLoop,
    Relay,
    build_lab,
    recv_all,
    recv_exact,
    start_relay,
)

pytestmark = pytest.mark.lab

T = TypeVar("T")
TOKEN = "p2p-lab-token-0123456789abcdef"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    the_lab = build_lab("p2p")
    yield the_lab
    the_lab.down()


@pytest.fixture
def relay(lab: Lab, tmp_path: Path) -> Iterator[Relay]:
    proc = start_relay(lab, tmp_path, token=TOKEN, http_port=None, https_port=None)
    yield proc
    proc.stop()


class NodeAgent:
    """A P2P-only Agent running on a lab node's own event loop."""

    def __init__(self, lab: Lab, node: str, relay: Relay, state: Path) -> None:
        self.loop = NodeLoop(lab, node)
        self.agent: Agent = self.loop.call(
            lambda: Agent(
                relay.address,
                TOKEN,
                [],
                fingerprint=relay.fingerprint,
                known_relays=state / f"known-{node}.json",
            )
        )
        self.task = self.loop.call(lambda: self.loop.loop.create_task(self.agent.run()))

    def start(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the node's loop without waiting (two of them at once)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop.loop)

    def close(self) -> None:
        self.loop.call(self.task.cancel)
        self.loop.run(self.agent.close())
        self.loop.close()


def test_stun_through_the_nat_returns_the_public_address(lab: Lab, relay: Relay) -> None:
    assert relay.ready["stun"] == relay.address
    port = int(relay.address.rsplit(":", 1)[1])
    lan = NodeLoop(lab, "lan")
    try:
        (result,) = lan.run(binding_udp([(RELAY_IP, port)], local_ip=SERVICE_IP, timeout=3))
    finally:
        lan.close()
    assert not isinstance(result, NatkitError), result
    assert result.mapped == (C.RTR_WAN_IP, result.local[1])  # eim keeps the port


def test_peers_meet_and_the_relay_path_crosses_the_nat(
    lab: Lab, relay: Relay, tmp_path: Path
) -> None:
    a = NodeAgent(lab, "lan", relay, tmp_path)
    b = NodeAgent(lab, "wan", relay, tmp_path)
    try:
        ra: P2PRoom = a.loop.run(a.agent.join_p2p("lab-room", "listen"))
        rb: P2PRoom = b.loop.run(b.agent.join_p2p("lab-room", "connect"))
        assert b.loop.run(rb.wait_peer(5)) and a.loop.run(ra.wait_peer(5))
        a.loop.call(lambda: ra.send_signal("candidates of lan"))
        assert b.loop.run(rb.recv_signal(5)) == "candidates of lan"
        b.loop.call(lambda: rb.send_signal("candidates of wan"))
        assert a.loop.run(ra.recv_signal(5)) == "candidates of wan"

        fa, fb = a.start(ra.open_relay_path()), b.start(rb.open_relay_path())
        sa, sb = fa.result(20), fb.result(20)
        up, down = secrets.token_bytes(1 << 20), secrets.token_bytes(2 << 20)
        deadline = time.monotonic() + 30
        for s in (sa, sb):
            s.setblocking(True)
        with sa, sb:
            sa.sendall(up)
            sa.shutdown(socket.SHUT_WR)
            assert recv_exact(sb, len(up), deadline) == up
            sb.settimeout(5)
            assert sb.recv(1) == b""  # lan's EOF, through the NAT and the relay
            sb.sendall(down)
            sb.shutdown(socket.SHUT_WR)
            assert recv_all(sa, deadline) == down
        b.loop.call(rb.leave)
        a.loop.run(ra.wait_peer_left(5))
    finally:
        a.close()
        b.close()
