"""The agent's local HTTP API (ngrok's ``web_addr``, 127.0.0.1:4040 by default): the calls
pyngrok makes, in the shapes it reads.

    GET/POST /api/tunnels, GET/DELETE /api/tunnels/NAME        (config v2)
    GET/POST /api/endpoints, GET/DELETE /api/endpoints/NAME    (config v3)
    GET /api/status
    GET/POST(replay)/DELETE /api/requests/http, GET /api/requests/http/ID

The captured requests are the HTTP inspector's (:mod:`natkit.inspect`): its store, its
JSON (:mod:`natkit.inspect.views`, ngrok's shape with the visitor's ``remote_addr``), its
replay (``POST`` answers 204 once the replay is checked and sends it in the background, as
ngrok's agent does). HTTP/1.1 framing is h11's. A request body is bounded, and so is the
time to send it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11

from natkit.compat.ngrok_agent.session import Session, TunnelExists
from natkit.compat.ngrok_agent.shapes import BadTunnel, tunnel_json, tunnel_request
from natkit.errors import NatkitError
from natkit.inspect.replay import BadChangesError
from natkit.inspect.views import record_json, records_json

log = logging.getLogger("natkit.ngrok")
MAX_BODY = 1 << 20
READ_TIMEOUT = 30.0
Answer = tuple[int, Any]


def _error(status: int, msg: str, code: int = 100) -> Answer:
    return status, {"error_code": code, "status_code": status, "msg": msg, "details": {"err": msg}}


class WebAPI:
    def __init__(self, session: Session) -> None:
        self.session = session
        self._server: asyncio.Server | None = None
        self.address = ""

    async def start(self, addr: str, *, move_on: bool) -> str:
        """Listen on ``addr`` (HOST:PORT); with ``move_on`` a taken port moves to the next
        (ngrok's own behaviour for its default 4040, so that two agents can run)."""
        host, _, port_text = addr.rpartition(":")
        host, port = host.strip("[]") or "127.0.0.1", int(port_text)
        for attempt in range(10 if move_on else 1):
            try:
                self._server = await asyncio.start_server(self._serve, host, port + attempt)
                break
            except OSError:
                if attempt == (9 if move_on else 0):
                    raise
        assert self._server is not None
        bound = self._server.sockets[0].getsockname()
        self.address = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    # ---- HTTP ---------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        try:
            while True:
                request, body = await asyncio.wait_for(_read_request(conn, reader), READ_TIMEOUT)
                if request is None:
                    break
                status, payload = await self.handle(
                    request.method.decode(), request.target.decode(), body
                )
                data = b"" if payload is None else json.dumps(payload).encode()
                headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
                writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
                writer.write(conn.send(h11.Data(data=data)) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, _TooLarge, asyncio.TimeoutError, OSError) as exc:
            if isinstance(exc, (h11.RemoteProtocolError, _TooLarge)):
                with contextlib.suppress(Exception):
                    writer.write(conn.send(h11.Response(status_code=400, headers=[])) or b"")
        finally:
            writer.close()

    # ---- the API ------------------------------------------------------------------------------

    async def handle(self, method: str, target: str, body: bytes) -> Answer:
        """The status and JSON answer of one call (errors in ngrok's shape)."""
        # The store's contract (it never pauses as the session makes it, but a store given
        # with an idle time would pause under an API in use without this).
        self.session.store.look()
        try:
            return await self._route(method, target, body)
        except NatkitError as exc:
            return _error(400, str(exc))
        except Exception as exc:  # a bug: answered, logged, the agent goes on
            log.exception("local API call failed")
            return _error(500, f"natkit-ngrok failed: {exc!r}")

    async def _route(self, method: str, target: str, body: bytes) -> Answer:
        parts = urlsplit(target)
        path = parts.path.rstrip("/")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        segments = path.split("/")[1:]  # ["api", ...]
        if not segments or segments[0] != "api":
            return _error(404, f"no such resource {path}")
        rest = segments[1:]
        if not rest:
            return 200, {"uri": "/api", "tunnels": "/api/tunnels", "endpoints": "/api/endpoints",
                         "requests": "/api/requests/http", "status": "/api/status"}  # fmt: skip
        if rest == ["status"] and method == "GET":
            return 200, self.session.status()
        if rest[0] in ("tunnels", "endpoints"):
            return await self._tunnels(method, rest[0], [unquote(s) for s in rest[1:]], body)
        if rest[:2] == ["requests", "http"]:
            return await self._requests(method, rest[2:], query, body)
        return _error(404 if method in ("GET", "DELETE") else 405, f"no such resource {path}")

    def _json(self, name: str, collection: str) -> dict[str, Any]:
        running = self.session.tunnels[name]
        return tunnel_json(running.request, running.spec.id, running.url, collection,
                           running.metrics())  # fmt: skip

    async def _tunnels(self, method: str, collection: str, rest: list[str], body: bytes) -> Answer:
        if not rest and method == "GET":
            return 200, {collection: [self._json(n, collection) for n in self.session.tunnels],
                         "uri": f"/api/{collection}"}  # fmt: skip
        if not rest and method == "POST":
            definition = _json_body(body)
            try:
                req = tunnel_request(definition, v3=collection == "endpoints")
                await self.session.open(req)
            except TunnelExists as exc:
                return _error(409, str(exc), 103)
            except BadTunnel as exc:
                return _error(400, str(exc), 102)
            except NatkitError as exc:
                return _error(502, str(exc), 104)
            return 201, self._json(req.name, collection)
        if len(rest) == 1 and method == "GET":
            if rest[0] not in self.session.tunnels:
                return _error(404, f"tunnel {rest[0]!r} not found")
            return 200, self._json(rest[0], collection)
        if len(rest) == 1 and method == "DELETE":
            if not await self.session.close_tunnel(rest[0]):
                return _error(404, f"tunnel {rest[0]!r} not found")
            return 204, None
        return _error(405, f"{method} is not served here")

    async def _requests(
        self, method: str, rest: list[str], query: dict[str, str], body: bytes
    ) -> Answer:
        store = self.session.store
        if not rest and method == "GET":
            limit_text = query.get("limit", "")
            limit = int(limit_text) if limit_text.isdigit() else None
            return 200, records_json(store.list(limit, query.get("tunnel_name") or None))
        if not rest and method == "DELETE":
            store.clear()
            return 204, None
        if not rest and method == "POST":
            args = _json_body(body)
            record_id, tunnel = args.get("id"), args.get("tunnel_name")
            try:
                store.replay_later(str(record_id or ""), str(tunnel) if tunnel else None)
            except KeyError:
                return _error(404, f"request {record_id!r} not found")
            except LookupError as exc:  # the tunnel was closed since
                return _error(409, f"{exc}: the request cannot be replayed")
            except BadChangesError as exc:
                return _error(400, str(exc))
            return 204, None
        if len(rest) == 1 and method == "GET":
            try:
                return 200, record_json(store.get(rest[0]))
            except KeyError:
                return _error(404, f"request {rest[0]!r} not found")
        return _error(405, f"{method} is not served here")


class _TooLarge(Exception):
    pass


def _json_body(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise BadTunnel(f"the request body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadTunnel("the request body must be a JSON object")
    return data


async def _read_request(
    conn: h11.Connection, reader: asyncio.StreamReader
) -> tuple[h11.Request | None, bytes]:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            conn.receive_data(data)
            if not data and request is None:
                return None, b""
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise _TooLarge()
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body)
        elif isinstance(event, (h11.ConnectionClosed, h11.PAUSED)):
            return None, b""
