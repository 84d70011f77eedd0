"""natkit-ngrok's capture proxy for real on loopback (asyncio, no relay): bytes pass
unchanged both ways, keep-alive and pipelined requests are paired with their responses,
chunked bodies, an upgrade passes what follows untouched, a service that is down resets the
visitor, the store's byte cap, and replay through the proxy (recorded anew)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from natkit.compat.ngrok_agent.capture import (
    CaptureProxy,
    Exchange,
    RingStore,
    exchange_json,
    new_id,
    replay,
)
from natkit.compat.ngrok_agent.httpsplit import Splitter
from natkit.errors import NatkitError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


async def keep_alive_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each request on the connection: chunked for /chunked, else a length."""
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ")[1]
            if b"Content-Length: " in head:
                await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
            if target == b"/chunked":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\n0\r\n\r\n")  # fmt: skip
            else:
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(target), target)
                )
            await writer.drain()
    writer.close()


async def test_keep_alive_and_pipelined_requests_are_paired_and_bytes_unchanged() -> None:
    store = RingStore()
    async with serving(keep_alive_service) as port:
        proxy = CaptureProxy(("127.0.0.1", port), "web", store)
        await proxy.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        sent = (b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n"
                b"POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
                b"GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n")  # fmt: skip
        writer.write(sent)
        expected = (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n/one"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n/two"
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")  # fmt: skip
        assert await asyncio.wait_for(reader.readexactly(len(expected)), 5) == expected
        writer.close()
        await proxy.close()
    records = store.list()
    assert [e.request.start_line for e in records] == [
        "GET /chunked HTTP/1.1", "POST /two HTTP/1.1", "GET /one HTTP/1.1"
    ]  # newest first  # fmt: skip
    assert [e.response.body if e.response else None for e in records] == [
        b"5\r\nhello\r\n0\r\n\r\n", b"/two", b"/one"
    ]  # fmt: skip
    assert records[1].request.body == b"abc"
    assert proxy.connections == 1 and proxy.requests == 3
    data = exchange_json(records[1])
    assert data["request"]["method"] == "POST" and data["response"]["status_code"] == 200
    assert data["request"]["headers"]["Content-Length"] == ["3"]


async def test_an_upgrade_passes_what_follows_untouched() -> None:
    async def upgrading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
        writer.write(await reader.readexactly(6))  # echo frames as they are
        await writer.drain()
        writer.close()

    store = RingStore()
    async with serving(upgrading) as port:
        proxy = CaptureProxy(("127.0.0.1", port), "ws", store)
        await proxy.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        writer.write(b"\x81\x04ping")
        assert await asyncio.wait_for(reader.readexactly(6), 5) == b"\x81\x04ping"
        writer.close()
        await proxy.close()
    (record,) = store.list()
    assert record.response is not None and record.response.start_line.startswith("HTTP/1.1 101")


async def test_a_service_that_is_down_resets_the_visitor() -> None:
    async with serving(keep_alive_service) as port:
        pass  # closed: nothing listens on the port now
    proxy = CaptureProxy(("127.0.0.1", port), "down", RingStore())
    await proxy.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(100), 5)
    writer.close()
    await proxy.close()


async def test_replay_sends_the_request_again_and_is_recorded() -> None:
    store = RingStore()
    async with serving(keep_alive_service) as port:
        proxy = CaptureProxy(("127.0.0.1", port), "web", store)
        await proxy.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /hook HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi")
        await asyncio.wait_for(
            reader.readexactly(len(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n/hook")), 5
        )
        writer.close()
        (original,) = store.list()
        await replay(original, proxy)
        again, first = store.list()
        assert first is original and again.id != original.id
        assert again.request.raw == original.request.raw and again.response is not None
        assert again.response.body == b"/hook"
        await proxy.close()


async def test_a_request_cut_short_is_not_replayed() -> None:
    s = Splitter("request", body_limit=2)
    s.feed(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd")
    cut = Exchange(new_id(), "web", "", 0.0, s.messages[0])
    proxy = CaptureProxy(("127.0.0.1", 9), "web", RingStore())
    with pytest.raises(NatkitError, match="2 of 4 bytes"):
        await replay(cut, proxy)


def test_the_store_keeps_the_newest_within_its_byte_cap() -> None:
    store = RingStore(max_bytes=260, max_entries=100)  # 84 bytes each
    for n in range(5):
        s = Splitter("request")
        s.feed(b"GET /%d HTTP/1.1\r\nX: %s\r\n\r\n" % (n, b"y" * 60))
        store.add(Exchange(f"id{n}", "t", "", 0.0, s.messages[0]))
    assert [e.id for e in store.list()] == ["id4", "id3", "id2"]
    assert store.get("id0") is None and store.list(limit=1)[0].id == "id4"
    assert store.list(tunnel_name="other") == []
    store.clear()
    assert store.list() == []
