"""TCP hole punching and reverse connections for the direct TCP path (issue 16, part 1).

When the connecting peer cannot reach the listener's TCP port (no router mapping there, a
firewall), it asks the listener, inside the authenticated session (a QUIC stream), to
connect to *it*:

* **punch** — a TCP simultaneous open (RFC 793 allows it, RFC 5382 REQ-2 asks NATs to
  let it through; the technique of Ford, Srisuresh and Kegel, "Peer-to-Peer Communication
  Across Network Address Translators", USENIX 2005, section 4): the connector binds a
  fresh port, learns that port's public address by a STUN Binding over TCP *from it* (the
  relay answers one on its listen port), starts connecting from it to the listener's
  punch endpoint (the public address of the listener's TCP port, learnt the same way and
  announced in the sealed offer), and only then sends the dial request. Its SYN opens its
  own NAT for the answer and dies at the listener's router (routers drop unsolicited
  packets; one that answered with a reset would end the attempt). The listener's SYN, sent
  from its TCP port (SO_REUSEPORT), opens the listener's router and meets the connector's
  socket in SYN-SENT: both kernels see a simultaneous open and make one connection.
* **reverse** — the connector's own router maps it a TCP port; the listener connects there.

Either way the listener first writes a MAC of the dial id (16 random bytes the connector
chose, carried only inside the session) under the session key: the connector tells its
dials apart by it (:func:`dial_answer`); then the connection carries the sealed opening
exactly as a direct one does
(:mod:`natkit.p2p.tcppath`: nothing is served before that opens under the session key).
A NAT that gives a port another public address per destination (RFC 4787 "address and
port-dependent mapping", the lab's ``random``) defeats the punch: the STUN server saw
another port than the listener would need. Expected outcomes per NAT pair: docs/p2p-paths.md.

The dial request, connector -> listener, on a QUIC stream of its own::

    "NKD1" | u16 port | dial id (16 bytes) | u8 length | address (ASCII)

The listener connects only to an address its peer announced among its ICE candidates (no
peer makes it knock on a third host), at most MAX_DIALS at once, each within DIAL_TIMEOUT,
and answers one byte: OK once connected, else FAILED.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from typing import Any

from natkit.errors import NatkitError, ProtocolError
from natkit.p2p.errors import P2PError
from natkit.p2p.forward import DIAL_MAGIC as DIAL
from natkit.p2p.forward import FAILED, OK
from natkit.relay.sockframes import recv_exact, wait_ready
from natkit.stun.address import family_of

log = logging.getLogger("natkit.p2p")

DIAL_ID_SIZE = 16
_HEAD = struct.Struct("!4sH")  # the magic and port: the same first six bytes as a forward
_REST = struct.Struct(f"!{DIAL_ID_SIZE}sB")
# One dial: the listener's connect, the id's arrival. A punch that works completes within a
# round trip of the listener's SYN (the connector's is out already); one that cannot (a
# random NAT) holds the session's first forward this long before QUIC takes it.
DIAL_TIMEOUT = 1.5
STUN_TIMEOUT = 1.0  # the connector's STUN Binding over TCP for each punch
MAX_DIALS = 8  # dials a listener runs at once; more are answered FAILED
MAX_SESSION_DIALS = 4096  # dials a listener makes in one session, in all

Addr = tuple[str, int]
OpenStream = Callable[[], Awaitable[Any]]


class DialError(P2PError):
    """A dial (punch or reverse) did not give a connection."""


# -- the dial request (pure) ---------------------------------------------------------------


def encode_dial(host: str, port: int, dial_id: bytes) -> bytes:
    """The dial request asking the listener to connect to ``host:port``."""
    address = ipaddress.ip_address(host).compressed.encode()
    if len(dial_id) != DIAL_ID_SIZE or not 0 < port < 65536:
        raise ValueError("a dial needs a 16-byte id and a port of 1-65535")
    return _HEAD.pack(DIAL, port) + _REST.pack(dial_id, len(address)) + address


def decode_dial_rest(rest: bytes, address: bytes) -> tuple[bytes, str]:
    """(dial id, host) from what follows the magic and port; ProtocolError if malformed."""
    dial_id, length = _REST.unpack(rest)
    if len(address) != length:
        raise ProtocolError("a dial request's address is cut short")
    try:
        text = address.decode("ascii")
        if "%" in text:  # a scope (an interface of the listener's) is not the peer's to name
            raise ValueError(text)
        host = ipaddress.ip_address(text).compressed
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("a dial request names no IP address") from None
    return dial_id, host


def dial_answer(key: bytes, dial_id: bytes) -> bytes:
    """What the listener writes first on a dial's connection: a MAC of the dial id under the
    session's key (not the id itself: no peer chooses bytes the listener sends elsewhere)."""
    return hmac.new(key, b"natkit p2p dial " + dial_id, hashlib.sha256).digest()[:DIAL_ID_SIZE]


# -- sockets --------------------------------------------------------------------------------


_REUSE_PORT: int | None = getattr(socket, "SO_REUSEPORT", None)


