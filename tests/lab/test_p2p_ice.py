"""natkit's ICE in the lab: real NATs (nftables), miniupnpd for the port-mapped candidate,
coturn on wan for STUN and TURN.

Each side runs its own IceAgent on its own event loop in its node's namespace; descriptions
cross between the two threads as JSON text through queues (the signalling channel).

Most tests pair lan (behind rtr) with wan, a public host behind a stateful firewall
(replies only; the STUN/TURN ports open). With an open wan, anything behind any NAT reaches
it directly (wan learns the NAT's port as a peer-reflexive candidate), so neither a port
mapping nor TURN would ever be needed. With the firewall, lan's packets get in only where
wan has sent first: to an address of lan's that wan knows and that admits it — the srflx of
a port-keeping NAT (hole punching), the port-mapped one, or the TURN relay.
``test_two_peers_behind_two_nats`` pairs lan with lan2 behind a second router instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from natkit.lab import Lab
from natkit.lab import config as C
from natkit.p2p.candidates import IceDescription, SelectedPair
from natkit.p2p.errors import P2PError
from natkit.p2p.ice import IceAgent, PathDown, TurnServer
from tests.conftest import IN_CI, call_in_node, run_in_node

pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not IN_CI, reason="the lab needs root")

WAIT = 30.0  # bound on every wait for the other side or an event (never asserted on)
TURN = TurnServer(C.STUN_PRIMARY[0], C.STUN_PRIMARY[1], C.TURN_USER, C.TURN_PASSWORD)
LAN = {"stun_server": C.STUN_PRIMARY, "turn": TURN}  # port mapping: on (the default)
WAN = {"port_mapping": False}  # a public host has no router to ask

# The lab is dual stack (lan and wan have global IPv6 addresses, rtr routes IPv6 without NAT):
# two stateful firewalls that both send are punched through over IPv6 as over IPv4. These tests
# are about the IPv4 NAT, so wan's firewall drops lan's IPv6 outright; that lan still gathers
# its IPv6 host candidate is checked on its own (ipv4_kinds / test_ipv6_host_candidates_...).
FIREWALL = f"""\
table inet natkit_ice_fw {{
    chain input {{
        type filter hook input priority 0; policy accept;
        ip6 saddr {C.LAN6_NET}/{C.LAN6_PREFIX} drop
        ct state established,related accept
        ip saddr {C.RTR_WAN_IP} udp dport {{ {C.STUN_PORT}, {C.STUN_ALT_PORT} }} accept
        ip saddr {C.RTR_WAN_IP} drop
    }}
}}
"""
# Every UDP packet through the router is dropped: the path dies, the NAT is left as it was.
CUT = """\
table inet natkit_ice_cut {
    chain forward {
        type filter hook forward priority -10; policy accept;
        meta l4proto udp drop
    }
}
"""


def nft(lab: Lab, node: str, *args: str, script: str | None = None) -> None:
    r = lab.run(node, ["nft", *(args or ("-f", "-"))], input=script)
    assert r.returncode == 0, r.stderr


def firewall_wan(lab: Lab) -> None:
    nft(lab, "wan", script=FIREWALL)


def open_wan(lab: Lab) -> None:
    nft(lab, "wan", "delete", "table", "inet", "natkit_ice_fw")


# ---- two agents, one per node ------------------------------------------------------------------


class Signalling:
    """The channel between the two nodes' threads, and a rendezvous."""

    def __init__(self, a: str, b: str) -> None:
        self.other = {a: b, b: a}
        self.inbox: dict[str, queue.Queue[str]] = {a: queue.Queue(), b: queue.Queue()}
        self.barrier = threading.Barrier(2, timeout=2 * WAIT)

    async def swap(self, me: str, mine: IceDescription) -> IceDescription:
        self.inbox[self.other[me]].put(json.dumps(mine.to_dict()))
        text = await asyncio.to_thread(self.inbox[me].get, timeout=WAIT)
        return IceDescription.from_dict(json.loads(text))

    async def sync(self) -> None:
        await asyncio.to_thread(self.barrier.wait)


async def connect_and_greet(
    agent: IceAgent, me: str, chan: Signalling
) -> tuple[SelectedPair, bytes]:
    theirs = await chan.swap(me, await agent.gather())
    selected = await agent.connect(theirs, timeout=WAIT)
    await agent.send(f"hello from {me}".encode())
    return selected, await asyncio.wait_for(agent.recv(), WAIT)


@dataclass
class Outcome:
    agent: IceAgent  # closed by now; what it learned stays readable
    description: IceDescription
    report: dict[str, str]
    selected: SelectedPair
    got: bytes
    extra: Any = None


Body = Callable[[IceAgent, str, Signalling], Awaitable[Any]]


