"""Proof version 3 on loopback (natkit.p2p.proof): the peers' proofs are bound to their QUIC
connection and the server checks the client's certificate and key.

The splice: a party in the middle plays the server to the client (with the server's stolen
key, so the client's pin passes) and the client to the server, and forwards the nonces and
proofs byte for byte between its two QUIC connections. Waits are bounded only against
hanging."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from natkit.p2p import quicconn
from natkit.p2p.auth import PeerIdentity
from natkit.p2p.errors import P2PAuthError, P2PClosedError
from natkit.p2p.paths import PathSwitch, UdpPath
from natkit.p2p.session import ALPN, AUTH_STREAM, P2PSession, SessionConfig
from tests.p2p.test_session import SECRET, bounded, udp_paths

CLIENT, SERVER = PeerIdentity.generate("client"), PeerIdentity.generate("server")
QUICK = SessionConfig(handshake_timeout=8.0)


async def test_the_normal_path_authenticates_both_and_carries_data() -> None:
    a, b = await udp_paths()
    client, server = await bounded(
        asyncio.gather(
            P2PSession.connect(PathSwitch(a), role="client", identity=CLIENT, secret=SECRET,
                               peer_fingerprint=SERVER.fingerprint),
            P2PSession.connect(PathSwitch(b), role="server", identity=SERVER, secret=SECRET,
                               peer_fingerprint=CLIENT.fingerprint),
        )
    )  # fmt: skip
    try:
        stream = await client.open_stream()
        stream.write(b"ping")
        stream.write_eof()
        accepted = await bounded(server.accept_stream())
        assert await bounded(accepted.read(100)) == b"ping"
    finally:
        await client.close()
        await server.close()


@pytest.mark.parametrize(
    ("client_identity", "refusal"),
    [
        # another certificate than the one it announced
        (PeerIdentity.generate("other"), "not the one it announced through signalling"),
        # the announced (public) certificate, but signing with a key that is not its own
        (PeerIdentity(CLIENT.certificate, PeerIdentity.generate("x").private_key),
         "does not hold that certificate's private key"),
    ],
)  # fmt: skip
async def test_a_client_that_is_not_the_announced_certificate_is_refused(
    client_identity: PeerIdentity, refusal: str
) -> None:
    a, b = await udp_paths()
    client, server = await bounded(
        asyncio.gather(
            P2PSession.connect(PathSwitch(a), role="client", identity=client_identity,
                               secret=SECRET, peer_fingerprint=SERVER.fingerprint, config=QUICK),
            P2PSession.connect(PathSwitch(b), role="server", identity=SERVER, secret=SECRET,
                               peer_fingerprint=CLIENT.fingerprint, config=QUICK),
            return_exceptions=True,
        )
    )  # fmt: skip
    assert isinstance(server, P2PAuthError), server
    assert refusal in str(server)
    assert isinstance(client, P2PAuthError), client  # told why, not left waiting
    assert refusal in str(client)


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Any) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on_datagram(data)


class Splicer:
    """Two raw QUIC connections (natkit's qh3 wrapper): the server's face toward the client
    (holding the server's key) and a client toward the server; it copies the proof stream
    from one to the other in both directions."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.toward_server = self._quic(is_client=True, identity=PeerIdentity.generate("m"))
        self.toward_client: quicconn.NatkitQuic | None = None
        self.socks: dict[str, _Socket] = {}
        self.pending_for_client: list[tuple[bytes, bool]] = []  # server's stream, early
        self.forwarded = {"to client": 0, "to server": 0}

    def _quic(self, **kw: Any) -> quicconn.NatkitQuic:
        return quicconn.new_connection(
            alpn=ALPN, idle_timeout=30.0, max_datagram_size=1200, stream_window=1 << 20,
            connection_window=4 << 20, **kw,
        )  # fmt: skip

    async def attach(self, to_client: socket.socket, to_server: socket.socket) -> None:
        for name, sock, handler in (
            ("client", to_client, self._from_client),
            ("server", to_server, self._from_server),
        ):
            _, proto = await self.loop.create_datagram_endpoint(
                lambda h=handler: _Socket(h), sock=sock
            )
            self.socks[name] = proto
        self.toward_server.connect(quicconn.PEER_ADDRESS, now=self.loop.time())
        self._flush()

    def _from_client(self, data: bytes) -> None:
        if self.toward_client is None:
            dcid = quicconn.initial_destination_cid(data)
            if dcid is None:
                return
            self.toward_client = self._quic(is_client=False, identity=SERVER, original_dcid=dcid)
        self.toward_client.receive_batch([data], now=self.loop.time())
        self._step()

    def _from_server(self, data: bytes) -> None:
        self.toward_server.receive_batch([data], now=self.loop.time())
        self._step()

    def _step(self) -> None:
        from qh3.quic import events as qe

        while (event := self.toward_server.next_event()) is not None:
            if isinstance(event, qe.StreamDataReceived) and event.stream_id == AUTH_STREAM:
                self.pending_for_client.append((event.data, event.end_stream))
        if self.toward_client is not None:
            while (event := self.toward_client.next_event()) is not None:
                if isinstance(event, qe.StreamDataReceived) and event.stream_id == AUTH_STREAM:
                    self.toward_server.send_stream_data(AUTH_STREAM, event.data, event.end_stream)
                    self.forwarded["to server"] += len(event.data)
            # It has 1-RTT keys (it has read the client's Initial): it may send.
            for data, end in self.pending_for_client:
                self.toward_client.send_stream_data(AUTH_STREAM, data, end)
                self.forwarded["to client"] += len(data)
            self.pending_for_client.clear()
        self._flush()

    def _flush(self) -> None:
        now = self.loop.time()
        for conn, name in ((self.toward_server, "server"), (self.toward_client, "client")):
            if conn is None:
                continue
            if (timer := conn.get_timer()) is not None and timer <= now:
                conn.handle_timer(now=now)
            transport = self.socks[name].transport
            assert transport is not None
            for data, _ in conn.datagrams_to_send(now=now):
                transport.sendto(data)

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            self._step()


@contextlib.asynccontextmanager
async def spliced() -> AsyncIterator[tuple[asyncio.Task[Any], asyncio.Task[Any], Splicer]]:
    loop = asyncio.get_running_loop()
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
    client_sock, splice_c, splice_s, server_sock = socks
    for x, y in ((client_sock, splice_c), (server_sock, splice_s)):
        x.connect(y.getsockname())
        y.connect(x.getsockname())
    paths = [UdpPath(), UdpPath()]
    for path, sock in zip(paths, (client_sock, server_sock), strict=True):
        await loop.create_datagram_endpoint(lambda p=path: p, sock=sock)
    splicer = Splicer()
    await splicer.attach(splice_c, splice_s)
    ticking = asyncio.create_task(splicer.tick())
    server = asyncio.create_task(
        P2PSession.connect(PathSwitch(paths[1]), role="server", identity=SERVER, secret=SECRET,
                           peer_fingerprint=CLIENT.fingerprint, config=QUICK)
    )  # fmt: skip
    client = asyncio.create_task(
        P2PSession.connect(PathSwitch(paths[0]), role="client", identity=CLIENT, secret=SECRET,
                           peer_fingerprint=SERVER.fingerprint, config=QUICK)
    )  # fmt: skip
    try:
        yield client, server, splicer
    finally:
        ticking.cancel()
        for task in (client, server):
            task.cancel()
            with contextlib.suppress(BaseException):
                session = await task
                await session.close()


async def test_a_proof_forwarded_from_another_quic_connection_is_refused() -> None:
    async with spliced() as (_client, server, splicer):
        with pytest.raises(P2PAuthError, match="another connection"):
            await bounded(server)
        # the client's whole proof did reach the server, forwarded from the client's connection
        assert splicer.forwarded["to client"] == 32  # the server's nonce
        assert splicer.forwarded["to server"] > 32 + 300  # nonce, certificate, signature, MAC


async def test_without_the_channel_binding_the_same_splice_would_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the binding is for: made equal on both connections (as anything the splicer can
    see or choose could be: nonces, connection IDs), the forwarded proofs pass both ways."""
    monkeypatch.setattr(quicconn.NatkitQuic, "channel_binding", lambda self: bytes(32))
    async with spliced() as (client, server, _):
        sessions = await bounded(asyncio.gather(client, server))
        assert all(not s.closed for s in sessions)


async def test_a_peer_of_the_previous_proof_version_gets_a_clear_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from natkit.p2p import session

    a, b = await udp_paths()
    monkeypatch.setattr(session, "ALPN", "natkit-p2p/2")  # the client is a natkit of proof v2
    client = asyncio.create_task(
        P2PSession.connect(PathSwitch(a), role="client", identity=CLIENT, secret=SECRET,
                           peer_fingerprint=SERVER.fingerprint, config=QUICK)
    )  # fmt: skip
    await asyncio.sleep(0)  # it made its QUIC connection (and ClientHello)
    monkeypatch.setattr(session, "ALPN", ALPN)
    server = P2PSession.connect(PathSwitch(b), role="server", identity=SERVER, secret=SECRET,
                                peer_fingerprint=CLIENT.fingerprint, config=QUICK)  # fmt: skip
    results = await bounded(asyncio.gather(client, server, return_exceptions=True))
    for result in results:
        assert isinstance(result, P2PClosedError), result
        assert "natkit-p2p/3" in str(result) and "compatible natkit" in str(result)