def shared_port_socket(
    family: socket.AddressFamily, port: int, host: str | None = None
) -> socket.socket:
    """A TCP socket bound to ``port`` (on ``host``, default any address of ``family``)
    that other sockets may share (SO_REUSEPORT): the listening endpoint, its STUN Binding
    and each dial from the same port."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if _REUSE_PORT is not None:  # (Windows has none: its SO_REUSEADDR shares the port)
            sock.setsockopt(socket.SOL_SOCKET, _REUSE_PORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if host is None:
            host = "::" if family == socket.AF_INET6 else "0.0.0.0"
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def start_connect(sock: socket.socket, addr: Addr) -> Coroutine[Any, Any, None]:
    """Send the SYN now (not when a task gets to run) and return what waits for the end."""
    err = sock.connect_ex(addr)
    if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):  # (Windows: WSAEWOULDBLOCK)
        raise OSError(err, os.strerror(err))

    async def done() -> None:
        await wait_ready(sock, write=True)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))

    return done()


async def stun_tcp(sock: socket.socket, server: Addr, timeout: float = STUN_TIMEOUT) -> Addr:
    """The public address of the TCP port ``sock`` is bound to (with SO_REUSEPORT, shared):
    a STUN Binding over TCP from it. ``sock`` is closed afterwards."""
    from natkit.stun.client import binding_tcp_from

    result = await binding_tcp_from(sock, server, timeout)
    if result.response.mapped is None:
        raise DialError(f"the STUN server {server[0]}:{server[1]} told no address over TCP")
    return result.response.mapped


# -- the listener's side -----------------------------------------------------------------


class DialServer:
    """(listener) Answers the peer's dial requests: connects from the endpoint's port to
    the address the peer named (one of its own candidates) and hands the connection to
    ``adopt`` (the endpoint's sealed handshake) after writing the dial id."""

    def __init__(
        self,
        key: bytes,
        port: int,
        peer_hosts: Collection[str],
        adopt: Callable[[socket.socket], None],
        ipv6: str | None = None,
    ) -> None:
        self.key, self.port, self.adopt = key, port, adopt
        self.peer_hosts = frozenset(ipaddress.ip_address(h).compressed for h in peer_hosts)
        self.ipv6 = ipv6  # the IPv6 address we announced: dials over IPv6 leave from it
        self._running = 0
        self.dials = 0  # in this session (at most MAX_SESSION_DIALS)

    async def serve(self, stream: Any, port: int) -> None:
        """One dial request whose magic and port were read already from ``stream``."""
        try:
            rest = await stream.readexactly(_REST.size)
            address = await stream.readexactly(rest[-1])
            dial_id, host = decode_dial_rest(rest, address)
        except (NatkitError, asyncio.IncompleteReadError, struct.error) as exc:
            log.info("TCP path: a bad dial request: %s", exc)
            stream.close()
            return
        ok = False
        if host not in self.peer_hosts or port == 0:
            log.info("TCP path: refused a dial to %s (not one of the peer's candidates)", host)
        elif self._running >= MAX_DIALS or self.dials >= MAX_SESSION_DIALS:
            log.info("TCP path: refused a dial: %d running, %d made", self._running, self.dials)
        else:
            self._running += 1
            self.dials += 1
            try:
                ok = await self._dial(host, port, dial_id)
            finally:
                self._running -= 1
        with contextlib.suppress(NatkitError, OSError):  # the peer gave up waiting: fine
            stream.write(bytes([OK if ok else FAILED]))
            stream.write_eof()

    async def _dial(self, host: str, port: int, dial_id: bytes) -> bool:
        loop = asyncio.get_running_loop()
        try:
            family = family_of(host)
            local = self.ipv6 if family == socket.AF_INET6 else None
            sock = shared_port_socket(family, self.port, local)
        except OSError as exc:
            log.info("TCP path: cannot dial from port %d: %s", self.port, exc)
            return False
        try:
            deadline = loop.time() + DIAL_TIMEOUT  # one limit for both steps
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), DIAL_TIMEOUT)
            answer = dial_answer(self.key, dial_id)
            await asyncio.wait_for(loop.sock_sendall(sock, answer), deadline - loop.time())
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("TCP path: a dial to %s:%d failed: %s", host, port, exc or "no answer")
            sock.close()
            return False
        except BaseException:
            sock.close()
            raise
        self.adopt(sock)
        return True


# -- the connector's side ------------------------------------------------------------------


