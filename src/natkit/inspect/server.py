"""The inspector's local web server: the page and the API over a :class:`CaptureStore`.

Routes (ngrok's agent API where it has one):

- ``GET /`` the page; ``GET /static/NAME`` its script and style (package data);
- ``GET /api/requests/http[?limit=N&tunnel_name=NAME]`` captured requests, newest first;
- ``GET /api/requests/http/ID`` one;
- ``POST /api/requests/http`` ``{"id": ID, "tunnel_name": NAME}`` replays it (to NAME's
  service when given): 204 at once, the replay goes on (as ngrok's);
- ``DELETE /api/requests/http`` forgets them all (204);
- ``POST /api/requests/http/ID/replay`` (natkit) replays with changes (``method``,
  ``uri``, ``headers``, ``body``/``body_base64``), answers the new record (201);
- ``GET /api/events`` (natkit) server-sent events: ``request``, ``response`` (a record's
  summary: no headers, no bytes), ``clear``, ``refused`` (a visitor the relay kept out);
- ``GET /api/refused`` (natkit) the visitors the relay refused (access policy), newest first;
- ``GET /api/tunnels`` the tunnels the inspector watches;
- ``GET /api/inspect/status`` (natkit) whether it captures, when it paused, the buffer.

Every request counts as someone looking (capture goes on, see :mod:`natkit.inspect.store`).

The server listens on loopback by default. A web page elsewhere must not read or drive
it: a request whose Host is not the inspector's own address (DNS rebinding) is refused,
and so is a POST or DELETE whose Origin is another site's or whose body is not JSON (a
cross-site form cannot send ``application/json`` without the browser asking first, and
nothing here answers that preflight).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from natkit.inspect.exchange import Message, RequestReader, Stop
from natkit.inspect.records import Record, Service
from natkit.inspect.replay import BadChangesError, ReplayError
from natkit.inspect.store import CaptureStore, Subscription
from natkit.inspect.views import (
    API_REQUESTS,
    changes_from_json,
    dumps,
    iso_time,
    record_json,
    records_json,
    refusal_json,
    summary_json,
)

log = logging.getLogger("natkit.inspect")
MAX_API_BODY = 2 * 1024 * 1024  # a replay's changed body fits
IDLE_TIMEOUT = 60.0  # a kept-alive API connection with no request for this long is closed
SSE_PING = 15.0  # a comment line this often keeps an event stream through idle proxies
IDLE_CHECK = 1.0  # how often to see whether anyone still looks
_STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
           "app.css": "text/css; charset=utf-8"}  # fmt: skip


@dataclasses.dataclass
class WatchedTunnel:
    name: str
    public_url: str
    service: Service


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Inspector:
    """The inspector of one agent's HTTP tunnels: the store, and the server once started."""

    def __init__(self, store: CaptureStore | None = None) -> None:
        self.store = store or CaptureStore()
        self.tunnels: dict[str, WatchedTunnel] = {}
        self.server: asyncio.Server | None = None
        self.address: tuple[str, int] = ("", 0)
        self._streams: set[Subscription] = set()
        self._idle_timer: asyncio.TimerHandle | None = None

    def watch(self, name: str, public_url: str, host: str, port: int) -> None:
        """Tunnel ``name`` (its public URL; visitors go to host:port) is captured."""
        service = Service(host, port)
        self.tunnels[name] = WatchedTunnel(name, public_url, service)
        self.store.services[name] = service

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def start(self, host: str = "127.0.0.1", port: int = 4040) -> None:
        """Listen on host:port (port 0: any). Raises OSError when it is taken."""
        self.server = await asyncio.start_server(self._client, host, port, limit=65536)
        sockname = self.server.sockets[0].getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        self._check_idle()

    def _check_idle(self) -> None:
        """Pause capture once nobody looks (open connections' taps stop too)."""
        self.store.check_idle()
        self._idle_timer = asyncio.get_running_loop().call_later(IDLE_CHECK, self._check_idle)

    async def close(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self.store.stop_replays()
        for sub in list(self._streams):
            sub.close()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    # -- connections ----------------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = RequestReader(max_body=MAX_API_BODY)
        pending: list[Message] = []
        try:
            while True:
                while not pending:
                    data = await asyncio.wait_for(reader.read(65536), IDLE_TIMEOUT)
                    if not data:
                        return
                    pending += parser.feed(data)
                request = pending.pop(0)
                keep = await self._answer(request, writer)
                if not keep:
                    return
        except Stop as exc:
            self._write(writer, 400, "text/plain", f"bad request: {exc}\n".encode(), keep=False)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, request: Message, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection ends after it."""
        keep = (
            request.start[2] == "HTTP/1.1"
            and (request.header("connection") or "").lower() != "close"
        )
        try:
            self._check_origin(request)
            self.store.look()  # someone looks: capture goes on (again)
            result = await self._route(request, writer)
        except _HTTPError as exc:
            body = dumps({"error_code": exc.status, "status_code": exc.status, "msg": str(exc)})
            self._write(writer, exc.status, "application/json", body, keep=keep)
            await writer.drain()
            return keep
        except (OSError, asyncio.CancelledError):
            raise
        except Exception:  # a bug: said once in the log, the page gets a 500, the server goes on
            log.exception("inspector: %s %s failed", request.start[0], request.start[1][:80])
            body = dumps({"error_code": 500, "status_code": 500, "msg": "internal error"})
            self._write(writer, 500, "application/json", body, keep=False)
            await writer.drain()
            return False
        if result is None:  # an event stream: it held the connection until it ended
            return False
        status, ctype, body = result
        self._write(writer, status, ctype, body, keep=keep)
        await writer.drain()
        return keep

    def _write(self, writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes, *,
               keep: bool) -> None:  # fmt: skip
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
                f"Content-Length: {len(body)}", "Cache-Control: no-store",
                "X-Content-Type-Options: nosniff", "Referrer-Policy: no-referrer"]  # fmt: skip
        if status != 204:
            head.append(f"Content-Type: {ctype}")
        else:
            head.pop(1)
            body = b""
        if ctype.startswith("text/html"):
            head.append("Content-Security-Policy: default-src 'self'; img-src 'self' data:; "
                        "frame-ancestors 'none'")  # fmt: skip
        if not keep:
            head.append("Connection: close")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)

    def _check_origin(self, request: Message) -> None:
        host = (request.header("host") or "").strip().lower()
        if not _host_allowed(host, self.address):
            raise _HTTPError(403, f"Host {host[:80]!r} is not this inspector's address")
        method = request.start[0]
        if method in ("GET", "HEAD"):
            return
        origin = request.header("origin")
        if origin is not None and origin.lower() not in (f"http://{host}", "null"):
            raise _HTTPError(403, "requests from another site's page are refused")
        if method == "POST":
            ctype = (request.header("content-type") or "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise _HTTPError(415, "send JSON (Content-Type: application/json)")

    # -- routes -----------------------------------------------------------------------------
    async def _route(
        self, request: Message, writer: asyncio.StreamWriter
    ) -> tuple[int, str, bytes] | None:
        method = request.start[0]
        url = urlsplit(request.start[1])
        path = url.path.rstrip("/") or "/"
        query = parse_qs(url.query)
        if path in ("/", "/inspect/http") and method == "GET":
            return 200, _STATIC["index.html"], _static("index.html")
        if path.startswith("/static/") and method == "GET":
            name = path.removeprefix("/static/")
            if name not in _STATIC:
                raise _HTTPError(404, "no such file")
            return 200, _STATIC[name], _static(name)
        if path == "/api/events" and method == "GET":
            await self._events(writer)
            return None
        if path == "/api/inspect/status" and method == "GET":
            store = self.store
            return 200, "application/json", dumps({
                "capturing": store.capturing, "idle": store.idle,
                "paused": [{"from": iso_time(a or 0), "to": iso_time(b) if b else None}
                           for a, b in store.paused],
                "records": len(store.list()), "bytes": store.bytes, "max_bytes": store.max_bytes,
                "max_body": store.max_body, "dropped": store.dropped,
                "refused": len(store.refusals)})  # fmt: skip
        if path == "/api/refused" and method == "GET":
            return (
                200,
                "application/json",
                dumps({"refused": [refusal_json(r) for r in reversed(self.store.refusals)]}),
            )
        if path == "/api/tunnels" and method == "GET":
            return 200, "application/json", dumps({"uri": "/api/tunnels", "tunnels": [
                {"name": t.name, "uri": f"/api/tunnels/{t.name}", "public_url": t.public_url,
                 "proto": t.public_url.split("://")[0],
                 "config": {"addr": f"http://{t.service.host}:{t.service.port}", "inspect": True}}
                for t in self.tunnels.values()]})  # fmt: skip
        if path == API_REQUESTS:
            if method == "GET":
                limit = _int_arg(query, "limit")
                tunnel = query.get("tunnel_name", [None])[0]
                return 200, "application/json", dumps(records_json(self.store.list(limit, tunnel)))
            if method == "DELETE":
                self.store.clear()
                return 204, "", b""
            if method == "POST":
                obj = _json_body(request)
                if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
                    raise _HTTPError(400, 'send {"id": ID, "tunnel_name": NAME}')
                tunnel = obj.get("tunnel_name")
                self._replay_later(obj["id"], tunnel if isinstance(tunnel, str) else None)
                return 204, "", b""
        prefix = API_REQUESTS + "/"
        if path.startswith(prefix):
            rest = path.removeprefix(prefix)
            if rest.endswith("/replay") and method == "POST":
                changes = self._changes(_json_body(request))
                made = await self._replay(rest.removesuffix("/replay"), changes)
                return 201, "application/json", dumps(record_json(made))
            if "/" not in rest and method == "GET":
                try:
                    return 200, "application/json", dumps(record_json(self.store.get(rest)))
                except KeyError:
                    raise _HTTPError(404, f"no captured request {rest[:40]!r}") from None
        raise _HTTPError(404 if method in ("GET", "POST", "DELETE") else 405, "no such route")

    def _changes(self, obj: Any) -> Any:
        try:
            return changes_from_json(obj)
        except ReplayError as exc:
            raise _HTTPError(400, str(exc)) from None

    def _replay_later(self, record_id: str, tunnel: str | None) -> None:
        """ngrok's replay: checked now (404, 409, 400), answered 204, sent after."""
        try:
            self.store.replay_later(record_id, tunnel)
        except KeyError:
            raise _HTTPError(404, f"no captured request {record_id[:40]!r}") from None
        except LookupError as exc:
            raise _HTTPError(409, str(exc)) from None
        except BadChangesError as exc:
            raise _HTTPError(400, str(exc)) from None

    async def _replay(self, record_id: str, changes: Any) -> Any:
        try:
            return await self.store.replay(record_id, changes)
        except KeyError:
            raise _HTTPError(404, f"no captured request {record_id[:40]!r}") from None
        except LookupError as exc:
            raise _HTTPError(409, str(exc)) from None
        except BadChangesError as exc:
            raise _HTTPError(400, str(exc)) from None
        except ReplayError as exc:
            raise _HTTPError(502, str(exc)) from None
        except OSError as exc:
            raise _HTTPError(502, f"the local service: {exc.strerror or exc}") from None

    async def _events(self, writer: asyncio.StreamWriter) -> None:
        """Server-sent events until the page goes away (or falls too far behind)."""
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Cache-Control: no-store\r\nConnection: close\r\n\r\n: natkit\n\n")  # fmt: skip
        sub = self.store.subscribe()
        self._streams.add(sub)
        try:
            await writer.drain()
            while True:
                try:
                    kind, record = await asyncio.wait_for(sub.get(), SSE_PING)
                except asyncio.TimeoutError:
                    writer.write(b": ping\n\n")
                    await writer.drain()
                    continue
                except EOFError:
                    return
                if record is None:
                    data = b"{}"
                elif isinstance(record, Record):
                    data = dumps(summary_json(record))
                else:
                    data = dumps(refusal_json(record))
                writer.write(b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n")
                await writer.drain()
        finally:
            self._streams.discard(sub)
            sub.close()


def _host_allowed(host: str, address: tuple[str, int]) -> bool:
    """Is ``host`` (a Host header) a name of the inspector's own address? On loopback only
    loopback names are; bound elsewhere, any name is (the user chose to publish it)."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    try:
        bound = ipaddress.ip_address(address[0])
    except ValueError:
        return True
    if not bound.is_loopback:
        return True
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _json_body(request: Message) -> Any:
    try:
        return json.loads(bytes(request.body) or b"null")
    except (ValueError, UnicodeDecodeError):
        raise _HTTPError(400, "the body is not JSON") from None


def _int_arg(query: dict[str, list[str]], name: str) -> int | None:
    values = query.get(name)
    if not values:
        return None
    if not values[0].isdigit():
        raise _HTTPError(400, f"{name} must be a number")
    return int(values[0])


def _static(name: str) -> bytes:
    return resources.files("natkit.inspect").joinpath("static").joinpath(name).read_bytes()


_REASONS = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
            415: "Unsupported Media Type", 500: "Internal Server Error", 502: "Bad Gateway"}  # fmt: skip

__all__ = ["Inspector", "WatchedTunnel"]
