"""Dialling back for the direct TCP path (natkit.p2p.tcppunch), on loopback: the dial request
byte for byte and fuzzed; a reverse dial end to end (the listener connects to the
connector's acceptor, the connection then opens under the session key and forwards, as a
direct one does); the listener dials only its peer's own addresses, a bounded number at
once; a connection to the acceptor that does not name a dial of ours is dropped.

The dial requests travel on a loopback TCP connection standing in for the QUIC stream (the
same read/write calls); the punch itself needs two NATs and is tested in the lab
(tests/lab/test_p2p_tcp.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natkit.errors import ProtocolError
from natkit.p2p import tcppath, tcppunch
from natkit.p2p.forward import serve_forward
from natkit.p2p.tcppath import TcpDialer, TcpEndpoint, serve_tcp_forwards
from natkit.p2p.tcppunch import DialAcceptor, DialBack, DialError, DialServer
from tests.p2p.test_forward import _service
from tests.p2p.test_session import bounded
from tests.p2p.test_tcppath import forwarded_round_trip

KEY = tcppath.session_key("a-secret-of-the-two-peers", "nonce-a.nonce-b")
LOOPBACK = "127.0.0.1"
ID = bytes(range(16))


def test_the_dial_request_byte_for_byte() -> None:
    data = tcppunch.encode_dial("192.0.2.7", 40001, ID)
    assert data == b"NKD1" + bytes.fromhex("9c41") + ID + b"\x09" + b"192.0.2.7"
    assert tcppunch.decode_dial_rest(data[6:23], data[23:]) == (ID, "192.0.2.7")
    v6 = tcppunch.encode_dial("2001:DB8::0:1", 1, ID)
    assert v6[22:] == b"\x0b2001:db8::1"  # the address in its compressed form


@pytest.mark.parametrize("address", [b"not-an-ip", b"\xff\xfe", b"1.2.3.4 ", b"::1%eth0", b""])
def test_a_dial_request_must_name_an_ip_address(address: bytes) -> None:
    with pytest.raises(ProtocolError):
        tcppunch.decode_dial_rest(ID + bytes([len(address)]), address)


def test_a_cut_dial_request_is_refused() -> None:
    with pytest.raises(ProtocolError, match="cut short"):
        tcppunch.decode_dial_rest(ID + b"\x09", b"192.0.2")


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=17, max_size=17), st.binary(max_size=64))
def test_decoding_any_bytes_gives_a_dial_or_a_protocol_error(rest: bytes, address: bytes) -> None:
    try:
        dial_id, host = tcppunch.decode_dial_rest(rest, address)
    except ProtocolError:
        return
    assert dial_id == rest[:16] and tcppunch.encode_dial(host, 1, dial_id)[23:] != b""


class PipeStream:
    """A loopback TCP connection with the calls a QUIC stream of the session offers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def readexactly(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    def write_eof(self) -> None:
        self.writer.write_eof()

    def close(self) -> None:
        self.writer.close()


class Listener:
    """The listening peer's TCP side: its endpoint, its dial server, its forwards."""

    def __init__(self, allowed: set[int], peer_hosts: set[str]) -> None:
        self.endpoint = TcpEndpoint.open(KEY, LOOPBACK)
        self.dials = DialServer(KEY, self.endpoint.port, peer_hosts, self.endpoint.adopt)
        self.allowed = allowed
        self.tasks = [asyncio.ensure_future(
            serve_tcp_forwards(self.endpoint, target_host=LOOPBACK, allowed=allowed))]  # fmt: skip
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        async def on_stream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await serve_forward(PipeStream(r, w), target_host=LOOPBACK, allowed=self.allowed,
                                dial=self.dials.serve)  # fmt: skip

        self.server = await asyncio.start_server(on_stream, LOOPBACK, 0)

    async def open_stream(self) -> Any:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return PipeStream(*await asyncio.open_connection(LOOPBACK, port))

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.server is not None:
            self.server.close()
        self.endpoint.close()


@pytest.fixture
async def service() -> AsyncIterator[tuple[int, Any]]:
    listener, port, served = await _service()
    yield port, served
    served.cancel()
    listener.close()


async def _acceptor_at(acceptor: DialAcceptor) -> tuple[str, int]:
    return LOOPBACK, acceptor.port  # our "router mapping": the acceptor itself


def _reverse(listener: Listener, acceptor: DialAcceptor) -> DialBack:
    """The connector's dial backs: reverse only, to ``acceptor`` as its own mapping."""
    return DialBack(listener.open_stream, key=KEY, stun_server=None, acceptor=acceptor,
                    mapped=lambda: _acceptor_at(acceptor))  # fmt: skip


async def test_a_reverse_dial_carries_a_forward_end_to_end() -> None:
    services = [await _service(), await _service()]
    listener = Listener({port for _, port, _ in services}, {LOOPBACK})
    await listener.start()
    acceptor = DialAcceptor.open()
    found: list[str] = []
    dialer = TcpDialer(KEY, [], _reverse(listener, acceptor), on_route=found.append)
    try:
        await bounded(dialer.warm_up())  # the route, found before any forward
        assert found == ["reverse"] and dialer.remote == f"{LOOPBACK}:{listener.endpoint.port}"
        for _, port, served in services:  # both take the route found
            sealed = await bounded(dialer.open(port))
            assert sealed is not None
            await forwarded_round_trip(sealed, served, 1 << 20)
        assert found == ["reverse"]  # reported once, when found
        assert dialer.route is not None and dialer.route.kind == "reverse"
    finally:
        acceptor.close()
        listener.close()
        for sock, _, _ in services:
            sock.close()


async def test_the_listener_dials_only_its_peers_own_addresses(service: tuple[int, Any]) -> None:
    port, _ = service
    listener = Listener({port}, {"192.0.2.1"})  # the peer announced only this address
    await listener.start()
    acceptor = DialAcceptor.open()
    back = _reverse(listener, acceptor)
    try:
        with pytest.raises(DialError, match="could not connect"):
            await bounded(back.reverse())
        assert listener.endpoint._ready.empty()
        # and the dialer falls back to QUIC, saying so once
        found: list[str] = []
        dialer = TcpDialer(KEY, [], back, on_route=found.append)
        assert await bounded(dialer.open(port), 10) is None
        assert dialer.failed and found == ["none"]
    finally:
        acceptor.close()
        listener.close()


async def test_dials_beyond_the_limit_are_refused() -> None:
    listener = Listener(set(), {"192.0.2.1"})
    await listener.start()
    listener.dials._running = tcppunch.MAX_DIALS  # as if MAX_DIALS dials were under way
    stream = await listener.open_stream()
    try:
        stream.write(tcppunch.encode_dial("192.0.2.1", 9, ID))
        assert await bounded(stream.readexactly(1)) == b"\x02"  # FAILED, no connect tried
    finally:
        stream.close()
        listener.close()


async def test_a_connection_naming_no_dial_of_ours_is_dropped() -> None:
    acceptor = DialAcceptor.open()
    waiting = acceptor.expect(os.urandom(16))
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, acceptor.port)
        writer.write(os.urandom(16))  # a guess
        assert await bounded(reader.read()) == b""  # closed
        writer.close()
        assert not waiting.done()
    finally:
        acceptor.close()