def run_ice(
    lab: Lab,
    lan: dict[str, Any],
    peer: dict[str, Any],
    *,
    peer_node: str = "wan",
    lan_controls: bool = True,
    body: Body | None = None,
) -> dict[str, Outcome]:
    """Connect an agent on lan with one on ``peer_node``, greet, run ``body`` on both, close.
    The outcomes are keyed by node."""
    chan = Signalling("lan", peer_node)

    def side(me: str, options: dict[str, Any]) -> Outcome:
        async def main() -> Outcome:
            async with IceAgent(controlling=(me == "lan") == lan_controls, **options) as agent:
                selected, got = await connect_and_greet(agent, me, chan)
                extra = await body(agent, me, chan) if body else None
                await chan.sync()  # neither closes while the other still uses the path
                assert agent.local_description is not None
                return Outcome(
                    agent, agent.local_description, agent.gather_report, selected, got, extra
                )

        try:
            return run_in_node(lab, me, main)
        except BaseException:
            chan.barrier.abort()  # don't leave the other side waiting
            raise

    with ThreadPoolExecutor(2) as pool:
        futures = {
            me: pool.submit(side, me, opts) for me, opts in (("lan", lan), (peer_node, peer))
        }
    # The side that failed first says why; the other one only saw the barrier break.
    errors = [f.exception() for f in futures.values() if f.exception() is not None]
    for exc in sorted(errors, key=lambda e: isinstance(e, threading.BrokenBarrierError)):
        raise exc
    return {me: f.result() for me, f in futures.items()}


def ipv4_kinds(outcome: Outcome) -> list[str]:
    """The types of the IPv4 candidates gathered, in order (IPv6 ones are on their own)."""
    return [c.type for c in outcome.description.candidates if ":" not in c.host]


def the_port_mapped(outcome: Outcome) -> tuple[str, int]:
    [mapped] = [c for c in outcome.description.candidates if c.port_mapped]
    return mapped.address


# ---- labs ---------------------------------------------------------------------------------------


@pytest.fixture
def eim_lab(make_lab: Callable[..., Lab]) -> Lab:
    """A port-keeping NAT whose router offers no port mapping; wan behind its firewall."""
    lab = make_lab("ice-eim", portmap=frozenset(), nat="eim")
    firewall_wan(lab)
    return lab


@pytest.fixture
def random_lab(make_lab: Callable[..., Lab]) -> Lab:
    """A symmetric NAT (a new port per destination) with UPnP, NAT-PMP and PCP."""
    lab = make_lab("ice-random", nat="random")
    firewall_wan(lab)
    return lab


# ---- paths --------------------------------------------------------------------------------------


@pytest.mark.parametrize("lan_controls", [True, False], ids=["lan-controls", "wan-controls"])
def test_direct_through_a_port_keeping_nat(eim_lab: Lab, lan_controls: bool) -> None:
    out = run_ice(eim_lab, LAN, WAN, lan_controls=lan_controls)
    lan, wan = out["lan"], out["wan"]
    assert (lan.got, wan.got) == (b"hello from wan", b"hello from lan")
    assert lan.selected.path == wan.selected.path == "direct"
    assert ipv4_kinds(lan) == ["host", "srflx", "relay"]  # TURN was there, and not needed
    host, srflx = [c for c in lan.description.candidates if c.type in ("host", "srflx")
                   and ":" not in c.host]  # fmt: skip
    assert srflx.address == (C.RTR_WAN_IP, host.port)  # port kept
    # Dual stack: lan's global IPv6 address is a host candidate too (wan's firewall drops
    # it in this test; the lab's router routes it without NAT).
    assert [c.host for c in lan.description.candidates if ":" in c.host] == [C.LAN_IP6]
    # wan got through to lan's NAT address, which admitted it once lan had sent to wan.
    assert wan.selected.remote.address == srflx.address
    assert lan.selected.seen_as == srflx.address
    # The router offers no port mapping: asked, not fatal.
    assert lan.report["port mapping"].startswith(("failed", "no answer within"))
    assert lan.report["stun"] == f"srflx {srflx.host}:{srflx.port}"


