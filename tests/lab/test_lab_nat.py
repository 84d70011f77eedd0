"""The lab's Internet side and NAT behaviours, checked with plain UDP sockets and aioice's STUN
codec against the real parts: coturn on wan, nftables NAT on rtr (eim, random, full-cone),
a carrier NAT in front of it (double NAT), Debian's ``stun`` client as a reference.

STUN clients under test belong elsewhere; these tests only prove that the lab behaves as
each configuration promises, so that those clients have something true to be tested on.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import natkit_netguard
import pytest
from aioice import stun
from aioice.turn import create_turn_endpoint

from natkit.errors import LabError
from natkit.lab import Lab, LabConfig, netns
from natkit.lab import config as C
from natkit.lab.procs import pid_alive
from tests.conftest import IN_CI, LAB_PREFIX
from tests.lab.helpers import http_get, http_server, udp_ask, udp_echo

# Outside CI a non-root developer skips; in CI (root) a missing lab capability fails instead.
pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not IN_CI, reason="the lab needs root")

NATKIT = str(Path(sys.executable).parent / "natkit")
PRIMARY, ALTERNATE = C.STUN_PRIMARY, C.STUN_ALTERNATE
CHANGE_IP, CHANGE_PORT = 0x4, 0x2  # RFC 5780 CHANGE-REQUEST flags
Addr = tuple[str, int]


# ---- plain sockets and STUN ------------------------------------------------------------------


def udp_socket(lab: Lab, node: str, ip: str = "0.0.0.0") -> socket.socket:
    """A UDP socket that lives in ``node``'s namespace (usable from any thread).

    On wan give ``ip``: wan has two addresses, and a reply must come from the one asked.
    """

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((ip, 0))
        return sock

    return netns.call_in(lab.netns(node), make)


def ask(
    sock: socket.socket, server: Addr, change: int = 0, timeout: float = 1.0
) -> tuple[stun.Message, Addr] | None:
    """One binding request; the response and where it came from, or None."""
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    if change:
        request.attributes["CHANGE-REQUEST"] = change
    sock.sendto(bytes(request), server)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, source = sock.recvfrom(2048)
        except TimeoutError:
            break
        try:
            response = stun.parse_message(data)
        except ValueError:
            continue
        if response.transaction_id == request.transaction_id:
            return response, source
    return None


def mapped(sock: socket.socket, server: Addr) -> Addr:
    answer = ask(sock, server)
    assert answer is not None, f"no STUN answer from {server}"
    response, _ = answer
    assert response.message_class == stun.Class.RESPONSE, response
    address: Addr = response.attributes["XOR-MAPPED-ADDRESS"]
    return address


def receives(sock: socket.socket, timeout: float) -> tuple[bytes, Addr] | None:
    sock.settimeout(timeout)
    try:
        return sock.recvfrom(2048)
    except TimeoutError:
        return None


@pytest.fixture
def nat_lab(request: pytest.FixtureRequest, make_lab: Callable[..., Lab]) -> Iterator[Lab]:
    """The lab for ``request.param`` (a --nat value): the shared one for eim, else a new one."""
    nat = request.param
    if nat == "eim":
        yield request.getfixturevalue("lab")
    else:
        yield make_lab(f"nat-{nat}", nat=nat)


# ---- coturn ---------------------------------------------------------------------------------


def test_coturn_answers_on_both_addresses_and_ports(lab: Lab, sockets: list[socket.socket]) -> None:
    sock = udp_socket(lab, "lan")
    sockets.append(sock)
    local_port = sock.getsockname()[1]
    for server in [(ip, port) for ip in C.WAN_IPS for port in (C.STUN_PORT, C.STUN_ALT_PORT)]:
        answer = ask(sock, server)
        assert answer is not None, f"coturn does not answer on {server}"
        response, source = answer
        assert source == server and response.message_class == stun.Class.RESPONSE
        assert response.attributes["XOR-MAPPED-ADDRESS"] == (C.RTR_WAN_IP, local_port)
        assert "OTHER-ADDRESS" in response.attributes, response.attributes
        assert response.attributes["RESPONSE-ORIGIN"] == server
    # RFC 5780 is on: the primary names the alternate, and a change request is answered from it.
    response, _ = ask(sock, PRIMARY) or pytest.fail("no answer")
    assert response.attributes["OTHER-ADDRESS"] == ALTERNATE
    on_wan = udp_socket(lab, "wan", C.WAN_IPS[0])  # no NAT filters the answer there
    sockets.append(on_wan)
    answer = ask(on_wan, PRIMARY, CHANGE_IP | CHANGE_PORT)
    assert answer is not None and answer[1] == ALTERNATE, answer

    status = lab.status()["coturn"]
    assert status["running"] and status["pid"] == lab.coturn_pid() and pid_alive(status["pid"])
    assert status["turn"]["user"] == C.TURN_USER and status["turn"]["realm"] == C.TURN_REALM
    assert status["stun_primary"] == "100.200.0.2:3478"
    assert "Relay ports initialization done" in lab.coturn_log.read_text()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_turn_allocation_from_lan(lab: Lab, transport: str, sockets: list[socket.socket]) -> None:
    peer = udp_socket(lab, "wan", C.WAN_IPS[1])  # the relay's permission is for this address
    sockets.append(peer)
    peer_addr: Addr = peer.getsockname()

    class Receiver(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.got: asyncio.Queue[tuple[bytes, Addr]] = asyncio.Queue()

        def datagram_received(self, data: bytes, addr: Addr) -> None:
            self.got.put_nowait((data, addr))

    async def relay_round_trip() -> tuple[Addr, Addr, tuple[bytes, Addr], tuple[bytes, Addr]]:
        turn, receiver = await create_turn_endpoint(
            Receiver, PRIMARY, C.TURN_USER, C.TURN_PASSWORD, transport=transport
        )
        try:
            relayed: Addr = turn.get_extra_info("sockname")
            turn.sendto(b"to the peer", peer_addr)
            at_peer = await asyncio.to_thread(receives, peer, 3.0)
            assert at_peer is not None, "nothing reached the peer through the relay"
            peer.sendto(b"to lan", relayed)
            back = await asyncio.wait_for(receiver.got.get(), 3.0)
            return relayed, turn.get_extra_info("related_address"), at_peer, back
        finally:
            turn.close()
            await asyncio.sleep(0.1)  # lets the allocation be deleted before the loop ends

    relayed, related, at_peer, back = netns.run_in(lab.netns("lan"), relay_round_trip)
    low, high = C.TURN_RELAY_PORTS
    assert relayed[0] == C.TURN_RELAY_IP and low <= relayed[1] <= high
    assert related[0] == C.RTR_WAN_IP
    assert at_peer == (b"to the peer", relayed)
    assert back == (b"to lan", peer_addr)


def test_coturn_life_cycle(make_lab: Callable[..., Lab]) -> None:
    first = make_lab("cot")
    old = first.coturn_pid()
    assert old is not None
    # Taken away and brought back (tests of STUN clients use this for "no server answers").
    with udp_socket(first, "lan") as sock:
        first.stop_coturn()
        assert first.coturn_pid() is None and not pid_alive(old)
        assert ask(sock, PRIMARY, timeout=0.3) is None
        first.start_coturn()
        assert ask(sock, PRIMARY) is not None
    old = first.coturn_pid()
    assert old is not None
    # A stale lab (its state directory lost, its daemons still running) is replaced.
    shutil.rmtree(first.state_dir)
    second = make_lab("cot")
    new = second.coturn_pid()
    assert new is not None and new != old and not pid_alive(old)
    # Off: nothing runs on wan, and the status says so.
    third = make_lab("cot", coturn=False)
    assert not pid_alive(new)
    assert subprocess.run(["ip", "netns", "pids", third.netns("wan")],
                          capture_output=True, text=True, check=True).stdout == ""  # fmt: skip
    assert third.status()["coturn"] == {"enabled": False, "running": False, "pid": None}
    with udp_socket(third, "lan") as sock:
        assert ask(sock, PRIMARY, timeout=0.3) is None
    third.down()
    assert not any(netns.exists(third.cfg.netns(n)) for n in C.ALL_NODES)


# ---- NAT behaviours -----------------------------------------------------------------------


@pytest.mark.parametrize("nat_lab", ["eim", "random", "full-cone"], indirect=True)
def test_mapping_behaviour(nat_lab: Lab, sockets: list[socket.socket]) -> None:
    """From one lan socket, the public port towards .2 and .3: kept and the same (eim,
    full-cone), or new for every destination (random)."""
    sock = udp_socket(nat_lab, "lan")
    sockets.append(sock)
    local_port = sock.getsockname()[1]
    to_primary, to_other_ip, to_other_port = (
        mapped(sock, server) for server in (PRIMARY, (C.WAN_IPS[1], C.STUN_PORT), ALTERNATE)
    )
    assert {to_primary[0], to_other_ip[0], to_other_port[0]} == {C.RTR_WAN_IP}
    if nat_lab.cfg.nat == "random":
        assert to_primary[1] != to_other_ip[1], "random NAT kept one port for two hosts"
        assert to_primary[1] != to_other_port[1], "random NAT kept one port for two ports"
    else:
        assert to_primary == to_other_ip == to_other_port == (C.RTR_WAN_IP, local_port)


@pytest.mark.parametrize("nat_lab", ["eim", "full-cone"], indirect=True)
def test_filtering_behaviour(nat_lab: Lab, sockets: list[socket.socket]) -> None:
    """After lan sent to .2, does a packet from .3 reach it? Only behind a full cone."""
    full_cone = nat_lab.cfg.nat == "full-cone"
    lan, stranger = udp_socket(nat_lab, "lan"), udp_socket(nat_lab, "wan", C.WAN_IPS[1])
    sockets += [lan, stranger]
    public = mapped(lan, PRIMARY)
    stranger.sendto(b"unsolicited", public)
    got = receives(lan, 1.0 if full_cone else 0.5)
    if full_cone:
        assert got is not None, "full cone: the packet from another host did not arrive"
        assert got[0] == b"unsolicited" and got[1][0] == C.WAN_IPS[1]
    else:
        assert got is None, f"eim must filter by address: {got}"
    # The same through RFC 5780's own test (from a fresh socket): a change request answered
    # from the other address and port.
    fresh = udp_socket(nat_lab, "lan")
    sockets.append(fresh)
    mapped(fresh, PRIMARY)
    answer = ask(fresh, PRIMARY, CHANGE_IP | CHANGE_PORT, timeout=1.0 if full_cone else 0.5)
    assert (answer is not None and answer[1] == ALTERNATE) if full_cone else answer is None


def stun_client(lab: Lab) -> tuple[int, str]:
    """Debian's RFC 3489 classifier from lan: exit code and its one-line verdict."""
    port = random.randint(40000, 59999)
    r = lab.run("lan", ["stun", PRIMARY[0], "-p", str(port)], timeout=30)
    verdict = re.search(r"Primary: (.*)", r.stdout)
    assert verdict, r.stdout + r.stderr
    return r.returncode, verdict.group(1).strip()


