"""The inspector on a real HTTP tunnel, on loopback: a real relay (in-process), a real
agent with capture on, a real HTTP service, visitors over TCP. What the visitor sent and
got is compared byte for byte with what the inspector captured, over both data paths
(sealed, and plaintext with splice); replays reach the service again; the API refuses
other sites. Nothing is sent beyond 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from natkit.inspect.server import Inspector
from natkit.inspect.tap import tap_factory
from natkit.relay.agent import Agent, TunnelSpec
from natkit.relay.server import RelayConfig, RelayServer

TOKEN = "inspect-token-0123456789abcdef01"
LOOPBACK = "127.0.0.1"
HOST = "shop.lab.test"


class Service:
    """An HTTP/1.1 service (keep-alive) that keeps every request it got, raw."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from natkit.inspect.exchange import RequestReader, Stop

        parser = RequestReader()
        with contextlib.suppress(OSError, Stop):
            while data := await reader.read(65536):
                for msg in parser.feed(data):
                    self.got.append(bytes(msg.raw))
                    writer.write(self.answer(msg.start[1], bytes(msg.body)))
                    await writer.drain()
        writer.close()

    @staticmethod
    def answer(target: str, body: bytes) -> bytes:
        if target.startswith("/chunked"):
            return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"4\r\nwiki\r\n5\r\npedia\r\n0\r\n\r\n")  # fmt: skip
        if target.startswith("/big"):
            payload = b"B" * 300_000
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
        payload = json.dumps({"target": target, "got": body.decode("latin-1")}).encode()
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(payload), payload))  # fmt: skip

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[RelayServer]:
    server = RelayServer(RelayConfig(listen_host=LOOPBACK, listen_port=0, tokens={"a": TOKEN},
                                     ports=(41400, 41420), state_dir=tmp_path / "relay",
                                     stun=False, pool_size=2, http_port=0, domain="lab.test"))  # fmt: skip
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    svc = Service()
    await svc.start()
    yield svc
    await svc.close()


@contextlib.asynccontextmanager
async def inspected(relay: RelayServer, service: Service, tmp_path: Path, *, plaintext: bool,
                    max_body: int = 1 << 20) -> AsyncIterator[Inspector]:  # fmt: skip
    """An agent with an HTTP tunnel to ``service`` and the inspector on it."""
    from natkit.inspect.store import CaptureStore

    spec = TunnelSpec(service.port, kind="http", name="shop")
    agent = Agent(f"{LOOPBACK}:{relay.listen_port}", TOKEN, [spec], plaintext_data=plaintext,
                  known_relays=tmp_path / f"known-{plaintext}.json")  # fmt: skip
    inspector = Inspector(CaptureStore(max_body=max_body))
    await inspector.start(LOOPBACK, 0)
    inspector.watch("shop", "", LOOPBACK, service.port)
    agent.capture(spec.id, tap_factory(inspector.store, "shop"))
    task = asyncio.get_running_loop().create_task(agent.run())
    try:
        await agent.wait_open(spec.id, timeout=10)
        yield inspector
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await agent.close()
        await inspector.close()


async def visit(port: int, requests: list[bytes], expect: int) -> bytes:
    """Send the requests on one connection (pipelined), read until ``expect`` bytes."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(b"".join(requests))
    got = b""
    while len(got) < expect:
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        if not chunk:
            break
        got += chunk
    writer.close()
    return got


async def settled(inspector: Inspector, n: int) -> list[Any]:
    for _ in range(200):
        records = inspector.store.list()
        if len(records) >= n and all(r.exchange.response is not None or r.note for r in records):
            return records[::-1]
        await asyncio.sleep(0.02)
    raise AssertionError(f"{len(inspector.store.list())} records, wanted {n}")


def req(method: str, target: str, body: bytes = b"", extra: str = "") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
    return f"{method} {target} HTTP/1.1\r\nHost: {HOST}\r\n{extra}{length}\r\n".encode() + body


async def api(inspector: Inspector, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None) -> tuple[int, Any]:  # fmt: skip
    """A request to the inspector's API (plain HTTP/1.1 on loopback)."""
    data = b"" if body is None else json.dumps(body).encode()
    head = {"Host": f"{LOOPBACK}:{inspector.address[1]}", "Connection": "close",
            "Content-Length": str(len(data))}  # fmt: skip
    if body is not None:
        head["Content-Type"] = "application/json"
    head |= headers or {}
    raw = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items())
    reader, writer = await asyncio.open_connection(LOOPBACK, inspector.address[1])
    writer.write(raw.encode() + b"\r\n" + data)
    answer = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    head_bytes, _, payload = answer.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ")[1])
    return status, json.loads(payload) if payload else None


