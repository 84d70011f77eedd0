"""The attack review of issue 16, part 4 ("safe by default"), on loopback: a real
``natkit relay serve``, the unmodified ``natkit p2p`` CLI as a child process, the Python API
and a bare relay agent as the attacker: someone who holds the relay *token* but not the
P2P secret (or, where said, who also learned the room id the relay sees).

Each test failed on the code before the fix it names and passes after it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import natkit.p2p
from natkit.errors import EXIT_USAGE
from natkit.p2p import auth
from natkit.p2p.forward import ForwardRefusedError, open_forward, serve_forward
from natkit.p2p.peer import P2POptions, connect_peer
from natkit.relay.agent import Agent
from natkit.relay.server import RelayConfig, RelayServer
from natkit.rendezvous.client import P2PRoom, RendezvousTimeoutError
from tests.tcp_proxy import TcpProxy
from tests.unit.cli_run import env, relay_serve
from tests.unit.cli_run import natkit as run_natkit

T = TypeVar("T")
TOKEN = "attack-token-0123456789abcdef"
SECRET = "attack-secret-0123456789abcdef"
ROOM = "office"
BOUND = 60.0  # seconds: only so that a broken test fails instead of hanging


async def bounded(aw: Awaitable[T], timeout: float = BOUND) -> T:
    return await asyncio.wait_for(aw, timeout)


class Relay:
    def __init__(self, ready: dict[str, Any]) -> None:
        self.address = f"127.0.0.1:{ready['listen'].rsplit(':', 1)[1]}"
        self.fingerprint = str(ready["fingerprint"])

    def api_options(self, secret: str = SECRET) -> dict[str, Any]:
        """natkit.p2p.connect/listen keywords: host candidates on loopback only."""
        return {"relay": self.address, "token": TOKEN, "secret": secret,
                "fingerprint": self.fingerprint, "port_mapping": False,
                "host_addresses": ("127.0.0.1",)}  # fmt: skip


@pytest.fixture
def relay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Relay]:
    monkeypatch.setenv("NATKIT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("NATKIT_P2P_SECRET", raising=False)
    with relay_serve(tmp_path, TOKEN) as ready:
        yield Relay(ready)


class CliPeer:
    """``natkit p2p ... --json`` as a child process; its events read as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def start(cls, tmp: Path, relay: Relay, *args: str) -> CliPeer:
        argv = ["-m", "natkit", "p2p", *args, "--relay", relay.address, "--token", TOKEN,
                "--fingerprint", relay.fingerprint, "--no-portmap", "--local-address", "127.0.0.1",
                "--json"]  # fmt: skip
        environ = env(NATKIT_STATE_DIR=str(tmp / f"peer-{args[0]}"), PYTHONUNBUFFERED="1")
        environ.pop("NATKIT_P2P_SECRET", None)
        with (tmp / f"{args[0]}.log").open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *[sys.executable, *argv], stdout=asyncio.subprocess.PIPE, stderr=log,
                env=environ,
            )  # fmt: skip
        return cls(proc)

    async def expect(self, event: str, timeout: float = BOUND) -> dict[str, Any]:
        """The next event named ``event`` (the others are kept in :attr:`events`)."""
        assert self.proc.stdout is not None
        while True:
            line = await bounded(self.proc.stdout.readline(), timeout)
            assert line, f"the peer ended (exit {await self.proc.wait()}); events: {self.events}"
            got = json.loads(line)
            self.events.append(got)
            if got["event"] == event:
                return got

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


@pytest.fixture
async def peers() -> AsyncIterator[list[CliPeer]]:
    started: list[CliPeer] = []
    yield started
    for peer in started:
        await peer.stop()


