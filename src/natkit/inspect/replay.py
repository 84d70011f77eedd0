"""Replaying a captured request to the tunnel's local service, as sent or changed.

:func:`request_bytes` (pure) makes the bytes: the captured request exactly as it was on
the wire, or, with :class:`Changes`, a new request from its parts (method, target,
headers, body) with ``Content-Length`` set for the new body and any
``Transfer-Encoding`` dropped. :func:`replay` sends them on a new connection to the
service and captures the exchange like a visitor's, bounded in time and size.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Protocol

from natkit.errors import NatkitError
from natkit.inspect.exchange import TOKEN_RE, Message
from natkit.inspect.records import Record, Service
from natkit.inspect.tap import ConnectionTap, Sink

REPLAY_TIMEOUT = 30.0  # the whole exchange, connect to the response's last byte
_HOP_BY_HOP = {"content-length", "transfer-encoding"}


class ReplayError(NatkitError):
    """A replay could not be made or got no complete response."""


class BadChangesError(ReplayError):
    """The request cannot be sent as asked (the changes, or a request cut at the cap)."""


@dataclasses.dataclass
class Changes:
    """What a replay changes; None keeps the captured value."""

    method: str | None = None
    target: str | None = None  # the path and query
    headers: list[tuple[str, str]] | None = None  # the whole list (Content-Length is set)
    body: bytes | None = None


def request_bytes(request: Message, changes: Changes | None) -> bytes:
    """The request to send: the captured bytes, or the changed request."""
    if changes is None or changes == Changes():
        if request.truncated or not request.complete:
            raise BadChangesError("the captured request is incomplete (its body was over the cap)")
        return bytes(request.raw)
    method = changes.method if changes.method is not None else request.start[0]
    target = changes.target if changes.target is not None else request.start[1]
    headers = changes.headers if changes.headers is not None else request.headers
    if changes.body is not None:
        body = changes.body
    elif request.truncated:
        raise BadChangesError("the captured request body was cut at the cap: give a body")
    else:
        body = bytes(request.body)
    for text in (target, *(value for _, value in headers)):
        if any(c in text for c in "\r\n\0"):
            raise BadChangesError("a target or header value with a line break or NUL")
    if not TOKEN_RE.fullmatch(method) or not target or " " in target:
        raise BadChangesError(f"{method!r} {target!r}: a method is one word, a target has no space")
    bad = [name for name, _ in headers if not TOKEN_RE.fullmatch(name)]
    if bad:
        raise BadChangesError(f"not a header name: {bad[0][:40]!r}")
    lines = [f"{method} {target} {request.start[2]}"]
    lines += [f"{name}: {value}" for name, value in headers if name.lower() not in _HOP_BY_HOP]
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS", "TRACE"):
        lines.append(f"Content-Length: {len(body)}")
    try:
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError:
        raise BadChangesError(
            "HTTP/1.1 heads are Latin-1: a character beyond it was given"
        ) from None
    return head + body


class ReplaySink(Sink, Protocol):
    """A sink that knows where each tunnel's visitors go."""

    services: dict[str, Service]


async def replay(
    store: ReplaySink, record: Record, changes: Changes | None, tunnel: str | None = None
) -> Record:
    """Send ``record``'s request (changed by ``changes``) to its tunnel's service (or
    ``tunnel``'s) and capture the exchange in ``store``; returns the new record once its
    response is whole."""
    tunnel = tunnel or record.tunnel
    service = store.services.get(tunnel)
    if service is None:
        raise LookupError(f"tunnel {tunnel!r} has no local service now")
    data = request_bytes(record.exchange.request, changes)
    tap = ConnectionTap(store, tunnel, "replay", replay_of=record.id)
    try:
        await asyncio.wait_for(_exchange(service.host, service.port, data, tap), REPLAY_TIMEOUT)
    except asyncio.TimeoutError:
        tap.closed()
        tap.flush()
        raise ReplayError(f"no whole response within {REPLAY_TIMEOUT:g} s") from None
    if tap.first is None or tap.first.exchange.response is None:
        raise ReplayError(f"the service at {service.host}:{service.port} sent no response")
    return tap.first


async def _exchange(host: str, port: int, data: bytes, tap: ConnectionTap) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        tap.request(data)
        tap.flush()
        while tap.on:
            chunk = await reader.read(65536)
            if not chunk:
                tap.closed()
            else:
                tap.response(chunk)
            tap.flush()
            if not chunk or (tap.first is not None and tap.first.exchange.response is not None):
                break
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
