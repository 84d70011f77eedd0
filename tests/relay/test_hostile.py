"""The relay against hostile peers, for real on loopback: a :class:`RelayServer` and real
:class:`Agent`s in the test's loop (or ``natkit relay serve`` as a process where its
descriptor limit matters), real services, real visitors. Nothing leaves 127.0.0.0/8.

Each finding of the review that attacked the relay is reproduced here:

* an on-path forwarder that lifts tickets from sealed openings and tries them in
  plaintext (the downgrade): it learns nothing a visitor sent, the agent is told;
* two agents on one token: two addresses, no silent takeover; an explicit one is told;
* a token exhausting ports and host names: its quota, not everyone's;
* a host name nested under another tenant's;
* an unauthenticated flood from one address under a low descriptor limit, and failed
  logins, logged once per burst;
* DIALs that are long or many; slow HTTP visitors, cut off by a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from natkit.errors import NatkitError
from natkit.net.certs import RelayTrustError
from natkit.relay import control, routing
from natkit.relay import messages as M
from natkit.relay.agent import Agent, TunnelRefusedError, TunnelSpec
from natkit.relay.server import RelayConfig, RelayServer
from natkit.relay.tenants import Quota, Tenant

NATKIT = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "natkit")
LOOPBACK = "127.0.0.1"
ATTACKER = "127.0.0.2"  # another address on loopback: the relay tells them apart
TOKEN_A = "alice-hostile-token-0123456789"
TOKEN_B = "bob-hostile-token-0123456789ab"
SECRET = b"Bearer s3cret-0f-the-visitor"


# ---- fixtures -------------------------------------------------------------------------------


def _config(tmp_path: Path, **kw: Any) -> RelayConfig:
    base: dict[str, Any] = dict(
        listen_host=LOOPBACK, listen_port=0, ports=(42000, 42049),
        state_dir=tmp_path / "relay", stun=False, pool_size=2, http_port=0, domain="lab.test",
        tenants=[Tenant("alice", TOKEN_A), Tenant("bob", TOKEN_B)],
    )  # fmt: skip
    base.update(kw)
    return RelayConfig(**base)


@contextlib.asynccontextmanager
async def running_relay(cfg: RelayConfig) -> AsyncIterator[RelayServer]:
    server = RelayServer(cfg)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[RelayServer]:
    async with running_relay(_config(tmp_path)) as server:
        yield server


class Service:
    """A tiny HTTP-ish service: answers every request with its name and remembers what
    it was sent."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.received = bytearray()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> Service:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            data = await r.readuntil(b"\r\n\r\n")
            self.received += data
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (len(self.name), self.name))  # fmt: skip
            await w.drain()
        w.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@contextlib.asynccontextmanager
async def agent(
    relay_addr: str, token: str, spec: TunnelSpec, tmp_path: Path, **kw: Any
) -> AsyncIterator[tuple[Agent, asyncio.Task[None], list[tuple[str, dict[str, Any]]]]]:
    a = Agent(relay_addr, token, [spec], known_relays=tmp_path / "known.json", **kw)
    events: list[tuple[str, dict[str, Any]]] = []
    a.on_event(lambda e, i: events.append((e, i)))
    task = asyncio.get_running_loop().create_task(a.run())
    try:
        yield a, task, events
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await a.close()


async def visit(address: str, host: str = "", body: bytes = b"") -> bytes:
    """A request to a public address (host:port); the whole answer."""
    h, _, p = address.rpartition(":")
    r, w = await asyncio.open_connection(h, int(p))
    head = b"GET /secret HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\n\r\n" % (
        host.encode() or b"x", SECRET)  # fmt: skip
    w.write(head + body)
    await w.drain()
    try:
        return await asyncio.wait_for(r.read(), 10)
    finally:
        w.close()


def relay_address(server: RelayServer) -> str:
    return f"{LOOPBACK}:{server.listen_port}"


# ---- 1. the downgrade: an on-path forwarder ---------------------------------------------------


