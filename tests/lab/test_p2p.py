"""``natkit p2p`` between two LANs, each behind its own real router (nftables NAT, real
miniupnpd), meeting through a real ``natkit relay serve`` on the Internet host, with the
real coturn as TURN: the success matrix over router behaviours and port mapping, the
relay as the last resort, and a path that dies mid-transfer.

Peers: ``listen`` on lan2 (behind rtr2), ``connect`` on lan (behind rtr), forwarding a
local port on lan to a web server on lan2's loopback.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from natkit.lab import Lab
from natkit.lab import config as C
from tests.conftest import IN_CI
from tests.lab.relay_helpers import NatkitProc, start_relay

pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not IN_CI, reason="the lab needs root")

TOKEN = "p2p-lab-token-0123456789abcdef"
SECRET = "p2p-lab-secret-0123456789"  # the peers' own (issue 16: never the token)
RELAY = f"{C.WAN_IPS[0]}:7835"
TURN = [
    "--turn", f"{C.STUN_PRIMARY[0]}:{C.STUN_PRIMARY[1]}",
    "--turn-user", C.TURN_USER, "--turn-password", C.TURN_PASSWORD,
]  # fmt: skip
WEB_PORT, LOCAL_PORT = 8000, 9000
ALL = frozenset({"upnp", "natpmp", "pcp"})
NONE: frozenset[str] = frozenset()

# A router: (NAT behaviour, port mapping on).
Router = tuple[str, bool]
ROUTERS: list[Router] = [
    (nat, pm) for nat in ("eim", "random", "full-cone") for pm in (True, False)
]


def expected(a: Router, b: Router) -> set[str]:
    """What theory allows: a port mapping on either router lets the other peer in; without
    one, hole punching works when both map endpoint-independently, or when one side filters
    nothing (full cone); otherwise only TURN carries it."""
    if a[1] or b[1]:
        return {"port-mapped", "direct"}
    nats = {a[0], b[0]}
    if "random" not in nats or "full-cone" in nats:
        return {"direct"}
    return {"turn"}


def expected_tcp(a: Router, b: Router) -> set[str]:
    """How the direct TCP path for forwarded connections goes (docs/p2p-paths.md), ``a`` the
    connector's router and ``b`` the listener's: to the listener's TCP mapping; else the
    listener dials back — to the connector's mapping, or a simultaneous open when neither
    NAT changes a port's public address per destination (the lab's full-cone router maps
    TCP as eim does); else none (QUIC)."""
    if b[1]:
        return {"direct"}
    punch = {"punch"} if "random" not in {a[0], b[0]} else set()
    if a[1]:
        return {"reverse"} | punch
    return punch or {"none"}


def _id(pair: tuple[Router, Router]) -> str:
    return "-".join(f"{nat}{'+pm' if pm else ''}" for nat, pm in pair)


@pytest.fixture
def p2p_lab(make_lab: Callable[..., Lab], request: pytest.FixtureRequest) -> Lab:
    (nat, pm), (nat2, pm2) = request.param
    return make_lab(
        f"p{abs(hash(request.param)) % 10_000}",
        ALL if pm else NONE,
        nat,
        second_lan=True,
        nat2=nat2,
        portmap2=ALL if pm2 else NONE,
    )


class Peers:
    def __init__(
        self, lab: Lab, tmp: Path, extra: list[str], forwards: list[str],
        nodes: tuple[str, str] = ("lan2", "lan"),
    ) -> None:  # fmt: skip
        self.lab, self.tmp = lab, tmp
        listen_on, self.connect_on = nodes
        self.procs: list[NatkitProc] = []
        self.relay = start_relay(lab, tmp / "relay", token=TOKEN, http_port=None,
                                 https_port=None)  # fmt: skip
        self.procs.append(self.relay)
        self.web = lab.popen(listen_on, [sys.executable, "-m",
                                      "natkit.lab.webserver", "127.0.0.1", str(WEB_PORT)])  # fmt: skip
        common = ["--relay", RELAY, "--token", TOKEN, "--secret", SECRET, "--json", *extra]
        allow = [x for f in forwards for x in ("--allow", f.rpartition(":")[2])]
        self.listen = NatkitProc(lab, listen_on, ["p2p", "listen", "room", *common, *allow],
                                 state_dir=tmp / "l", label="p2p listen")  # fmt: skip
        self.procs.append(self.listen)
        self.connect = NatkitProc(
            lab, self.connect_on, ["p2p", "connect", "room", *common,
                         *(x for f in forwards for x in ("--forward", f))],
            state_dir=tmp / "c", label="p2p connect",
        )  # fmt: skip
        self.procs.append(self.connect)

    def ready(self, timeout: float = 30) -> tuple[dict[str, object], dict[str, object]]:
        a = self.connect.wait_event("ready", timeout)
        b = self.listen.wait_event("ready", timeout)
        self.connect.wait_event("forwarding", 5)
        return a, b

    def get(self, path: str = "/", timeout: float = 20) -> str:
        r = self.lab.run(self.connect_on, ["curl", "-s", "-m", str(timeout), f"http://127.0.0.1:{LOCAL_PORT}{path}"],
                         timeout=timeout + 5)  # fmt: skip
        assert r.returncode == 0, (r.returncode, r.stderr, self.why())
        return r.stdout

    def why(self) -> str:
        return "\n".join(p.why() for p in self.procs)

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.web.kill()
        self.web.wait()


@pytest.fixture
def peers_factory(tmp_path: Path) -> Iterator[Callable[..., Peers]]:
    made: list[Peers] = []

    def make(
        lab: Lab, extra: list[str] | None = None, forwards: list[str] | None = None,
        nodes: tuple[str, str] = ("lan2", "lan"),
    ) -> Peers:  # fmt: skip
        made.append(Peers(lab, tmp_path / str(len(made)), TURN if extra is None else extra,
                          forwards or [f"{LOCAL_PORT}:{WEB_PORT}"], nodes))  # fmt: skip
        return made[-1]

    yield make
    for peers in made:
        peers.close()


PAIRS = list(itertools.combinations_with_replacement(ROUTERS, 2))


@pytest.mark.parametrize("p2p_lab", PAIRS, ids=[_id(p) for p in PAIRS], indirect=True)
def test_success_matrix(p2p_lab: Lab, peers_factory: Callable[..., Peers]) -> None:
    """Every pair connects, directly where theory allows it, else through TURN."""
    cfg = p2p_lab.cfg
    a: Router = (cfg.nat, bool(cfg.portmap))
    b: Router = (cfg.nat2, bool(cfg.portmap2))
    peers = peers_factory(p2p_lab)
    ready_c, _ = peers.ready()
    path = ready_c["path"]
    if path == "relay":  # ICE took longer than its head start: the session moves when it connects
        path = peers.connect.wait_event("path", 15)["path"]
    assert path in expected(a, b), (a, b, ready_c, peers.why())
    assert isinstance(ready_c["elapsed_ms"], float)
    assert peers.get() == f"hello from 127.0.0.1:{WEB_PORT}\n"
    tcp = peers.connect.wait_event("tcp_path", 15)["via"]  # how that forward went
    assert tcp in expected_tcp(a, b), (a, b, tcp, peers.why())
    assert peers.get() == f"hello from 127.0.0.1:{WEB_PORT}\n"  # and the next one too
    print(f"P2P {_id((a, b))}: {path} (ready on {ready_c['path']} in {ready_c['elapsed_ms']} ms),"
          f" TCP path: {tcp}")  # fmt: skip


@pytest.mark.parametrize("p2p_lab", [(("random", False), ("random", False))], indirect=True)
def test_without_turn_the_relay_carries_it(
    p2p_lab: Lab, peers_factory: Callable[..., Peers]
) -> None:
    peers = peers_factory(p2p_lab, extra=[])
    ready_c, ready_l = peers.ready(60)
    assert ready_c["path"] == ready_l["path"] == "relay", peers.why()
    assert peers.get() == f"hello from 127.0.0.1:{WEB_PORT}\n"


@pytest.mark.parametrize("p2p_lab", [(("random", False), ("full-cone", False))], indirect=True)
def test_a_path_that_dies_mid_transfer_loses_nothing(
    p2p_lab: Lab, peers_factory: Callable[..., Peers], tmp_path: Path
) -> None:
    """Direct through a full cone; then the random router's UDP NAT state is flushed (its
    next packets leave from a new port the peer does not know): the session moves to the
    relay and the transfer in flight completes, byte for byte; later ICE finds a direct
    path again and the session moves back. (Only UDP state: a random NAT that forgot its
    TCP state too would also cut the relay's TCP connections, every path at once.)"""
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(24 << 20))
    out = tmp_path / "got"
    # A raw TCP server on lan2 that sends the blob, and a slow reader on lan (~8 s).
    files = p2p_lab.popen("lan2", [sys.executable, "-c", SEND_FILE, str(blob), "8001"])
    # (--no-tcp: this is about the QUIC session's paths; forwards would take TCP otherwise)
    peers = peers_factory(p2p_lab, extra=["--no-tcp"], forwards=["9001:8001"])
    conn = peers.connect
    try:
        ready_c, _ = peers.ready()
        assert ready_c["path"] == "direct", peers.why()
        reader = p2p_lab.popen("lan", [sys.executable, "-c", SLOW_READ, str(out), "9001"])
        time.sleep(2)
        p2p_lab.flush_nat("rtr", protocol="udp")
        moved = conn.wait_event("path", 30)
        assert moved["path"] == "relay", (moved, conn.why())
        assert reader.wait(120) == 0, conn.why()
        assert (
            hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(blob.read_bytes()).digest()
        )
        back = conn.wait_event("path", 40)  # ICE is retried every 10 s while on the relay
        assert back["path"] == "direct", (back, conn.why())
        print("events:", json.dumps(conn.events))
    finally:
        files.kill()
        files.wait()


SEND_FILE = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[2])))
s.listen()
c, _ = s.accept()
c.sendall(open(sys.argv[1], "rb").read())
c.close()
"""

SLOW_READ = """
import socket, sys, time
c = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
with open(sys.argv[1], "wb") as f:
    while data := c.recv(65536):
        f.write(data)
        time.sleep(0.02)
"""
