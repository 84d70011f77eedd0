"""Port forwarding over a real P2P session on loopback (natkit.p2p.forward)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator

import pytest

from natkit.p2p.forward import ForwardRefusedError, open_forward, serve_forward, splice_stream
from natkit.p2p.paths import PathSwitch
from natkit.p2p.session import P2PSession
from tests.p2p.test_session import bounded, connect, stream_paths


@pytest.fixture
async def sessions() -> AsyncIterator[tuple[P2PSession, P2PSession]]:
    a, b = await stream_paths()
    client, server = await connect(PathSwitch(a), PathSwitch(b))
    yield client, server
    await client.close()
    await server.close()


async def _serve(server: P2PSession, allowed: tuple[int, ...]) -> None:
    while True:
        stream = await server.accept_stream()
        task = serve_forward(stream, target_host="127.0.0.1", allowed=allowed)
        asyncio.ensure_future(task)  # noqa: RUF006


async def _service(upper: bool = True) -> tuple[socket.socket, int, asyncio.Task[bytes]]:
    """A one-connection TCP service: reads to EOF, answers the sha256 (half-close), closes."""
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)

    async def one() -> bytes:
        conn, _ = await loop.sock_accept(listener)
        got = bytearray()
        while chunk := await loop.sock_recv(conn, 1 << 16):
            got += chunk
        await loop.sock_sendall(conn, hashlib.sha256(got).digest())
        conn.close()
        return bytes(got)

    return listener, listener.getsockname()[1], asyncio.ensure_future(one())


async def digest_round_trip(a: socket.socket, service: asyncio.Task[bytes], size: int) -> None:
    """Through ``a``: ``size`` random bytes and a half-close; the service's sha256 of them
    must come back, and the service must have seen them all."""
    loop = asyncio.get_running_loop()
    blob = os.urandom(size)
    await loop.sock_sendall(a, blob)
    a.shutdown(socket.SHUT_WR)  # the request ends; the answer still comes back
    answer = bytearray()
    while chunk := await bounded(loop.sock_recv(a, 1 << 16)):
        answer += chunk
    assert bytes(answer) == hashlib.sha256(blob).digest()
    assert await bounded(service) == blob


async def test_a_forwarded_connection_carries_bytes_both_ways_with_half_close(
    sessions: tuple[P2PSession, P2PSession],
) -> None:
    client, server = sessions
    listener, port, service = await _service()
    serving = asyncio.ensure_future(_serve(server, allowed=(port,)))
    a, b = socket.socketpair()  # a: the local application, b: what the forwarder accepted
    a.setblocking(False)
    stream = await bounded(open_forward(client, port))
    pump = asyncio.ensure_future(splice_stream(b, stream))
    await digest_round_trip(a, service, 3 << 20)
    await bounded(pump)
    serving.cancel()
    listener.close()
    a.close()


# An empty allow-list used to mean "every port of the target host" (issue 16).
@pytest.mark.parametrize("allowed", [(1,), ()], ids=["another-port", "no-port"])
async def test_a_port_outside_the_allowed_ones_is_refused(
    sessions: tuple[P2PSession, P2PSession], allowed: tuple[int, ...]
) -> None:
    client, server = sessions
    serving = asyncio.ensure_future(_serve(server, allowed=allowed))
    listener, port, service = await _service()
    with pytest.raises(ForwardRefusedError, match="not allowed"):
        await bounded(open_forward(client, port))
    service.cancel()
    serving.cancel()
    listener.close()


async def test_a_port_where_nothing_listens_is_reported(
    sessions: tuple[P2PSession, P2PSession],
) -> None:
    client, server = sessions
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]  # closed again: nothing listens there
    serving = asyncio.ensure_future(_serve(server, allowed=(free,)))
    with pytest.raises(ForwardRefusedError, match="nothing answers"):
        await bounded(open_forward(client, free))
    serving.cancel()