class DialAcceptor:
    """(connector) A TCP port of our own the listener may dial (through our router's
    mapping): each connection names its dial by the id it writes first."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self._waiting: dict[bytes, asyncio.Future[socket.socket]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting = asyncio.ensure_future(self._accept_loop())

    @classmethod
    def open(cls) -> DialAcceptor:
        sock = shared_port_socket(socket.AF_INET, 0)
        try:
            sock.listen(32)
        except OSError:
            sock.close()
            raise
        return cls(sock)

    def expect(self, answer: bytes) -> asyncio.Future[socket.socket]:
        """The connection that will come with ``answer`` (the dial's :func:`dial_answer`)."""
        fut: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
        self._waiting[answer] = fut
        fut.add_done_callback(lambda _: self._waiting.pop(answer, None))
        return fut

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as exc:
                log.info("TCP path: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if len(self._tasks) >= MAX_DIALS or not self._waiting:
                conn.close()  # nothing of ours is dialling now
                continue
            task = asyncio.ensure_future(self._claim(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _claim(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            answer = await asyncio.wait_for(recv_exact(conn, DIAL_ID_SIZE), DIAL_TIMEOUT)
        except BaseException:  # (cancelled too: the acceptor is closing)
            conn.close()
            return
        fut = self._waiting.get(answer)
        if fut is None or fut.done():
            conn.close()
            return
        fut.set_result(conn)

    def close(self) -> None:
        self._accepting.cancel()
        for task in list(self._tasks):
            task.cancel()
        for fut in list(self._waiting.values()):
            fut.cancel()
        self.sock.close()


class DialBack:
    """(connector) The ways to have the listener connect to us, each giving a connected
    socket or raising: ``punch`` to each of the listener's punch endpoints (IPv4: both NATs
    keep a port's public address whatever the destination; IPv6: no NAT, a stateful
    firewall at most, and our own global address is the public one) and ``reverse`` (our
    router mapped our acceptor's port)."""

    def __init__(
        self,
        open_stream: OpenStream,
        *,
        key: bytes,
        stun_server: Addr | None,
        punch_to: Sequence[Addr] = (),
        own_ipv6: str | None = None,
        acceptor: DialAcceptor | None = None,
        mapped: Callable[[], Awaitable[Addr | None]] | None = None,
    ) -> None:
        self.open_stream, self.key = open_stream, key
        self.stun_server, self.punch_to, self.own_ipv6 = stun_server, punch_to, own_ipv6
        self.acceptor, self.mapped = acceptor, mapped  # our router's mapping of the acceptor
        self._asking = asyncio.Semaphore(MAX_DIALS)  # the listener answers that many at once

    def routes(self) -> list[tuple[str, Callable[[], Awaitable[socket.socket]]]]:
        """(name, attempt) for each way open to us now."""
        ways: list[tuple[str, Callable[[], Awaitable[socket.socket]]]] = []
        if self.acceptor is not None and self.mapped is not None:
            ways.append(("reverse", self.reverse))
        for target in self.punch_to:
            v6 = family_of(target[0]) == socket.AF_INET6
            if (self.own_ipv6 if v6 else self.stun_server) is not None:
                ways.append(("punch", functools.partial(self.punch, target)))
        return ways

    async def _ask(self, host: str, port: int, dial_id: bytes) -> None:
        async with self._asking:
            stream = await self.open_stream()
            try:
                stream.write(encode_dial(host, port, dial_id))
                await stream.drain()
                answer = await asyncio.wait_for(stream.readexactly(1), DIAL_TIMEOUT + 1)
            except (NatkitError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
                raise DialError(f"the peer did not answer a dial: {exc or 'in time'}") from None
            finally:
                stream.close()
        if answer[0] != OK:
            raise DialError(f"the peer could not connect to {host}:{port}")

    async def punch(self, target: Addr) -> socket.socket:
        family = family_of(target[0])
        if family == socket.AF_INET6:
            # from the address we name (not one the kernel would pick: a temporary one)
            assert self.own_ipv6 is not None
            sock = shared_port_socket(family, 0, self.own_ipv6)
            public = (self.own_ipv6, sock.getsockname()[1])
        else:  # our NAT's address for a port of ours, then our dial from that port
            assert self.stun_server is not None
            probe = shared_port_socket(family, 0)
            port = probe.getsockname()[1]
            public = await stun_tcp(probe, self.stun_server)
            sock = shared_port_socket(family, port)
        connected: Coroutine[Any, Any, None] | None = None
        try:
            connected = start_connect(sock, target)  # our SYN leaves first
            dial_id = os.urandom(DIAL_ID_SIZE)
            await self._ask(public[0], public[1], dial_id)
            await asyncio.wait_for(connected, DIAL_TIMEOUT)
            got = await asyncio.wait_for(recv_exact(sock, DIAL_ID_SIZE), DIAL_TIMEOUT)
            if not hmac.compare_digest(got, dial_answer(self.key, dial_id)):
                raise DialError("the punched connection did not name our dial")
        except BaseException:
            if connected is not None:
                connected.close()  # (not awaited when the dial request failed)
            sock.close()
            raise
        return sock

    async def reverse(self) -> socket.socket:
        assert self.acceptor is not None and self.mapped is not None
        mapped = await self.mapped()
        if mapped is None:
            raise DialError("our router gave no TCP mapping")
        dial_id = os.urandom(DIAL_ID_SIZE)
        arrived = self.acceptor.expect(dial_answer(self.key, dial_id))
        try:
            await self._ask(mapped[0], mapped[1], dial_id)
            return await asyncio.wait_for(arrived, DIAL_TIMEOUT)
        except BaseException:
            if arrived.done() and not arrived.cancelled() and arrived.exception() is None:
                arrived.result().close()  # it came, but too late for this attempt
            arrived.cancel()
            raise
