"""Access control on relay tunnels in the lab: ``natkit relay serve`` on wan (the
Internet), ``natkit expose --via relay --allow/--deny/--basic-auth/--rate-limit`` on lan
behind the NAT, a service on lan, and visitors from wan's two addresses (100.200.0.2 and
100.200.0.3): one admitted, one refused, for TCP and HTTP tunnels.

Each time: what the visitor sees (a reset for TCP; 401 with the realm, 403, 429 for HTTP),
that a refused visitor never reaches the service, the relay's Prometheus counters by
reason, the agent's ``refused`` JSON events, and that the password is in no log line.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from natkit.lab import Lab, netns
from natkit.lab import config as C
from tests.lab.relay_helpers import (
    Agent,
    NodeLoop,
    Relay,
    build_lab,
    parse_metrics,
    recv_all,
    split_public,
    start_agent,
    start_relay,
    start_service,
    stop_service,
)
from tests.relay.test_relay_access import Counting

pytestmark = pytest.mark.lab

TOKEN = "relay-access-" + secrets.token_hex(12)
FIRST, SECOND = C.WAN_IPS  # 100.200.0.2 (also the relay's address), 100.200.0.3
PASSWORD = "pw-" + secrets.token_hex(8)
METRICS_PORT = 9100


@pytest.fixture(scope="module")
def alab() -> Iterator[Lab]:
    the_lab = build_lab("access")
    try:
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture(scope="module")
def lan(alab: Lab) -> Iterator[NodeLoop]:
    loop = NodeLoop(alab, "lan")
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture(scope="module")
def relay(alab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    state = tmp_path_factory.mktemp("relay-access")
    # -v: the relay's DEBUG log, to check that no password is in it.
    server = start_relay(alab, state, token=TOKEN, metrics_port=METRICS_PORT, verbose=True)
    try:
        yield server
    finally:
        rc = server.stop()
    assert rc == 0, server.why()


@contextlib.contextmanager
def exposed(
    alab: Lab, lan: NodeLoop, relay: Relay, tmp_path: Path, kind: str, *options: str
) -> Iterator[tuple[Agent, Counting]]:
    service = Counting()
    server, port = lan.run(start_service(service))
    agent = start_agent(alab, tmp_path, relay, port, kind=kind, extra=list(options), verbose=True)
    try:
        yield agent, service
    finally:
        rc = agent.stop()
        lan.run(stop_service(server))
    assert rc == 0, agent.why()
    assert PASSWORD not in agent.stderr + agent.stdout, "the agent logged the password"


def from_wan(alab: Lab, source: str, host: str, port: int, data: bytes) -> bytes:
    """Connect from wan's address ``source``, send, read to the end: b"RST" for a reset."""

    def go() -> bytes:
        try:
            with socket.create_connection((host, port), timeout=10,
                                          source_address=(source, 0)) as s:  # fmt: skip
                s.sendall(data)
                return recv_all(s, deadline=time.monotonic() + 10)
        except ConnectionResetError:
            return b"RST"

    result: bytes = netns.call_in(alab.netns("wan"), go)
    return result


def http_get(host: str, *headers: str) -> bytes:
    return ("\r\n".join(["GET / HTTP/1.1", f"Host: {host}", *headers]) + "\r\n\r\n").encode()


def basic(user_pass: str) -> str:
    return "Authorization: Basic " + base64.b64encode(user_pass.encode()).decode()


def refusals(relay: Relay) -> dict[str, float]:
    found = parse_metrics(relay.metrics())
    prefix = "natkit_relay_refused_visitors_total{reason="
    return {k[len(prefix) + 1 : -2]: v for k, v in found.items() if k.startswith(prefix)}