class Forwarder:
    """A TCP forwarder between an agent and the relay, as an attacker on the path would run
    it: control connections (TLS) pass through untouched; a sealed data connection's clear
    opening is read, and what it names is tried on a plaintext data connection of the
    attacker's own (``tamper`` instead flips a bit in the sealed bytes). Every byte the
    forwarder sees is kept, to check it learned nothing."""

    def __init__(self, relay: tuple[str, int], mode: str) -> None:
        self.relay, self.mode = relay, mode
        self.seen = bytearray()
        self.stolen_visitor_bytes = bytearray()  # what the relay sent on the attacker's conns
        self.tries = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._conn, LOOPBACK, 0)
        return f"{LOOPBACK}:{self.server.sockets[0].getsockname()[1]}"

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await r.read(65536):
                self.seen += data
                w.write(data)
                await w.drain()
        with contextlib.suppress(Exception):
            w.close()

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(*self.relay)
        first = await r.read(1)
        self.seen += first
        if first in (b"S", b"G"):  # a sealed opening (ChaCha20 or AES-GCM)
            size = (await r.readexactly(1))[0]
            rest = await r.readexactly(size + 16)
            self.seen += bytes([size]) + rest
            handle = rest[:size].decode()
            if self.mode == "downgrade":
                await self._steal(handle)  # first, while the real opening is held back
                first = first + bytes([size]) + rest
            elif self.mode == "observe":
                first = first + bytes([size]) + rest
            else:  # tamper: flip a bit in the first sealed record
                record = bytearray(await r.read(65536))
                self.seen += record
                record[-1] ^= 1
                first = first + bytes([size]) + rest + bytes(record)
        uw.write(first)
        await asyncio.gather(self._pipe(r, uw), self._pipe(ur, w))

    async def _steal(self, what: str) -> None:
        """Present what the opening named, on a plaintext data connection of our own."""
        self.tries += 1
        with contextlib.suppress(Exception):
            r, w = await asyncio.open_connection(*self.relay)
            w.write(M.encode(M.Data(ticket=what)))
            await w.drain()
            self.stolen_visitor_bytes += await asyncio.wait_for(r.read(65536), 5)
            w.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.mark.parametrize("mode", ["observe", "downgrade", "tamper"])
async def test_an_on_path_forwarder_learns_nothing_and_the_agent_is_told(
    relay: RelayServer, tmp_path: Path, mode: str
) -> None:
    """``observe`` only watches: visitors are served and it sees no byte of theirs in
    clear. ``downgrade`` shows each opening's ticket handle on a plaintext connection of its
    own first; ``tamper`` flips a bit in each first record. Either way the relay refuses
    (and revokes the ticket), nothing reaches the attacker, and the agent is told."""
    service = await Service(b"the real service").start()
    fwd = Forwarder(("127.0.0.1", relay.listen_port), mode)
    via = await fwd.start()
    try:
        async with agent(via, TOKEN_A, TunnelSpec(service.port), tmp_path) as (a, _, events):
            public = await a.wait_open("t0", timeout=10)
            if mode == "observe":
                assert (await visit(public)).endswith(b"the real service")
                assert SECRET in service.received
                assert not [e for e, _ in events if e == "interference"]
            else:
                for _ in range(50):  # the agent's pool is opening through the forwarder
                    if any(e == "interference" for e, _ in events):
                        break
                    await asyncio.sleep(0.1)
                assert any(e == "interference" for e, _ in events), events
                notice = next(i for e, i in events if e == "interference")
                assert "tampering" in notice["message"], notice
                # A visitor now is refused (no data connection survives the meddling),
                # never answered by anyone else.
                with contextlib.suppress(OSError, asyncio.TimeoutError):
                    assert not (await visit(public)).endswith(b"the real service")
                assert relay.stats["interference"] > 0
        if mode == "downgrade":
            assert fwd.tries > 0
        assert SECRET not in bytes(fwd.seen), "the forwarder saw the visitor's request in clear"
        assert not fwd.stolen_visitor_bytes, bytes(fwd.stolen_visitor_bytes)
    finally:
        fwd.close()
        service.close()


async def test_a_sealed_tunnels_ticket_is_refused_on_a_plaintext_connection(
    relay: RelayServer, tmp_path: Path
) -> None:
    """Even the ticket itself (not only its handle), shown in clear, is refused for a
    tunnel whose agent chose sealed, and the agent hears of it."""
    service = await Service(b"sealed only").start()
    try:
        async with agent(relay_address(relay), TOKEN_A, TunnelSpec(service.port), tmp_path) as (
            a, _, events,
        ):  # fmt: skip
            await a.wait_open("t0", timeout=10)
            tunnel = next(iter(relay.sessions)).tunnels["t0"]
            (ticket,) = relay.tickets.issue(tunnel, 1, sealed=True)
            r, w = await asyncio.open_connection(LOOPBACK, relay.listen_port)
            w.write(M.encode(M.Data(ticket=ticket)))
            await w.drain()
            assert await asyncio.wait_for(r.read(), 5) == b""  # closed, nothing sent
            w.close()
            for _ in range(50):
                if any(e == "interference" for e, _ in events):
                    break
                await asyncio.sleep(0.05)
            assert any(e == "interference" for e, _ in events), events
    finally:
        service.close()