@pytest.mark.parametrize("lan_controls", [True, False], ids=["lan-controls", "wan-controls"])
def test_the_port_mapped_candidate_wins_behind_a_symmetric_nat(
    random_lab: Lab, lan_controls: bool
) -> None:
    host_port: list[int] = []

    async def while_connected(agent: IceAgent, me: str, chan: Signalling) -> None:
        if me == "lan":
            [mapping] = agent.port_mappings
            assert (mapping.protocol, mapping.internal_ip) == ("udp", C.LAN_IP)
            host_port.append(mapping.internal_port)
            rules = await asyncio.to_thread(random_lab.router_rules)
            assert f"dnat ip to {C.LAN_IP}:{mapping.internal_port}" in rules

    out = run_ice(random_lab, LAN, WAN, lan_controls=lan_controls, body=while_connected)
    lan, wan = out["lan"], out["wan"]
    assert (lan.got, wan.got) == (b"hello from wan", b"hello from lan")
    mapped = the_port_mapped(lan)
    assert mapped[0] == C.RTR_WAN_IP
    assert lan.report["port mapping"].endswith(f"{mapped[0]}:{mapped[1]}")
    # The STUN-learned address is useless here (the NAT admits only the STUN server
    # there), and TURN was gathered: the port mapping is what made it direct.
    assert ipv4_kinds(lan) == ["host", "srflx", "srflx", "relay"]
    assert lan.selected.path == wan.selected.path == "port-mapped"
    assert wan.selected.remote.address == mapped and wan.selected.remote.port_mapped
    assert lan.selected.seen_as == mapped
    # Closing the agent deleted the router's mapping.
    assert f"dnat ip to {C.LAN_IP}:{host_port[0]}" not in random_lab.router_rules()


def test_turn_when_nothing_else_gets_through_then_a_restart_goes_direct(
    make_lab: Callable[..., Lab],
) -> None:
    lab = make_lab("ice-turn", portmap=frozenset(), nat="random")
    firewall_wan(lab)

    async def restart_after_the_firewall_opens(agent: IceAgent, me: str, chan: Signalling) -> Any:
        if me == "lan":
            await asyncio.to_thread(open_wan, lab)
        await chan.sync()
        async with agent.restarted() as fresh:
            selected, got = await connect_and_greet(fresh, me, chan)
            # The old path keeps working until the session switches over.
            await agent.send(f"still here, {me}".encode())
            old = await asyncio.wait_for(agent.recv(), WAIT)
            await chan.sync()
            return selected, got, old, fresh.controlling == agent.controlling

    out = run_ice(lab, LAN, WAN, body=restart_after_the_firewall_opens)
    lan, wan = out["lan"], out["wan"]
    assert (lan.got, wan.got) == (b"hello from wan", b"hello from lan")
    assert lan.selected.path == wan.selected.path == "turn"
    relay = lan.description.candidates[-1]
    assert relay.type == "relay" and relay.host == C.TURN_RELAY_IP
    assert lan.selected.local == relay
    assert wan.selected.remote.address == relay.address
    # After the restart (new agents, new credentials) the path is direct again.
    for me, outcome in out.items():
        selected, got, old, same_role = outcome.extra
        assert selected.path == "direct"
        other = "wan" if me == "lan" else "lan"
        assert got == f"hello from {other}".encode()
        assert old == f"still here, {other}".encode()
        assert same_role


# Two peers, each behind its own router (lan behind rtr, lan2 behind rtr2): the routers'
# behaviour, whether both offer port mapping, and the path ICE must end up on.
TWO_LANS = {
    "eim-eim": ("eim", "eim", False, "direct"),  # hole punching between the two srflx
    "random-random-portmap": ("random", "random", True, "port-mapped"),
    "random-random": ("random", "random", False, "turn"),  # only the relay gets through
}


@pytest.mark.parametrize("case", TWO_LANS)
def test_two_peers_behind_two_nats(make_lab: Callable[..., Lab], case: str) -> None:
    nat, nat2, portmap, expected = TWO_LANS[case]
    protocols = None if portmap else frozenset()
    name = "ice2-" + "".join(word[0] for word in case.split("-"))
    lab = make_lab(name, nat=nat, portmap=protocols, second_lan=True, nat2=nat2, portmap2=protocols)
    out = run_ice(lab, LAN, LAN, peer_node="lan2")
    lan, lan2 = out["lan"], out["lan2"]
    assert (lan.got, lan2.got) == (b"hello from lan2", b"hello from lan")
    assert lan.selected.path == lan2.selected.path == expected
    for outcome in (lan, lan2):
        kinds = {c.type for c in outcome.description.candidates}
        assert kinds == {"host", "srflx", "relay"}  # every kind was there to choose from
    if expected == "port-mapped":
        # Either side reached the other's port mapping, or was seen at its own mapped address
        # (its checks left through the mapping while the peer's came back as prflx).
        def via_mapping(o: Any) -> bool:
            mapped = {c.address for c in o.description.candidates if c.port_mapped}
            return bool(o.selected.remote.port_mapped or o.selected.seen_as in mapped)

        assert via_mapping(lan) or via_mapping(lan2), (lan.selected, lan2.selected)


