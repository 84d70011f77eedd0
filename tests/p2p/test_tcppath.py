"""The direct TCP path for forwarded streams (natkit.p2p.tcppath), on loopback: a real
listening endpoint, real sockets, the sealed record path of the relay."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from natkit.p2p import tcppath
from natkit.p2p.forward import MAGIC, ForwardRefusedError
from natkit.p2p.tcppath import TcpDialer, TcpEndpoint, serve_tcp_forwards, usable_endpoints
from natkit.relay import seal, sealpump
from tests.p2p.test_attacks import ROOM, SECRET, CliPeer, Relay, peers, relay
from tests.p2p.test_forward import _service, digest_round_trip
from tests.p2p.test_session import bounded

__all__ = ["peers", "relay"]  # fixtures of the attack tests, used here too
KEY = tcppath.session_key("a-secret-of-the-two-peers", "nonce-a.nonce-b")


@pytest.fixture
async def endpoint() -> AsyncIterator[TcpEndpoint]:
    opened = TcpEndpoint.open(KEY, "127.0.0.1")
    yield opened
    opened.close()


async def forwarded_round_trip(
    sealed: sealpump.SealedSocket, service: asyncio.Task[bytes], size: int
) -> None:
    """:func:`digest_round_trip` through ``sealed`` as ``p2p connect`` bridges it: ``a`` is
    the local application, ``b`` what the forwarder accepted."""
    a, b = socket.socketpair()
    a.setblocking(False)
    pump = asyncio.ensure_future(tcppath.bridge_client(sealed, b))
    await digest_round_trip(a, service, size)
    await bounded(pump)
    a.close()


def _dialer(endpoint: TcpEndpoint, key: bytes = KEY) -> TcpDialer:
    return TcpDialer(key, endpoint.endpoints(["127.0.0.1"]))


async def test_a_forwarded_connection_runs_over_tcp_both_ways_with_half_close(
    endpoint: TcpEndpoint,
) -> None:
    listener, port, service = await _service()
    serving = asyncio.ensure_future(
        serve_tcp_forwards(endpoint, target_host="127.0.0.1", allowed={port})
    )
    sealed = await bounded(_dialer(endpoint).open(port))
    assert sealed is not None
    await forwarded_round_trip(sealed, service, 5 << 20)
    serving.cancel()
    listener.close()


async def test_a_port_the_listener_did_not_name_is_refused(endpoint: TcpEndpoint) -> None:
    listener, port, _ = await _service()
    serving = asyncio.ensure_future(
        serve_tcp_forwards(endpoint, target_host="127.0.0.1", allowed={port})
    )
    with pytest.raises(ForwardRefusedError, match="not allowed"):
        await bounded(_dialer(endpoint).open(port + 1 if port < 65535 else port - 1))
    serving.cancel()
    listener.close()


async def test_a_connection_under_another_key_is_dropped_unanswered(
    endpoint: TcpEndpoint,
) -> None:
    other = tcppath.session_key("a-secret-of-the-two-peers", "another.session")
    dialer = _dialer(endpoint, other)
    assert await bounded(dialer.open(80), tcppath.HANDSHAKE_TIMEOUT + 5) is None
    assert endpoint._ready.empty()  # nothing reached the forwarding side
    # ... and the endpoint still serves the right key.
    await _still_serves(endpoint)


async def _still_serves(endpoint: TcpEndpoint) -> None:
    listener, port, service = await _service()
    serving = asyncio.ensure_future(
        serve_tcp_forwards(endpoint, target_host="127.0.0.1", allowed={port})
    )
    sealed = await bounded(_dialer(endpoint).open(port))
    assert sealed is not None
    sealed.close()
    serving.cancel()
    listener.close()
    service.cancel()


def _recorded_opening(port: int) -> bytes:
    """What a dialer sends: the clear opening, then the sealed request."""
    nonce = os.urandom(seal.NONCE_SIZE)
    send_key, recv_key = tcppath._keys(KEY, nonce, seal.CHACHA)
    chan = seal.SealedChannel(send_key, recv_key, seal.CHACHA)
    chan.seal(tcppath._REQUEST.pack(MAGIC, port))
    return (
        tcppath.OPENING
        + seal.cipher_prefix(seal.CHACHA)
        + nonce
        + b"".join(bytes(part) for part in chan.take_output())
    )


async def _send_raw(endpoint: TcpEndpoint, data: bytes, *, end: bool = False) -> bytes:
    """Send ``data`` (then EOF with ``end``) on a fresh connection; what comes back before
    the listener closes it."""
    reader, writer = await bounded(asyncio.open_connection("127.0.0.1", endpoint.port))
    writer.write(data)
    if end:
        writer.write_eof()
    await writer.drain()
    got = await bounded(reader.read(), tcppath.HANDSHAKE_TIMEOUT + 5)
    writer.close()
    return got


async def test_a_replayed_connection_is_refused(endpoint: TcpEndpoint) -> None:
    listener, port, _ = await _service()
    serving = asyncio.ensure_future(
        serve_tcp_forwards(endpoint, target_host="127.0.0.1", allowed={port})
    )
    recorded = _recorded_opening(port)
    first = asyncio.ensure_future(_send_raw(endpoint, recorded))
    await asyncio.sleep(0.5)  # the first one is served (answered OK, then held open)
    assert await _send_raw(endpoint, recorded) == b""  # the replay: closed unanswered
    first.cancel()
    serving.cancel()
    listener.close()


@pytest.mark.parametrize(
    "garbage", [b"", b"GET / HTTP/1.1\r\n\r\n", tcppath.OPENING + b"S" + bytes(16) + bytes(64)]
)
async def test_garbage_is_dropped_and_the_endpoint_keeps_serving(
    endpoint: TcpEndpoint, garbage: bytes
) -> None:
    assert await _send_raw(endpoint, garbage, end=True) == b""
    await _still_serves(endpoint)


async def test_no_tcp_path_means_quic_at_once_for_the_next_streams() -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    dialer = TcpDialer(KEY, [("127.0.0.1", closed.getsockname()[1])])
    assert await bounded(dialer.open(80)) is None
    assert dialer.failed
    assert await dialer.open(80) is None  # no second attempt
    closed.close()


def test_announced_endpoints_are_filtered_by_scope_and_shape() -> None:
    announced = [["127.0.0.1", 1], ["192.168.1.2", 2], ["100.200.0.5", 3], ["fe80::1", 4],
                 ["not an ip", 5], ["100.200.0.6", 0], ["100.200.0.7", "8"], "x", ["8.8.8.8"]]  # fmt: skip
    assert usable_endpoints(announced, ["192.168.1.7"]) == [("192.168.1.2", 2), ("100.200.0.5", 3)]
    # A private endpoint of another network (the other side of two home routers) is not tried.
    assert usable_endpoints(announced, ["10.0.0.2"]) == [("100.200.0.5", 3)]
    assert usable_endpoints(announced, ["192.168.77.10"]) == [("100.200.0.5", 3)]
    assert usable_endpoints(announced, ["100.200.0.9"]) == [("100.200.0.5", 3)]
    assert usable_endpoints(announced, ["127.0.0.1"]) == [("127.0.0.1", 1), ("100.200.0.5", 3)]
    assert usable_endpoints({"a": 1}, ["127.0.0.1"]) == []
    assert len(usable_endpoints([["100.200.0.5", p] for p in range(1, 50)], [])) == 8


def _established_on(port: int) -> int:
    """TCP connections in this network namespace, established, whose local port is ``port``."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    count += 1
    return count


