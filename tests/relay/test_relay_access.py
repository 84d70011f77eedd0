"""Access control on tunnels, for real on loopback: a :class:`RelayServer` and a real
:class:`Agent` in the test's loop, a real service, visitors from two loopback addresses
(127.0.0.1 and 127.0.0.2; the relay tells them apart). Nothing leaves 127.0.0.0/8.

What is checked each time: a refused visitor never reaches the service (the agent is not
even told of it but by a REFUSED event), the relay's counters say why, and what the visitor
sees (a reset for TCP; 401, 403 or 429 for HTTP)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from natkit.relay import metrics
from natkit.relay.access import build_policy
from natkit.relay.agent import Agent, TunnelSpec
from natkit.relay.server import RelayServer
from tests.relay.test_hostile import LOOPBACK, TOKEN_A, _config, running_relay

OTHER = "127.0.0.2"


class Counting:
    """A service that answers an HTTP request with 200 ``ok``, anything else with an echo;
    counts connections (a refused visitor must never make one). Also the lab test's
    service (an instance is a ``start_server`` handler)."""

    def __init__(self) -> None:
        self.connections = 0
        self.heads: list[bytes] = []
        self.port = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> Counting:
        self.server = await asyncio.start_server(self, LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __call__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(Exception):
            first = await r.read(65536)
            if first.startswith(b"GET "):
                self.heads.append(first)
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            else:
                w.write(b"echo:" + first)
            await w.drain()
        w.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@contextlib.asynccontextmanager
async def tunnel(
    relay: RelayServer, tmp_path: Path, kind: str, **options: Any
) -> AsyncIterator[tuple[str, Counting, list[dict[str, Any]]]]:
    """A tunnel of ``kind`` with the access ``options``; yields (public, service, refused
    events the agent got)."""
    service = await Counting().start()
    spec = TunnelSpec(service.port, kind=kind, name="app" if kind != "tcp" else "",
                      access=build_policy(kind=kind, **options))  # fmt: skip
    host = relay.cfg.listen_host
    address = f"[{host}]:{relay.listen_port}" if ":" in host else f"{host}:{relay.listen_port}"
    agent = Agent(address, TOKEN_A, [spec], known_relays=tmp_path / "known.json")
    refused: list[dict[str, Any]] = []
    agent.on_event(lambda e, info: refused.append(info) if e == "refused" else None)
    task = asyncio.get_running_loop().create_task(agent.run())
    try:
        public = await agent.wait_open(spec.id, timeout=10)
        yield public, service, refused
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await agent.close()
        service.close()


async def exchange(port: int, data: bytes, source: str) -> bytes:
    """Connect from ``source`` to the relay's ``port``, send, read to the end. A reset
    reads as b"RST" (on loopback it may come before the connect call returns)."""
    try:
        r, w = await asyncio.open_connection(LOOPBACK, port, local_addr=(source, 0))
    except ConnectionResetError:
        return b"RST"
    try:
        w.write(data)
        await w.drain()
        return await asyncio.wait_for(r.read(), 10)
    except ConnectionResetError:
        return b"RST"
    finally:
        w.close()


def http_get(host: str, *headers: str) -> bytes:
    lines = ["GET /x HTTP/1.1", f"Host: {host}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def authorization(user_pass: str) -> str:
    return "Authorization: Basic " + base64.b64encode(user_pass.encode()).decode()


async def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def relay_at(tmp_path: Path) -> AsyncIterator[RelayServer]:
    async with running_relay(_config(tmp_path, pool_size=1)) as server:
        yield server


async def test_tcp_allow_list_admits_one_address_and_resets_the_other(tmp_path: Path) -> None:
    async with relay_at(tmp_path) as relay, tunnel(relay, tmp_path, "tcp", allow=[OTHER]) as (
        public, service, refused,
    ):  # fmt: skip
        port = int(public.rsplit(":", 1)[1])
        assert await exchange(port, b"hi", OTHER) == b"echo:hi"
        assert await exchange(port, b"hi", LOOPBACK) in (b"RST", b"")
        assert service.connections == 1  # the refused visitor never reached it
        assert relay.refusals == {"not-allowed": 1}
        await until(lambda: refused)
        assert refused[0]["reason"] == "not-allowed"
        assert refused[0]["visitor"].startswith("127.0.0.1:")
        assert refused[0]["more"] == 0 and refused[0]["at"] > 1.6e9
        text = metrics.render(relay).decode()
        assert 'natkit_relay_refused_visitors_total{reason="not-allowed"} 1' in text
        assert 'natkit_relay_refused_visitors_total{reason="denied"} 0' in text


async def test_tcp_deny_wins(tmp_path: Path) -> None:
    async with (
        relay_at(tmp_path) as relay,
        tunnel(relay, tmp_path, "tcp", allow=["127.0.0.0/8"], deny=[OTHER]) as (public, service, _),
    ):
        port = int(public.rsplit(":", 1)[1])
        assert await exchange(port, b"a", LOOPBACK) == b"echo:a"
        assert await exchange(port, b"b", OTHER) in (b"RST", b"")
        assert service.connections == 1 and relay.refusals == {"denied": 1}


async def test_tcp_rate_limit_per_address(tmp_path: Path) -> None:
    async with relay_at(tmp_path) as relay, tunnel(relay, tmp_path, "tcp", rate_limit="2/min") as (
        public, service, _,
    ):  # fmt: skip
        port = int(public.rsplit(":", 1)[1])
        got = [await exchange(port, b"x", LOOPBACK) for _ in range(3)]
        assert got[:2] == [b"echo:x", b"echo:x"] and got[2] in (b"RST", b"")
        assert await exchange(port, b"y", OTHER) == b"echo:y"  # its own bucket
        assert service.connections == 3 and relay.refusals == {"rate-limited": 1}


async def test_http_basic_auth_right_wrong_missing(tmp_path: Path) -> None:
    async with (
        relay_at(tmp_path) as relay,
        tunnel(relay, tmp_path, "http", basic_auth="alice:pa:ss") as (public, service, refused),
    ):
        host = public.split("://", 1)[1].rsplit(":", 1)[0]
        port = relay.http_port
        assert port is not None
        missing = await exchange(port, http_get(host), LOOPBACK)
        assert missing.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), missing
        assert b'WWW-Authenticate: Basic realm="natkit", charset="UTF-8"\r\n' in missing
        wrong = await exchange(port, http_get(host, authorization("alice:nope")), LOOPBACK)
        assert wrong.startswith(b"HTTP/1.1 401 "), wrong
        right = await exchange(port, http_get(host, authorization("alice:pa:ss")), LOOPBACK)
        assert right.startswith(b"HTTP/1.1 200 OK") and right.endswith(b"ok"), right
        assert service.connections == 1
        # The relay passes the request on untouched, Authorization header included.
        assert authorization("alice:pa:ss").encode() in service.heads[0]
        assert relay.refusals == {"auth-missing": 1, "auth-wrong": 1}
        await until(lambda: len(refused) == 2)
        assert [r["reason"] for r in refused] == ["auth-missing", "auth-wrong"]


async def test_http_address_rules_and_rate_answer_403_and_429(tmp_path: Path) -> None:
    async with (
        relay_at(tmp_path) as relay,
        tunnel(relay, tmp_path, "http", deny=[OTHER], rate_limit="1/h") as (public, service, _),
    ):
        host = public.split("://", 1)[1].rsplit(":", 1)[0]
        port = relay.http_port
        assert port is not None
        denied = await exchange(port, http_get(host), OTHER)
        assert denied.startswith(b"HTTP/1.1 403 Forbidden\r\n"), denied
        assert (await exchange(port, http_get(host), LOOPBACK)).startswith(b"HTTP/1.1 200")
        limited = await exchange(port, http_get(host), LOOPBACK)
        assert limited.startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), limited
        assert b"Retry-After: 3600\r\n" in limited
        assert service.connections == 1
        assert relay.refusals == {"denied": 1, "rate-limited": 1}


async def test_a_flood_of_refusals_is_reported_to_the_agent_a_few_at_a_time(
    tmp_path: Path,
) -> None:
    async with relay_at(tmp_path) as relay, tunnel(relay, tmp_path, "tcp", deny=[LOOPBACK]) as (
        public, service, refused,
    ):  # fmt: skip
        port = int(public.rsplit(":", 1)[1])
        for _ in range(60):
            await exchange(port, b"", LOOPBACK)
        assert relay.refusals == {"denied": 60} and service.connections == 0
        await until(lambda: len(refused) >= 20)
        await asyncio.sleep(0.3)  # the next report, a moment later, says how many were held
        await exchange(port, b"", LOOPBACK)
        await until(lambda: sum(1 + r["more"] for r in refused) == 61)
        assert len(refused) < 30  # a burst of 20, then a few a second


async def test_the_python_api_passes_the_policy(tmp_path: Path) -> None:
    import natkit

    async with relay_at(tmp_path) as relay:
        service = await Counting().start()
        events: list[Any] = []
        try:
            async with natkit.connect_async(
                service.port, relay=f"{LOOPBACK}:{relay.listen_port}", token=TOKEN_A,
                fingerprint=relay.fingerprint, known_relays=tmp_path / "k.json",
                allow=["127.0.0.0/8"], deny=[f"{OTHER}/32"], on_event=events.append,
            ) as tunnel_:  # fmt: skip
                port = int(tunnel_.public_url.rsplit(":", 1)[1])
                assert await exchange(port, b"a", OTHER) in (b"RST", b"")
                assert await exchange(port, b"b", LOOPBACK) == b"echo:b"
                await until(lambda: any(isinstance(e, natkit.events.Refused) for e in events))
        finally:
            service.close()
        (event,) = [e for e in events if isinstance(e, natkit.events.Refused)]
        assert event.reason == "denied" and event.visitor.startswith(f"{OTHER}:")
        assert event.public_address == tunnel_.public_url and event.method == "relay"
        assert event.to_json()["event"] == "refused"


async def test_a_policy_version_the_relay_does_not_know_is_refused(tmp_path: Path) -> None:
    from natkit.relay.access import AccessPolicy
    from natkit.relay.agent import TunnelRefusedError

    async with relay_at(tmp_path) as relay:
        spec = TunnelSpec(9, access=AccessPolicy(version=2))
        agent = Agent(f"{LOOPBACK}:{relay.listen_port}", TOKEN_A, [spec],
                      known_relays=tmp_path / "known.json")  # fmt: skip
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(agent.run(), 10)
            raise AssertionError("the tunnel was opened")
        except TunnelRefusedError as exc:
            assert "the agent sent version 2: upgrade the relay" in str(exc)
        finally:
            await agent.close()
        assert not relay.names.live()


async def test_ipv6_visitors(tmp_path: Path) -> None:
    """A relay on ::1: an IPv6 visitor is checked against IPv6 networks (and never matches
    an IPv4 one)."""

    async def visit(public: str) -> bytes:
        port = int(public.rsplit(":", 1)[1])
        try:
            r, w = await asyncio.open_connection("::1", port)
        except ConnectionResetError:
            return b"RST"
        try:
            w.write(b"v6")
            return await asyncio.wait_for(r.read(), 10)
        except ConnectionResetError:
            return b"RST"
        finally:
            w.close()

    cfg = _config(tmp_path, listen_host="::1", pool_size=1)
    async with running_relay(cfg) as relay:
        async with tunnel(relay, tmp_path, "tcp", allow=["::1/128"], deny=["10.0.0.0/8"]) as (
            public, service, _,
        ):  # fmt: skip
            assert public.startswith("[::1]:")
            assert await visit(public) == b"echo:v6"
        async with tunnel(relay, tmp_path, "tcp", allow=["127.0.0.0/8", "2001:db8::/32"]) as (
            public, service, _,
        ):  # fmt: skip
            assert await visit(public) in (b"RST", b"")
            assert service.connections == 0
        async with tunnel(relay, tmp_path, "tcp", deny=["::/0"]) as (public, service, _):
            assert await visit(public) in (b"RST", b"")
        assert relay.refusals == {"not-allowed": 1, "denied": 1}


class OldRelay(RelayServer):
    """A relay from before access control, as the agent sees it: its codec refuses an
    OPEN with the extra field (this is the Error such a relay sends, word for word)."""

    def open_tunnel(self, s: Any, msg: Any) -> None:
        if msg.access is not None:
            s.fail("protocol", "relay Open: fields must be exactly: tunnel, kind, name, port, "
                   "exact, plaintext, takeover")  # fmt: skip
            return
        super().open_tunnel(s, msg)


async def test_a_relay_that_predates_access_control_is_a_final_error(tmp_path: Path) -> None:
    from natkit.relay.agent import TunnelRefusedError

    relay = OldRelay(_config(tmp_path))
    await relay.start()
    try:
        spec = TunnelSpec(9, access=build_policy(deny=["10.0.0.0/8"]))
        agent = Agent(f"{LOOPBACK}:{relay.listen_port}", TOKEN_A, [spec],
                      known_relays=tmp_path / "known.json")  # fmt: skip
        try:
            await asyncio.wait_for(agent.run(), 10)
        except TunnelRefusedError as exc:
            assert "predates access control" in str(exc) and "upgrade the relay" in str(exc)
        else:
            raise AssertionError("run() returned")
        finally:
            await agent.close()
        assert agent.connections == 1  # not retried
    finally:
        await relay.close()


async def test_expose_with_a_policy_uses_the_relay_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """natkit.expose_async in auto mode with a policy: no router is asked (a mapping
    would let everyone in; the network guard would also catch discovery here)."""
    import natkit

    monkeypatch.setenv("NATKIT_STATE_DIR", str(tmp_path / "state"))
    async with relay_at(tmp_path) as relay:
        service = await Counting().start()
        try:
            async with natkit.expose_async(
                service.port, relay=f"{LOOPBACK}:{relay.listen_port}", token=TOKEN_A,
                fingerprint=relay.fingerprint, deny=[OTHER], rate_limit="100/s",
            ) as exposure:  # fmt: skip
                assert exposure.method == "relay"
                port = int(exposure.public_address.rsplit(":", 1)[1])
                assert await exchange(port, b"a", OTHER) in (b"RST", b"")
                assert await exchange(port, b"b", LOOPBACK) == b"echo:b"
        finally:
            service.close()
        assert relay.refusals == {"denied": 1} and service.connections == 1


def test_expose_refuses_a_policy_it_cannot_enforce(monkeypatch: pytest.MonkeyPatch) -> None:
    import natkit

    monkeypatch.delenv("NATKIT_RELAY", raising=False)
    with pytest.raises(ValueError, match="enforced by a relay"):
        natkit.expose_async(8080, relay=None, token=None, allow=["10.0.0.0/8"])
    with pytest.raises(ValueError, match="via='relay'"):
        natkit.expose_async(8080, via="upnp", relay="127.0.0.1:1", token="t", deny=["::/0"])
    with pytest.raises(ValueError, match="basic auth needs an HTTP tunnel"):
        natkit.connect_async(8080, relay="127.0.0.1:1", token="t", basic_auth="u:p")


async def test_https_tunnels_are_checked_once_the_sni_is_read(tmp_path: Path) -> None:
    """TLS passes through untouched: address rules apply (a reset), never basic auth."""
    import ssl

    async def hello_from(source: str) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with contextlib.suppress(OSError, ssl.SSLError, asyncio.TimeoutError):
            _, w = await asyncio.wait_for(asyncio.open_connection(
                LOOPBACK, relay.https_port, ssl=ctx, server_hostname="app.lab.test",
                local_addr=(source, 0)), 5)  # fmt: skip
            w.close()

    async with (
        running_relay(_config(tmp_path, pool_size=1, https_port=0)) as relay,
        tunnel(relay, tmp_path, "tls", deny=[OTHER]) as (public, service, _),
    ):
        assert public.startswith("https://")
        await hello_from(OTHER)
        assert service.connections == 0 and relay.refusals == {"denied": 1}
        await hello_from(LOOPBACK)  # admitted: the service gets the ClientHello
        await until(lambda: service.connections == 1)
