"""How data connections are opened and taken in, for real on loopback: a
:class:`RelayServer` and an :class:`Agent` in the test's loop, a real echo service, real
TCP sockets. Nothing leaves 127.0.0.1.

* The agent opens its data connections from callbacks (:class:`Opening`): visitors are
  served in both data modes, one after another and side by side; an opening to a relay
  that is not there, or one given up, leaves nothing behind.
* The relay takes a plain data connection whose DATA frame came with it in its accept
  callback, and one whose frame comes in parts in a task: both are judged the same way.
* The relay routes an HTTP visitor whose request head came with its connection in its
  accept callback, and one whose head comes in parts in a task: both are served, and both
  get the same 404 for a host no tunnel holds.
* The agent's control connection is cut after a silence (one watchdog timer, not a
  timeout per message), and not while the relay speaks.
* The agent command runs on uvloop, and the network guard holds it all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from natkit.relay import messages as M
from natkit.relay.agent import Agent, TunnelSpec, _Watchdog
from natkit.relay.control import ticket_handle
from natkit.relay.dataconn import DataConn, Opening
from natkit.relay.listeners import listen
from natkit.relay.server import RelayConfig, RelayServer

NATKIT = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "natkit")
TOKEN = "data-conn-token-0123456789abcdef"
LOOPBACK = "127.0.0.1"


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[RelayServer]:
    server = RelayServer(
        RelayConfig(
            listen_host=LOOPBACK,
            listen_port=0,
            tokens={"a": TOKEN},
            ports=(41000, 41049),
            state_dir=tmp_path / "relay",
            stun=False,
            pool_size=4,
            http_port=0,
            domain="lab.test",
        )
    )
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    """A service that echoes every connection until its EOF, then half-closes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        writer.close()

    server = await asyncio.start_server(serve, LOOPBACK, 0)
    yield int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()


@contextlib.asynccontextmanager
async def _running_agent(relay: RelayServer, service: int, tmp_path: Path, *, plaintext: bool, spec: TunnelSpec | None = None) -> AsyncIterator[tuple[Agent, int]]:  # fmt: skip
    """An agent for one tunnel, connected and open; yields it and its public TCP port (0
    for a named tunnel); stopped after."""
    agent = Agent(
        f"{LOOPBACK}:{relay.listen_port}",
        TOKEN,
        [spec or TunnelSpec(local_port=service)],
        plaintext_data=plaintext,
        known_relays=tmp_path / f"known-{plaintext}.json",
    )
    task = asyncio.get_running_loop().create_task(agent.run())
    try:
        public = await agent.wait_open("t0", timeout=10)
        yield agent, int(public.rsplit(":", 1)[1]) if spec is None else 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await agent.close()


