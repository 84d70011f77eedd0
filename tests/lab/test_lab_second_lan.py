"""The second LAN (``--second-lan``): a peer host lan2 behind its own router rtr2, whose WAN
side shares the Internet segment with rtr. Checked with plain UDP sockets and aioice's STUN
codec against coturn, like test_lab_nat.py: rtr2's NAT behaviours, its own miniupnpd, a
manual hole punch between lan and lan2 through both NATs, and flushing a router's NAT state.

Three labs, each built once per module: eim/eim with every port-mapping protocol (``peer``),
random/random with no port mapping on rtr2 (``rand``, built through the CLI) and a double NAT
in front of rtr with a full-cone rtr2 (``cone``).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from natkit.errors import LabError
from natkit.lab import Lab, LabConfig, netns
from natkit.lab import config as C
from natkit.lab.procs import pid_alive
from tests.conftest import IN_CI, LAB_PREFIX, _build
from tests.lab.helpers import udp_ask, udp_echo
from tests.lab.test_lab_nat import (
    ALTERNATE,
    PRIMARY,
    Addr,
    mapped,
    receives,
    udp_socket,
)

# Outside CI a non-root developer skips; in CI (root) a missing lab capability fails instead.
pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not IN_CI, reason="the lab needs root")

NATKIT = str(Path(sys.executable).parent / "natkit")
RAND = f"{LAB_PREFIX}-p2pr"


def nk(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([NATKIT, *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def peer() -> Iterator[Lab]:
    """Both routers eim, both offering UPnP, NAT-PMP and PCP."""
    the_lab = _build(LabConfig(name=f"{LAB_PREFIX}-p2p", second_lan=True))
    yield the_lab
    the_lab.down()


@pytest.fixture(scope="module")
def rand() -> Iterator[Lab]:
    """Both routers random ("symmetric"), rtr2 without port mapping: through the CLI."""
    up = f"lab up --name {RAND} --second-lan --nat random --nat2 random --portmap2 none --replace"
    try:
        nk(*up.split())
        yield Lab.open(RAND)
    finally:
        nk("lab", "down", "--name", RAND)
    assert not any(netns.exists(f"{RAND}-{node}") for node in C.EVERY_NODE)


@pytest.fixture(scope="module")
def cone() -> Iterator[Lab]:
    """A carrier NAT in front of rtr (--upstream-nat), a full-cone rtr2 with NAT-PMP only."""
    cfg = LabConfig(
        name=f"{LAB_PREFIX}-p2pc",
        upstream_nat=True,
        second_lan=True,
        nat2="full-cone",
        portmap2=frozenset({"natpmp"}),
    )
    the_lab = _build(cfg)
    yield the_lab
    the_lab.down()


@pytest.fixture
def by_nat2(request: pytest.FixtureRequest) -> Lab:
    """The module's lab whose rtr2 behaves as ``request.param``."""
    name = {"eim": "peer", "random": "rand", "full-cone": "cone"}[request.param]
    the_lab: Lab = request.getfixturevalue(name)
    return the_lab


def ip_json(*args: str) -> Any:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=False).stdout
    return json.loads(out or "[]")


