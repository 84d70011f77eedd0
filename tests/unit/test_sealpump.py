"""The sealed data path (natkit.relay.sealpump) over real loopback TCP connections."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from natkit.errors import ProtocolError
from natkit.net.sockets import reset_on_close
from natkit.relay import messages as M
from natkit.relay import seal, sealpump
from natkit.relay.control import ticket_handle

START = M.encode(M.Start(tunnel="t0", visitor="100.200.0.3:40000"))


def _chunk(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    for s in (a, b):
        s.setblocking(False)
    return a, b


async def _sealed_pair() -> tuple[sealpump.SealedSocket, sealpump.SealedSocket]:
    """(agent side, relay side) of one sealed data connection, opened as the agent does."""
    key, ticket = os.urandom(seal.KEY_SIZE), "t-0123456789abcdef"
    a, b = _pair()
    agent, relay = await asyncio.gather(
        sealpump.open_sealed(a, key, ticket),
        sealpump.accept_sealed(b, {ticket_handle(ticket): (ticket, key)}.get),
    )
    return agent, relay


async def _recv_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 16):
        out += chunk
    return bytes(out)


async def _moved_whole(
    up: bytes, up_blob: bytes, down: bytes, down_blob: bytes,
    relay_bridge: Awaitable[tuple[int, int]], agent_bridge: Awaitable[tuple[int, int]],
) -> None:  # fmt: skip
    """Each way arrived whole, and each bridge counted what it moved."""
    assert hashlib.sha256(up).digest() == hashlib.sha256(up_blob).digest()
    assert hashlib.sha256(down).digest() == hashlib.sha256(down_blob).digest()
    assert await relay_bridge == (len(up_blob), len(down_blob))
    assert await agent_bridge == (len(down_blob), len(up_blob))


Body = Callable[[sealpump.SealedSocket, sealpump.SealedSocket], Awaitable[None]]


def run(tmp_path: Path, body: Body) -> None:
    async def main() -> None:
        client, server = await _sealed_pair()
        try:
            await asyncio.wait_for(body(client, server), 20)
        finally:
            client.close()
            server.close()

    asyncio.run(main())


def test_start_then_visitor_bytes_in_one_record_reach_the_service(tmp_path: Path) -> None:
    """START and the visitor's first chunk often arrive together: read_frame takes START
    only, and the bridge delivers the rest, already opened in the channel."""

    async def body(agent: sealpump.SealedSocket, relay: sealpump.SealedSocket) -> None:
        await sealpump.send_all(relay, START + _chunk(b"GET / HTTP/1.0\r\n\r\n") + _chunk(b""))
        msg = await sealpump.read_frame(agent)
        assert msg == M.Start(tunnel="t0", visitor="100.200.0.3:40000")
        service, service_far = _pair()
        bridge = asyncio.ensure_future(sealpump.bridge(agent, service))
        assert await _recv_all(service_far) == b"GET / HTTP/1.0\r\n\r\n"
        service_far.close()  # the service answers nothing and ends: an end mark goes back
        assert await sealpump.recv_sealed_exact(relay, 4) == _chunk(b"")
        assert await bridge == (0, 18)

    run(tmp_path, body)


@pytest.mark.parametrize(
    "data",
    [
        M.encode(M.Ping(t=1)),
        bytes([M.Start.TYPE, 0xFF, 0xFF, 0xFF]),  # larger than any frame
        bytes([0, 0, 0, 1]) + b"x",  # not a relay frame at all
        bytes([M.Start.TYPE, 0, 0, 2]) + b"[]",  # not an object
        START[:-2] + b"!}",  # not JSON
    ],
)
def test_read_frame_refuses_what_is_not_a_frame(tmp_path: Path, data: bytes) -> None:
    async def body(agent: sealpump.SealedSocket, relay: sealpump.SealedSocket) -> None:
        await sealpump.send_all(relay, data)
        with pytest.raises(ProtocolError):
            msg = await sealpump.read_frame(agent)
            if not isinstance(msg, M.Start):
                raise ProtocolError("not START")

    run(tmp_path, body)


def test_read_frame_on_a_connection_closed_mid_frame(tmp_path: Path) -> None:
    async def body(agent: sealpump.SealedSocket, relay: sealpump.SealedSocket) -> None:
        await sealpump.send_all(relay, START[:5])
        relay.close()
        with pytest.raises((ProtocolError, OSError)):
            await sealpump.read_frame(agent)

    run(tmp_path, body)


def test_both_bridges_move_a_big_stream_with_back_pressure_and_half_close(tmp_path: Path) -> None:
    """visitor -> relay bridge -> sealed -> agent bridge -> service and back, each way ending
    on its own (half-close), 8 MiB per direction, the service reading slowly."""
    up_blob, down_blob = os.urandom(8 << 20), os.urandom(8 << 20)

    async def body(agent: sealpump.SealedSocket, relay: sealpump.SealedSocket) -> None:
        loop = asyncio.get_running_loop()
        visitor_far, visitor = _pair()
        service, service_far = _pair()
        relay_bridge = asyncio.ensure_future(sealpump.bridge(relay, visitor, prefix=START))
        assert isinstance(await sealpump.read_frame(agent), M.Start)
        agent_bridge = asyncio.ensure_future(sealpump.bridge(agent, service))

        async def visitor_side() -> bytes:
            await loop.sock_sendall(visitor_far, up_blob)
            visitor_far.shutdown(socket.SHUT_WR)  # done sending, still reading
            return await _recv_all(visitor_far)

        async def service_side() -> bytes:
            got = bytearray()
            while chunk := await loop.sock_recv(service_far, 4096):
                got += chunk
                if len(got) % (1 << 20) < 4096:
                    await asyncio.sleep(0.005)  # a slow reader: the bridges must hold back
            await loop.sock_sendall(service_far, down_blob)  # answers after the request ended
            service_far.shutdown(socket.SHUT_WR)
            return bytes(got)

        down, up = await asyncio.gather(visitor_side(), service_side())
        await _moved_whole(up, up_blob, down, down_blob, relay_bridge, agent_bridge)
        visitor_far.close()
        service_far.close()

    run(tmp_path, body)


def test_both_ways_at_once_held_back_keep_what_the_socket_did_not_take(tmp_path: Path) -> None:
    """Both bridges seal at the same time (both far ends send 8 MiB at once and read
    slowly), so the sealed sockets fill while the other bridge seals on the same thread: the
    part of a record a socket did not take must survive the next record sealed in the
    thread's scratch buffer (seal_record's ciphertext lives there)."""
    up_blob, down_blob = os.urandom(8 << 20), os.urandom(8 << 20)

    async def slow_read(sock: socket.socket) -> bytes:
        loop = asyncio.get_running_loop()
        got = bytearray()
        while chunk := await loop.sock_recv(sock, 8192):
            got += chunk
            if len(got) % (1 << 19) < 8192:
                await asyncio.sleep(0.002)
        return bytes(got)

    async def send_then_end(sock: socket.socket, blob: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(sock, blob)
        sock.shutdown(socket.SHUT_WR)

    async def body(agent: sealpump.SealedSocket, relay: sealpump.SealedSocket) -> None:
        visitor_far, visitor = _pair()
        service, service_far = _pair()
        for sealed in (agent, relay):  # small buffers: the sealed sockets fill often
            sealed.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
            sealed.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        relay_bridge = asyncio.ensure_future(sealpump.bridge(relay, visitor, prefix=START))
        assert isinstance(await sealpump.read_frame(agent), M.Start)
        agent_bridge = asyncio.ensure_future(sealpump.bridge(agent, service))
        _, _, down, up = await asyncio.gather(
            send_then_end(visitor_far, up_blob),
            send_then_end(service_far, down_blob),
            slow_read(visitor_far),
            slow_read(service_far),
        )
        await _moved_whole(up, up_blob, down, down_blob, relay_bridge, agent_bridge)
        visitor_far.close()
        service_far.close()

    run(tmp_path, body)


def test_a_data_connection_cut_without_its_end_mark_resets_the_service(tmp_path: Path) -> None:
    async def body(agent: sealpump.SealedSocket, relay: sealpump.SealedSocket) -> None:
        loop = asyncio.get_running_loop()
        service, service_far = _pair()
        bridge = asyncio.ensure_future(sealpump.bridge(agent, service))
        await sealpump.send_all(relay, _chunk(b"partial"))
        relay.close()  # no end mark: a cut-off stream
        got = bytearray()
        with pytest.raises(ConnectionResetError):
            while chunk := await loop.sock_recv(service_far, 100):
                got += chunk
        assert got in (b"", b"partial")
        await bridge
        service_far.close()

    run(tmp_path, body)


def test_a_chunk_length_that_is_not_our_framing_drops_the_connection(tmp_path: Path) -> None:
    async def body(agent: sealpump.SealedSocket, relay: sealpump.SealedSocket) -> None:
        loop = asyncio.get_running_loop()
        service, service_far = _pair()
        bridge = asyncio.ensure_future(sealpump.bridge(agent, service))
        await sealpump.send_all(relay, b"\xff\xff\xff\xff")
        with pytest.raises(ConnectionResetError):
            await loop.sock_recv(service_far, 100)
        await bridge
        service_far.close()

    run(tmp_path, body)


def test_a_visitor_reset_reaches_the_far_side_as_a_reset(tmp_path: Path) -> None:
    async def body(agent: sealpump.SealedSocket, relay: sealpump.SealedSocket) -> None:
        loop = asyncio.get_running_loop()
        visitor_far, visitor = _pair()
        service, service_far = _pair()
        relay_bridge = asyncio.ensure_future(sealpump.bridge(relay, visitor))
        agent_bridge = asyncio.ensure_future(sealpump.bridge(agent, service))
        await loop.sock_sendall(visitor_far, b"hello")
        assert await loop.sock_recv(service_far, 100) == b"hello"
        reset_on_close(visitor_far)
        visitor_far.close()
        with pytest.raises(ConnectionResetError):
            while await loop.sock_recv(service_far, 100):
                pass
        await asyncio.gather(relay_bridge, agent_bridge)
        service_far.close()

    run(tmp_path, body)


def test_a_cleanly_ended_connection_carries_the_next_visitor(tmp_path: Path) -> None:
    """keep=True: after both end marks the sealed connection stays open, and the next START,
    sent right behind the end mark, is read from what the bridge set aside."""

    async def body(agent: sealpump.SealedSocket, relay: sealpump.SealedSocket) -> None:
        loop = asyncio.get_running_loop()
        for visitor in ("100.200.0.3:1", "100.200.0.3:2"):
            start = M.encode(M.Start(tunnel="t0", visitor=visitor))
            if visitor.endswith("1"):
                await sealpump.send_all(relay, start)
            assert (await sealpump.read_frame(agent)) == M.Start(tunnel="t0", visitor=visitor)
            service, service_far = _pair()
            bridge = asyncio.ensure_future(sealpump.bridge(agent, service, keep=True))
            nxt = M.encode(M.Start(tunnel="t0", visitor="100.200.0.3:2"))
            tail = nxt if visitor.endswith("1") else b""
            await sealpump.send_all(relay, _chunk(b"ping") + _chunk(b"") + tail)
            assert await _recv_all(service_far) == b"ping"
            await loop.sock_sendall(service_far, b"pong")
            service_far.close()
            assert await sealpump.recv_sealed_exact(relay, 12) == _chunk(b"pong") + _chunk(b"")
            assert await bridge == (4, 4)
            assert not agent.closed
        relay.close()
        with pytest.raises((ProtocolError, OSError)):
            await sealpump.read_frame(agent)

    run(tmp_path, body)


def test_without_keep_the_connection_is_closed_after_the_visitor(tmp_path: Path) -> None:
    async def body(agent: sealpump.SealedSocket, relay: sealpump.SealedSocket) -> None:
        service, service_far = _pair()
        bridge = asyncio.ensure_future(sealpump.bridge(agent, service))
        service_far.close()
        await sealpump.send_all(relay, _chunk(b""))
        await bridge
        assert agent.closed

    run(tmp_path, body)


def test_start_and_a_chunk_behind_an_end_mark_in_one_record_reach_the_next_visitor(
    tmp_path: Path,
) -> None:
    """One record may hold a visitor's end mark, the next START and that visitor's first
    chunk: read_frame takes START from what was set aside, the next bridge the chunk."""

    async def body(agent: sealpump.SealedSocket, relay: sealpump.SealedSocket) -> None:
        await sealpump.send_all(relay, START)
        assert isinstance(await sealpump.read_frame(agent), M.Start)
        first, first_far = _pair()
        bridge = asyncio.ensure_future(sealpump.bridge(agent, first, keep=True))
        nxt = M.encode(M.Start(tunnel="t0", visitor="100.200.0.3:2"))
        await sealpump.send_all(relay, _chunk(b"") + nxt + _chunk(b"second") + _chunk(b""))
        first_far.close()
        assert await bridge == (0, 0)
        assert (await sealpump.read_frame(agent)) == M.Start(tunnel="t0", visitor="100.200.0.3:2")
        second, second_far = _pair()
        bridge = asyncio.ensure_future(sealpump.bridge(agent, second, keep=True))
        assert await _recv_all(second_far) == b"second"
        second_far.close()
        assert await bridge == (0, 6)

    run(tmp_path, body)


def test_a_cancelled_bridge_resets_both_sides_and_lets_go_of_the_loop(tmp_path: Path) -> None:
    async def body(agent: sealpump.SealedSocket, relay: sealpump.SealedSocket) -> None:
        loop = asyncio.get_running_loop()
        service, service_far = _pair()
        fds = (agent.fileno(), service.fileno())
        bridge = asyncio.ensure_future(sealpump.bridge(agent, service))
        await asyncio.sleep(0.05)
        bridge.cancel()
        with pytest.raises(asyncio.CancelledError):
            await bridge
        assert service.fileno() == -1 and agent.closed
        selector = loop._selector  # type: ignore[attr-defined]
        assert all(fd not in selector.get_map() for fd in fds)
        with pytest.raises(ConnectionResetError):
            await loop.sock_recv(service_far, 10)
        with pytest.raises((ConnectionResetError, ProtocolError)):
            await sealpump.read_frame(relay)
        service_far.close()

    run(tmp_path, body)


# ---- the opening: a handle in clear, the ticket only under the seal ----------------------

TICKET = "t-0123456789abcdef"


def test_the_opening_names_the_ticket_by_its_handle_only() -> None:
    async def main() -> bytes:
        a, b = _pair()
        agent = await sealpump.open_sealed(a, os.urandom(seal.KEY_SIZE), TICKET)
        agent.close()
        return await _recv_all(b)

    wire = asyncio.run(main())
    handle = ticket_handle(TICKET)
    assert wire[:2] == b"S" + bytes([len(handle)])
    assert wire[2 : 2 + len(handle)] == handle.encode()
    assert seal.decode_opening(wire[: seal.opening_size(wire[:2])])[0] == handle
    assert TICKET.encode() not in wire  # neither the opening nor the sealed DATA shows it


def test_accept_sealed_asks_for_the_handle_and_refuses_an_unknown_one() -> None:
    asked: list[str] = []

    def key_for(handle: str) -> tuple[str, bytes] | None:
        asked.append(handle)
        return None

    async def main() -> None:
        a, b = _pair()
        try:
            await sealpump.open_sealed(a, os.urandom(seal.KEY_SIZE), TICKET)
            with pytest.raises(sealpump.UnknownTicketError):
                await asyncio.wait_for(sealpump.accept_sealed(b, key_for), 10)
        finally:
            a.close()
            b.close()

    asyncio.run(main())
    assert asked == [ticket_handle(TICKET)]
    assert issubclass(sealpump.UnknownTicketError, ProtocolError)


@pytest.mark.parametrize("wrong", ["ticket", "key"])
def test_accept_sealed_refuses_an_opening_that_does_not_open_under_the_ticket(
    wrong: str,
) -> None:
    """A handle lifted from the wire, replayed by someone without the ticket (or under
    another session's key): the DATA record does not open."""
    key = os.urandom(seal.KEY_SIZE)
    found = ("t-another-ticket-000", key) if wrong == "ticket" else (TICKET, os.urandom(32))

    async def main() -> None:
        a, b = _pair()
        try:
            await sealpump.open_sealed(a, key, TICKET)
            with pytest.raises(ProtocolError) as info:
                await asyncio.wait_for(sealpump.accept_sealed(b, lambda handle: found), 10)
            assert not isinstance(info.value, sealpump.UnknownTicketError)
        finally:
            a.close()
            b.close()

    asyncio.run(main())
