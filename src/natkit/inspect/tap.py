"""The tap on one visitor connection of an HTTP tunnel.

The data path (:mod:`natkit.relay.pump`, :mod:`natkit.relay.sealpump`) calls ``request``
with the bytes it passed to the service and ``response`` with those it passed back,
right after moving them, and ``closed`` at the end. The tap only copies them and asks for
one parse soon (``loop.call_soon``): the pump's callback returns at once, and the bytes of
one loop iteration are parsed together, after the pumps have moved them. Once the parser
gives the connection up (not HTTP, upgraded, a body over the cap), ``on`` is False and the
pumps stop calling (the splice path then goes back to splicing without a look).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from natkit.inspect.exchange import Exchange, ExchangeParser
from natkit.inspect.records import Record

_REQUEST, _RESPONSE, _CLOSED = 0, 1, 2


class Sink(Protocol):
    """Where a tap's records go (:class:`natkit.inspect.store.CaptureStore`)."""

    max_body: int

    def new_id(self) -> str: ...

    def add(self, record: Record) -> None: ...

    def completed(self, record: Record) -> None: ...

    def check_idle(self) -> bool: ...

    def tapped(self, tap: ConnectionTap) -> None: ...


class ConnectionTap:
    __slots__ = ("__weakref__", "_chunks", "_loop", "_parser", "_records", "_scheduled",
                 "first", "on", "replay_of", "store", "tunnel", "visitor")  # fmt: skip

    def __init__(self, store: Sink, tunnel: str, visitor: str, replay_of: str = "") -> None:
        self.store, self.tunnel, self.visitor = store, tunnel, visitor
        self.replay_of = replay_of
        self.first: Record | None = None  # the connection's first record (a replay's)
        self.on = True
        self._loop = asyncio.get_running_loop()
        self._parser = ExchangeParser(max_body=store.max_body)
        self._chunks: list[tuple[int, bytes, float]] = []
        self._scheduled = False
        self._records: dict[int, Record] = {}  # id(exchange) -> its record, until answered

    # -- called by the pumps (the hot path: copy and return) ------------------------------
    def request(self, data: bytes | memoryview) -> None:
        if self.on:
            self._chunks.append((_REQUEST, bytes(data), time.time()))
            self._schedule()

    def response(self, data: bytes | memoryview) -> None:
        if self.on:
            self._chunks.append((_RESPONSE, bytes(data), time.time()))
            self._schedule()

    def closed(self) -> None:
        if self.on:
            self._chunks.append((_CLOSED, b"", time.time()))
            self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._parse)

    # -- off the hot path ---------------------------------------------------------------
    def flush(self) -> None:
        """Parse what was tapped now (a replay waits for its response this way)."""
        self._parse()

    def _parse(self) -> None:
        self._scheduled = False
        chunks, self._chunks = self._chunks, []
        parser = self._parser
        for direction, data, now in chunks:
            if direction == _REQUEST:
                parser.request_data(data, now)
            elif direction == _RESPONSE:
                parser.response_data(data, now)
            else:
                parser.closed(now)
            for kind, exchange in parser.events():
                self._record(kind, exchange)
            if not parser.following:
                self._give_up(parser.stopped)
                return

    def _record(self, kind: str, exchange: Exchange) -> None:
        if kind == "request":
            record = Record(self.store.new_id(), self.tunnel, self.visitor, exchange,
                            wall_start=exchange.request.started, replay_of=self.replay_of)  # fmt: skip
            if exchange.request.truncated:
                record.note = f"request body over {self.store.max_body} bytes: capture stopped"
            self._records[id(exchange)] = record
            if self.first is None:
                self.first = record
            self.store.add(record)
            return
        record = self._records.pop(id(exchange))
        response = exchange.response
        if response is not None and response.truncated:
            record.note = f"response body over {self.store.max_body} bytes: capture stopped"
        self.store.completed(record)

    def stop(self, why: str) -> None:
        """Stop capturing this connection (capture paused): what was whole is kept."""
        if self.on:
            self._parse()
            if self.on:
                self._give_up(why)

    def _give_up(self, why: str) -> None:
        """Stop following: the records still waiting for a response say why."""
        self.on = False
        self._chunks = []
        for record in self._records.values():
            if not record.note:
                record.note = f"no response captured: {why}"
            self.store.completed(record)
        self._records.clear()


TapFactory = Callable[[str], "ConnectionTap | None"]


def tap_factory(store: Sink, tunnel: str) -> TapFactory:
    """What the agent calls with each visitor's address to get that connection's tap (None
    while capture is paused)."""

    def make(visitor: str) -> ConnectionTap | None:
        if not store.check_idle():
            return None  # nobody is looking: this connection costs nothing
        tap = ConnectionTap(store, tunnel, visitor)
        store.tapped(tap)
        return tap

    return make


__all__ = ["ConnectionTap", "TapFactory", "tap_factory"]
