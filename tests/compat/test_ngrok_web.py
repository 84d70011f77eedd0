"""natkit-ngrok's local API without a relay: its routes and error shapes (what pyngrok
reads on failure), its HTTP layer on a real loopback socket (malformed and oversized
requests are answered 400, keep-alive works), and the captured requests it serves from the
inspector's store (pyngrok's CapturedRequest reads them; replay to a loopback service)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from natkit.compat.ngrok_agent.capture import TunnelCapture
from natkit.compat.ngrok_agent.config import Settings
from natkit.compat.ngrok_agent.logs import LogWriter
from natkit.compat.ngrok_agent.session import Session
from natkit.compat.ngrok_agent.web import MAX_BODY, WebAPI
from natkit.errors import RelayError
from natkit.inspect.records import Service


@pytest.fixture
async def web() -> AsyncIterator[WebAPI]:
    # A session that is never started: the routes that need no relay answer all the same.
    api = WebAPI(Session(Settings(relay="127.0.0.1:9", token="t" * 20), LogWriter("false")))
    yield api
    await api.close()


async def test_routes_that_need_no_relay(web: WebAPI) -> None:
    assert (await web.handle("GET", "/api", b""))[1]["tunnels"] == "/api/tunnels"
    status, body = await web.handle("GET", "/api/status", b"")
    assert status == 200 and body["status"] == "reconnecting" and body["uri"] == "/api/status"
    assert await web.handle("GET", "/api/tunnels", b"") == (
        200,
        {"tunnels": [], "uri": "/api/tunnels"},
    )
    assert await web.handle("GET", "/api/endpoints/", b"") == (
        200,
        {"endpoints": [], "uri": "/api/endpoints"},
    )
    assert await web.handle("GET", "/api/requests/http?limit=5", b"") == (
        200, {"uri": "/api/requests/http", "requests": []}
    )  # fmt: skip
    assert await web.handle("DELETE", "/api/requests/http", b"") == (204, None)


@pytest.mark.parametrize(
    ("method", "target", "body", "status", "words"),
    [
        ("GET", "/api/tunnels/nope", b"", 404, "not found"),
        ("DELETE", "/api/endpoints/nope", b"", 404, "not found"),
        ("GET", "/api/requests/http/nope", b"", 404, "not found"),
        ("POST", "/api/requests/http", b'{"id": "nope"}', 404, "not found"),
        ("POST", "/api/tunnels", b"{not json", 400, "not JSON"),
        ("POST", "/api/tunnels", b"[1]", 400, "JSON object"),
        ("POST", "/api/endpoints", b'{"upstream": {"url": "80"}, "oauth": {}}', 400, "OAuth"),
        ("PUT", "/api/tunnels", b"", 405, "not served"),
        ("GET", "/other", b"", 404, "no such resource"),
        ("GET", "/api/what", b"", 404, "no such resource"),
    ],
)
async def test_errors_have_ngroks_shape(
    web: WebAPI, method: str, target: str, body: bytes, status: int, words: str
) -> None:
    got, payload = await web.handle(method, target, body)
    assert got == status and payload["status_code"] == status and words in payload["msg"]
    assert set(payload) == {"error_code", "status_code", "msg", "details"}


async def test_a_tunnel_while_the_relay_is_away_is_a_502_after_the_wait(
    web: WebAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("natkit.compat.ngrok_agent.session.OPEN_TIMEOUT", 0.2)
    status, payload = await web.handle("POST", "/api/tunnels", b'{"addr": "8080", "name": "x"}')
    assert status == 502 and "did not open the tunnel" in payload["msg"]
    assert web.session.tunnels == {} and web.session.agent.tunnels == {}


async def _exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    got = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return got


async def test_the_http_layer(web: WebAPI) -> None:
    addr = await web.start("127.0.0.1:0", move_on=False)
    port = int(addr.rpartition(":")[2])
    two = (b"GET /api/tunnels HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /api/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # fmt: skip
    answer = await _exchange(port, two)
    assert answer.count(b"HTTP/1.1 200") == 2 and b'"tunnels": []' in answer
    assert (await _exchange(port, b"NOT HTTP AT ALL\r\n\r\n")).startswith(b"HTTP/1.1 400")
    big = b"POST /api/tunnels HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
    big += b"x" * (MAX_BODY + 1)
    assert (await _exchange(port, big)).startswith(b"HTTP/1.1 400")
    body = json.loads(
        (await _exchange(port, b"GET /api HTTP/1.0\r\n\r\n")).split(b"\r\n\r\n", 1)[1]
    )
    assert body["status"] == "/api/status"


async def test_a_taken_default_port_moves_on_a_chosen_one_does_not(web: WebAPI) -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    taken = int(blocker.sockets[0].getsockname()[1])
    try:
        with pytest.raises(OSError):
            await WebAPI(web.session).start(f"127.0.0.1:{taken}", move_on=False)
        moved = WebAPI(web.session)
        addr = await moved.start(f"127.0.0.1:{taken}", move_on=True)
        assert addr != f"127.0.0.1:{taken}"
        await moved.close()
    finally:
        blocker.close()


def test_a_session_needs_a_relay_and_a_token() -> None:
    with pytest.raises(RelayError, match="NATKIT_RELAY"):
        Session(Settings(token="t" * 20), LogWriter("false"))
    with pytest.raises(RelayError, match="add-authtoken"):
        Session(Settings(relay="r:1"), LogWriter("false"))


# ---- captured requests: the inspector's store, in ngrok's shape -----------------------------

REQUEST = b"POST /hook?n=1 HTTP/1.1\r\nHost: web.lab.test\r\ncontent-type: text/plain\r\nContent-Length: 2\r\n\r\nhi"  # fmt: skip
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n/hook"


async def _capture(web: WebAPI, log: LogWriter | None = None) -> TunnelCapture:
    """One visitor's exchange, as the agent's data path feeds a tunnel's tap."""
    capture = TunnelCapture(web.session.store, "web", log or LogWriter("false"))
    tap = capture.tap_for("198.51.100.7:40000")
    assert tap is not None  # natkit-ngrok's capture never pauses
    tap.request(REQUEST)
    tap.response(RESPONSE)
    await asyncio.sleep(0)  # the tap parses from call_soon
    return capture


