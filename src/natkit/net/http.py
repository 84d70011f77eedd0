"""A small, bounded HTTP/1.1 client for talking to routers (h11 does the framing).

Everything a LAN device sends is untrusted: the body size, the header size and the total
time are capped, redirects are refused, and every failure is a :class:`ProtocolError`.
This is the control path (a few small requests), so asyncio streams are fine here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import h11

from natkit.errors import ProtocolError

MAX_HEADER_BYTES = 16 * 1024


@dataclasses.dataclass(frozen=True)
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


async def request(
    host: str,
    port: int,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes = b"",
    *,
    max_body: int,
    timeout: float,
    local_addr: str | None = None,
) -> Response:
    """Send one request on a fresh connection and read the whole response, within bounds."""
    try:
        return await asyncio.wait_for(
            _request(host, port, method, target, headers, body, max_body, local_addr), timeout
        )
    except asyncio.TimeoutError:
        raise ProtocolError(
            f"{method} http://{host}:{port}{target}: no complete answer within {timeout:g} s"
        ) from None
    except OSError as exc:
        raise ProtocolError(
            f"{method} http://{host}:{port}{target}: {exc.strerror or exc}"
        ) from None


async def _request(
    host: str,
    port: int,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
    max_body: int,
    local_addr: str | None,
) -> Response:
    where = f"http://{host}:{port}{target}"
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
    names = {name.lower() for name, _ in headers}
    all_headers = list(headers)
    if "host" not in names:
        all_headers.insert(0, ("Host", f"{host}:{port}"))
    if body and "content-length" not in names:
        all_headers.append(("Content-Length", str(len(body))))
    reader, writer = await asyncio.open_connection(
        host, port, local_addr=(local_addr, 0) if local_addr else None, limit=MAX_HEADER_BYTES
    )
    try:
        data = conn.send(h11.Request(method=method, target=target, headers=all_headers))
        if body:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        writer.write(data)
        await writer.drain()
        status = 0
        resp_headers: list[tuple[str, str]] = []
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise ProtocolError(f"{where}: malformed HTTP response: {exc}") from None
            if event is h11.NEED_DATA:
                chunk = await reader.read(65536)
                try:
                    conn.receive_data(chunk)
                except h11.RemoteProtocolError as exc:
                    raise ProtocolError(f"{where}: malformed HTTP response: {exc}") from None
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                resp_headers = [
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers
                ]
                if 300 <= status < 400:
                    raise ProtocolError(f"{where}: redirect (HTTP {status}) refused")
                length = {k.lower(): v for k, v in resp_headers}.get("content-length")
                if length and length.isdigit() and int(length) > max_body:
                    raise ProtocolError(f"{where}: body of {length} bytes exceeds {max_body}")
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > max_body:
                    raise ProtocolError(f"{where}: body exceeds {max_body} bytes; refused")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return Response(status, resp_headers, b"".join(chunks))
            elif isinstance(event, h11.ConnectionClosed):
                raise ProtocolError(f"{where}: connection closed before a complete response")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