@pytest.mark.parametrize("tcp", [True, False])
async def test_p2p_connect_forwards_over_the_direct_tcp_path_else_quic(
    relay: Relay, tmp_path: Path, peers: list[CliPeer], tcp: bool
) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):  # as it comes, not at the end
            writer.write(data)
            await writer.drain()
        writer.close()

    service = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = service.sockets[0].getsockname()[1]
    no_tcp = [] if tcp else ["--no-tcp"]
    listener = await CliPeer.start(tmp_path, relay, "listen", ROOM, "--secret", SECRET,
                                   "--allow", str(port), *no_tcp)  # fmt: skip
    peers.append(listener)
    connector = await CliPeer.start(tmp_path, relay, "connect", ROOM, "--secret", SECRET,
                                    "--forward", f"0:{port}", *no_tcp)  # fmt: skip
    peers.append(connector)
    served, dialed = (
        (await listener.expect("ready"))["tcp"],
        (await connector.expect("ready"))["tcp"],
    )
    if tcp:
        assert isinstance(served, int)
        assert dialed == [f"127.0.0.1:{served}"]
    else:
        assert served is None and dialed is None
    host, _, local_port = (await connector.expect("forwarding"))["local"].rpartition(":")
    reader, writer = await bounded(asyncio.open_connection(host, int(local_port)))
    writer.write(b"through the peer")
    await writer.drain()
    assert await bounded(reader.readexactly(16)) == b"through the peer"
    if tcp:  # the forwarded connection is a TCP connection to the listener's port
        assert _established_on(served) == 1
    writer.write_eof()
    assert await bounded(reader.read()) == b""
    writer.close()
    service.close()