async def test_plaintext_is_refused_when_the_relay_does_not_allow_it(tmp_path: Path) -> None:
    async with running_relay(_config(tmp_path, allow_plaintext_data=False)) as server:
        service = await Service(b"x").start()
        try:
            async with agent(relay_address(server), TOKEN_A, TunnelSpec(service.port), tmp_path,
                             plaintext_data=True) as (_a, task, _):  # fmt: skip
                with pytest.raises(TunnelRefusedError, match="refuses plaintext"):
                    await asyncio.wait_for(task, 10)
        finally:
            service.close()


# ---- 2. two agents on one token -------------------------------------------------------------


async def test_two_agents_on_one_token_get_two_addresses(
    relay: RelayServer, tmp_path: Path
) -> None:
    one, two = await Service(b"one").start(), await Service(b"two").start()
    addr = relay_address(relay)
    try:
        async with (
            agent(addr, TOKEN_A, TunnelSpec(one.port), tmp_path) as (a1, _, ev1),
            agent(addr, TOKEN_A, TunnelSpec(two.port), tmp_path) as (a2, _, ev2),
        ):
            p1, p2 = await a1.wait_open("t0", 10), await a2.wait_open("t0", 10)
            assert p1 != p2
            assert (await visit(p1)).endswith(b"one")
            assert (await visit(p2)).endswith(b"two")
            assert not [e for e, _ in ev1 + ev2 if e in ("lost", "reconnecting")]
    finally:
        one.close()
        two.close()


async def test_a_live_agents_host_name_is_refused_to_another_unless_taken_over(
    relay: RelayServer, tmp_path: Path
) -> None:
    one, two = await Service(b"one").start(), await Service(b"two").start()
    addr = relay_address(relay)
    web = {"kind": "http", "name": "shop"}
    host = f"shop.lab.test:{relay.http_port}"
    http = f"{LOOPBACK}:{relay.http_port}"
    try:
        async with agent(addr, TOKEN_A, TunnelSpec(one.port, **web), tmp_path) as (a1, t1, ev1):
            public = await a1.wait_open("t0", 10)
            assert public == f"http://{host}"
            async with agent(addr, TOKEN_A, TunnelSpec(two.port, **web), tmp_path) as (_, t2, _):
                with pytest.raises(TunnelRefusedError, match="another live agent of this token"):
                    await asyncio.wait_for(t2, 10)
            assert (await visit(http, host)).endswith(b"one")
            spec = TunnelSpec(two.port, takeover=True, **web)
            async with agent(addr, TOKEN_A, spec, tmp_path) as (a2, _, _):
                assert await a2.wait_open("t0", 10) == public
                with pytest.raises(TunnelRefusedError, match="taken over"):
                    await asyncio.wait_for(t1, 10)  # the first is told, and stops
                lost = [i for e, i in ev1 if e == "lost"]
                assert lost and "taken over" in lost[0]["reason"], ev1
                assert (await visit(http, host)).endswith(b"two")
    finally:
        one.close()
        two.close()


async def test_an_agent_back_on_a_new_connection_keeps_its_address(
    relay: RelayServer, tmp_path: Path
) -> None:
    """The same agent process (its instance and resumption secret) reconnecting before the
    relay noticed its old connection die takes its own tunnel back."""
    service = await Service(b"back").start()
    try:
        async with agent(relay_address(relay), TOKEN_A, TunnelSpec(service.port, kind="http",
                         name="back"), tmp_path) as (a, _, events):  # fmt: skip
            public = await a.wait_open("t0", 10)
            (old,) = relay.sessions
            assert a._writer is not None
            a._writer.transport.abort()  # the agent drops it; the relay has not noticed yet
            for _ in range(100):
                if [e for e, _ in events if e == "restored"]:
                    break
                await asyncio.sleep(0.05)
            restored = [i for e, i in events if e == "restored"]
            assert restored and restored[0]["public"] == public, events
            assert relay.stats["sessions_resumed"] + relay.stats["takeovers"] <= 1
            assert relay.stats["takeovers"] == 0
            assert old not in relay.sessions
    finally:
        service.close()


