"""Captured HTTP requests of the agent's http tunnels, in the shapes of ngrok's
``/api/requests/http``, and their replay.

An http tunnel with inspection on is pointed at a :class:`CaptureProxy` on loopback, which
passes every byte to the service unchanged and records each request and response on the
way (:mod:`.httpsplit` finds where they begin and end). The records go to a
:class:`CaptureStore`: a ring buffer capped in bytes here, an interface so that the HTTP
inspector's own store can take its place. A replay sends the recorded request through the
same proxy again, so it is recorded as a new request, as ngrok does.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import datetime
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from natkit.compat.ngrok_agent.httpsplit import Message, Splitter
from natkit.errors import NatkitError
from natkit.net.sockets import reset_on_close

log = logging.getLogger("natkit.ngrok")
CONNECT_TIMEOUT = 10.0
REPLAY_TIMEOUT = 30.0
MAX_PENDING = 100  # requests of one connection waiting for their responses, recorded
_READ = 256 * 1024


@dataclasses.dataclass
class Exchange:
    """One request through a tunnel and (once it came) its response."""

    id: str
    tunnel_name: str
    remote_addr: str
    started: float  # wall clock, seconds
    request: Message
    response: Message | None = None
    duration_ns: int = 0
    _t0: float = dataclasses.field(default_factory=time.monotonic, repr=False)

    @property
    def size(self) -> int:
        """What this record holds in memory (about): for the store's byte cap."""
        return len(self.request.raw) + (len(self.response.raw) if self.response else 0)

    def answered(self, response: Message) -> None:
        self.response = response
        self.duration_ns = int((time.monotonic() - self._t0) * 1e9)


class CaptureStore(Protocol):
    """Where captured requests are kept (this module's :class:`RingStore`, or the HTTP
    inspector's store behind the same four calls)."""

    def add(self, exchange: Exchange) -> None: ...

    def updated(self, exchange: Exchange) -> None: ...

    def list(self, tunnel_name: str | None = None, limit: int | None = None) -> list[Exchange]: ...

    def get(self, exchange_id: str) -> Exchange | None: ...

    def clear(self) -> None: ...


class RingStore:
    """The newest requests, at most ``max_bytes`` of them (and ``max_entries``): the oldest
    go first."""

    def __init__(self, max_bytes: int = 32 << 20, max_entries: int = 1000) -> None:
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._items: collections.OrderedDict[str, Exchange] = collections.OrderedDict()
        self._sizes: dict[str, int] = {}
        self._bytes = 0

    def add(self, exchange: Exchange) -> None:
        self._items[exchange.id] = exchange
        self._account(exchange)

    def updated(self, exchange: Exchange) -> None:
        if exchange.id in self._items:
            self._account(exchange)

    def _account(self, exchange: Exchange) -> None:
        self._bytes += exchange.size - self._sizes.get(exchange.id, 0)
        self._sizes[exchange.id] = exchange.size
        while self._items and (self._bytes > self.max_bytes or len(self._items) > self.max_entries):
            old, _ = self._items.popitem(last=False)
            self._bytes -= self._sizes.pop(old)

    def list(self, tunnel_name: str | None = None, limit: int | None = None) -> list[Exchange]:
        """Newest first, as ngrok lists them."""
        found = [e for e in reversed(self._items.values())
                 if tunnel_name is None or e.tunnel_name == tunnel_name]  # fmt: skip
        return found if limit is None else found[:limit]

    def get(self, exchange_id: str) -> Exchange | None:
        return self._items.get(exchange_id)

    def clear(self) -> None:
        self._items.clear()
        self._sizes.clear()
        self._bytes = 0


_ids = itertools.count(1)
_ID_PREFIX = secrets.token_hex(4)


def new_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):08x}"


# ---- ngrok's JSON shapes ---------------------------------------------------------------------


def _headers(msg: Message) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for name, value in msg.headers:
        grouped.setdefault("-".join(p.capitalize() for p in name.split("-")), []).append(value)
    return grouped


