"""natkit.expose_core, the engine under ``natkit expose`` and ``natkit.expose``, rootless: a real
relay on 127.0.0.1, a real echo service, and the fake NAT-PMP/PCP gateway on loopback as the
router. (Proof from outside, the switch to a proven mapping and the watch of a service that was
down need a router whose mapping is public: lab tests, tests/lab/test_expose_service_down.py.)

* a router that does not answer: the relay serves after the short head start (its ``ready``
  says the mapping is still ``probing``), and the router's failure follows as ``fallback``;
* a router whose external address is not public: its mapping is removed again at once, and
  the relay serves (``fallback`` first, then the relay's ``ready``);
* relay ports are remembered where the settings say; a tunnel that never opened is not
  "closed".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from natkit.expose_core import CoreEvent, ExposeCore, Settings
from natkit.relay.server import RelayConfig, RelayServer
from tests.fakegw.pmp import FakePmpGateway, fake_pmp_gateway
from tests.unit import test_api_relay

TOKEN = "expose-core-token-0123456789abcdef"
LOOPBACK = "127.0.0.1"
echo = test_api_relay.echo  # the fixture: an echo service on 127.0.0.1


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATKIT_STATE_DIR", str(tmp_path / "state"))  # the relay's pin


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[str]:
    server = RelayServer(RelayConfig(listen_host=LOOPBACK, listen_port=0, tokens={"a": TOKEN},
                                     ports=(41250, 41299), state_dir=tmp_path / "relay",
                                     stun=False, pool_size=1))  # fmt: skip
    await server.start()
    yield f"{LOOPBACK}:{server.listen_port}"
    await server.close()


@pytest.fixture
def silent_router() -> Iterator[FakePmpGateway]:
    with fake_pmp_gateway(answering=False) as fake:
        yield fake


@pytest.fixture
def router() -> Iterator[FakePmpGateway]:
    with fake_pmp_gateway() as fake:  # its external address, 198.51.100.7, is not public
        yield fake


def _settings(port: int, relay: str, gw: FakePmpGateway, tmp_path: Path) -> Settings:
    return Settings(port, relay=relay, token=TOKEN, via="pcp", gateway=LOOPBACK,
                    pmp_port=gw.port, ipv6=False,
                    remember_ports=tmp_path / "relay_ports.json")  # fmt: skip


async def _until(seen: list[CoreEvent], name: str, limit: float = 10.0) -> CoreEvent:
    async with asyncio.timeout(limit):
        while not any(e.name == name for e in seen):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return next(e for e in seen if e.name == name)


@contextlib.asynccontextmanager
async def _public(core: ExposeCore) -> AsyncIterator[None]:
    """The core running until it is public (bounded); stopped, and its end awaited, after."""
    stop = asyncio.Event()
    run = asyncio.create_task(core.run(stop))
    try:
        async with asyncio.timeout(10):
            await core.ready.wait()
        yield
    finally:
        stop.set()
        await asyncio.wait_for(run, 10)


async def _visit(public: str) -> bytes:
    reader, writer = await asyncio.open_connection(LOOPBACK, int(public.rpartition(":")[2]))
    writer.write(b"ping")
    got = await asyncio.wait_for(reader.readexactly(4), 10)
    writer.close()
    return got


async def test_the_relay_goes_first_while_the_router_is_silent(
    relay: str, echo: int, silent_router: FakePmpGateway, tmp_path: Path
) -> None:
    seen: list[CoreEvent] = []
    core = ExposeCore(_settings(echo, relay, silent_router, tmp_path), seen.append)
    async with _public(core):
        assert [(e.source, e.name) for e in seen if e.name != "pinned"] == [("relay", "ready")]
        ready = seen[-1]
        assert ready.info["mapping"] == "probing" and core.method == "relay", seen
        assert core.public_address == ready.info["public"] and core.mapping is None
        assert await _visit(core.public_address) == b"ping"
        fallback = await _until(seen, "fallback")  # the router's 2 s are over
        assert fallback.source == "core", fallback
        assert fallback.info["reason"].startswith("port mapping failed"), fallback
        assert core.method == "relay"  # it stays
    closed = seen[-1]
    assert (closed.source, closed.name) == ("relay", "closed"), seen
    assert closed.info == {"public": core.public_address, "opened": True}
    assert (tmp_path / "relay_ports.json").exists()


async def test_a_mapping_that_is_not_public_gives_way_to_the_relay(
    relay: str, echo: int, router: FakePmpGateway, tmp_path: Path
) -> None:
    seen: list[CoreEvent] = []
    core = ExposeCore(_settings(echo, relay, router, tmp_path), seen.append)
    async with _public(core):
        names = [e.name for e in seen if e.name != "pinned"]
        assert names == ["fallback", "ready"], seen  # PCP answers within the head start
        assert "not publicly reachable" in seen[-2].info["reason"], seen
        assert "mapping" not in seen[-1].info  # nothing left to take over
        assert router.mapped("tcp", echo) is None  # the unusable mapping was removed
        assert await _visit(core.public_address) == b"ping"


async def test_a_tunnel_that_never_opened_is_not_closed(
    echo: int, router: FakePmpGateway, tmp_path: Path
) -> None:
    # No relay at 127.0.0.1:1: the agent retries while the mapping gives way; stopped
    # there (the CLI's Ctrl-C before ready), nothing was public and nothing is "closed".
    seen: list[CoreEvent] = []
    core = ExposeCore(_settings(echo, f"{LOOPBACK}:1", router, tmp_path), seen.append)
    stop = asyncio.Event()
    run = asyncio.create_task(core.run(stop))
    await _until(seen, "fallback")
    stop.set()
    await asyncio.wait_for(run, 10)
    assert not core.ready.is_set() and router.mapped("tcp", echo) is None
    assert [(e.source, e.name) for e in seen][-1] == ("relay", "closed"), seen
    assert seen[-1].info == {"public": "", "opened": False}  # the twins say nothing of it