async def test_an_instance_cannot_be_claimed_without_its_resumption_secret(
    relay: RelayServer, tmp_path: Path
) -> None:
    service = await Service(b"mine").start()
    try:
        async with agent(relay_address(relay), TOKEN_A, TunnelSpec(service.port), tmp_path) as (
            a, _, _,
        ):  # fmt: skip
            await a.wait_open("t0", 10)
            impostor = Agent(relay_address(relay), TOKEN_A, [], known_relays=tmp_path / "k.json")
            impostor.instance = a.instance  # the name, not the secret
            with pytest.raises(NatkitError, match="another resumption secret"):
                await asyncio.wait_for(impostor._session(), 10)
            await impostor.close()
            assert len(relay.sessions) == 1
    finally:
        service.close()


# ---- 3. quotas ---------------------------------------------------------------------------------


async def test_one_token_cannot_lock_other_tenants_out(tmp_path: Path) -> None:
    small = Quota(sessions=3, tunnels=2, ports=2, hostnames=1)
    cfg = _config(tmp_path, tenants=[Tenant("alice", TOKEN_A, small), Tenant("bob", TOKEN_B)],
                  ports=(42100, 42105))  # fmt: skip
    service = await Service(b"q").start()
    async with running_relay(cfg) as server:
        addr = relay_address(server)
        try:
            # Connect, open, disconnect, many times: reservations pile up only to the quota.
            for _ in range(6):
                async with agent(addr, TOKEN_A, TunnelSpec(service.port), tmp_path) as (a, _, _):
                    await a.wait_open("t0", 10)
            assert server.names.count("alice", "tcp") <= small.ports
            assert server.stats["reservations_evicted"] >= 4
            # Two live tunnels fill alice's quota; a third is refused with the quota named.
            async with (
                agent(addr, TOKEN_A, TunnelSpec(service.port), tmp_path) as (a1, _, _),
                agent(addr, TOKEN_A, TunnelSpec(service.port), tmp_path) as (a2, _, _),
            ):
                await a1.wait_open("t0", 10)
                await a2.wait_open("t0", 10)
                async with agent(addr, TOKEN_A, TunnelSpec(service.port), tmp_path) as (_, t3, _):
                    with pytest.raises(TunnelRefusedError, match="quota"):
                        await asyncio.wait_for(t3, 10)
                # Bob still gets ports: alice holds 2 of 6.
                async with agent(addr, TOKEN_B, TunnelSpec(service.port), tmp_path) as (b, _, _):
                    assert (await visit(await b.wait_open("t0", 10))).endswith(b"q")
            # Host names: one for alice, the second refused.
            web = TunnelSpec(service.port, kind="http", name="one")
            async with agent(addr, TOKEN_A, web, tmp_path) as (a, _, _):
                await a.wait_open("t0", 10)
                web2 = TunnelSpec(service.port, kind="http", name="two")
                async with agent(addr, TOKEN_A, web2, tmp_path) as (_, t2, _):
                    with pytest.raises(TunnelRefusedError, match="quota"):
                        await asyncio.wait_for(t2, 10)
        finally:
            service.close()


# ---- 4. nested host names ----------------------------------------------------------------------


async def test_a_name_under_another_tenants_name_is_refused(
    relay: RelayServer, tmp_path: Path
) -> None:
    service = await Service(b"n").start()
    addr = relay_address(relay)
    try:
        async with agent(addr, TOKEN_A, TunnelSpec(service.port, kind="http", name="shop"),
                         tmp_path) as (a, _, _):  # fmt: skip
            await a.wait_open("t0", 10)
            for name in ("x.shop", "shop"):
                spec = TunnelSpec(service.port, kind="http", name=name)
                async with agent(addr, TOKEN_B, spec, tmp_path) as (_, tb, _):
                    with pytest.raises(TunnelRefusedError, match=r"another token|nests"):
                        await asyncio.wait_for(tb, 10)
            # The same tenant may nest its own names.
            spec = TunnelSpec(service.port, kind="http", name="x.shop")
            async with agent(addr, TOKEN_A, spec, tmp_path) as (a2, _, _):
                assert await a2.wait_open("t0", 10) == f"http://x.shop.lab.test:{relay.http_port}"
        # And the other way round: bob's deeper name blocks alice's parent.
        async with agent(addr, TOKEN_B, TunnelSpec(service.port, kind="http", name="a.blog"),
                         tmp_path) as (b, _, _):  # fmt: skip
            await b.wait_open("t0", 10)
            async with agent(addr, TOKEN_A, TunnelSpec(service.port, kind="http", name="blog"),
                             tmp_path) as (_, ta, _):  # fmt: skip
                with pytest.raises(TunnelRefusedError, match="nests"):
                    await asyncio.wait_for(ta, 10)
    finally:
        service.close()