# What stun-client 0.97 (RFC 3489) reported here. Its exit code is its "return value": the
# type (0x02 independent filter, 0x06 port-dependent filter, 0x08 dependent mapping), | 0x01
# when it preserves ports, | 0x10 when it does not hairpin.
STUN_CLIENT_SAYS = {
    "eim": (0x17, "Independent Mapping, Port Dependent Filter, preserves ports, no hairpin"),
    "random": (0x18, "Dependent Mapping, random port, no hairpin"),
    "full-cone": (0x13, "Independent Mapping, Independent Filter, preserves ports, no hairpin"),
}


@pytest.mark.parametrize("nat_lab", ["eim", "random", "full-cone"], indirect=True)
def test_reference_stun_client_agrees(nat_lab: Lab) -> None:
    assert stun_client(nat_lab) == STUN_CLIENT_SAYS[nat_lab.cfg.nat]


def natpmpc(lab: Lab, node: str, *args: str) -> str:
    r = lab.run(node, ["natpmpc", "-g", C.RTR_LAN_IP, *args], timeout=30)
    assert r.returncode == 0, f"natpmpc {' '.join(args)}: {r.stdout} {r.stderr}"
    return r.stdout


@pytest.mark.parametrize("nat_lab", ["random", "full-cone"], indirect=True)
def test_port_mappings_work_in_every_behaviour(nat_lab: Lab) -> None:
    """miniupnpd's forwards win over the NAT's own rules: a UDP port mapped to dev reaches
    dev even behind the full cone (whose catch-all forwards to lan), and TCP reaches lan."""
    ext_udp, ext_tcp = random.sample(range(20000, 39999), 2)
    with (
        udp_echo(nat_lab, "dev", C.DEV_IP) as udp_port,
        http_server(nat_lab, "lan", C.LAN_IP, 0, "mapped") as tcp_port,
    ):
        natpmpc(nat_lab, "dev", "-a", str(ext_udp), str(udp_port), "udp", "60")
        natpmpc(nat_lab, "lan", "-a", str(ext_tcp), str(tcp_port), "tcp", "60")
        assert udp_ask(nat_lab, "wan", C.RTR_WAN_IP, ext_udp, b"ping") == b"echo:ping"
        assert http_get(nat_lab, "wan", C.RTR_WAN_IP, ext_tcp) == "mapped"
        natpmpc(nat_lab, "dev", "-a", str(ext_udp), str(udp_port), "udp", "0")
        natpmpc(nat_lab, "lan", "-a", str(ext_tcp), str(tcp_port), "tcp", "0")