def test_gathering_survives_dead_stun_and_turn_servers(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab("ice-dead", nat="eim")

    async def gather(**options: Any) -> dict[str, str]:
        async with IceAgent(controlling=True, **options) as agent:
            await agent.gather()
            return agent.gather_report

    bad_password = TurnServer(TURN.host, TURN.port, TURN.username, "not-the-password")
    report = run_in_node(lab, "lan", lambda: gather(turn=bad_password, port_mapping=False))
    assert "401" in report["turn"] and "check the TURN user name and password" in report["turn"]

    lab.stop_coturn()
    dead = {"stun_server": C.STUN_PRIMARY, "turn": TURN}
    out = run_ice(lab, dead, {**WAN, **dead})
    lan, wan = out["lan"], out["wan"]
    for outcome in (lan, wan):
        assert outcome.report["stun"] == "no answer within 2 s"
        assert outcome.report["turn"] == "no answer within 2 s"
    assert ipv4_kinds(lan) == ["host", "srflx"]
    assert ipv4_kinds(wan) == ["host", "host"]  # .2 and .3
    # Still connected: lan's port-keeping NAT and its PCP mapping gave the same public
    # port, so whichever check got through first, wan sees lan at the port mapping.
    host, mapped = [c for c in lan.description.candidates if ":" not in c.host]
    assert mapped.port_mapped and mapped.address == (C.RTR_WAN_IP, host.port)
    assert (lan.got, wan.got) == (b"hello from wan", b"hello from lan")
    assert lan.selected.path == wan.selected.path == "port-mapped"


# ---- liveness -----------------------------------------------------------------------------------


@pytest.fixture
def short_udp_timeouts(eim_lab: Lab) -> Iterator[int]:
    """The router and wan's firewall forget an idle UDP flow after 8 s instead of 30/120 s."""
    seconds = 8
    for node in ("rtr", "wan"):
        r = eim_lab.run(
            node,
            [
                "sysctl",
                "-w",
                f"net.netfilter.nf_conntrack_udp_timeout={seconds}",
                f"net.netfilter.nf_conntrack_udp_timeout_stream={seconds}",
            ],
        )
        assert r.returncode == 0, r.stderr
    yield seconds


def test_consent_checks_keep_an_idle_path_open(eim_lab: Lab, short_udp_timeouts: int) -> None:
    idle = 2.5 * short_udp_timeouts
    # The control: a plain UDP flow through the same NAT, idle as long (wan's firewall lets
    # it in whatever the state, so only the router's forgetting is tested).
    lan_sock = call_in_node(
        eim_lab, "lan", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    )
    wan_sock = call_in_node(
        eim_lab, "wan", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    )
    with lan_sock, wan_sock:
        lan_sock.bind((C.LAN_IP, 0))
        wan_sock.bind((C.WAN_IPS[0], 0))
        port = str(wan_sock.getsockname()[1])
        nft(
            eim_lab,
            "wan",
            "insert",
            "rule",
            "inet",
            "natkit_ice_fw",
            "input",
            "udp",
            "dport",
            port,
            "accept",
        )
        lan_sock.settimeout(1.0)
        wan_sock.settimeout(WAIT)
        lan_sock.sendto(b"open", wan_sock.getsockname())
        _, lan_public = wan_sock.recvfrom(100)
        wan_sock.sendto(b"reply", lan_public)
        assert lan_sock.recvfrom(100)[0] == b"reply"

        async def stay_idle(agent: IceAgent, me: str, chan: Signalling) -> tuple[bytes, bool]:
            await asyncio.sleep(idle)  # nothing but ICE's own consent checks on the path
            await chan.sync()
            await agent.send(f"after {idle:g} s, {me}".encode())
            return await asyncio.wait_for(agent.recv(), WAIT), agent.alive

        out = run_ice(eim_lab, LAN, WAN, body=stay_idle)
        wan_sock.sendto(b"anyone there?", lan_public)
        with pytest.raises(TimeoutError):
            lan_sock.recvfrom(100)  # the idle flow was forgotten: the control is dead
    for me, outcome in out.items():
        other = "wan" if me == "lan" else "lan"
        assert outcome.extra == (f"after {idle:g} s, {other}".encode(), True)
        assert outcome.agent.dead.result().reason == "closed"  # only by us, at the end


def test_a_dead_path_is_reported(eim_lab: Lab) -> None:
    async def cut_the_path(agent: IceAgent, me: str, chan: Signalling) -> PathDown:
        await chan.sync()
        if me == "lan":
            await asyncio.to_thread(nft, eim_lab, "rtr", script=CUT)
        down = await asyncio.wait_for(agent.dead, WAIT)
        with pytest.raises(P2PError, match="cannot receive"):
            await agent.recv()
        return down

    quick = {"consent_interval": 1.0, "consent_lifetime": 3.0}
    out = run_ice(eim_lab, {**LAN, **quick}, {**WAN, **quick}, body=cut_the_path)
    for outcome in out.values():
        assert outcome.extra.reason == "consent-expired"
        assert re.search(r"no consent check for \d+ s", outcome.extra.detail)