async def test_reserved_host_names_belong_to_their_tenant(tmp_path: Path) -> None:
    cfg = _config(tmp_path, tenants=[Tenant("alice", TOKEN_A, reserve=("shop",)),
                                     Tenant("bob", TOKEN_B)])  # fmt: skip
    service = await Service(b"r").start()
    async with running_relay(cfg) as server:
        addr = relay_address(server)
        try:
            for name in ("shop", "api.shop"):
                spec = TunnelSpec(service.port, kind="http", name=name)
                async with agent(addr, TOKEN_B, spec, tmp_path) as (_, tb, _):
                    with pytest.raises(TunnelRefusedError, match="reserved"):
                        await asyncio.wait_for(tb, 10)
            spec = TunnelSpec(service.port, kind="http", name="api.shop")
            async with agent(addr, TOKEN_A, spec, tmp_path) as (a, _, _):
                await a.wait_open("t0", 10)
        finally:
            service.close()


# ---- 5. unauthenticated floods and failed logins ------------------------------------------------


def _spawn_relay(
    tmp_path: Path, nofile: int, per_ip: int
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{TOKEN_A}\n")
    env = {**os.environ, "NATKIT_STATE_DIR": str(tmp_path / "state"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [NATKIT, "relay", "serve", "--listen", f"{LOOPBACK}:0", "--tokens-file", str(tokens),
         "--ports", "42200-42210", "--no-stun", "--max-unauthenticated-per-ip", str(per_ip),
         "--json", "--state-dir", str(tmp_path / "relay")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=limit,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(proc.stderr.read() if proc.stderr else "relay did not start")
    return proc, json.loads(line)


@contextlib.contextmanager
def flood(port: int, n: int) -> Iterator[list[socket.socket]]:
    """``n`` idle connections from the attacker's address, never saying a word."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((ATTACKER, 0))
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((LOOPBACK, port))
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


async def test_an_idle_flood_from_one_address_stops_no_one_else(tmp_path: Path) -> None:
    """The relay runs with 200 descriptors; 400 idle connections from one address. Agents
    from another address still log in and serve visitors, during and after."""
    proc, ready = _spawn_relay(tmp_path, nofile=200, per_ip=20)
    port = int(ready["listen"].rpartition(":")[2])
    service = await Service(b"still here").start()
    try:
        with flood(port, 400):
            await asyncio.sleep(0.5)  # let the relay accept (and shed) them
            async with agent(f"{LOOPBACK}:{port}", TOKEN_A, TunnelSpec(service.port),
                             tmp_path) as (a, _, _):  # fmt: skip
                public = await a.wait_open("t0", 15)
                assert (await visit(public)).endswith(b"still here")
    finally:
        service.close()
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "Traceback" not in err, err


async def test_failed_logins_are_refused_for_a_while_and_logged_once_per_burst(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="natkit.relay")
    async with running_relay(_config(tmp_path, failed_logins=5)) as server:
        addr = relay_address(server)
        for i in range(8):
            bad = Agent(addr, "not-the-token-0123456789", [], known_relays=tmp_path / "k.json")
            if i < 5:
                with pytest.raises(NatkitError, match="rejected the token"):
                    await asyncio.wait_for(bad._session(), 10)
            else:  # blocked: not even a TLS handshake for this address
                with pytest.raises((OSError, NatkitError)):
                    await asyncio.wait_for(bad._session(), 10)
            await bad.close()
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert sum("failed authentication" in m for m in warnings) == 1, warnings
        assert sum("refusing its connections" in m for m in warnings) == 1, warnings
        assert server.stats["auth_failures"] == 5  # then refused before the MAC is checked
        assert server.stats["refused_unauthenticated"] == 3
        # Even the right token is refused from that address while it is blocked.
        good = Agent(addr, TOKEN_A, [], known_relays=tmp_path / "k.json")
        with pytest.raises((OSError, NatkitError)):
            await asyncio.wait_for(good._session(), 10)
        await good.close()


# ---- 6. DIALs and slow visitors ---------------------------------------------------------------


async def test_dials_are_bounded_in_length_and_number(relay: RelayServer, tmp_path: Path) -> None:
    async with agent(relay_address(relay), TOKEN_A, TunnelSpec(1), tmp_path) as (a, _, _):
        await a.wait_open("t0", 10)
        with pytest.raises(NatkitError, match="longer than"):
            await a.dial("h" * 300, 80)  # refused before it leaves, not a crashed task
        ok, error = await a.dial("x" * 60, 80)  # not an address: answered, not crashed
        assert not ok and "not the address" in error
        # A listener that never accepts keeps dials in flight: the fifth is refused.
        hold = socket.socket()
        hold.bind((LOOPBACK, 0))
        hold.listen(0)
        try:
            answers = await asyncio.gather(
                *(a.dial(LOOPBACK, 9) for _ in range(6)), return_exceptions=True
            )
        finally:
            hold.close()
        assert any(isinstance(x, tuple) and "in flight" in x[1] for x in answers), answers
    assert relay.stats["task_errors"] == 0


async def test_slow_visitors_are_cut_off_by_a_timer_while_others_are_served(
    relay: RelayServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(routing, "HEADER_TIMEOUT", 1.5)
    service = await Service(b"fast").start()
    http = f"{LOOPBACK}:{relay.http_port}"
    try:
        async with agent(relay_address(relay), TOKEN_A, TunnelSpec(service.port, kind="http",
                         name="fast"), tmp_path) as (a, _, _):  # fmt: skip
            await a.wait_open("t0", 10)
            slow = []
            for _ in range(200):
                r, w = await asyncio.open_connection(LOOPBACK, relay.http_port)
                w.write(b"GET / HTTP/1.1\r\nHost: fa")  # and never the rest
                slow.append((r, w))
            host = f"fast.lab.test:{relay.http_port}"
            assert (await visit(http, host)).endswith(b"fast")
            # Half a head more from one of them: it is looked at again, and routed.
            r, w = slow.pop()
            w.write(b"st.lab.test\r\n\r\n")
            assert (await asyncio.wait_for(r.read(), 10)).endswith(b"fast")
            ends = await asyncio.gather(
                *(asyncio.wait_for(r.read(), 10) for r, _ in slow), return_exceptions=True
            )
            # Cut off with no answer (a reset: what they sent was never read).
            assert all(e == b"" or isinstance(e, ConnectionResetError) for e in ends), ends
            assert relay.stats["slow_visitors"] == 199
            for _, w in slow:
                w.close()
    finally:
        service.close()


async def test_a_damaged_pin_file_is_an_error_that_names_it(
    relay: RelayServer, tmp_path: Path
) -> None:
    pins = tmp_path / "known.json"
    pins.write_text("{not json")
    with pytest.raises(RelayTrustError, match=str(pins)):
        async with agent(relay_address(relay), TOKEN_A, TunnelSpec(1), tmp_path) as (_, task, _):
            await asyncio.wait_for(task, 10)
    assert pins.read_text() == "{not json"  # left as it was, for the user to look at


def test_the_auth_mac_binds_the_instance() -> None:
    mac = control.auth_mac(TOKEN_A, "n", "fp", "i" * 16, "r" * 32)
    assert control.check_mac(TOKEN_A, "n", "fp", "i" * 16, "r" * 32, mac)
    assert not control.check_mac(TOKEN_A, "n", "fp", "j" * 16, "r" * 32, mac)


def _ca_signed(tmp_path: Path, san: Any) -> tuple[Path, Path, Path]:
    """A CA, and a relay certificate it signed for ``san``: (ca, cert, key) files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject: str, issuer: str, key: Any, sign: Any, ca: bool) -> Any:
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))  # fmt: skip
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([san]), critical=False)
        return b.sign(sign, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = build("test CA", "test CA", ca_key, ca_key, True)
    cert = build("relay", "test CA", key, ca_key, False)
    paths = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                         serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
    return paths


@pytest.mark.parametrize("right_name", [True, False])
async def test_with_a_ca_the_relays_name_is_checked(tmp_path: Path, right_name: bool) -> None:
    import ipaddress

    from cryptography import x509

    san = (x509.IPAddress(ipaddress.ip_address(LOOPBACK)) if right_name
           else x509.DNSName("someone-else.example"))  # fmt: skip
    ca, cert, key = _ca_signed(tmp_path, san)
    async with running_relay(_config(tmp_path, cert=cert, key=key)) as server:
        service = await Service(b"ca").start()
        try:
            async with agent(relay_address(server), TOKEN_A, TunnelSpec(service.port), tmp_path,
                             cafile=ca) as (a, task, _):  # fmt: skip
                if right_name:
                    assert (await visit(await a.wait_open("t0", 10))).endswith(b"ca")
                else:
                    with pytest.raises(RelayTrustError, match=r"not trusted for 127\.0\.0\.1"):
                        await asyncio.wait_for(task, 10)
        finally:
            service.close()


# ---- review fixes: a refused tunnel on reconnect, random names, a closed tunnel's conns ----------


async def _events_until(events: list[tuple[str, dict[str, Any]]], name: str, after: int = 0,
                        timeout: float = 15) -> dict[str, Any]:  # fmt: skip
    for _ in range(int(timeout / 0.05)):
        found = [i for e, i in events[after:] if e == name]
        if found:
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {name} event in {events}")


async def test_a_tunnel_refused_on_reconnect_asks_again_alone(
    relay: RelayServer, tmp_path: Path
) -> None:
    """A's name is taken by B (same token) while A is away: A's tunnel is refused when it
    comes back. Only that tunnel is lost for a while (A's session and other tunnel go on);
    once B lets go, A gets its name back."""
    one, two = await Service(b"A").start(), await Service(b"B").start()
    addr = relay_address(relay)
    web = TunnelSpec(one.port, kind="http", name="web")
    try:
        async with agent(addr, TOKEN_A, web, tmp_path) as (a, task_a, events):
            public = await a.wait_open("t0", 10)
            a.open(TunnelSpec(one.port, id="t1"))
            tcp_public = await a.wait_open("t1", 10)
            (session,) = relay.sessions
            session.abort()  # A is cut off; its names wait for it (same tenant)
            await asyncio.sleep(0.05)
            spec_b = TunnelSpec(two.port, kind="http", name="web")
            async with agent(addr, TOKEN_A, spec_b, tmp_path) as (b, _, _):
                assert await b.wait_open("t0", 10) == public
                lost = await _events_until(events, "lost")
                assert lost["tunnel"] == "t0" and lost.get("retry_in"), lost
                assert not task_a.done()
                assert (await visit(tcp_public)).endswith(b"A")  # the other tunnel serves
            n = len(events)
            restored = await _events_until(events, "restored", after=n, timeout=20)
            assert restored["public"] == public, restored
            host = f"web.lab.test:{relay.http_port}"
            assert (await visit(f"{LOOPBACK}:{relay.http_port}", host)).endswith(b"A")
    finally:
        one.close()
        two.close()


async def test_a_random_host_name_is_kept_across_reconnects(
    relay: RelayServer, tmp_path: Path
) -> None:
    service = await Service(b"r").start()
    try:
        spec = TunnelSpec(service.port, kind="http")
        async with agent(relay_address(relay), TOKEN_A, spec, tmp_path) as (a, _, events):
            public = await a.wait_open("t0", 10)
            (session,) = relay.sessions
            session.abort()
            restored = await _events_until(events, "restored")
            assert restored["public"] == public and not restored["changed"], restored
    finally:
        service.close()


async def test_a_data_connection_for_a_closed_tunnel_is_not_parked(
    relay: RelayServer, tmp_path: Path
) -> None:
    from natkit.relay.tunnels import ParkedConn

    service = await Service(b"c").start()
    try:
        async with agent(relay_address(relay), TOKEN_A, TunnelSpec(service.port), tmp_path) as (
            a, _, _,
        ):  # fmt: skip
            await a.wait_open("t0", 10)
            (session,) = relay.sessions
            tunnel = session.tunnels.pop("t0")
            relay.close_tunnel(tunnel, keep=False)
            mine, theirs = socket.socketpair()
            mine.setblocking(False)
            tunnel.park(ParkedConn(mine))  # arrived just after the close
            assert mine.fileno() == -1 and not tunnel.pool
            theirs.close()
    finally:
        service.close()
