"""Two P2PSessions on loopback: over UDP, over a relay-like stream, over aioice, and both
with the path cut under a running transfer. Waits are bounded only against hanging."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aioice
import pytest

from natkit.errors import NatkitError
from natkit.p2p.auth import PeerIdentity
from natkit.p2p.errors import P2PAuthError, P2PClosedError, P2PError, P2PStreamError
from natkit.p2p.paths import IcePath, Liveness, PathEvent, PathSwitch, StreamPath, UdpPath
from natkit.p2p.quicconn import PEER_STREAMS
from natkit.p2p.session import P2PSession, SessionConfig
from natkit.p2p.streams import P2PStream

T = TypeVar("T")
SECRET = "s3cret shared through the relay's rendezvous"
BOUND = 60.0  # seconds: only so that a broken test fails instead of hanging


async def bounded(aw: Awaitable[T], timeout: float = BOUND) -> T:
    return await asyncio.wait_for(aw, timeout)


class CuttableUdpPath(UdpPath):
    """A UDP path whose datagrams can be made to vanish both ways (a NAT binding lost)."""

    cut = False

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.cut:
            super().datagram_received(data, addr)

    def send(self, data: bytes) -> None:
        if self.cut:
            self.dropped += 1
            return
        super().send(data)

    def send_many(self, datagrams: Sequence[bytes]) -> None:
        if self.cut:
            self.dropped += len(datagrams)
            return
        super().send_many(datagrams)


def udp_sockets() -> tuple[socket.socket, socket.socket]:
    a, b = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    for s in (a, b):
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
    a.connect(b.getsockname())
    b.connect(a.getsockname())
    return a, b


async def udp_paths() -> tuple[CuttableUdpPath, CuttableUdpPath]:
    a, b = udp_sockets()
    pa, pb = CuttableUdpPath(), CuttableUdpPath()
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: pa, sock=a)
    await loop.create_datagram_endpoint(lambda: pb, sock=b)
    return pa, pb


async def stream_paths() -> tuple[StreamPath, StreamPath]:
    a, b = socket.socketpair()
    return await StreamPath.from_socket(a), await StreamPath.from_socket(b)


async def connect(
    client_switch: PathSwitch,
    server_switch: PathSwitch,
    *,
    client_secret: str = SECRET,
    pinned: str | None = None,
    config: SessionConfig | None = None,
) -> tuple[P2PSession, P2PSession]:
    ident_c, ident_s = PeerIdentity.generate("client"), PeerIdentity.generate("server")
    client, server = await bounded(
        asyncio.gather(
            P2PSession.connect(
                client_switch, role="client", identity=ident_c, secret=client_secret,
                peer_fingerprint=pinned or ident_s.fingerprint, config=config,
            ),
            P2PSession.connect(
                server_switch, role="server", identity=ident_s, secret=SECRET,
                peer_fingerprint=ident_c.fingerprint, config=config,
            ),
        )
    )  # fmt: skip
    return client, server


@pytest.fixture(params=["udp", "relay-stream"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[P2PSession, P2PSession]]:
    a, b = await (udp_paths() if request.param == "udp" else stream_paths())
    client, server = await connect(PathSwitch(a), PathSwitch(b))
    yield client, server
    await client.close()
    await server.close()


async def send_all(stream: P2PStream, data: bytes, chunk: int = 64 * 1024) -> None:
    for i in range(0, len(data), chunk):
        stream.write(data[i : i + chunk])
        await stream.drain()
    stream.write_eof()


async def sha256_until_eof(stream: P2PStream) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    while chunk := await stream.read(256 * 1024):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


# --------------------------------------------------------------------------- streams


async def test_16_mib_stream_arrives_intact(pair: tuple[P2PSession, P2PSession]) -> None:
    client, server = pair
    data = os.urandom(16 << 20)

    async def receive() -> tuple[str, int]:
        stream = await server.accept_stream()
        result = await sha256_until_eof(stream)
        stream.write(result[0].encode())
        stream.write_eof()
        return result

    stream = await client.open_stream()
    _, (digest, size) = await bounded(asyncio.gather(send_all(stream, data), receive()))
    assert (digest, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert await bounded(stream.read()) == digest.encode()  # the answer came after our EOF


async def test_many_concurrent_streams_both_ways(pair: tuple[P2PSession, P2PSession]) -> None:
    client, server = pair
    count = 300  # beyond QUIC's 128 concurrently open streams: credit must come back

    async def echo_server() -> None:
        async def echo(s: P2PStream) -> None:
            s.write(await s.read())
            s.write_eof()

        tasks = [asyncio.create_task(echo(await server.accept_stream())) for _ in range(count)]
        await asyncio.gather(*tasks)

    async def one(i: int) -> bytes:
        s = await client.open_stream()
        await send_all(s, b"%05d" % i * 2000)
        return await s.read()

    results = await bounded(asyncio.gather(echo_server(), *(one(i) for i in range(count))))
    assert results[1:] == [b"%05d" % i * 2000 for i in range(count)]

    # and the server opens streams towards the client as well
    async def server_side() -> list[bytes]:
        streams = [await server.open_stream() for _ in range(20)]
        for i, s in enumerate(streams):
            s.write(b"from server %d" % i)
            s.write_eof()
        return [await s.read() for s in streams]

    async def client_side() -> None:
        for _ in range(20):
            s = await client.accept_stream()
            s.write(b"re: " + await s.read())
            s.write_eof()

    answers, _ = await bounded(asyncio.gather(server_side(), client_side()))
    assert answers == [b"re: from server %d" % i for i in range(20)]


async def test_half_close_each_way(pair: tuple[P2PSession, P2PSession]) -> None:
    client, server = pair
    c = await client.open_stream()
    c.write(b"request")
    c.write_eof()
    s = await bounded(server.accept_stream())
    assert await bounded(s.read()) == b"request"  # ended by our EOF ...
    assert s.at_eof()
    with pytest.raises(P2PError, match="after write_eof"):
        c.write(b"more")
    for i in range(3):  # ... while the other direction stays open
        s.write(b"part %d;" % i)
        await s.drain()
        assert await bounded(c.readexactly(7)) == b"part %d;" % i
    s.write_eof()
    assert await bounded(c.read()) == b""
    s.close()
    c.close()


async def round_trips_until(
    client: P2PSession,
    server: P2PSession,
    condition: Callable[[], bool],
    *,
    at_least: int = 1,
    limit: int = 1000,
) -> None:
    """Echo small messages on a stream of their own until ``condition()`` holds (and at
    least ``at_least`` times): the connection makes progress, no guessed sleep."""
    ping = await client.open_stream()
    ping.write(b".")
    pong = await bounded(server.accept_stream())
    for i in range(limit):
        pong.write(await bounded(pong.readexactly(1)))
        await bounded(ping.readexactly(1))
        if i + 1 >= at_least and condition():
            break
        ping.write(b".")
    ping.close()
    pong.close()
    assert condition()


async def test_slow_reader_holds_the_writer_back(pair: tuple[P2PSession, P2PSession]) -> None:
    client, server = pair
    initial, window = server.config.initial_stream_window, server.config.stream_window
    data = os.urandom(8 * window)
    stream = await client.open_stream()
    stream.write(data[:1])  # the server learns of the stream
    writer = asyncio.create_task(send_all(stream, data[1:]))
    peer = await bounded(server.accept_stream())

    # Never read: the stream fills its first window, and no more comes while many round
    # trips go by.
    await round_trips_until(client, server, lambda: peer.delivered == initial)
    await round_trips_until(client, server, lambda: True, at_least=20)
    assert peer.delivered <= initial
    assert not writer.done()  # the writer waits in drain()
    assert client._stream_unsent(stream) <= 2 * client.config.write_buffer

    # Read a little: a whole window is granted, filled, and again no more.
    first = await bounded(peer.readexactly(100))
    await round_trips_until(client, server, lambda: peer.delivered == 100 + window)
    await round_trips_until(client, server, lambda: True, at_least=20)
    assert peer.delivered <= 100 + window  # unread: at most one window
    assert not writer.done()
    assert client._stream_unsent(stream) <= 2 * client.config.write_buffer

    digest, size = await bounded(sha256_until_eof(peer))
    await bounded(writer)
    whole = hashlib.sha256(data[100:]).hexdigest()
    assert first == data[:100] and (digest, size) == (whole, len(data) - 100)


async def test_streams_nobody_reads_stay_within_the_connection_window(
    pair: tuple[P2PSession, P2PSession],
) -> None:
    client, server = pair
    writers, streams, size = [], [], 256 << 10
    for _ in range(PEER_STREAMS - 1):  # all the peer may open (one is round_trips_until's)
        stream = await client.open_stream()
        streams.append(stream)
        writers.append(asyncio.create_task(send_all(stream, bytes(size))))

    peers = [await bounded(server.accept_stream()) for _ in writers]  # taken, never read

    def unread() -> int:
        return sum(p.delivered for p in peers)

    full = (PEER_STREAMS - 1) * server.config.initial_stream_window
    await round_trips_until(client, server, lambda: unread() == full)
    await round_trips_until(client, server, lambda: True, at_least=20)
    assert unread() <= server.config.connection_window
    # The rest waits on the sender's side (within its write_buffer per stream).
    held = sum(client._stream_unsent(s) for s in streams)
    assert held == len(streams) * size - full
    for w in writers:
        w.cancel()


async def test_closing_a_stream_with_unread_data_gives_the_credit_back(
    pair: tuple[P2PSession, P2PSession],
) -> None:
    client, server = pair
    stream_window, connection_window = server.config.stream_window, server.config.connection_window
    rounds = connection_window // stream_window + 2  # more than the connection can hold unread
    for _ in range(rounds):
        c = await client.open_stream()
        writer = asyncio.create_task(send_all(c, os.urandom(2 * stream_window)))
        s = await bounded(server.accept_stream())
        await round_trips_until(
            client, server, lambda s=s: s.delivered == server.config.initial_stream_window
        )
        s.close()  # STOP_SENDING: the rest is refused, and the unread window given back
        with pytest.raises(P2PError, match="stopped reading"):
            await bounded(writer)
    c = await client.open_stream()
    await send_all(c, b"still flowing")
    s = await bounded(server.accept_stream())
    assert await bounded(s.read()) == b"still flowing"


async def test_abort_reaches_the_peer_as_a_reset_not_an_end(
    pair: tuple[P2PSession, P2PSession],
) -> None:
    client, server = pair
    c = await client.open_stream()
    c.write(b"partial")
    s = await bounded(server.accept_stream())
    assert await bounded(s.readexactly(7)) == b"partial"
    c.abort(7)
    with pytest.raises(P2PStreamError, match="reset stream") as info:
        await bounded(s.read())
    assert info.value.code == 7
    with pytest.raises(P2PError, match="aborted"):
        c.write(b"more")

    async def write_until_stopped() -> None:
        while True:  # the peer's STOP_SENDING ends our writing side as well
            s.write(b"y" * 1000)
            await s.drain()

    with pytest.raises(P2PStreamError, match="stopped reading"):
        await bounded(write_until_stopped())


# --------------------------------------------------------------------------- datagrams


async def test_datagrams_both_ways(pair: tuple[P2PSession, P2PSession]) -> None:
    client, server = pair
    biggest = client.config.max_datagram_payload
    for size in (1, 100, biggest):
        client.send_datagram(b"c" * size)
        assert await bounded(server.recv_datagram()) == b"c" * size
        server.send_datagram(b"s" * size)
        assert await bounded(client.recv_datagram()) == b"s" * size
    with pytest.raises(P2PError, match="exceeds"):
        client.send_datagram(b"x" * (biggest + 1))


# --------------------------------------------------------------------------- authentication


async def test_each_side_raises_an_auth_error_on_a_wrong_secret() -> None:
    a, b = await udp_paths()
    ident_c, ident_s = PeerIdentity.generate(), PeerIdentity.generate()
    outcomes = await bounded(
        asyncio.gather(
            P2PSession.connect(PathSwitch(a), role="client", identity=ident_c,
                               peer_fingerprint=ident_s.fingerprint, secret="wrong"),
            P2PSession.connect(PathSwitch(b), role="server", identity=ident_s,
                               peer_fingerprint=ident_c.fingerprint, secret=SECRET),
            return_exceptions=True,
        )
    )  # fmt: skip
    assert all(isinstance(o, P2PAuthError) for o in outcomes), outcomes
    assert all(isinstance(o, NatkitError) for o in outcomes)


async def test_wrong_pinned_fingerprint_fails_on_both_sides() -> None:
    a, b = await stream_paths()
    ident_c, ident_s = PeerIdentity.generate(), PeerIdentity.generate()
    impostor = PeerIdentity.generate()
    outcomes = await bounded(
        asyncio.gather(
            P2PSession.connect(PathSwitch(a), role="client", identity=ident_c,
                               peer_fingerprint=impostor.fingerprint, secret=SECRET),
            P2PSession.connect(PathSwitch(b), role="server", identity=ident_s,
                               peer_fingerprint=ident_c.fingerprint, secret=SECRET),
            return_exceptions=True,
        )
    )  # fmt: skip
    client_err, server_err = outcomes
    assert isinstance(client_err, P2PAuthError) and "intercepting" in str(client_err)
    assert isinstance(server_err, P2PAuthError) and "refused" in str(server_err)


async def test_no_peer_times_out_with_natkits_error() -> None:
    a, _b = await udp_paths()  # nobody runs a session on _b
    ident = PeerIdentity.generate()
    with pytest.raises(P2PError, match="no authenticated session"):
        await bounded(
            P2PSession.connect(
                PathSwitch(a), role="client", identity=ident, peer_fingerprint=ident.fingerprint,
                secret=SECRET, config=SessionConfig(handshake_timeout=0.5),
            )
        )  # fmt: skip
    _b.close()


# --------------------------------------------------------------------------- closing


async def test_close_reaches_the_peer(pair: tuple[P2PSession, P2PSession]) -> None:
    client, server = pair
    c = await client.open_stream()
    c.write(b"unfinished")
    s = await bounded(server.accept_stream())
    assert await bounded(s.readexactly(10)) == b"unfinished"
    pending = asyncio.create_task(server.accept_stream())
    await client.close("done here")
    with pytest.raises(P2PClosedError, match="done here"):
        await bounded(pending)
    with pytest.raises(P2PClosedError):
        await bounded(s.read())  # no FIN came: the stream did not end cleanly
    with pytest.raises(P2PClosedError):
        client.send_datagram(b"late")
    assert server.closed and client.closed


# --------------------------------------------------------------------------- path switching


async def test_transfer_survives_losing_the_udp_path_then_moves_back() -> None:
    lv = Liveness(probe_after=0.1, dead_after=0.5, standby_interval=0.3)
    udp_c, udp_s = await udp_paths()
    relay_c, relay_s = await stream_paths()
    client, server = await connect(
        PathSwitch(udp_c, [relay_c], liveness=lv), PathSwitch(udp_s, [relay_s], liveness=lv)
    )
    seen: list[PathEvent] = []
    client.on_path_event(seen.append)
    assert (client.path, server.path) == ("direct", "direct")

    data = os.urandom(16 << 20)
    cut_at = 2 << 20
    received = asyncio.Event()

    async def receive() -> tuple[str, int]:
        s = await server.accept_stream()
        h, n = hashlib.sha256(), 0
        while chunk := await s.read(64 * 1024):
            h.update(chunk)
            n += len(chunk)
            if n >= cut_at:
                received.set()
        return h.hexdigest(), n

    stream = await client.open_stream()
    transfer = asyncio.gather(send_all(stream, data), receive())
    await bounded(received.wait())
    udp_c.cut = udp_s.cut = True  # the direct path dies under the transfer
    _, (digest, size) = await bounded(transfer)
    assert (digest, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert (client.path, server.path) == ("relay", "relay")
    assert ("switched", "relay") in [(e.type, e.path.kind) for e in seen]
    assert relay_c.sent > 0 and relay_s.sent > 0

    # (qh3 may finish the transfer before the cut path is declared dead: wait for that.)
    dead = asyncio.Event()
    client.on_path_event(lambda e: dead.set() if e.type == "dead" and e.path is udp_c else None)
    if client.switch.is_live(udp_c):
        await bounded(dead.wait())
    # The direct path comes back: the switch notices, the owner moves back.
    udp_c.cut = udp_s.cut = False
    alive = asyncio.Event()
    client.on_path_event(lambda e: alive.set() if e.type == "alive" and e.path is udp_c else None)
    await bounded(alive.wait())
    client.switch.switch(udp_c)
    server.switch.switch(udp_s)
    before = udp_c.sent
    c = await client.open_stream()
    await send_all(c, b"over the direct path again")
    s = await bounded(server.accept_stream())
    assert await bounded(s.read()) == b"over the direct path again"
    assert (client.path, server.path) == ("direct", "direct")
    assert udp_c.sent > before
    await client.close()
    await server.close()


async def test_one_side_switching_is_followed_by_the_other() -> None:
    lv = Liveness(probe_after=0.1, dead_after=5.0, standby_interval=0.3)
    udp_c, udp_s = await udp_paths()
    relay_c, relay_s = await stream_paths()
    client, server = await connect(
        PathSwitch(udp_c, [relay_c], liveness=lv), PathSwitch(udp_s, [relay_s], liveness=lv)
    )
    events = client.events()
    udp_c.cut = udp_s.cut = True
    client.switch.switch(relay_c)  # the owner moves; the server follows (well before dead_after)
    first = await bounded(anext(events))
    assert (first.type, first.path.kind, first.reason) == ("switched", "relay", "owner")
    c = await client.open_stream()
    await send_all(c, b"x" * 100_000)
    s = await bounded(server.accept_stream())
    assert len(await bounded(s.read())) == 100_000
    assert server.path == "relay"
    await events.aclose()
    await client.close()
    await server.close()


# --------------------------------------------------------------------------- over aioice


async def test_session_over_aioice_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
    ca = aioice.Connection(ice_controlling=True, use_ipv6=False)
    cb = aioice.Connection(ice_controlling=False, use_ipv6=False)
    await asyncio.gather(ca.gather_candidates(), cb.gather_candidates())
    for x, y in ((ca, cb), (cb, ca)):
        for cand in y.local_candidates:
            await x.add_remote_candidate(cand)
        await x.add_remote_candidate(None)
        x.remote_username, x.remote_password = y.local_username, y.local_password
    await bounded(asyncio.gather(ca.connect(), cb.connect()))
    client, server = await connect(PathSwitch(IcePath(ca)), PathSwitch(IcePath(cb)))
    data = os.urandom(1 << 20)
    c = await client.open_stream()

    async def receive() -> tuple[str, int]:
        return await sha256_until_eof(await server.accept_stream())

    _, (digest, size) = await bounded(asyncio.gather(send_all(c, data), receive()))
    assert (digest, size) == (hashlib.sha256(data).hexdigest(), len(data))
    await client.close()
    await server.close()


# --------------------------------------------------------------------------- forgers on a path


def spoof(path: UdpPath, data: bytes) -> None:
    """A datagram reaching ``path``'s socket with the peer's address as its source: what an
    on-path attacker can send (the socket is connected, so only a spoofed source gets in)."""
    UdpPath.datagram_received(path, data, ("127.0.0.1", 1))


async def test_forged_and_replayed_datagrams_neither_revive_nor_attract_the_session() -> None:
    """The attack from issue 16: forged traffic kept a dead path "alive" and drew a healthy
    session onto a black-holed path. Only packets QUIC authenticated count now."""
    lv = Liveness(probe_after=0.1, dead_after=0.5, standby_interval=0.2)
    direct_c, direct_s = await udp_paths()
    mapped_c, mapped_s = await udp_paths()
    mapped_c.kind = mapped_s.kind = "port-mapped"
    genuine: list[bytes] = []  # what the server really sent, for the replays
    send = direct_s.send
    direct_s.send = lambda data: (genuine.append(data), send(data))[1]  # type: ignore[method-assign]
    client, server = await connect(
        PathSwitch(direct_c, [mapped_c], liveness=lv), PathSwitch(direct_s, [mapped_s], liveness=lv)
    )
    events: list[PathEvent] = []
    client.on_path_event(events.append)
    mapped_c.cut = mapped_s.cut = True  # the attacker black-holes the standby
    dead = asyncio.Event()
    client.on_path_event(lambda e: dead.set() if e.type == "dead" and e.path is mapped_c else None)
    await bounded(dead.wait())

    async def forge() -> None:
        while True:
            for data in (
                b"\x40" + os.urandom(60),  # a short-header "QUIC packet"
                b"\x00NKP\x02" + os.urandom(8),  # natkit's old unauthenticated probe answer
                *genuine[-20:],  # genuine packets of the peer's, replayed
            ):
                spoof(mapped_c, data)
            await asyncio.sleep(0.02)

    forger = asyncio.create_task(forge())
    try:
        # A transfer runs on the direct path meanwhile; its quiet moments must not send the
        # session after the forged traffic.
        data = os.urandom(4 << 20)
        stream = await client.open_stream()

        async def receive() -> tuple[str, int]:
            return await sha256_until_eof(await server.accept_stream())

        _, (digest, _) = await bounded(asyncio.gather(send_all(stream, data), receive()))
        await asyncio.sleep(5 * lv.standby_interval)  # several probe rounds with the forger on
    finally:
        forger.cancel()
    assert digest == hashlib.sha256(data).hexdigest()
    assert client.path == "direct" and not client.switch.is_live(mapped_c)
    assert [(e.type, e.path.kind) for e in events if e.path is mapped_c] == [
        ("dead", "port-mapped")
    ]
    assert mapped_c.received > 100  # the forged datagrams did reach the session
    # And when the black hole ends, the peer's authenticated answers revive the path.
    mapped_c.cut = mapped_s.cut = False
    alive = asyncio.Event()
    client.on_path_event(
        lambda e: alive.set() if e.type == "alive" and e.path is mapped_c else None
    )
    await bounded(alive.wait())
    await client.close()
    await server.close()


async def test_a_peer_that_ignores_the_stream_credit_loses_the_session(
    pair: tuple[P2PSession, P2PSession],
) -> None:
    client, server = pair
    stream = await client.open_stream()
    client._send_queues[stream.stream_id].limit = 1 << 40  # a peer that grants itself credit
    stream.write(os.urandom(4 * server.config.stream_window))  # and nobody reads it
    with pytest.raises(P2PClosedError, match="ignores natkit's stream credit"):
        while True:  # the server takes the stream, then the session ends under it
            await bounded(server.accept_stream())
    with pytest.raises(P2PClosedError):  # the peer is told (CONNECTION_CLOSE)
        while True:
            await bounded(client.accept_stream())