# ---- double NAT -----------------------------------------------------------------------------


def nk(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([NATKIT, *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return proc


def ip_json(*args: str) -> Any:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=False).stdout
    return json.loads(out or "[]")


@pytest.fixture(scope="module")
def double_nat() -> Iterator[Lab]:
    """A double-NAT lab built through the CLI (``--upstream-nat``), removed by it too."""
    name = f"{LAB_PREFIX}-dnat"
    try:
        nk("lab", "up", "--name", name, "--upstream-nat", "--replace")
        yield Lab.open(name)
    finally:
        nk("lab", "down", "--name", name)
    assert not any(netns.exists(f"{name}-{node}") for node in C.ALL_NODES)


def test_double_nat_topology(double_nat: Lab) -> None:
    name = double_nat.cfg.name
    status = json.loads(nk("lab", "status", "--name", name, "--json").stdout)
    assert status["upstream_nat"] and status["public_ip"] == C.RTR_WAN_IP
    assert set(status["nodes"]) == set(C.ALL_NODES)
    assert set(status["nodes"]["isp"]["addresses"]) == {"100.200.0.1/24", "100.201.0.1/24"}
    assert set(status["nodes"]["rtr"]["addresses"]) == {"192.168.77.1/24", "100.201.0.2/24"}
    assert status["router"]["wan_ip"] == C.RTR_ISP_IP == "100.201.0.2"
    assert status["router"]["gateway"] == C.ISP_CPE_IP
    assert status["coturn"]["running"] and status["isp"]["wan_ip"] == C.RTR_WAN_IP
    out = nk("lab", "exec", "--name", name, "isp", "--", "sysctl", "-n", "net.ipv4.ip_forward")
    assert out.stdout.strip() == "1"
    # Every veth joins two namespaces of this lab: none leads to the host.
    own = {f"{name}-{node}" for node in C.ALL_NODES}
    for ns in own:
        peers = {i["nsid"]: i.get("name") for i in ip_json("-n", ns, "netns", "list-id")}
        for link in ip_json("-n", ns, "link", "show"):
            if "link_netnsid" in link:
                assert peers.get(link["link_netnsid"]) in own - {ns}, (ns, link["ifname"])
    # A lab without isp says so when asked for it.
    with pytest.raises(LabError, match="--upstream-nat"):
        Lab(LabConfig(name=name)).netns("isp")


def test_double_nat_stun_and_router_disagree(double_nat: Lab, sockets: list[socket.socket]) -> None:
    """STUN sees the carrier NAT's address; the home router's port mapping reports its own.
    A mapping made on the router is reachable from the carrier's network but not from the
    Internet: the second NAT drops it."""
    sock = udp_socket(double_nat, "lan")
    sockets.append(sock)
    public = mapped(sock, PRIMARY)
    assert public[0] == C.RTR_WAN_IP and mapped(sock, (C.WAN_IPS[1], C.STUN_PORT)) == public
    # The reference clients ask the home router (upnpc without its 2 s discovery).
    desc = f"http://{C.RTR_LAN_IP}:{C.UPNP_HTTP_PORT}/rootDesc.xml"
    upnpc = double_nat.run("lan", ["upnpc", "-u", desc, "-s"], timeout=30).stdout
    assert f"ExternalIPAddress = {C.RTR_ISP_IP}" in upnpc, upnpc
    assert f"Public IP address : {C.RTR_ISP_IP}" in natpmpc(double_nat, "lan")

    ext = random.randint(20000, 39999)
    with http_server(double_nat, "lan", C.LAN_IP, 0, "behind two NATs") as port:
        natpmpc(double_nat, "lan", "-a", str(ext), str(port), "tcp", "60")
        assert http_get(double_nat, "isp", C.RTR_ISP_IP, ext) == "behind two NATs"
        with pytest.raises(OSError):
            http_get(double_nat, "wan", C.RTR_WAN_IP, ext, timeout=0.5)
        natpmpc(double_nat, "lan", "-a", str(ext), str(port), "tcp", "0")
    # Unsolicited packets die at the carrier NAT whatever the home router would do.
    stranger = udp_socket(double_nat, "wan", C.WAN_IPS[1])
    sockets.append(stranger)
    stranger.sendto(b"unsolicited", public)
    assert receives(sock, 0.5) is None
    assert stun_client(double_nat) == STUN_CLIENT_SAYS["eim"]


def test_every_lab_subnet_passes_the_network_guard() -> None:
    for subnet in C.LAB_SUBNETS:
        first = str(next(ipaddress.ip_network(subnet).hosts()))
        assert natkit_netguard.allowed(first, in_host_netns=False), subnet
        assert not natkit_netguard.allowed(first, in_host_netns=True), subnet
