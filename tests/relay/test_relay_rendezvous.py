"""The relay as a P2P rendezvous and STUN server, for real on loopback: ``natkit relay
serve`` as a subprocess, two (or three) real :class:`Agent` objects with no tunnels in the
test's loop, real TCP and UDP sockets. Nothing leaves 127.0.0.1.

* Peers meet in a room and signal both ways; a third of a role is refused; another token
  never meets them; a leaving or vanished peer is reported; rooms come back by themselves
  after the relay restarts.
* The relay-fallback path joins two sockets: bytes both ways, half-close both ways, tickets
  one-time, an unpaired path released in time.
* STUN: a Binding request to the relay's UDP port returns the client's address; garbage is
  ignored and the relay keeps answering; ``--no-stun`` turns it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from natkit.errors import NatkitError
from natkit.relay import messages as M
from natkit.relay.agent import Agent, RelayAuthError
from natkit.relay.server import RelayConfig, RelayServer
from natkit.rendezvous import rooms
from natkit.rendezvous.client import P2PRoom, RendezvousError, RendezvousTimeoutError
from natkit.stun import StunTimeoutError, binding_udp
from tests.tcp_proxy import TcpProxy

NATKIT = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "natkit")
TOKEN_A = "alice-token-0123456789abcdef"
TOKEN_B = "bob-token-0123456789abcdef"
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class RelayProc:
    """``natkit relay serve --json`` on loopback, with metrics; restartable on its port."""

    def __init__(self, state: Path, extra: tuple[str, ...] = ()) -> None:
        self.state, self.extra = state, extra
        self.port = 0
        self.metrics_port = free_port()
        self.ready: dict[str, Any] = {}
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        args = [
            "relay",
            "serve",
            "--listen",
            f"{LOOPBACK}:{self.port}",
            "--json",
            "--token",
            TOKEN_A,
            "--token",
            TOKEN_B,
            "--ports",
            "40000-40009",
            "--metrics",
            f"{LOOPBACK}:{self.metrics_port}",
            *self.extra,
        ]
        env = {**os.environ, "NATKIT_STATE_DIR": str(self.state), "PYTHONUNBUFFERED": "1"}
        log = self.state / "relay.log"
        with log.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                NATKIT, *args, stdout=asyncio.subprocess.PIPE, stderr=err, env=env
            )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 20)
        assert line, f"relay ended: {(self.state / 'relay.log').read_text()[-3000:]}"
        self.ready = json.loads(line)
        assert self.ready["event"] == "ready", self.ready
        self.port = int(self.ready["listen"].rsplit(":", 1)[1])

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    async def metrics(self) -> dict[str, float]:
        reader, writer = await asyncio.open_connection(LOOPBACK, self.metrics_port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        found: dict[str, float] = {}
        for line in raw.partition(b"\r\n\r\n")[2].decode().splitlines():
            name, _, value = line.rpartition(" ")
            found[name.replace('natkit_relay_events_total{event="', "").rstrip('"}')] = float(value)
        return found


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[RelayProc]:
    proc = RelayProc(tmp_path)
    await proc.start()
    yield proc
    await proc.stop()


MakeAgent = Callable[..., Awaitable[Agent]]


@pytest.fixture
async def make_agent(tmp_path: Path) -> AsyncIterator[MakeAgent]:
    """Agents with no tunnels, running; closed after the test."""
    running: list[tuple[Agent, asyncio.Task[None]]] = []

    async def make(relay: RelayProc | str, token: str = TOKEN_A, *, fp: str = "") -> Agent:
        address = relay.address if isinstance(relay, RelayProc) else relay
        fingerprint = fp or (relay.ready["fingerprint"] if isinstance(relay, RelayProc) else "")
        agent = Agent(
            address,
            token,
            [],
            fingerprint=fingerprint or None,
            known_relays=tmp_path / "known_relays.json",
            max_backoff=1.0,
        )
        running.append((agent, asyncio.get_running_loop().create_task(agent.run())))
        return agent

    yield make
    for agent, task in running:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, NatkitError):
            await task
        await agent.close()


async def meet(a: Agent, b: Agent, name: str = "cam") -> tuple[P2PRoom, P2PRoom]:
    ra = await a.join_p2p(name, "listen")
    rb = await b.join_p2p(name, "connect")
    await asyncio.gather(ra.wait_peer(5), rb.wait_peer(5))
    return ra, rb


# ---- meeting ------------------------------------------------------------------------------


async def test_two_agents_meet_and_signal_both_ways(
    relay: RelayProc, make_agent: MakeAgent
) -> None:
    a, b = await make_agent(relay), await make_agent(relay)
    ra = await a.join_p2p("cam", "listen")
    events: list[tuple[str, dict[str, Any]]] = []
    ra.on_event(lambda event, info: events.append((event, info)))
    assert not ra.peer_present and ra.ticket == ""
    rb = await b.join_p2p("cam", "connect")
    assert rb.peer_present and rb.ticket  # the listener was there: the answer says so
    ticket_a = await ra.wait_peer(5)
    assert ticket_a and ticket_a != rb.ticket
    assert events == [("peer", {"ticket": ticket_a})]
    offer = json.dumps({"sdp": "v=0 …", "candidates": ["1 1 udp 2130706431 10.0.0.1 5000"]})
    ra.send_signal(offer)
    rb.send_signal("answer-1")
    rb.send_signal("answer-2")
    assert await rb.recv_signal(5) == offer
    assert [await ra.recv_signal(5), await ra.recv_signal(5)] == ["answer-1", "answer-2"]
    big = "x" * 16384  # the largest signal, verbatim
    ra.send_signal(big)
    assert await rb.recv_signal(5) == big
    with pytest.raises(RendezvousError, match="over the relay's 16384") as exc:
        ra.send_signal(big + "x")
    assert exc.value.code == "too-large"
    metrics = await relay.metrics()
    assert metrics["natkit_relay_p2p_rooms"] == 1 and metrics["p2p_signals"] == 4


async def test_a_third_peer_of_the_same_role_is_refused(
    relay: RelayProc, make_agent: MakeAgent
) -> None:
    a, b, c = [await make_agent(relay) for _ in range(3)]
    ra, rb = await meet(a, b)
    with pytest.raises(RendezvousError, match="already has a listen peer") as exc:
        await c.join_p2p("cam", "listen")
    assert exc.value.code == "busy"
    assert "cam" not in c._rendezvous.rooms  # c may try again later
    rb.send_signal("still here")  # the room is undisturbed
    assert await ra.recv_signal(5) == "still here"
    with pytest.raises(RendezvousError, match="in room 'cam' already"):
        await a.join_p2p("cam", "listen")


async def test_another_token_never_meets(relay: RelayProc, make_agent: MakeAgent) -> None:
    a, other = await make_agent(relay, TOKEN_A), await make_agent(relay, TOKEN_B)
    ra = await a.join_p2p("cam", "listen")
    ro = await other.join_p2p("cam", "connect")  # same name, other token: another room
    with pytest.raises(RendezvousTimeoutError):
        await ro.wait_peer(1.0)
    assert not ra.peer_present
    with pytest.raises(RendezvousError, match="no peer in room 'cam'"):
        ro.send_signal("anyone?")
    # A token the relay does not know gets nowhere at all.
    stranger = await make_agent(relay, "mallory-token-0123456789abcdef")
    with pytest.raises(RendezvousTimeoutError, match="did not answer the request to join"):
        await stranger.join_p2p("cam", "connect", timeout=1.0)
    assert not ra.peer_present
    assert (await relay.metrics())["auth_failures"] >= 1


async def test_leave_and_a_vanished_agent_are_reported(
    relay: RelayProc, make_agent: MakeAgent
) -> None:
    a, b = await make_agent(relay), await make_agent(relay)
    ra, rb = await meet(a, b)
    left: list[dict[str, Any]] = []
    ra.on_event(lambda event, info: left.append(info) if event == "peer_left" else None)
    rb.leave()
    await ra.wait_peer_left(5)
    assert left == [{"reason": "left"}] and ra.ticket == ""
    with pytest.raises(RendezvousError, match="closed: left"):
        await rb.recv_signal(1)
    rb2 = await b.join_p2p("cam", "connect")  # back in, as a new room object
    assert rb2.peer_present and await ra.wait_peer(5)
    await b.close()  # its control connection ends without a LEAVE
    await ra.wait_peer_left(5)
    assert len(left) == 2


async def test_rooms_rejoin_by_themselves_after_the_relay_restarts(
    relay: RelayProc, make_agent: MakeAgent
) -> None:
    a, b = await make_agent(relay), await make_agent(relay)
    ra, rb = await meet(a, b)
    old = ra.ticket
    await relay.stop()
    await asyncio.gather(ra.wait_peer_left(5), rb.wait_peer_left(5))
    await relay.start()  # same port, same certificate
    assert await ra.wait_peer(15) != old
    await rb.wait_peer(15)
    assert a.connections == 2 and b.connections == 2
    rb.send_signal("after the restart")
    assert await ra.recv_signal(5) == "after the restart"


# ---- the relay-fallback path ----------------------------------------------------------------


async def _recv_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = []
    while data := await loop.sock_recv(sock, 1 << 16):
        chunks.append(data)
    return b"".join(chunks)


async def test_the_relay_path_moves_bytes_both_ways_with_half_close(
    relay: RelayProc, make_agent: MakeAgent
) -> None:
    loop = asyncio.get_running_loop()
    a, b = await make_agent(relay), await make_agent(relay)
    ra, rb = await meet(a, b)
    ticket_a = ra.ticket
    # B opens its path a moment later: A's waits for it.
    path_a = asyncio.ensure_future(ra.open_relay_path())
    await asyncio.sleep(0.3)
    assert not path_a.done()
    sb = await rb.open_relay_path()
    sa = await path_a
    up, down = secrets.token_bytes(3 << 20), secrets.token_bytes(5 << 20)
    try:

        async def a_side() -> bytes:
            await loop.sock_sendall(sa, up)
            sa.shutdown(socket.SHUT_WR)  # A is done sending, still reads
            return await _recv_all(sa)

        async def b_side() -> bytes:
            got = b""
            while len(got) < len(up):
                got += await loop.sock_recv(sb, 1 << 16)
            assert await loop.sock_recv(sb, 1) == b""  # A's EOF came through
            await loop.sock_sendall(sb, down)  # B still sends after A's half-close
            sb.shutdown(socket.SHUT_WR)
            return got

        got_a, got_b = await asyncio.wait_for(asyncio.gather(a_side(), b_side()), 30)
    finally:
        sa.close()
        sb.close()
    assert got_b == up and got_a == down
    assert (await relay.metrics())["p2p_bridged"] == 1
    # Tickets are one-time; a fresh pair joins again.
    with pytest.raises(RendezvousError, match="refused the relay-path ticket") as exc:
        await ra.open_relay_path(ticket_a)
    assert exc.value.code == "ticket"
    with pytest.raises(RendezvousError, match="new_ticket"):
        await ra.open_relay_path()  # the room's ticket was used
    t1, t2 = await asyncio.gather(ra.new_ticket(), rb.new_ticket())
    s1, s2 = await asyncio.gather(ra.open_relay_path(t1), rb.open_relay_path(t2))
    await loop.sock_sendall(s2, b"again")
    assert await loop.sock_recv(s1, 5) == b"again"
    s1.close()
    s2.close()


async def test_the_relay_path_ticket_never_travels_in_clear(
    relay: RelayProc, make_agent: MakeAgent
) -> None:
    # Issue 16: DATA {ticket} went in clear, so anyone on the way could take the ticket and
    # be joined to the peer's path in its place. Now the opening names the ticket by its
    # handle and proves it sealed under the agent's session secret.
    loop = asyncio.get_running_loop()
    proxy = TcpProxy(LOOPBACK, relay.port)
    via_proxy = await proxy.start()
    try:
        a = await make_agent(via_proxy, fp=relay.ready["fingerprint"])
        b = await make_agent(relay)
        ra, rb = await meet(a, b)
        ticket_a = ra.ticket
        sa, sb = await asyncio.gather(ra.open_relay_path(), rb.open_relay_path())
        await loop.sock_sendall(sa, b"through the relay")
        assert await loop.sock_recv(sb, 17) == b"through the relay"
        assert proxy.seen and ticket_a.encode() not in proxy.seen
        sa.close()
        sb.close()

        # A ticket shown in a plain DATA frame (as a thief would) is refused and stays
        # good for its holder.
        t1, t2 = await asyncio.gather(ra.new_ticket(), rb.new_ticket())
        thief = socket.create_connection((LOOPBACK, relay.port))
        thief.sendall(M.encode(M.Data(ticket=t1)))
        thief.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert thief.recv(1) == b""
        thief.close()
        s1, s2 = await asyncio.gather(ra.open_relay_path(t1), rb.open_relay_path(t2))
        await loop.sock_sendall(s2, b"again")
        assert await loop.sock_recv(s1, 5) == b"again"
        s1.close()
        s2.close()
    finally:
        proxy.close()


@pytest.fixture
async def inproc_relay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """A relay in this process, with the path wait cut to 0.5 s."""
    monkeypatch.setattr(rooms, "PATH_WAIT", 0.5)
    server = RelayServer(
        RelayConfig(
            listen_host=LOOPBACK, listen_port=0, tokens={"a": TOKEN_A}, state_dir=tmp_path / "relay"
        )
    )
    await server.start()
    yield f"{LOOPBACK}:{server.listen_port}"
    await server.close()


async def test_an_unpaired_relay_path_is_released(inproc_relay: str, make_agent: MakeAgent) -> None:
    a, b = await make_agent(inproc_relay), await make_agent(inproc_relay)
    ra, rb = await meet(a, b)
    with pytest.raises(RendezvousError, match=r"opened no relay path within 0\.5 s") as exc:
        await ra.open_relay_path()
    assert exc.value.code == "timeout"
    # A path parked when its peer leaves is told so at once.
    t1 = await ra.new_ticket()
    path = asyncio.ensure_future(ra.open_relay_path(t1))
    await asyncio.sleep(0.1)
    rb.leave()
    with pytest.raises(RendezvousError, match="left the room") as exc:
        await path
    assert exc.value.code == "gone"


# ---- STUN ----------------------------------------------------------------------------------


async def test_stun_binding_returns_the_clients_address(relay: RelayProc) -> None:
    assert relay.ready["stun"] == relay.address
    (result,) = await binding_udp([(LOOPBACK, relay.port)], local_ip=LOOPBACK, timeout=2)
    assert not isinstance(result, NatkitError), result
    assert result.mapped == (LOOPBACK, result.local[1])
    assert result.source == (LOOPBACK, relay.port)


async def test_garbage_udp_is_ignored_and_the_relay_keeps_answering(relay: RelayProc) -> None:
    from natkit.stun import codec

    garbage = [
        b"",
        b"\x00" * 20,
        b"GET / HTTP/1.1\r\n\r\n",
        secrets.token_bytes(1400),
        codec.encode(codec.binding_request(change_ip=True, change_port=True), fingerprint=True),
        codec.binding_success(codec.binding_request(), ("1.2.3.4", 5)),  # a response
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        s.settimeout(0.5)
        for data in garbage:
            s.sendto(data, (LOOPBACK, relay.port))
        with pytest.raises(TimeoutError):
            s.recv(2048)  # not a byte back
        request = codec.binding_request()
        s.sendto(codec.encode(request), (LOOPBACK, relay.port))
        answer = codec.parse_binding_response(s.recv(2048), request.transaction_id)
        assert answer.mapped == s.getsockname()
    metrics = await relay.metrics()
    assert metrics["stun_dropped"] == len(garbage) and metrics["stun_requests"] == 1
    # The control port on the same number is unaffected.
    a = Agent(
        relay.address,
        TOKEN_A,
        [],
        fingerprint=relay.ready["fingerprint"],
        known_relays=relay.state / "known.json",
    )
    task = asyncio.get_running_loop().create_task(a.run())
    try:
        assert await a.ping(5) < 5
    finally:
        task.cancel()
        await a.close()


async def test_no_stun_means_no_udp_answer(tmp_path: Path) -> None:
    proc = RelayProc(tmp_path, extra=("--no-stun",))
    await proc.start()
    try:
        assert proc.ready["stun"] is None
        (result,) = await binding_udp([(LOOPBACK, proc.port)], local_ip=LOOPBACK, timeout=0.6)
        assert isinstance(result, StunTimeoutError)
    finally:
        await proc.stop()


async def test_stun_over_tcp_on_the_listen_port_tells_that_ports_address(
    relay: RelayProc,
) -> None:
    """What TCP hole punching asks before it dials (natkit.p2p.tcppunch): the public address
    of one TCP port, from a socket sharing that port."""
    from natkit.p2p.tcppunch import shared_port_socket, stun_tcp

    sharing = shared_port_socket(socket.AF_INET, 0, LOOPBACK)
    sharing.listen(1)  # a listening socket on the port does not stop the question
    port = sharing.getsockname()[1]
    try:
        mapped = await stun_tcp(shared_port_socket(socket.AF_INET, port, LOOPBACK),
                                (LOOPBACK, relay.port), 2.0)  # fmt: skip
    finally:
        sharing.close()
    assert mapped == (LOOPBACK, port)
    assert (await relay.metrics())["stun_tcp"] == 1


async def test_not_a_binding_request_over_tcp_gets_no_answer(relay: RelayProc) -> None:
    from natkit.stun import codec

    bad = [
        codec.binding_success(codec.binding_request(), ("1.2.3.4", 5)),  # a response
        codec.encode(codec.binding_request(change_ip=True), fingerprint=True),
        b"\x00\x01\xff\xff" + bytes(16),  # a length far past any request
    ]
    for data in bad:
        reader, writer = await asyncio.open_connection(LOOPBACK, relay.port)
        writer.write(data)
        assert await _dropped(reader)  # not a byte back
        writer.close()
    metrics = await relay.metrics()
    assert metrics.get("stun_tcp", 0) == 0 and metrics["garbage"] >= len(bad)


async def _dropped(reader: asyncio.StreamReader) -> bool:
    """The relay closed the connection without a byte (or reset it, our bytes unread: a
    STUN response starts as relay message type 1 would)."""
    try:
        return await asyncio.wait_for(reader.read(), 15) == b""
    except ConnectionResetError:
        return True


async def test_no_stun_means_no_tcp_answer_either(tmp_path: Path) -> None:
    from natkit.stun import codec

    proc = RelayProc(tmp_path, extra=("--no-stun",))
    await proc.start()
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, proc.port)
        writer.write(codec.encode(codec.binding_request(), fingerprint=True))
        assert await _dropped(reader)  # not a relay frame either
        writer.close()
    finally:
        await proc.stop()


async def test_an_agent_with_a_rejected_token_fails_fast(relay: RelayProc, tmp_path: Path) -> None:
    agent = Agent(
        relay.address,
        "mallory-token-0123456789abcdef",
        [],
        fingerprint=relay.ready["fingerprint"],
        known_relays=tmp_path / "k.json",
    )
    with pytest.raises(RelayAuthError):
        await asyncio.wait_for(agent.run(), 10)
    await agent.close()
