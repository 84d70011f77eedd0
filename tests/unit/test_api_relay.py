"""The relay side of the Python API for real on loopback: a :class:`RelayServer` in the
test's loop, a real echo service, real TCP. ``natkit.connect``/``expose`` with typed events,
``async with`` both ways, typed errors (an unreachable relay, a wrong token, an untrusted
certificate) raised at once, and ``$NATKIT_RELAY``/``$NATKIT_TOKEN`` read. Nothing leaves
127.0.0.1 (auto mode's router mapping is a lab test)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import natkit
from natkit import events
from natkit.relay.server import RelayConfig, RelayServer

TOKEN = "api-relay-token-0123456789abcdef"
LOOPBACK = "127.0.0.1"


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATKIT_STATE_DIR", str(tmp_path / "state"))  # pins land here
    monkeypatch.delenv("NATKIT_RELAY", raising=False)
    monkeypatch.delenv("NATKIT_TOKEN", raising=False)


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[str]:
    server = RelayServer(
        RelayConfig(
            listen_host=LOOPBACK,
            listen_port=0,
            tokens={"a": TOKEN},
            ports=(41100, 41149),
            state_dir=tmp_path / "relay",
            stun=False,
            pool_size=2,
            http_port=0,
            domain="lab.test",
        )
    )
    await server.start()
    yield f"{LOOPBACK}:{server.listen_port}"
    await server.close()


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, LOOPBACK, 0)
    yield int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()


def _closed_port() -> int:
    s = socket.socket()
    s.bind((LOOPBACK, 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


async def _visit(public: str, payload: bytes = b"hello through the relay") -> bytes:
    port = public.rpartition(":")[2]
    reader, writer = await asyncio.open_connection(LOOPBACK, int(port))
    writer.write(payload)
    got = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    writer.close()
    return got


async def test_connect_async_in_async_with_without_await(relay: str, echo: int) -> None:
    seen: list[events.Event] = []
    async with natkit.connect_async(echo, relay=relay, token=TOKEN, on_event=seen.append) as t:
        assert isinstance(t, natkit.RelayTunnel) and not t.closed
        assert await _visit(t.public_url) == b"hello through the relay"
    assert t.closed
    pinned, ready, closed = seen  # trust on first use, public, closed
    assert isinstance(pinned, events.Pinned) and pinned.fingerprint.startswith("sha256:")
    assert ready == events.Ready(t.public_url, "relay")
    assert closed == events.Closed(t.public_url, "relay")
    await t.close()  # a second close says nothing more
    assert len(seen) == 3


async def test_async_with_await_still_works_and_env_defaults_are_read(
    relay: str, echo: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NATKIT_RELAY", relay)
    monkeypatch.setenv("NATKIT_TOKEN", TOKEN)
    async with await natkit.connect_async(addr=str(echo), proto="tcp") as t:  # pyngrok's shape
        assert await _visit(t.public_url) == b"hello through the relay"
    assert t.closed


async def test_an_unreachable_relay_is_a_relay_error_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NATKIT_RELAY", f"{LOOPBACK}:{_closed_port()}")
    monkeypatch.setenv("NATKIT_TOKEN", TOKEN)
    # Not RelayTimeoutError after the 30 s timeout: the refused connection is the answer.
    seen: list[events.Event] = []
    with pytest.raises(natkit.RelayError, match="cannot reach relay") as caught:
        await natkit.connect_async(8080, on_event=seen.append)
    assert not isinstance(caught.value, natkit.RelayTimeoutError)
    assert not any(isinstance(e, events.Closed) for e in seen), seen  # it never opened
    with pytest.raises(natkit.RelayError, match="cannot reach relay"):
        await natkit.expose_async(8080, via="relay", on_event=seen.append)
    assert not any(isinstance(e, events.Closed) for e in seen), seen


async def test_a_wrong_token_and_an_untrusted_relay_are_typed(relay: str, echo: int) -> None:
    with pytest.raises(natkit.RelayAuthError, match="rejected the token"):
        await natkit.connect_async(echo, relay=relay, token="wrong-token-0123456789abcdef")
    with pytest.raises(natkit.RelayTrustError):
        await natkit.connect_async(
            echo, relay=relay, token=TOKEN, fingerprint="sha256:" + "00" * 32
        )


async def test_expose_via_relay_with_typed_events(relay: str, echo: int) -> None:
    seen: list[events.Event] = []
    async with natkit.expose_async(echo, via="relay", relay=relay, token=TOKEN,
                                   on_event=seen.append) as exposure:  # fmt: skip
        assert exposure.method == "relay" and exposure.mapping is None
        assert await _visit(exposure.public_address) == b"hello through the relay"
    assert [type(e) for e in seen] == [events.Pinned, events.Ready, events.Closed]
    assert {e.public_address for e in seen[1:]} == {exposure.public_address}
    assert seen[2].to_json()["event"] == "closed"


async def test_expose_http_needs_a_relay_and_gets_a_name(relay: str, echo: int) -> None:
    async with natkit.expose_async(echo, http=True, hostname="app", relay=relay, token=TOKEN) as e:
        assert e.public_address.startswith("http://app.lab.test")
        assert e.method == "relay"


async def test_blocking_connect_get_tunnels_disconnect(relay: str, echo: int) -> None:
    # The blocking API runs in a worker thread: this loop serves the relay meanwhile.
    tunnel = await asyncio.to_thread(natkit.connect, echo, relay=relay, token=TOKEN)
    try:
        assert natkit.get_tunnels() == [tunnel]
        assert await _visit(tunnel.public_url) == b"hello through the relay"
    finally:
        await asyncio.to_thread(natkit.disconnect, tunnel.public_url)
    assert natkit.get_tunnels() == []
    assert tunnel._handle.closed


async def test_blocking_expose_via_relay(relay: str, echo: int) -> None:
    seen: list[events.Event] = []
    exposed = await asyncio.to_thread(
        natkit.expose, echo, via="relay", relay=relay, token=TOKEN, on_event=seen.append
    )
    try:
        assert exposed.method == "relay" and not exposed.verified
        assert await _visit(exposed.public_address) == b"hello through the relay"
    finally:
        await asyncio.to_thread(exposed.close)
    assert isinstance(seen[-1], events.Closed)


async def test_expose_remembers_its_relay_port_as_the_cli_does(
    relay: str, echo: int, tmp_path: Path
) -> None:
    # The relay keeps a closed tunnel's port reserved for its token and hands out free ones
    # first: only a remembered preference gives the same address back.
    async with natkit.expose_async(echo, via="relay", relay=relay, token=TOKEN) as first:
        address = first.public_address
    assert (tmp_path / "state" / "relay_ports.json").exists()
    async with natkit.expose_async(echo, via="relay", relay=relay, token=TOKEN) as second:
        assert second.public_address == address
        assert await _visit(second.public_address) == b"hello through the relay"


async def test_closed_reaches_listeners_added_later_and_older_ones(relay: str, echo: int) -> None:
    typed: list[events.Event] = []
    legacy: list[tuple[str, dict[str, object]]] = []
    tunnel = await natkit.connect_async(echo, relay=relay, token=TOKEN)
    tunnel.on_event(typed.append)
    tunnel.on_event(lambda name, info: legacy.append((name, info)))
    await tunnel.close()
    assert typed == [events.Closed(tunnel.public_url, "relay")]
    assert legacy == [("closed", {"tunnel": "t0", "public": tunnel.public_url})]


async def test_blocking_connect_says_closed(relay: str, echo: int) -> None:
    seen: list[events.Event] = []
    tunnel = await asyncio.to_thread(
        natkit.connect, echo, relay=relay, token=TOKEN, on_event=seen.append
    )
    await asyncio.to_thread(tunnel.close)
    assert seen[-1] == events.Closed(tunnel.public_url, "relay"), seen


async def test_asyncio_run_takes_the_openers_directly(relay: str, echo: int) -> None:
    # asyncio.run in a worker thread (its own loop): this loop serves the relay meanwhile.
    tunnel = await asyncio.to_thread(
        asyncio.run, natkit.connect_async(echo, relay=relay, token=TOKEN)
    )
    assert isinstance(tunnel, natkit.RelayTunnel) and tunnel.public_url.startswith("127.0.0.1:")
    exposure = await asyncio.to_thread(
        asyncio.run, natkit.expose_async(echo, via="relay", relay=relay, token=TOKEN)
    )
    assert isinstance(exposure, natkit.Exposure) and exposure.method == "relay"
