"""IceAgent on loopback: two agents in one event loop, a scripted TURN server, and the aioice
internals natkit's extension relies on. Nothing leaves 127.0.0.1 (no port mapping here:
the lab tests ask a real router)."""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
from aioice import Connection, stun
from aioice.ice import StunProtocol
from aioice.turn import make_integrity_key

from natkit.p2p import ice_conn
from natkit.p2p.candidates import IceCandidate, IceDescription
from natkit.p2p.errors import P2PError
from natkit.p2p.ice import IceAgent, IceOptions, TurnServer
from natkit.p2p.paths import IcePath

LOOPBACK = ("127.0.0.1",)
WAIT = 20.0  # generous bound on waits for events (never an assertion on time)


def agent(controlling: bool, **kw: Any) -> IceAgent:
    kw.setdefault("port_mapping", False)
    return IceAgent(controlling=controlling, host_addresses=LOOPBACK, use_ipv6=False, **kw)


def over_the_wire(d: IceDescription) -> IceDescription:
    return IceDescription.from_dict(json.loads(json.dumps(d.to_dict())))


async def connect_pair(**kw: Any) -> tuple[IceAgent, IceAgent]:
    a, b = agent(True, **kw), agent(False, **kw)
    da, db = await a.gather(), await b.gather()
    await asyncio.gather(a.connect(over_the_wire(db)), b.connect(over_the_wire(da)))
    return a, b