async def _visit(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(payload)
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return got


@pytest.mark.parametrize("plaintext", [True, False], ids=["plain", "sealed"])
async def test_visitors_are_served_through_callback_opened_data_conns(
    relay: RelayServer, echo: int, tmp_path: Path, plaintext: bool
) -> None:
    async with _running_agent(relay, echo, tmp_path, plaintext=plaintext) as (agent, port):
        for i in range(30):  # more than the pool: plain ones are replaced one by one
            payload = b"visitor %d " % i * 100
            assert await _visit(port, payload) == payload
        many = [b"together %d " % i * 2000 for i in range(20)]
        assert await asyncio.gather(*(_visit(port, p) for p in many)) == many
        await asyncio.sleep(0.1)
        assert not agent._openings, "openings left behind once parked"
        assert relay.stats["bad_tickets"] == 0 and relay.stats["garbage"] == 0, relay.stats
        if plaintext:
            assert relay.stats["data_conns_reused"] == 0
        else:
            assert relay.stats["data_conns_reused"] > 0


async def test_an_opening_to_no_relay_ends_with_nothing_parked() -> None:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        closed_port = s.getsockname()[1]  # bound, not listening: connections are refused
        ended: list[Opening] = []
        states: list[str] = []
        opening = Opening(
            (LOOPBACK, closed_port), "ticket", None, (LOOPBACK, 9),
            lambda _c, state: states.append(state), ended.append,
        )  # fmt: skip
        for _ in range(50):
            if ended:
                break
            await asyncio.sleep(0.01)
        assert ended == [opening] and opening.finished
        assert opening.sock.fileno() == -1
        assert states == []  # no DataConn was made
        opening.abort()  # a second end is a no-op
        assert ended == [opening]


@pytest.mark.parametrize("key", [None, bytes(32)], ids=["plain", "sealed"])
async def test_an_opening_sends_its_ticket_and_parks(key: bytes | None) -> None:
    listener = socket.create_server((LOOPBACK, 0))
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    ended: list[Opening] = []
    conns: list[tuple[DataConn, str]] = []
    try:
        opening = Opening(
            listener.getsockname()[:2], "t1cket", key, (LOOPBACK, 9),
            lambda c, state: conns.append((c, state)), ended.append,
        )  # fmt: skip
        peer, _ = await loop.sock_accept(listener)
        for _ in range(50):
            if ended:
                break
            await asyncio.sleep(0.01)
        assert ended == [opening] and [s for _, s in conns] == ["parked"]
        head = await asyncio.wait_for(loop.sock_recv(peer, 4096), 5)
        if key is None:
            assert head == M.encode(M.Data(ticket="t1cket"))
        else:  # the clear opening names it by its handle, never the ticket itself
            assert head[:1] == b"S" and ticket_handle("t1cket").encode() in head
            assert b"t1cket" not in head
        opening.abort()  # handed over: the DataConn owns the socket now
        assert conns[0][0].sock.fileno() >= 0
        conns[0][0].abort()
        peer.close()
    finally:
        listener.close()


async def _send_in_parts(port: int, parts: list[bytes], pause: float) -> bytes:
    """The first part goes before the relay's loop runs again (so it is there when the
    relay accepts), the others after pauses, then EOF; returns what came back."""
    loop = asyncio.get_running_loop()
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        sock.sendall(parts[0])
        sock.setblocking(False)
        for part in parts[1:]:
            await asyncio.sleep(pause)
            await loop.sock_sendall(sock, part)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 4096), 5):
                got += chunk
        return got


@pytest.mark.parametrize("split", [False, True], ids=["whole", "in-parts"])
async def test_plain_data_frames_are_judged_alike_whole_or_in_parts(
    relay: RelayServer, split: bool
) -> None:
    cases: dict[str, tuple[bytes, str]] = {
        "a bogus ticket": (M.encode(M.Data(ticket="bogus")), "bad_tickets"),
        "not JSON": (bytes([M.Data.TYPE, 0, 0, 4]) + b"\xff\xfe\xfd\xfc", "garbage"),
        "not DATA": (M.encode(M.Ping(t=1.0)), "garbage"),
    }
    for name, (frame, counter) in cases.items():
        before = dict(relay.stats)
        parts = [frame[:3], frame[3:]] if split else [frame]
        got = await _send_in_parts(relay.listen_port, parts, 0.05)
        assert got == b"", f"{name}: the relay answered {got!r}"
        for _ in range(50):
            if relay.stats[counter] > before.get(counter, 0):
                break
            await asyncio.sleep(0.01)
        assert relay.stats[counter] == before.get(counter, 0) + 1, (name, relay.stats)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "in-parts"])
async def test_http_visitors_are_routed_whole_or_in_parts(
    relay: RelayServer, echo: int, tmp_path: Path, split: bool
) -> None:
    spec = TunnelSpec(local_port=echo, kind="http", name="shop")
    async with _running_agent(relay, echo, tmp_path, plaintext=False, spec=spec):
        assert relay.http_port is not None
        for host, served in (("shop.lab.test", True), ("nobody.lab.test", False)):
            head = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            parts = [head[:9], head[9:]] if split else [head]
            got = await _send_in_parts(relay.http_port, parts, 0.05)
            if served:  # the echo service sends the request back
                assert got == head, got
            else:
                assert got.startswith(b"HTTP/1.1 404 "), got
        assert relay.stats["unrouted_visitors"] == 1, relay.stats