def natpmpc(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.run("lan2", ["natpmpc", "-g", C.RTR2_LAN_IP, *args], timeout=30)


# ---- topology and status ---------------------------------------------------------------------


def test_topology_and_status(peer: Lab) -> None:
    status = peer.status()
    assert status["second_lan"] and status["lan2_ip"] == C.LAN2_IP == "192.168.78.10"
    nodes = status["nodes"]
    assert set(nodes) == {*C.NODES, "lan2", "rtr2"}
    assert nodes["lan2"]["addresses"] == ["192.168.78.10/24"]
    assert set(nodes["rtr2"]["addresses"]) == {"192.168.78.1/24", "100.200.0.4/24"}
    assert set(nodes["wan"]["addresses"]) == {f"{ip}/24" for ip in C.WAN_IPS}
    router2 = status["router2"]
    assert (router2["nat"], router2["portmap"]) == ("eim", ["natpmp", "pcp", "upnp"])
    assert (router2["wan_ip"], router2["lan_ip"]) == (C.RTR2_WAN_IP, C.RTR2_LAN_IP)
    assert router2["miniupnpd_pid"] == peer.router_pid("rtr2") != peer.router_pid()
    assert router2["miniupnpd_running"] and pid_alive(router2["miniupnpd_pid"])
    assert router2["upnp_description"] == "http://192.168.78.1:5000/rootDesc.xml"
    assert status["router"]["wan_ip"] == C.RTR_WAN_IP and status["router"]["nat"] == "eim"
    assert (
        "allow 1024-65535 192.168.78.0/24"
        in peer.state_dir.joinpath("miniupnpd-rtr2.conf").read_text()
    )

    # One Internet segment: wan's eth0 is a bridge with a port per router, and each router
    # reaches the other's public address on it directly (wan does not route).
    ports = {
        link["ifname"]
        for link in ip_json("-n", peer.netns("wan"), "link", "show", "master", C.HOST_IF)
    }
    assert ports == {"rtr-p", "rtr2-p"}
    for node, other in (("rtr", C.RTR2_WAN_IP), ("rtr2", C.RTR_WAN_IP)):
        (route,) = ip_json("-n", peer.netns(node), "route", "get", other)
        assert route["dev"] == C.RTR_WAN_IF and "gateway" not in route, route
    out = peer.run("wan", ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout
    assert out.strip() == "0"
    # Every veth joins two namespaces of this lab: none leads to the host.
    own = {peer.netns(node) for node in peer.cfg.nodes}
    for ns in own:
        peers = {i["nsid"]: i.get("name") for i in ip_json("-n", ns, "netns", "list-id")}
        for link in ip_json("-n", ns, "link", "show"):
            if "link_netnsid" in link:
                assert peers.get(link["link_netnsid"]) in own - {ns}, (ns, link["ifname"])
    # A lab without the second LAN says so when asked for it.
    plain = Lab(LabConfig(name=peer.cfg.name))
    with pytest.raises(LabError, match="--second-lan"):
        plain.netns("lan2")
    with pytest.raises(LabError, match="--second-lan"):
        plain.flush_nat("rtr2")


def test_second_router_options_need_second_lan() -> None:
    name = f"{LAB_PREFIX}-p2px"
    for option in (["--nat2", "random"], ["--portmap2", "none"]):
        proc = subprocess.run([NATKIT, "lab", "up", "--name", name, *option],
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert proc.returncode == 2 and "add --second-lan" in proc.stderr, proc.stderr
    assert not any(netns.exists(f"{name}-{node}") for node in C.EVERY_NODE)


def test_down_removes_a_stale_second_lan(make_lab: Any) -> None:
    """A lab removed under a config that does not know its second LAN still goes entirely."""
    the_lab = make_lab("p2pd", coturn=False, second_lan=True, nat2="random")
    assert the_lab.cfg.nat2 == "random" and the_lab.status()["router2"]["nat"] == "random"
    pid = the_lab.router_pid("rtr2")
    assert pid is not None
    stale = Lab(LabConfig(name=the_lab.cfg.name))
    assert stale.exists()
    stale.down()
    assert not stale.exists() and not pid_alive(pid)
    assert not any(netns.exists(the_lab.cfg.netns(n)) for n in C.EVERY_NODE)


# ---- rtr2's NAT behaviours -----------------------------------------------------------------


def test_lan2_gets_rtr2s_public_address_from_coturn(
    peer: Lab, sockets: list[socket.socket]
) -> None:
    lan2, lan = udp_socket(peer, "lan2"), udp_socket(peer, "lan")
    sockets += [lan2, lan]
    assert mapped(lan2, PRIMARY) == (C.RTR2_WAN_IP, lan2.getsockname()[1])
    assert mapped(lan, PRIMARY) == (C.RTR_WAN_IP, lan.getsockname()[1])


@pytest.mark.parametrize("by_nat2", ["eim", "random", "full-cone"], indirect=True)
def test_rtr2_mapping_behaviour(by_nat2: Lab, sockets: list[socket.socket]) -> None:
    """From one lan2 socket, the public port towards .2 and .3: kept and the same (eim,
    full-cone), or new for every destination (random)."""
    sock = udp_socket(by_nat2, "lan2")
    sockets.append(sock)
    seen = [mapped(sock, server) for server in (PRIMARY, (C.WAN_IPS[1], C.STUN_PORT), ALTERNATE)]
    assert {ip for ip, _ in seen} == {C.RTR2_WAN_IP}
    if by_nat2.cfg.nat2 == "random":
        assert len({port for _, port in seen}) == 3, f"random NAT kept a port: {seen}"
    else:
        assert set(seen) == {(C.RTR2_WAN_IP, sock.getsockname()[1])}


@pytest.mark.parametrize("by_nat2", ["eim", "full-cone"], indirect=True)
def test_rtr2_filtering_behaviour(by_nat2: Lab, sockets: list[socket.socket]) -> None:
    """After lan2 sent to .2, does a packet from .3 reach it? Only behind a full cone."""
    full_cone = by_nat2.cfg.nat2 == "full-cone"
    lan2, stranger = udp_socket(by_nat2, "lan2"), udp_socket(by_nat2, "wan", C.WAN_IPS[1])
    sockets += [lan2, stranger]
    stranger.sendto(b"unsolicited", mapped(lan2, PRIMARY))
    got = receives(lan2, 1.0 if full_cone else 0.5)
    if full_cone:
        assert got == (b"unsolicited", stranger.getsockname())
    else:
        assert got is None, f"eim must filter by address: {got}"


# ---- rtr2's port mapping ---------------------------------------------------------------------


def test_port_mapping_on_rtr2(peer: Lab) -> None:
    """lan2 maps a port on its own router with the reference client: wan reaches it, and so
    does lan through rtr; rtr's rules do not change. A reboot of rtr2 forgets it."""
    ext = random.randint(20000, 39999)
    rtr_pid = peer.router_pid()
    with udp_echo(peer, "lan2", C.LAN2_IP) as port:
        added = natpmpc(peer, "-a", str(ext), str(port), "udp", "60")
        assert added.returncode == 0, added.stdout + added.stderr
        assert f"Public IP address : {C.RTR2_WAN_IP}" in added.stdout
        assert f"dport {ext} dnat" in peer.router_rules("rtr2")
        assert f"dport {ext} dnat" not in peer.router_rules()
        assert udp_ask(peer, "wan", C.RTR2_WAN_IP, ext, b"ping") == b"echo:ping"
        assert udp_ask(peer, "lan", C.RTR2_WAN_IP, ext, b"hi") == b"echo:hi"

        before = peer.router_pid("rtr2")
        peer.reboot_router(router="rtr2")
        assert peer.router_pid("rtr2") not in (None, before) and peer.router_pid() == rtr_pid
        assert f"dport {ext} dnat" not in peer.router_rules("rtr2")
        assert udp_ask(peer, "wan", C.RTR2_WAN_IP, ext, b"ping", timeout=0.5) is None


def test_port_mapping_is_off_with_portmap2_none(rand: Lab) -> None:
    status = rand.status()
    assert status["router2"]["portmap"] == [] and not status["router2"]["miniupnpd_running"]
    assert status["router2"]["natpmp_port"] is None and status["router"]["miniupnpd_running"]
    pids = subprocess.run(["ip", "netns", "pids", rand.netns("rtr2")],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert pids == ""
    refused = natpmpc(rand, "-a", "20001", "20001", "udp", "60")
    assert refused.returncode != 0 and "does not support nat-pmp" in refused.stderr, refused
    # rtr keeps its own (every protocol): the routers are set up independently.
    ok = rand.run("lan", ["natpmpc", "-g", C.RTR_LAN_IP], timeout=30)
    assert ok.returncode == 0 and f"Public IP address : {C.RTR_WAN_IP}" in ok.stdout
    # A reboot of rtr2 from the CLI brings no daemon up.
    nk("lab", "reboot", "--name", RAND, "rtr2")
    assert rand.router_pid("rtr2") is None


# ---- hole punching between lan and lan2 --------------------------------------------------------


def punch(lab: Lab, sockets: list[socket.socket], wait: float = 1.0) -> tuple[Any, Any, Addr, Addr]:
    """Both peers learn their public address from coturn, then send to each other's a few
    times (the first packets die at the other NAT and open this one), then both listen.
    Returns what lan and lan2 received (data, source) or None, and both public addresses."""
    lan, lan2 = udp_socket(lab, "lan"), udp_socket(lab, "lan2")
    sockets += [lan, lan2]
    lan_public, lan2_public = mapped(lan, PRIMARY), mapped(lan2, PRIMARY)
    for _ in range(3):
        lan.sendto(b"from lan", lan2_public)
        lan2.sendto(b"from lan2", lan_public)
        time.sleep(0.05)
    # Everything was sent before anyone listens: once lan's wait is over, lan2's packets
    # have long arrived too.
    return receives(lan, wait), receives(lan2, 0.1), lan_public, lan2_public


@pytest.mark.parametrize("by_nat2", ["eim", "full-cone"], indirect=True)
def test_hole_punch_through_two_nats(by_nat2: Lab, sockets: list[socket.socket]) -> None:
    """eim on both sides (or a double NAT on one and a full cone on the other): each peer
    hears the other from its public address, so the packets crossed both NATs."""
    at_lan, at_lan2, lan_public, lan2_public = punch(by_nat2, sockets)
    assert lan_public[0] == C.RTR_WAN_IP and lan2_public[0] == C.RTR2_WAN_IP
    assert at_lan == (b"from lan2", lan2_public)
    assert at_lan2 == (b"from lan", lan_public)


def test_hole_punch_fails_between_two_random_nats(rand: Lab, sockets: list[socket.socket]) -> None:
    """Behind two "symmetric" NATs the ports STUN saw are not the ones the peers use for
    each other: every packet is unsolicited at the other router and dropped."""
    at_lan, at_lan2, _, _ = punch(rand, sockets, wait=0.5)
    assert (at_lan, at_lan2) == (None, None)


# ---- flushing a router's NAT state -----------------------------------------------------------


def test_flush_nat_breaks_an_established_mapping(peer: Lab, sockets: list[socket.socket]) -> None:
    """After ``flush_nat`` an established flow's replies are unsolicited and dropped, until
    the LAN side sends again; the other router's flows do not notice."""
    lan, lan2 = udp_socket(peer, "lan"), udp_socket(peer, "lan2")
    remote = udp_socket(peer, "wan", C.WAN_IPS[1])
    sockets += [lan, lan2, remote]
    where = remote.getsockname()

    def round_trip(sock: socket.socket, public: str) -> Addr:
        sock.sendto(b"out", where)
        got = receives(remote, 1.0)
        assert got is not None and got[0] == b"out" and got[1][0] == public, got
        remote.sendto(b"back", got[1])
        assert receives(sock, 1.0) == (b"back", where)
        return got[1]

    lan_public, lan2_public = round_trip(lan, C.RTR_WAN_IP), round_trip(lan2, C.RTR2_WAN_IP)
    peer.flush_nat("rtr")
    remote.sendto(b"after flush", lan_public)
    assert receives(lan, 0.5) is None, "rtr's mapping survived the flush"
    remote.sendto(b"still there", lan2_public)
    assert receives(lan2, 1.0) == (b"still there", where), "rtr2's mapping was flushed too"
    # The LAN side sends again: a new mapping (a port-keeping NAT picks the same port).
    assert round_trip(lan, C.RTR_WAN_IP) == lan_public


def test_flush_nat_moves_a_random_mapping(rand: Lab, sockets: list[socket.socket]) -> None:
    """Behind a random NAT the flow gets a new public port after a flush (the CLI's)."""
    lan2 = udp_socket(rand, "lan2")
    sockets.append(lan2)
    first = mapped(lan2, PRIMARY)
    nk("lab", "flush-nat", "--name", RAND, "rtr2")
    second = mapped(lan2, PRIMARY)
    assert first[0] == second[0] == C.RTR2_WAN_IP and first[1] != second[1]