async def test_the_endpoint_that_answers_is_used_whatever_its_place(
    endpoint: TcpEndpoint,
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # refuses connections
    dead = ("127.0.0.1", closed.getsockname()[1])
    listener, port, service = await _service()
    serving = asyncio.ensure_future(
        serve_tcp_forwards(endpoint, target_host="127.0.0.1", allowed={port})
    )
    dialer = TcpDialer(KEY, [dead, ("127.0.0.1", endpoint.port)])
    sealed = await bounded(dialer.open(port))
    assert sealed is not None
    assert dialer.working == ("127.0.0.1", endpoint.port)
    sealed.close()
    serving.cancel()
    listener.close()
    service.cancel()
    closed.close()


async def test_an_endpoint_that_is_not_the_peer_costs_one_wait_then_quic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tcppath, "HANDSHAKE_TIMEOUT", 0.5)
    silent = socket.socket()  # accepts (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    dialer = TcpDialer(KEY, [("127.0.0.1", silent.getsockname()[1])])
    assert await bounded(dialer.open(80)) is None
    assert dialer.failed
    silent.close()


def test_the_tcp_key_is_new_for_every_session_and_secret() -> None:
    keys = {
        tcppath.session_key(secret, session)
        for secret in ("a-secret-of-the-two-peers", "another-secret-of-two-peers")
        for session in ("a.b", "a.c")
    }
    assert len(keys) == 4
    assert all(len(k) == seal.KEY_SIZE for k in keys)


async def test_forwards_during_the_route_search_share_it(endpoint: TcpEndpoint) -> None:
    """A warm-up and two forwards at once: one search (one route reported), every forward
    served on the route it found."""
    services = [await _service(), await _service()]
    allowed = {p for _, p, _ in services}
    serving = asyncio.ensure_future(
        serve_tcp_forwards(endpoint, target_host="127.0.0.1", allowed=allowed)
    )
    found: list[str] = []
    dialer = TcpDialer(KEY, endpoint.endpoints(["127.0.0.1"]), on_route=found.append)
    warm = asyncio.ensure_future(dialer.warm_up())
    opened = await bounded(asyncio.gather(*(dialer.open(p) for _, p, _ in services)))
    await bounded(warm)
    assert found == ["direct"]
    for sealed, (listener, _, service) in zip(opened, services, strict=True):
        assert sealed is not None
        await forwarded_round_trip(sealed, service, 1 << 16)
        listener.close()
    serving.cancel()