def grew(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def wait_for(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return result


def test_tcp_allow_one_address_the_other_is_reset(
    alab: Lab, lan: NodeLoop, relay: Relay, tmp_path: Path
) -> None:
    before = refusals(relay)
    with exposed(alab, lan, relay, tmp_path, "tcp", "--allow", f"{SECOND}/32") as (agent, svc):
        assert "allow 100.200.0.3/32" in agent.ready["access"], agent.ready
        host, port = split_public(agent.public_address)
        assert from_wan(alab, SECOND, host, port, b"hello") == b"echo:hello"
        assert from_wan(alab, FIRST, host, port, b"hello") in (b"RST", b"")
        refused = agent.wait_event("refused")
        assert refused["reason"] == "not-allowed", refused
        assert refused["visitor"].startswith(f"{FIRST}:"), refused
        assert refused["public_address"] == agent.public_address and refused["more"] == 0
        assert abs(refused["time"] - time.time()) < 60
        assert svc.connections == 1  # the refused visitor never reached the service
    assert grew(before, refusals(relay)) == {"not-allowed": 1}


def test_tcp_deny_one_address_the_other_passes(
    alab: Lab, lan: NodeLoop, relay: Relay, tmp_path: Path
) -> None:
    before = refusals(relay)
    options = ("--allow", "100.200.0.0/24", "--deny", SECOND)
    with exposed(alab, lan, relay, tmp_path, "tcp", *options) as (agent, svc):
        host, port = split_public(agent.public_address)
        assert from_wan(alab, SECOND, host, port, b"x") in (b"RST", b"")
        assert from_wan(alab, FIRST, host, port, b"y") == b"echo:y"
        assert agent.wait_event("refused")["reason"] == "denied"
        assert svc.connections == 1
    assert grew(before, refusals(relay)) == {"denied": 1}


def test_tcp_rate_limit_per_visitor_address(
    alab: Lab, lan: NodeLoop, relay: Relay, tmp_path: Path
) -> None:
    before = refusals(relay)
    with exposed(alab, lan, relay, tmp_path, "tcp", "--rate-limit", "3/min") as (agent, svc):
        host, port = split_public(agent.public_address)
        got = [from_wan(alab, SECOND, host, port, b"n") for _ in range(5)]
        assert got[:3] == [b"echo:n"] * 3 and all(g in (b"RST", b"") for g in got[3:]), got
        assert from_wan(alab, FIRST, host, port, b"m") == b"echo:m"  # its own bucket
        assert agent.wait_event("refused")["reason"] == "rate-limited"
        assert svc.connections == 4
    assert grew(before, refusals(relay)) == {"rate-limited": 2}


def test_http_basic_auth_and_an_address_rule(
    alab: Lab, lan: NodeLoop, relay: Relay, tmp_path: Path
) -> None:
    before = refusals(relay)
    options = ("--basic-auth", f"alice:{PASSWORD}", "--deny", FIRST)
    with exposed(alab, lan, relay, tmp_path, "http", *options) as (agent, svc):
        name, port = split_public(agent.public_address)
        target = relay.host  # the name resolves nowhere in the lab: connect to the relay

        missing = from_wan(alab, SECOND, target, port, http_get(name))
        assert missing.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), missing
        assert b'WWW-Authenticate: Basic realm="natkit", charset="UTF-8"\r\n' in missing
        wrong = from_wan(alab, SECOND, target, port, http_get(name, basic("alice:guess")))
        assert wrong.startswith(b"HTTP/1.1 401 "), wrong
        right = from_wan(alab, SECOND, target, port, http_get(name, basic(f"alice:{PASSWORD}")))
        assert right.startswith(b"HTTP/1.1 200 OK\r\n") and right.endswith(b"ok"), right
        denied = from_wan(alab, FIRST, target, port, http_get(name, basic(f"alice:{PASSWORD}")))
        assert denied.startswith(b"HTTP/1.1 403 Forbidden\r\n"), denied

        assert svc.connections == 1
        reasons = [agent.wait_event("refused")["reason"] for _ in range(3)]
        assert reasons == ["auth-missing", "auth-wrong", "denied"], reasons
    assert grew(before, refusals(relay)) == {"auth-missing": 1, "auth-wrong": 1, "denied": 1}
    assert PASSWORD not in relay.stderr + relay.stdout, "the relay logged the password"


def test_auto_mode_with_a_policy_asks_no_router(
    alab: Lab, lan: NodeLoop, relay: Relay, tmp_path: Path
) -> None:
    """--via auto (the last --via wins) with --deny: the relay alone, and it says why."""
    options = ("--via", "auto", "--deny", FIRST)
    with exposed(alab, lan, relay, tmp_path, "tcp", *options) as (agent, svc):
        fallback = agent.events[0]
        assert fallback["event"] == "fallback", agent.events
        assert "enforces the access policy" in fallback["reason"], fallback
        assert agent.ready["method"] == "relay" and "deny 100.200.0.2/32" in agent.ready["access"]
        host, port = split_public(agent.public_address)
        assert from_wan(alab, SECOND, host, port, b"z") == b"echo:z"
        assert from_wan(alab, FIRST, host, port, b"z") in (b"RST", b"")
        assert svc.connections == 1