@pytest.fixture
async def pair() -> AsyncIterator[tuple[IceAgent, IceAgent]]:
    a, b = await connect_pair()
    yield a, b
    await asyncio.gather(a.close(), b.close())


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(int(WAIT / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


def quiet_port() -> socket.socket:
    """A bound UDP socket that never answers: checks to it get no reply and no ICMP."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


# ---- two agents --------------------------------------------------------------------------------


async def test_two_agents_connect_and_exchange_data(pair: tuple[IceAgent, IceAgent]) -> None:
    a, b = pair
    for me, peer in ((a, b), (b, a)):
        assert me.selected is not None and me.path == "direct"
        assert me.selected.local.type == "host"
        assert me.local_description is not None and peer.local_description is not None
        assert me.selected.seen_as == me.local_description.candidates[0].address
        assert me.alive and not me.dead.done()
    await a.send(b"ping")
    assert await asyncio.wait_for(b.recv(), WAIT) == b"ping"
    await b.send(b"pong")
    assert await asyncio.wait_for(a.recv(), WAIT) == b"pong"
    assert a.consent_age is not None and a.consent_age >= 0


async def test_data_from_a_stranger_is_dropped(pair: tuple[IceAgent, IceAgent]) -> None:
    a, b = pair
    assert a.local_description is not None
    target = a.local_description.candidates[0].address
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.sendto(b"injected", target)
        stranger.sendto(b"\x00\x01\x00\x08" + bytes(16), target)  # a truncated STUN header
        stranger.sendto(b"\x40" + bytes(1199), target)  # a QUIC short header
    await b.send(b"from the peer")
    assert await asyncio.wait_for(a.recv(), WAIT) == b"from the peer"
    assert a.dropped >= 3


async def test_what_cannot_be_stun_from_the_peer_is_data(pair: tuple[IceAgent, IceAgent]) -> None:
    """A datagram whose first bits say "not STUN" (as QUIC's do) is data, even when the rest
    would parse as a STUN header: aioice alone would take it for a STUN message."""
    a, b = pair
    looks_like_stun = b"\x41\x01\x00\x04" + bytes(16) + b"data"  # length field matches
    await b.send(looks_like_stun)
    assert await asyncio.wait_for(a.recv(), WAIT) == looks_like_stun


async def test_an_ice_path_sends_a_burst_in_order(pair: tuple[IceAgent, IceAgent]) -> None:
    """IcePath.send_many on natkit's ICE connection: one segmented send where the kernel
    can, arriving as the datagrams it was, in order (the last one shorter)."""
    a, b = pair
    got: list[bytes] = []
    pa, pb = (
        IcePath(a.connection, owns_connection=False),
        IcePath(b.connection, owns_connection=False),
    )
    pb.set_receiver(got.append, lambda exc: None)
    burst = [bytes([0x40, i]) * 600 for i in range(100)] + [b"\x40 last"]
    pa.send_many(burst)
    await until(lambda: len(got) == len(burst))
    assert got == burst and pa.sent == len(burst) and pa.dropped == 0
    pa.close()
    pb.close()
    await asyncio.gather(pa.wait_closed(), pb.wait_closed())


async def test_data_nobody_reads_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ice_conn, "MAX_QUEUED_BYTES", 1000)
    a, b = await connect_pair()
    try:
        for i in range(20):
            await b.send(bytes([i]) * 100)
        await until(lambda: a.dropped >= 10)
        assert [(await a.recv())[0] for _ in range(10)] == list(range(10))
        await b.send(b"more")  # room again
        assert await asyncio.wait_for(a.recv(), WAIT) == b"more"
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_consent_expiry_resolves_dead_and_ends_recv() -> None:
    a, b = await connect_pair(consent_interval=0.5, consent_lifetime=1.0)
    try:
        await b.close()  # gone without a word: only consent tells
        down = await asyncio.wait_for(a.dead, WAIT)
        assert down.reason == "consent-expired"
        assert "RFC 7675" in down.detail
        assert not a.alive
        with pytest.raises(P2PError, match="cannot receive"):
            await a.recv()
        assert (await b.dead).reason == "closed"
    finally:
        await a.close()


async def test_close_resolves_dead_and_can_be_repeated(pair: tuple[IceAgent, IceAgent]) -> None:
    a, _ = pair
    await a.close()
    await a.close()
    assert a.dead.result().reason == "closed"
    with pytest.raises(P2PError, match="cannot send"):
        await a.send(b"late")


async def test_a_connect_that_finds_no_path_raises_p2p_error() -> None:
    with quiet_port() as silent:
        a = agent(True)
        peer = IceDescription(
            "abcd",
            "b" * 22,
            (IceCandidate("1", 2130706431, "127.0.0.1", silent.getsockname()[1], "host"),),
        )
        with pytest.raises(P2PError) as err:
            await a.connect(peer, timeout=0.5)
    text = str(err.value)
    assert "no candidate pair worked within 0.5 s" in text
    assert "Ours: host 127.0.0.1:" in text and "The peer's: host 127.0.0.1:" in text
    assert "give a TURN server" in text
    assert a.dead.result().reason == "closed"  # a failed agent is closed: restart anew


async def test_a_peer_without_candidates_fails_at_once() -> None:
    a = agent(True)
    with pytest.raises(P2PError, match=r"no candidate pair worked\. .*The peer's: none"):
        await a.connect(IceDescription("abcd", "b" * 22, ()), timeout=WAIT)


async def test_connect_is_once_per_agent_and_a_restart_is_a_new_agent(
    pair: tuple[IceAgent, IceAgent],
) -> None:
    a, b = pair
    assert b.local_description is not None
    with pytest.raises(P2PError, match="once per ICE agent"):
        await a.connect(b.local_description)
    fresh = a.restarted()
    try:
        assert fresh.options == a.options and fresh.controlling
        assert not a.restarted(controlling=False).controlling
        d = await fresh.gather()
        assert a.local_description is not None
        assert (d.ufrag, d.pwd) != (a.local_description.ufrag, a.local_description.pwd)
    finally:
        await fresh.close()


async def test_a_dead_stun_server_costs_the_deadline_not_the_gathering() -> None:
    with quiet_port() as silent:
        a = agent(True, stun_server=silent.getsockname(), gather_timeout=0.3)
        try:
            d = await a.gather()
        finally:
            await a.close()
    assert [c.type for c in d.candidates] == ["host"]
    assert a.gather_report["stun"] == "no answer within 0.3 s"


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="consent_interval"):
        IceOptions(consent_interval=25)  # the gaps would outlast a NAT's 30 s UDP timeout
    with pytest.raises(ValueError, match="twice"):
        IceOptions(consent_interval=5, consent_lifetime=6)
    with pytest.raises(ValueError, match="gather_timeout"):
        IceOptions(gather_timeout=0)
    with pytest.raises(ValueError, match="relay_grace"):
        IceOptions(relay_grace=-1)
    assert "secret" not in repr(TurnServer("127.0.0.1", 3478, "u", "secret"))


# ---- TURN: a scripted server ------------------------------------------------------------------


class FakeTurn(asyncio.DatagramProtocol):
    """Enough of a TURN server (RFC 8656) for Allocate and Refresh with long-term
    credentials; it can declare nonces stale (438) and records what it answered."""

    REALM = "fake.natkit"

    def __init__(self, *, stale_allocates: int = 0, stale_refreshes: int = 0, lifetime: int = 600):
        self.user, self.password = "natkit", "natkit-pass"
        self.stale_allocates, self.stale_refreshes, self.lifetime = (
            stale_allocates,
            stale_refreshes,
            lifetime,
        )
        self.nonce_count = 0
        self.nonce = b"nonce-0"
        self.answers: list[tuple[str, int | None]] = []  # (method, error code or None)
        self.refreshed = asyncio.Event()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def _send(self, msg: stun.Message, addr: tuple[str, int], key: bytes | None) -> None:
        assert self.transport is not None
        if key is not None:
            msg.add_message_integrity(key)
        self.transport.sendto(bytes(msg), addr)

    def _error(self, req: stun.Message, addr: tuple[str, int], code: int) -> None:
        if code == 438:
            self.nonce_count += 1
            self.nonce = f"nonce-{self.nonce_count}".encode()
        reason = {401: "Unauthorized", 438: "Stale Nonce"}[code]
        msg = stun.Message(req.message_method, stun.Class.ERROR, req.transaction_id)
        msg.attributes.update({"ERROR-CODE": (code, reason), "REALM": self.REALM})
        msg.attributes["NONCE"] = self.nonce
        self.answers.append((req.message_method.name, code))
        self._send(msg, addr, None)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        req = stun.parse_message(data)
        if req.message_class != stun.Class.REQUEST:
            return
        key = make_integrity_key(self.user, self.REALM, self.password)
        if req.attributes.get("USERNAME") != self.user or not req.check_message_integrity(key):
            return self._error(req, addr, 401)
        if req.attributes.get("NONCE") != self.nonce:
            return self._error(req, addr, 438)
        method = req.message_method
        if method == stun.Method.ALLOCATE and self.stale_allocates:
            self.stale_allocates -= 1
            return self._error(req, addr, 438)
        if method == stun.Method.REFRESH and self.stale_refreshes:
            self.stale_refreshes -= 1
            return self._error(req, addr, 438)
        ok = stun.Message(method, stun.Class.RESPONSE, req.transaction_id)
        ok.attributes["LIFETIME"] = self.lifetime
        if method == stun.Method.ALLOCATE:
            ok.attributes["XOR-RELAYED-ADDRESS"] = ("127.0.0.1", 49999)
            ok.attributes["XOR-MAPPED-ADDRESS"] = addr
        elif method == stun.Method.REFRESH and req.attributes.get("LIFETIME") != 0:
            self.refreshed.set()
        self.answers.append((method.name, None))
        self._send(ok, addr, key)


@pytest.fixture
async def fake_turn() -> AsyncIterator[Callable[..., Any]]:
    made: list[asyncio.DatagramTransport] = []

    async def start(**kw: Any) -> tuple[FakeTurn, TurnServer]:
        loop = asyncio.get_running_loop()
        transport, server = await loop.create_datagram_endpoint(
            lambda: FakeTurn(**kw), local_addr=("127.0.0.1", 0)
        )
        made.append(transport)
        port = transport.get_extra_info("sockname")[1]
        return server, TurnServer("127.0.0.1", port, server.user, server.password)

    yield start
    for transport in made:
        transport.close()


async def test_turn_relayed_candidate(fake_turn: Callable[..., Any]) -> None:
    server, turn = await fake_turn()
    a = agent(True, turn=turn)
    try:
        d = await a.gather()
    finally:
        await a.close()
    relay = d.candidates[-1]
    assert (relay.type, relay.address) == ("relay", ("127.0.0.1", 49999))
    assert a.gather_report["turn"] == "relay 127.0.0.1:49999"
    assert server.answers[:2] == [("ALLOCATE", 401), ("ALLOCATE", None)]
    assert server.answers[-1] == ("REFRESH", None)  # close() deleted the allocation


async def test_a_stale_nonce_on_allocate_is_retried_once(fake_turn: Callable[..., Any]) -> None:
    server, turn = await fake_turn(stale_allocates=1)
    a = agent(True, turn=turn)
    try:
        d = await a.gather()
    finally:
        await a.close()
    assert d.candidates[-1].type == "relay"
    assert server.answers[:4] == [
        ("ALLOCATE", 401),
        ("ALLOCATE", 438),  # aioice gives up here: natkit allocates again
        ("ALLOCATE", 401),
        ("ALLOCATE", None),
    ]


async def test_a_turn_server_that_keeps_refusing_is_not_fatal(
    fake_turn: Callable[..., Any],
) -> None:
    _, stale = await fake_turn(stale_allocates=2)
    _, wrong = await fake_turn()
    for turn, why in (
        (stale, "438 - Stale Nonce"),
        (TurnServer(wrong.host, wrong.port, "natkit", "wrong"), "check the TURN user name"),
    ):
        a = agent(True, turn=turn)
        try:
            d = await a.gather()
        finally:
            await a.close()
        assert [c.type for c in d.candidates] == ["host"]
        assert why in a.gather_report["turn"]


async def test_a_stale_nonce_on_refresh_is_retried_by_aioice(
    fake_turn: Callable[..., Any],
) -> None:
    # aioice refreshes at 5/6 of the lifetime, and retries a 438 once the realm is known.
    server, turn = await fake_turn(stale_refreshes=1, lifetime=1)
    a = agent(True, turn=turn)
    try:
        await a.gather()
        await asyncio.wait_for(server.refreshed.wait(), WAIT)
    finally:
        await a.close()
    refreshes = [code for method, code in server.answers if method == "REFRESH"]
    assert refreshes[:2] == [438, None]


async def test_a_dead_turn_server_costs_the_deadline(fake_turn: Callable[..., Any]) -> None:
    with quiet_port() as silent:
        host, port = silent.getsockname()
        a = agent(True, turn=TurnServer(host, port, "u", "p"), gather_timeout=0.3)
        try:
            d = await a.gather()
        finally:
            await a.close()
    assert [c.type for c in d.candidates] == ["host"]
    assert a.gather_report["turn"] == "no answer within 0.3 s"


# ---- the aioice internals natkit extends -------------------------------------------------------


def test_the_aioice_internals_natkit_relies_on_are_there() -> None:
    """natkit's ICE overrides aioice hooks and reads some of its state; an aioice release
    that renames them must fail here, not in the field."""
    conn = Connection(ice_controlling=True)
    attrs = (
        "_protocols",
        "_nominated",
        "_remote_candidates",
        "_early_checks",
        "_queue",
        "_closing",
    )
    for attr in attrs:
        assert hasattr(conn, attr), attr
    for method, params in {
        "get_component_candidates": ["component", "addresses", "timeout"],
        "check_start": ["pair"],
        "query_consent": [],
        "protocol_lost": ["protocol"],
        "data_received": ["data", "component"],
        "recvfrom": [],
        "build_request": ["pair", "nominate"],
        "check_state": ["pair", "state"],
    }.items():
        assert list(inspect.signature(getattr(Connection, method)).parameters)[1:] == params
    assert "retransmissions" in inspect.signature(StunProtocol.request).parameters
    assert "_query_consent_task" in inspect.getsource(Connection.connect)