def exchange_json(e: Exchange) -> dict[str, Any]:
    method, target, proto = [*e.request.start_line.split(" ", 2), "", ""][:3]
    started = datetime.datetime.fromtimestamp(e.started, datetime.timezone.utc)
    out: dict[str, Any] = {
        "uri": f"/api/requests/http/{e.id}",
        "id": e.id,
        "tunnel_name": e.tunnel_name,
        "remote_addr": e.remote_addr,
        "start": started.isoformat(timespec="microseconds"),
        "duration": e.duration_ns,
        "request": {
            "method": method,
            "proto": proto,
            "headers": _headers(e.request),
            "uri": target,
            "raw": base64.b64encode(e.request.raw).decode(),
            "body_size": e.request.body_size,  # natkit's: the raw body may be cut short
        },
        "response": None,
    }
    if e.response is not None:
        proto, _, status = e.response.start_line.partition(" ")
        code = status.split(" ", 1)[0]
        out["response"] = {
            "status": status,
            "status_code": int(code) if code.isdigit() else 0,
            "proto": proto,
            "headers": _headers(e.response),
            "raw": base64.b64encode(e.response.raw).decode(),
            "body_size": e.response.body_size,
        }
    return out


# ---- the proxy -------------------------------------------------------------------------------


class CaptureProxy:
    """A loopback listener in front of the service at ``upstream``: bytes pass unchanged,
    each request and response is recorded in ``store`` under ``tunnel_name``."""

    def __init__(
        self,
        upstream: tuple[str, int],
        tunnel_name: str,
        store: CaptureStore,
        on_exchange: Callable[[Exchange], None] | None = None,
    ) -> None:
        self.upstream, self.tunnel_name, self.store = upstream, tunnel_name, store
        self.on_exchange = on_exchange
        self.port = 0
        self.connections = 0  # visitors carried so far (the tunnel's conns count)
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._carry(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), CONNECT_TIMEOUT
            )
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("service %s:%d unreachable: %s", *self.upstream, exc)
            _reset(writer)  # the visitor sees a reset, as without the proxy
            return
        requests, responses = Splitter("request"), Splitter("response")
        pending: collections.deque[Exchange] = collections.deque()

        def on_requests(messages: Iterable[Message]) -> None:
            for msg in messages:
                if len(pending) >= MAX_PENDING:  # a service that reads and never answers
                    requests.failed = f"over {MAX_PENDING} requests without a response"
                    return
                e = Exchange(new_id(), self.tunnel_name, "", time.time(), msg)
                responses.expect(msg.start_line.split(" ", 1)[0])
                pending.append(e)
                self.requests += 1
                self.store.add(e)

        def on_responses(messages: Iterable[Message]) -> None:
            for msg in messages:
                if not pending:
                    return
                e = pending.popleft()
                e.answered(msg)
                self.store.updated(e)
                if self.on_exchange is not None:
                    self.on_exchange(e)

        try:
            await asyncio.gather(
                _pump(reader, up_writer, requests, on_requests),
                _pump(up_reader, writer, responses, on_responses),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, up_writer):
                w.close()


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    splitter: Splitter,
    done: Callable[[list[Message]], None],
) -> None:
    """Copy ``reader`` to ``writer`` until EOF (then half-close), splitting on the way."""
    try:
        while data := await reader.read(_READ):
            writer.write(data)
            splitter.feed(data)
            if splitter.messages:
                done(splitter.messages)
                splitter.messages = []
            await writer.drain()
        splitter.close()
        if splitter.messages:
            done(splitter.messages)
            splitter.messages = []
        if writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()
    except OSError:
        _reset(writer)  # an abrupt end is passed on as one
        raise


def _reset(writer: asyncio.StreamWriter) -> None:
    reset_on_close(writer.get_extra_info("socket"))
    writer.transport.abort()


async def replay(exchange: Exchange, proxy: CaptureProxy) -> None:
    """Send ``exchange``'s request again through ``proxy`` (so it is recorded anew) and
    wait for the service's response."""
    if not exchange.request.complete:
        raise NatkitError(
            f"request {exchange.id}'s body was not captured whole "
            f"({len(exchange.request.body)} of {exchange.request.body_size} bytes): "
            "it cannot be replayed"
        )
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", proxy.port), CONNECT_TIMEOUT
    )
    try:
        writer.write(exchange.request.raw)
        responses = Splitter("response")
        responses.expect(exchange.request.start_line.split(" ", 1)[0])
        await asyncio.wait_for(_one_response(reader, responses), REPLAY_TIMEOUT)
    finally:
        writer.close()


async def _one_response(reader: asyncio.StreamReader, responses: Splitter) -> None:
    while not responses.messages and not responses.failed:
        data = await reader.read(_READ)
        if not data:
            return
        responses.feed(data)