async def test_captured_requests_in_the_shape_pyngrok_reads(web: WebAPI, tmp_path: Path) -> None:
    from pyngrok.agent import CapturedRequest  # a test dependency

    capture = await _capture(web, LogWriter(str(tmp_path / "agent.log")))
    assert capture.metrics() == {"conns": {"count": 1}, "http": {"count": 1}}
    (line,) = (tmp_path / "agent.log").read_text().splitlines()  # as ngrok logs each request
    assert 'msg="join connections"' in line and "r=198.51.100.7:40000" in line
    assert "method=POST" in line and 'path="/hook?n=1"' in line and 'status="200 OK"' in line
    status, listing = await web.handle("GET", "/api/requests/http?tunnel_name=web&limit=5", b"")
    assert status == 200 and listing["uri"] == "/api/requests/http"
    (captured,) = [CapturedRequest(r) for r in listing["requests"]]
    assert captured.tunnel_name == "web" and captured.remote_addr == "198.51.100.7"
    assert captured.uri == f"/api/requests/http/{captured.id}" and captured.start
    assert captured.duration is not None and captured.duration >= 0
    assert captured.request["method"] == "POST" and captured.request["uri"] == "/hook?n=1"
    assert captured.request["headers"]["Content-Type"] == ["text/plain"]  # Go's spelling
    assert base64.b64decode(captured.request["raw"]) == REQUEST
    assert captured.response["status"] == "200 OK" and captured.response["status_code"] == 200
    assert base64.b64decode(captured.response["raw"]) == RESPONSE
    assert (await web.handle("GET", f"/api/requests/http/{captured.id}", b""))[1] == captured.data
    _, other = await web.handle("GET", "/api/requests/http?tunnel_name=other", b"")
    assert other["requests"] == []


async def test_replay_is_answered_at_once_and_captured_anew(web: WebAPI) -> None:
    got: list[bytes] = []
    answered = asyncio.Event()

    async def service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.readexactly(len(REQUEST)))
        await answered.wait()  # the replay's answer comes after the API answered
        writer.write(RESPONSE)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(service, "127.0.0.1", 0)
    web.session.store.services["web"] = Service("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        await _capture(web)
        (original,) = web.session.store.list()
        body = json.dumps({"id": original.id, "tunnel_name": None}).encode()  # as pyngrok sends
        assert await web.handle("POST", "/api/requests/http", body) == (204, None)
        answered.set()
        for _ in range(250):
            if (
                len(web.session.store.list()) == 2
                and web.session.store.list()[0].duration is not None
            ):
                break
            await asyncio.sleep(0.02)
        again, first = web.session.store.list()
        assert got == [REQUEST] and first is original
        assert again.replay_of == original.id and again.tunnel == "web"
        assert (
            again.exchange.response is not None and bytes(again.exchange.response.raw) == RESPONSE
        )

        status, err = await web.handle(
            "POST",
            "/api/requests/http",
            json.dumps({"id": original.id, "tunnel_name": "gone"}).encode(),
        )
        assert status == 409 and "'gone' has no local service" in err["msg"]
        web.session.store.max_body = 1  # the next request's body is cut at the cap
        await _capture(web)
        status, err = await web.handle(
            "POST",
            "/api/requests/http",
            json.dumps({"id": web.session.store.list()[0].id}).encode(),
        )
        assert status == 400 and "incomplete" in err["msg"]
        assert got == [REQUEST]  # neither was sent
    finally:
        server.close()


async def test_each_api_call_counts_as_a_look_for_a_store_that_pauses() -> None:
    from natkit.inspect.store import CaptureStore

    store = CaptureStore(idle=0.0)  # pauses as soon as nobody looks
    session = Session(Settings(relay="127.0.0.1:9", token="t" * 20), LogWriter("false"), store)
    assert Session(session.settings, session.log).store.idle is None  # natkit-ngrok's own
    assert not store.check_idle()  # paused
    await WebAPI(session).handle("GET", "/api/requests/http", b"")
    assert store.capturing and store.paused[-1][1] is not None  # resumed by the call