async def echo_service() -> tuple[asyncio.base_events.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def forward_round_trip(conn: natkit.p2p.P2PConnection, port: int) -> bytes:
    stream = await bounded(open_forward(conn, port))
    stream.write(b"ping through the session")
    stream.write_eof()
    data: bytes = await bounded(stream.read())
    return data


@contextlib.asynccontextmanager
async def attacker_in(relay: Relay, room_name: str) -> AsyncIterator[P2PRoom]:
    """A relay agent holding the token, in room ``room_name`` as the connecting peer."""
    agent = Agent(relay.address, TOKEN, [], fingerprint=relay.fingerprint, max_backoff=1.0)
    runner = asyncio.ensure_future(agent.run())
    try:
        yield await bounded(agent.join_p2p(room_name, "connect"))
    finally:
        runner.cancel()
        with contextlib.suppress(BaseException):
            await runner
        await agent.close()


def udp_sockets_of(pid: int) -> int:
    """How many UDP sockets process ``pid`` holds (ICE host candidates are UDP sockets)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    udp = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            udp.add(line.split()[9])
    return len(inodes & udp)


# ---- 1. a secret of its own ---------------------------------------------------------------


def test_connect_without_a_secret_is_a_usage_error() -> None:
    # Before: the secret defaulted to the relay token; the command went on to the relay.
    argv = ["p2p", "connect", ROOM, "--relay", "127.0.0.1:1", "--token", TOKEN,
            "--forward", "0:22"]  # fmt: skip
    proc = run_natkit(*argv, NATKIT_P2P_SECRET="")
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert "--secret" in proc.stderr and "relay token is not a P2P secret" in proc.stderr


@pytest.mark.parametrize("command", [["listen", "--allow", "22"], ["connect", "--forward", "0:22"]])
def test_a_short_secret_is_refused(command: list[str]) -> None:
    argv = ["p2p", command[0], ROOM, "--relay", "127.0.0.1:1", "--token", TOKEN,
            "--secret", "too-short", *command[1:]]  # fmt: skip
    proc = run_natkit(*argv)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert "at least 16" in proc.stderr and "offline" in proc.stderr


async def test_the_python_api_has_no_default_secret(relay: Relay) -> None:
    options = relay.api_options()
    del options["secret"]
    with pytest.raises(natkit.p2p.P2PAuthError, match=r"secret of its own|not the relay token"):
        await bounded(natkit.p2p.connect(ROOM, **options))
    with pytest.raises(natkit.p2p.P2PAuthError, match="at least 16"):
        await bounded(natkit.p2p.listen(ROOM, **{**options, "secret": "short"}))


async def test_a_token_holder_without_the_secret_gets_no_session(
    relay: Relay, tmp_path: Path, peers: list[CliPeer]
) -> None:
    # Before: `natkit p2p listen` without --secret used the token as the secret, so any
    # token holder who knew the room name got a fully authenticated session.
    service, port = await echo_service()
    listener = await CliPeer.start(tmp_path, relay, "listen", ROOM, "--allow", str(port))
    peers.append(listener)
    waiting = await listener.expect("waiting")
    secret = waiting["secret"]  # made for this listener, printed once with the command
    assert len(secret) >= 32 and secret != TOKEN
    assert f"--secret {secret}" in waiting["connect"]
    assert waiting["connect"].startswith(f"natkit p2p connect {ROOM} --relay {relay.address}")

    # The token holder guesses the secret is the token: it does not even find the room.
    with pytest.raises(natkit.p2p.P2PTimeoutError, match="no peer came"):
        await bounded(natkit.p2p.connect(ROOM, **relay.api_options(TOKEN), peer_timeout=2))
    # Nor does the plain room name lead anywhere: the relay sees an HMAC of it.
    async with attacker_in(relay, ROOM) as room:
        with pytest.raises(RendezvousTimeoutError):
            await room.wait_peer(2)

    # The peer given the printed secret gets in, and reaches only the allowed port.
    conn = await bounded(natkit.p2p.connect(ROOM, **relay.api_options(secret)))
    try:
        assert await forward_round_trip(conn, port) == b"ping through the session"
        with pytest.raises(ForwardRefusedError, match="not allowed"):
            await bounded(open_forward(conn, port + 1))
    finally:
        await conn.close()
        service.close()


# ---- 2. nothing the listener did not name ---------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--to", "127.0.0.1"]])
def test_listen_without_allow_or_a_target_port_refuses_to_start(extra: list[str]) -> None:
    # Before: it started and let the peer reach every port of 127.0.0.1 (or of --to).
    argv = ["p2p", "listen", ROOM, "--relay", "127.0.0.1:1", "--token", TOKEN,
            "--secret", SECRET, *extra]  # fmt: skip
    proc = run_natkit(*argv)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert "--allow PORT" in proc.stderr and "--to HOST:PORT" in proc.stderr


# ---- 3. and 4. a listener survives what a token holder does before the session ------------


async def _silent(room: P2PRoom) -> None:
    await asyncio.sleep(BOUND)  # joins, never says hello


async def _wrong_secret(room: P2PRoom) -> None:
    room.send_signal("H:nk2.bm90LWEtbm9uY2U.Z2FyYmFnZQ")  # malformed: ignored
    room.send_signal("H:" + auth.seal("another secret, long enough", {"t": "hello", "n": "x"},
                                      session="hello", sender="connect"))  # fmt: skip
    await asyncio.sleep(BOUND)


async def _reflect(room: P2PRoom) -> None:
    while True:  # everything the listener says comes straight back to it
        room.send_signal(await room.recv_signal())


ATTACKS: dict[str, tuple[Callable[[P2PRoom], Awaitable[None]], str]] = {
    "join-and-never-say-hello": (_silent, "sent no hello"),
    "a-message-under-another-secret": (_wrong_secret, "not sealed with our secret"),
    "its-own-messages-reflected": (_reflect, "reflected"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_a_listener_survives_a_failed_peer_and_keeps_serving(
    attack: str, relay: Relay, tmp_path: Path, peers: list[CliPeer]
) -> None:
    # Before: each of these ended `natkit p2p listen` for good (the set-up sat outside the
    # error handling). The attacker here even knows the room id the relay sees.
    behave, reason = ATTACKS[attack]
    service, port = await echo_service()
    listener = await CliPeer.start(tmp_path, relay, "listen", ROOM, "--secret", SECRET,
                                   "--allow", str(port))  # fmt: skip
    peers.append(listener)
    await listener.expect("waiting")
    async with attacker_in(relay, auth.room_id(SECRET, ROOM)) as room:
        acting = asyncio.ensure_future(behave(room))
        rejected = await listener.expect("rejected", timeout=40)
        acting.cancel()
    assert reason in rejected["reason"], rejected
    assert rejected["room"] == ROOM and rejected["retry_in"] > 0
    await listener.expect("waiting")  # back in the room

    conn = await bounded(natkit.p2p.connect(ROOM, **relay.api_options()))
    try:
        await listener.expect("ready")
        assert await forward_round_trip(conn, port) == b"ping through the session"
    finally:
        await conn.close()
        service.close()
    assert listener.proc.returncode is None


def _readable(text: str) -> list[str]:
    """What of a signalling text can be read without the secret: the parts that decode to
    JSON or contain an address or a fingerprint."""
    found = []
    for part in text.partition(":")[2].split("."):
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)) if part.isascii() else b""
        with contextlib.suppress(ValueError):
            json.loads(raw)
            found.append(raw.decode(errors="replace"))
        for clear in (b"127.0.0.1", b"sha256:", b"ufrag", b"candidates"):
            if clear in raw or clear in text.encode():
                found.append(text)
    return found


async def test_a_peer_that_has_not_proved_the_secret_learns_nothing_and_costs_nothing(
    relay: Relay, tmp_path: Path, peers: list[CliPeer]
) -> None:
    # Before: the hello was plain text, so a token holder in the room who said hello got
    # the listener's ICE description and fingerprint (HMAC-signed, readable), and the
    # listener gathered candidates (UDP sockets, a router mapping) for it.
    listener = await CliPeer.start(tmp_path, relay, "listen", ROOM, "--secret", SECRET,
                                   "--allow", "22")  # fmt: skip
    peers.append(listener)
    await listener.expect("waiting")
    heard: list[str] = []
    async with attacker_in(relay, auth.room_id(SECRET, ROOM)) as room:
        loop = asyncio.get_running_loop()
        until = loop.time() + 4
        while (left := until - loop.time()) > 0:
            room.send_signal("H:abcdefghijklmnop")  # the old plain-text hello
            with contextlib.suppress(RendezvousTimeoutError):
                heard.append(await room.recv_signal(min(left, 0.5)))
        gathered = udp_sockets_of(listener.proc.pid)
    assert heard, "the listener said nothing"
    assert all(text.startswith("H:nk2.") for text in heard), heard
    assert [bit for text in heard for bit in _readable(text)] == []
    bodies = [auth.unseal(SECRET, t[2:], session="hello", sender="listen") for t in heard]
    assert {body["t"] for body in bodies} == {"hello"}  # no offer, no candidates
    assert gathered == 0, "the listener gathered ICE candidates for an unauthenticated peer"


# ---- 5. the connecting side -----------------------------------------------------------------


async def test_a_stream_the_listener_opens_does_not_end_p2p_connect(
    relay: Relay, tmp_path: Path, peers: list[CliPeer]
) -> None:
    # Before: `p2p connect` took any stream the peer opened for the end of the session.
    service, port = await echo_service()
    connector = await CliPeer.start(tmp_path, relay, "connect", ROOM, "--secret", SECRET,
                                    "--forward", f"0:{port}")  # fmt: skip
    peers.append(connector)
    conn = await bounded(natkit.p2p.listen(ROOM, **relay.api_options()))
    serving: set[asyncio.Task[None]] = set()

    async def serve() -> None:
        while True:
            stream = await conn.accept_stream()
            task = serve_forward(stream, target_host="127.0.0.1", allowed={port})
            serving.add(asyncio.ensure_future(task))

    server = asyncio.ensure_future(serve())
    try:
        local = (await connector.expect("forwarding"))["local"]
        pushed = await conn.open_stream()  # the listener opens a stream of its own
        pushed.write(b"unasked for")
        await pushed.drain()
        with pytest.raises(natkit.p2p.P2PError):  # refused: reset by the connector
            await bounded(pushed.read())
        host, _, local_port = local.rpartition(":")
        reader, writer = await bounded(asyncio.open_connection(host, int(local_port)))
        writer.write(b"still forwarding")
        writer.write_eof()
        assert await bounded(reader.read()) == b"still forwarding"
        writer.close()
        assert connector.proc.returncode is None
        assert not [e for e in connector.events if e["event"] == "closed"], connector.events
    finally:
        server.cancel()
        for task in serving:
            task.cancel()
        await conn.close()
        service.close()


async def test_a_blip_on_the_connectors_relay_connection_does_not_end_the_session(
    relay: Relay,
) -> None:
    # Before: the connector's room saw the peer leave (its own relay connection was lost)
    # and come back (rejoined), took that for a new peer and ended a working session.
    host, _, port = relay.address.rpartition(":")
    proxy = TcpProxy(host, int(port))
    connecting = relay.api_options() | {"relay": await proxy.start(), "stun": (host, int(port))}
    server, client = await bounded(
        asyncio.gather(
            natkit.p2p.listen(ROOM, **relay.api_options()),
            natkit.p2p.connect(ROOM, **connecting),
        )
    )
    try:
        assert client.path == "direct"  # both on loopback: the relay carries no data
        room = client._peer.room  # read only: to know when the agent is back
        proxy.cut()
        await bounded(room.wait_peer_left())
        await bounded(room.wait_peer())  # reconnected and rejoined
        await asyncio.sleep(1)  # what ended the session before did so at once

        async def echo() -> None:
            stream = await server.accept_stream()
            stream.write(await stream.read())
            stream.write_eof()

        answering = asyncio.ensure_future(echo())
        stream = await bounded(client.open_stream())
        stream.write(b"after the blip")
        stream.write_eof()
        assert await bounded(stream.read()) == b"after the blip"
        await bounded(answering)
    finally:
        await client.close()
        await server.close()
        proxy.close()


async def test_a_restarted_connector_gets_a_new_session_at_once(
    relay: Relay, tmp_path: Path, peers: list[CliPeer]
) -> None:
    # What the presence check did and the hello check must keep doing: a peer process
    # killed outright (no QUIC close) and started again meets the listener again at once.
    service, port = await echo_service()
    listener = await CliPeer.start(tmp_path, relay, "listen", ROOM, "--secret", SECRET,
                                   "--allow", str(port))  # fmt: skip
    first = await CliPeer.start(tmp_path, relay, "connect", ROOM, "--secret", SECRET,
                                "--forward", f"0:{port}")  # fmt: skip
    peers += [listener, first]
    await first.expect("forwarding")
    await listener.expect("ready")
    first.proc.kill()
    await first.proc.wait()
    conn = await bounded(natkit.p2p.connect(ROOM, **relay.api_options()), 20)
    try:
        await listener.expect("closed", 20)  # the old session, for the new peer's hello
        await listener.expect("ready", 20)
        assert await forward_round_trip(conn, port) == b"ping through the session"
    finally:
        await conn.close()
        service.close()


async def test_a_listener_waits_out_a_token_whose_room_limit_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: a listener whose JOIN the relay refused (any token holder can fill the
    # token's room limit) ended with that error; now it says so and tries again.
    monkeypatch.setenv("NATKIT_STATE_DIR", str(tmp_path / "state"))
    server = RelayServer(RelayConfig(listen_host="127.0.0.1", listen_port=0,
                                     tokens={"t": TOKEN}, state_dir=tmp_path / "relay",
                                     max_rooms_per_token=2))  # fmt: skip
    await server.start()
    relay = Relay({"listen": f"127.0.0.1:{server.listen_port}",
                   "fingerprint": server.fingerprint})  # fmt: skip
    events: list[tuple[str, dict[str, Any]]] = []
    rejected = asyncio.Event()

    def progress(event: str, info: dict[str, Any]) -> None:
        events.append((event, info))
        if event == "rejected":
            rejected.set()

    options = relay.api_options() | {"relay": relay.address}
    opts = P2POptions(**options)
    squatter = Agent(relay.address, TOKEN, [], fingerprint=relay.fingerprint)
    runner = asyncio.ensure_future(squatter.run())
    try:
        squatted = [await bounded(squatter.join_p2p(f"junk-{i}", "listen")) for i in range(2)]
        listening = asyncio.ensure_future(connect_peer(ROOM, "listen", opts, on_event=progress))
        await bounded(rejected.wait())
        assert "2 P2P rooms" in dict(events)["rejected"]["reason"], events
        squatted[0].leave()  # a slot frees: the listener gets in at its next try
        conn = await bounded(natkit.p2p.connect(ROOM, **options))
        server_side = await bounded(listening)
        await conn.close()
        await server_side.close()
    finally:
        runner.cancel()
        with contextlib.suppress(BaseException):
            await runner
        await squatter.close()
        await server.close()