async def test_without_so_reuseport_the_path_opens_and_dials_fail_cleanly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Windows has no SO_REUSEPORT: the endpoint still opens; here on Linux a dial from its
    port then cannot bind (Windows' SO_REUSEADDR would let it) and is answered FAILED,
    without an exception, and the dialer falls back to QUIC."""
    monkeypatch.setattr(tcppunch, "_REUSE_PORT", None)
    listener = Listener(set(), {LOOPBACK})
    await listener.start()
    acceptor = DialAcceptor.open()
    found: list[str] = []
    dialer = TcpDialer(KEY, [], _reverse(listener, acceptor), on_route=found.append)
    try:
        assert await bounded(dialer.open(80), 10) is None
        assert found == ["none"]
    finally:
        acceptor.close()
        listener.close()


def test_the_listener_dials_only_global_addresses_not_its_own_networks() -> None:
    """What ``TcpSide.take`` lets the peer name: its global addresses; never loopback, the
    unspecified address, link-local (a cloud's metadata service), private ones, our own
    LAN's neighbours (global IPv6 on our /64) or our own public address."""
    from natkit.p2p.tcpsetup import dial_targets

    announced = ["127.0.0.1", "::1", "0.0.0.0", "169.254.169.254", "fe80::1", "10.0.0.7",
                 "192.168.1.1", "fd00::5", "224.0.0.1", "2001:db8:77::20", "100.200.0.4",
                 "100.200.0.1", "2001:db8:201::2", "2001:DB8:201:0::2"]  # fmt: skip
    local = ["192.168.1.10", "2001:db8:77::10"]  # our interfaces: a LAN, a global /64
    public = ["100.200.0.4"]  # our router's public address (the lab's addresses)
    assert dial_targets(announced, local, public) == ["100.200.0.1", "2001:db8:201::2"]


async def test_the_listener_writes_a_mac_of_the_dial_id_not_the_id() -> None:
    """No peer chooses the bytes a dial sends: the listener writes a MAC of the id under
    the session key (a peer naming some service cannot make it say FLUSHALL)."""
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got.set_result(await r.readexactly(16))
        w.close()

    server = await asyncio.start_server(on_conn, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    listener = Listener(set(), {LOOPBACK})
    await listener.start()
    stream = await listener.open_stream()
    try:
        chosen = b"FLUSHALL\r\nPING\r\n"
        stream.write(tcppunch.encode_dial(LOOPBACK, port, chosen))
        assert await bounded(stream.readexactly(1)) == b"\x00"  # OK: connected
        sent = await bounded(got)
        assert sent == tcppunch.dial_answer(KEY, chosen) and sent != chosen
    finally:
        stream.close()
        listener.close()
        server.close()