async def test_the_watchdog_cuts_a_silent_connection_only() -> None:
    listener = socket.create_server((LOOPBACK, 0))
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.open_connection(*listener.getsockname()[:2])
        peer, _ = await loop.sock_accept(listener)
        watch = _Watchdog(writer.transport, 0.3)
        for _ in range(6):  # the peer speaks every 0.1 s: never cut
            await loop.sock_sendall(peer, b"x")
            assert await asyncio.wait_for(reader.read(1), 1) == b"x"
            watch.heard()
            await asyncio.sleep(0.1)
        assert not watch.fired
        t0 = loop.time()
        got: Any = await asyncio.wait_for(reader.read(1), 2)  # then silence
        assert got == b"" and watch.fired
        assert 0.2 <= loop.time() - t0 <= 1.0
        watch.cancel()
        peer.close()
    finally:
        listener.close()


@pytest.mark.trips_network_guard
@pytest.mark.parametrize("relay_addr", ["192.0.2.1:7835", "relay.example:7835"])
async def test_the_agent_command_on_uvloop_is_held_by_the_network_guard(
    tmp_path: Path, network_guard: list[str], relay_addr: str
) -> None:
    """``natkit expose`` runs on uvloop, which connects and resolves in C: the guard in
    every test child must stop it all the same (here: a relay outside loopback)."""
    env = {**os.environ, "NATKIT_STATE_DIR": str(tmp_path)}
    env.pop("NATKIT_EVENT_LOOP", None)
    proc = await asyncio.create_subprocess_exec(
        NATKIT, "expose", "8080", "--via", "relay", "--relay", relay_addr, "--token", TOKEN,
        "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    event = {"event": "local_unreachable"}  # nothing listens on 8080: said first
    while event["event"] == "local_unreachable":
        event = json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))
    proc.terminate()
    await proc.wait()
    # An address: the connection is refused and retried. A name: its lookup is refused,
    # which is final at the first connection (RelayNameError).
    why = event.get("reason") or event.get("message", "")
    assert event["event"] in ("lost", "error") and "network guard" in why, event


def test_accepted_sockets_are_tuned_without_a_call_each() -> None:
    """The relay sets TCP_NODELAY and keepalive on its listening sockets only: what it
    accepts must have them (Linux copies them), or visitors would wait on Nagle and
    half-open connections would never expire."""
    listener = listen(LOOPBACK, 0)
    try:
        with socket.create_connection(listener.getsockname()[:2]):
            listener.setblocking(True)
            conn, _ = listener.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
                assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
    finally:
        listener.close()


@pytest.mark.parametrize(
    ("relay_cipher", "agent_cipher", "used"),
    [
        ("aes-256-gcm", "aes-256-gcm", "aes-256-gcm"),
        ("chacha20-poly1305", "aes-256-gcm", "chacha20-poly1305"),
        ("aes-256-gcm", "chacha20-poly1305", "chacha20-poly1305"),
    ],
)
async def test_sealed_data_connections_use_aes_gcm_only_when_both_ends_prefer_it(
    relay: RelayServer,
    echo: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    relay_cipher: str,
    agent_cipher: str,
    used: str,
) -> None:
    from natkit.relay import seal

    relay.cipher = relay_cipher  # what the relay offers (chosen once, at its start)
    monkeypatch.setenv("NATKIT_SEAL_CIPHER", agent_cipher)  # what the agent prefers
    seen: list[str] = []
    real = seal.opening_cipher
    monkeypatch.setattr(seal, "opening_cipher", lambda head: seen.append(real(head)) or real(head))
    async with _running_agent(relay, echo, tmp_path, plaintext=False) as (_agent, port):
        for i in range(5):
            payload = b"cipher %d " % i * 5000
            assert await _visit(port, payload) == payload
    assert seen and set(seen) == {used}, seen