@pytest.mark.parametrize(
    ("plaintext", "splice"),
    [(False, True), (True, True), (True, False)],
    ids=["sealed", "plain-splice", "plain-protocols"],  # protocols: where there is no splice
)
async def test_exchanges_through_the_tunnel_are_captured_byte_for_byte(
    relay: RelayServer, service: Service, tmp_path: Path, plaintext: bool, splice: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from natkit.relay import pump

    monkeypatch.setattr(pump, "USE_SPLICE", pump.USE_SPLICE and splice)
    assert relay.http_port
    async with inspected(relay, service, tmp_path, plaintext=plaintext) as inspector:
        sent = [req("GET", "/a?x=1"), req("POST", "/items", b'{"n": [1, 2]}',
                "Content-Type: application/json\r\n"), req("GET", "/chunked")]  # fmt: skip
        answers = [Service.answer("/a?x=1", b""), Service.answer("/items", b'{"n": [1, 2]}'),
                   Service.answer("/chunked", b"")]  # fmt: skip
        got = await visit(relay.http_port, sent, sum(map(len, answers)))
        assert got == b"".join(answers)
        records = await settled(inspector, 3)
        for record, request, answer in zip(records, sent, answers, strict=True):
            assert bytes(record.exchange.request.raw) == request
            assert record.exchange.response is not None
            assert bytes(record.exchange.response.raw) == answer
            assert record.visitor.startswith(f"{LOOPBACK}:") and record.tunnel == "shop"
            assert record.duration is not None and record.duration >= 0
        assert records[1].exchange.request.body == b'{"n": [1, 2]}'
        assert records[2].exchange.response is not None
        assert records[2].exchange.response.body == b"wikipedia"
        # The API shows the same, in ngrok's shape.
        status, listing = await api(inspector, "GET", "/api/requests/http")
        assert status == 200 and [r["id"] for r in listing["requests"]] == [
            r.id for r in records[::-1]
        ]
        status, one = await api(inspector, "GET", f"/api/requests/http/{records[0].id}")
        assert status == 200 and base64.b64decode(one["request"]["raw"]) == sent[0]


@pytest.mark.parametrize("plaintext", [False, True], ids=["sealed", "plain"])
async def test_a_body_over_the_cap_ends_capture_and_not_the_visitor(
    relay: RelayServer, service: Service, tmp_path: Path, plaintext: bool
) -> None:
    assert relay.http_port
    async with inspected(
        relay, service, tmp_path, plaintext=plaintext, max_body=10_000
    ) as inspector:
        answers = Service.answer("/big", b"") + Service.answer("/after", b"")
        got = await visit(relay.http_port, [req("GET", "/big"), req("GET", "/after")], len(answers))
        assert got == answers  # the visitor gets every byte
        # Both pipelined requests were seen; the first answer went over the cap.
        big, after = await settled(inspector, 2)
        response = big.exchange.response
        assert response is not None and response.truncated and len(response.body) == 10_000
        assert "over 10000 bytes" in big.note
        assert after.exchange.response is None and "no response captured" in after.note
        await visit(relay.http_port, [req("GET", "/next")], len(Service.answer("/next", b"")))
        await settled(inspector, 3)  # a new connection is captured again


async def test_replay_and_replay_with_changes_reach_the_service(
    relay: RelayServer, service: Service, tmp_path: Path
) -> None:
    assert relay.http_port
    async with inspected(relay, service, tmp_path, plaintext=False) as inspector:
        first = req("POST", "/orders", b"one")
        await visit(relay.http_port, [first], len(Service.answer("/orders", b"one")))
        (record,) = await settled(inspector, 1)
        status, _ = await api(inspector, "POST", "/api/requests/http",
                              {"id": record.id, "tunnel_name": "shop"})  # fmt: skip
        assert status == 204
        for _ in range(100):  # ngrok's replay answers 204 at once and goes on
            if len(service.got) == 2:
                break
            await asyncio.sleep(0.02)
        status, made = await api(inspector, "POST", f"/api/requests/http/{record.id}/replay",
                                 {"uri": "/orders/2", "body": "two", "headers": [["Host", HOST]]})  # fmt: skip
        assert status == 201 and made["natkit"]["replay_of"] == record.id
        assert json.loads(base64.b64decode(made["natkit"]["response_body"])) == {
            "target": "/orders/2", "got": "two"}  # fmt: skip
        assert service.got == [first, first,
                               f"POST /orders/2 HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 3\r\n\r\ntwo".encode()]  # fmt: skip
        assert len(inspector.store.list()) == 3
        status, err = await api(inspector, "POST", "/api/requests/http/nosuch/replay", {})
        assert status == 404 and "nosuch" in err["msg"]
        status, err = await api(inspector, "POST", "/api/requests/http", {"id": "nosuch"})
        assert status == 404 and "nosuch" in err["msg"]
        status, err = await api(inspector, "POST", "/api/requests/http",
                                {"id": record.id, "tunnel_name": "other"})  # fmt: skip
        assert status == 409 and "'other' has no local service" in err["msg"]
        status, err = await api(inspector, "POST", f"/api/requests/http/{record.id}/replay",
                                {"headers": [["Bad Name", "x"]]})  # fmt: skip
        assert status == 400 and "not a header name" in err["msg"]
        assert len(service.got) == 3  # nothing sent
        status, _ = await api(inspector, "DELETE", "/api/requests/http")
        assert status == 204 and inspector.store.list() == []


async def test_the_api_refuses_other_sites(relay: RelayServer, service: Service, tmp_path: Path) -> None:  # fmt: skip
    async with inspected(relay, service, tmp_path, plaintext=False) as inspector:
        # DNS rebinding: a page of evil.example resolved to 127.0.0.1 reads nothing.
        status, _ = await api(inspector, "GET", "/api/requests/http", headers={"Host": "evil.example:4040"})  # fmt: skip
        assert status == 403
        # A cross-site form cannot replay or clear.
        status, _ = await api(inspector, "POST", "/api/requests/http", {"id": "x"},
                              headers={"Content-Type": "text/plain"})  # fmt: skip
        assert status == 415
        status, _ = await api(inspector, "DELETE", "/api/requests/http",
                              headers={"Origin": "http://evil.example"})  # fmt: skip
        assert status == 403
        status, _ = await api(
            inspector, "GET", "/api/requests/http", headers={"Host": "localhost:1"}
        )
        assert status == 200


@pytest.mark.parametrize("plaintext", [False, True], ids=["sealed", "plain"])
async def test_an_upgraded_connection_passes_untouched_after_its_101(
    relay: RelayServer, tmp_path: Path, plaintext: bool
) -> None:
    """A WebSocket upgrade is captured up to its 101; what follows (here bytes that look
    like HTTP) passes both ways unchanged and is not taken for requests."""

    async def upgrading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\n")  # fmt: skip
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)  # an echo of the frames
                await writer.drain()
        writer.close()

    echo = Service()
    echo.server = await asyncio.start_server(upgrading, LOOPBACK, 0)
    echo.port = int(echo.server.sockets[0].getsockname()[1])
    assert relay.http_port
    try:
        async with inspected(relay, echo, tmp_path, plaintext=plaintext) as inspector:
            reader, writer = await asyncio.open_connection(LOOPBACK, relay.http_port)
            writer.write(req("GET", "/ws", extra="Upgrade: websocket\r\nConnection: Upgrade\r\n"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 101 ")
            frames = (b"GET /not-a-request HTTP/1.1\r\n\r\n" + bytes(range(256))) * 100
            writer.write(frames)
            assert await asyncio.wait_for(reader.readexactly(len(frames)), 10) == frames
            writer.close()
            (record,) = await settled(inspector, 1)
            assert record.exchange.request.start[1] == "/ws"
            assert record.exchange.response is not None
            assert record.exchange.response.start[1] == "101"
            await asyncio.sleep(0.1)
            assert len(inspector.store.list()) == 1  # the frames were not parsed as requests
    finally:
        await echo.close()


async def test_a_tunnel_nobody_inspects_is_not_tapped(
    relay: RelayServer, service: Service, tmp_path: Path
) -> None:
    """Capture pauses after ``idle`` with nobody looking; the API's next use resumes it."""
    assert relay.http_port
    async with inspected(relay, service, tmp_path, plaintext=False) as inspector:
        inspector.store.idle = 0.2
        await asyncio.sleep(1.3)  # the inspector's idle check runs every second
        assert not inspector.store.capturing
        await visit(relay.http_port, [req("GET", "/unseen")], len(Service.answer("/unseen", b"")))
        await asyncio.sleep(0.1)
        assert inspector.store.list() == [] and service.got[-1].startswith(b"GET /unseen")
        status, info = await api(inspector, "GET", "/api/inspect/status")
        assert status == 200 and info["capturing"] and info["paused"][0]["to"] is not None, info
        await visit(relay.http_port, [req("GET", "/seen")], len(Service.answer("/seen", b"")))
        (record,) = await settled(inspector, 1)
        assert record.exchange.request.start[1] == "/seen"


async def test_garbage_to_the_api_gets_a_400_and_the_api_goes_on(
    relay: RelayServer, service: Service, tmp_path: Path
) -> None:
    async with inspected(relay, service, tmp_path, plaintext=False) as inspector:
        for garbage in (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
                        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", b"X" * 70_000):  # fmt: skip
            reader, writer = await asyncio.open_connection(LOOPBACK, inspector.address[1])
            writer.write(garbage)
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
        status, listing = await api(inspector, "GET", "/api/requests/http")
        assert status == 200 and listing == {"uri": "/api/requests/http", "requests": []}


async def test_events_stream_tells_each_request_as_it_comes(
    relay: RelayServer, service: Service, tmp_path: Path
) -> None:
    assert relay.http_port
    async with inspected(relay, service, tmp_path, plaintext=False) as inspector:
        reader, writer = await asyncio.open_connection(LOOPBACK, inspector.address[1])
        writer.write(
            f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{inspector.address[1]}\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"text/event-stream" in head
        await visit(relay.http_port, [req("GET", "/live")], len(Service.answer("/live", b"")))
        seen: list[tuple[str, dict[str, Any]]] = []
        while len(seen) < 2:
            block = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
            lines = dict(line.split(": ", 1) for line in block.decode().strip().splitlines()
                         if not line.startswith(":"))  # fmt: skip
            if lines:
                seen.append((lines["event"], json.loads(lines["data"])))
        writer.close()
        assert [kind for kind, _ in seen] == ["request", "response"]
        assert (
            seen[1][1]["request"]["uri"] == "/live" and seen[1][1]["response"]["status_code"] == 200
        )


def test_expose_flags(tmp_path: Path) -> None:
    """--inspect/--no-inspect are for --http; a taken --inspect address is said plainly."""
    run = [sys.executable, "-m", "natkit.cli.main", "expose", "8080", "--relay", "127.0.0.1:1",
           "--token", TOKEN]  # fmt: skip
    p = subprocess.run(
        [*run, "--no-inspect"], capture_output=True, text=True, timeout=30, check=False
    )
    assert p.returncode == 2 and "--http" in p.stderr, p.stderr
    p = subprocess.run([*run, "--http", "--inspect", "nope"], capture_output=True, text=True,
                       timeout=30, check=False)  # fmt: skip
    assert p.returncode == 2 and "--inspect" in p.stderr, p.stderr
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        where = f"{LOOPBACK}:{taken.getsockname()[1]}"
        p = subprocess.run([*run, "--http", "--inspect", where, "--json"], capture_output=True,
                           text=True, timeout=30, check=False, env={**os.environ,
                           "NATKIT_STATE_DIR": str(tmp_path)})  # fmt: skip
    error = json.loads(p.stdout.strip().splitlines()[-1])
    assert p.returncode == 1 and error["event"] == "error", (p.stdout, p.stderr)
    assert error["message"] == (f"cannot serve the inspector on {where}: Address already in use; "
                                "choose another address with --inspect HOST:PORT, or --no-inspect")  # fmt: skip
