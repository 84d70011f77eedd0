"""A direct TCP path for forwarded streams: kernel TCP, sealed with the session's keys.

When the listening peer's TCP port can be reached (no NAT between, or its router forwards
one: the listener asks for a TCP mapping as ICE gathering does for UDP), each forwarded connection runs over a TCP connection of its own instead of a QUIC
stream: the kernel does congestion control and retransmission, and natkit's sealed record
path (:mod:`natkit.relay.seal`, :mod:`natkit.relay.sealpump`, the relay's fastest
encrypted path) does the crypto. Nothing is reachable without the session: the listener
announces its TCP endpoints only inside the sealed signalling, after the secret proof.

On the wire, per connection (connector -> listener)::

    "NKT1" | cipher byte ("S" ChaCha20-Poly1305, "G" AES-256-GCM) | nonce (16 random bytes)
    then sealed records; the first carries the request "NKF1" | u16 port

    keys = HKDF-SHA256(session_key, salt=nonce, info="natkit sealed data v1 ..." "p2p-tcp")

``session_key`` is an HMAC of the shared secret over the session id (both peers' fresh
hello nonces), so it is new for every session; a connection opening with a nonce already
seen in this session is refused (no replay of a recorded connection). A peer without the
key cannot produce a first record that opens: the listener drops it unanswered. The
listener answers one sealed byte (forward.OK, REFUSED, FAILED); then both sides run the
sealed bridge (chunks, half-close, a reset passed on as a reset).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Collection, Iterable

from natkit.errors import NatkitError, ProtocolError
from natkit.net.routes import default_gateway, local_address_for, read_routes_async
from natkit.p2p import auth
from natkit.p2p.candidates import address_scope
from natkit.p2p.errors import P2PError
from natkit.p2p.forward import FAILED, MAGIC, OK, REFUSED, ForwardRefusedError, connect_target
from natkit.p2p.ice_gather import keep_mapping
from natkit.p2p.tcppunch import DialBack, shared_port_socket
from natkit.portmap.manager import KeptMapping
from natkit.relay import seal, sealpump
from natkit.relay.sockframes import recv_exact
from natkit.stun.address import family_of

log = logging.getLogger("natkit.p2p")

OPENING = b"NKT1"
_OPENING_SIZE = len(OPENING) + 1 + seal.NONCE_SIZE
_REQUEST = struct.Struct("!4sH")
_TICKET = "p2p-tcp"  # the HKDF info's label (seal.derive_keys' "ticket")
HANDSHAKE_TIMEOUT = 5.0  # an accepted connection must open and ask within this
CONNECT_TIMEOUT = 2.0  # per announced endpoint, before falling back to QUIC
MAX_MISSES = 3  # forwards in a row without a connection on the route found: then QUIC only
DIALBACK_DELAY = 0.2  # the direct routes' head start over the dial backs
DIALBACK_TIMEOUT = 3.5  # one dial back: STUN, the request, the peer's connect
MAX_HANDSHAKES = 32  # connections being checked at once; more wait in the kernel's backlog
MAX_HANDSHAKES_PER_ADDRESS = 8  # of those, from one address (more are closed at once)
MAX_ENDPOINTS = 8  # announced endpoints taken from the peer
MAX_NONCES = 1 << 20  # remembered per session (16 bytes each): then the endpoint closes


def session_key(secret: str, session: str) -> bytes:
    """The key both peers derive for this session's TCP connections."""
    return auth.key_for(secret, b"tcp path " + session.encode())


def _keys(key: bytes, nonce: bytes, cipher: str) -> tuple[bytes, bytes]:
    return seal.derive_keys(key, _TICKET, nonce, cipher)


class TcpEndpoint:
    """The listening peer's side: a TCP port, its connections checked and queued.

    :meth:`accept` returns ``(sealed socket, asked port)`` for connections whose opening
    and first record were sealed with this session's key; others are dropped."""

    def __init__(self, key: bytes, socks: list[socket.socket]) -> None:
        self.key, self.socks = key, socks
        self.port: int = socks[0].getsockname()[1]
        self._seen: set[bytes] = set()
        self._ready: asyncio.Queue[tuple[sealpump.SealedSocket, int]] = asyncio.Queue(64)
        self._slots = asyncio.Semaphore(MAX_HANDSHAKES)
        self._pending: collections.Counter[str] = collections.Counter()  # by source address
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting = [asyncio.ensure_future(self._accept_loop(s)) for s in socks]

    @classmethod
    def open(cls, key: bytes, host: str = "0.0.0.0", *, ipv6: bool = False) -> TcpEndpoint:
        """A free port on ``host`` that dials from it may share (SO_REUSEPORT); with
        ``ipv6``, the same port number on IPv6's any address too when it is free there."""
        socks = [shared_port_socket(family_of(host), 0, host)]
        try:
            socks[0].listen(128)
            if ipv6 and socks[0].family == socket.AF_INET:
                with contextlib.suppress(OSError):  # no IPv6 here, or the port taken on it
                    socks.append(shared_port_socket(socket.AF_INET6, socks[0].getsockname()[1]))
                    socks[-1].listen(128)
        except OSError:
            for sock in socks:
                sock.close()
            raise
        return cls(key, socks)

    def endpoints(self, hosts: Iterable[str]) -> list[tuple[str, int]]:
        """What to announce: our port on each of these addresses of a family we listen on."""
        families = {s.family for s in self.socks}
        return [(h, self.port) for h in dict.fromkeys(hosts) if family_of(h) in families]

    async def accept(self) -> tuple[sealpump.SealedSocket, int]:
        return await self._ready.get()

    def adopt(self, conn: socket.socket) -> None:
        """A connection we made ourselves (a dial: :mod:`natkit.p2p.tcppunch`): checked
        exactly as an accepted one, but without taking one of the slots strangers can fill
        (the dials have their own bound)."""
        task = asyncio.ensure_future(self._check(conn, slot=False))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as exc:
                self._slots.release()
                log.warning("TCP path: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            ip = str(peer[0]) if isinstance(peer, tuple) else "?"
            if self._pending[ip] >= MAX_HANDSHAKES_PER_ADDRESS:  # one address cannot fill all
                self._slots.release()
                conn.close()
                continue
            self._pending[ip] += 1
            task = asyncio.ensure_future(self._check(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(functools.partial(self._checked, ip))

    def _checked(self, ip: str, _: object) -> None:
        self._pending[ip] -= 1
        if not self._pending[ip]:
            del self._pending[ip]

    async def _check(self, conn: socket.socket, slot: bool = True) -> None:
        try:
            sealed, port = await asyncio.wait_for(self._handshake(conn), HANDSHAKE_TIMEOUT)
        except (NatkitError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
            log.info("TCP path: dropped a connection: %s", exc)
            conn.close()
            return
        except BaseException:  # closed under us (cancelled)
            conn.close()
            raise
        finally:
            if slot:
                self._slots.release()
        try:
            await self._ready.put((sealed, port))
        except BaseException:
            sealed.close()
            raise

    async def _handshake(self, conn: socket.socket) -> tuple[sealpump.SealedSocket, int]:
        conn.setblocking(False)
        opening = await recv_exact(conn, _OPENING_SIZE)
        if opening[: len(OPENING)] != OPENING:
            raise ProtocolError("not a natkit P2P TCP connection")
        cipher = seal.opening_cipher(opening[len(OPENING) : len(OPENING) + 1])
        nonce = opening[len(OPENING) + 1 :]
        recv_key, send_key = _keys(self.key, nonce, cipher)
        sealed = sealpump.SealedSocket(conn, seal.SealedChannel(send_key, recv_key, cipher))
        sealed.chan.limit = sealpump.FIRST_RECORD_MAX  # not authenticated yet
        magic, port = _REQUEST.unpack(await sealpump.recv_sealed_exact(sealed, _REQUEST.size))
        # The record opened: the peer holds the session key. Only now is the nonce kept.
        if nonce in self._seen:
            raise ProtocolError("a replayed TCP connection (its nonce was seen)")
        if len(self._seen) >= MAX_NONCES:
            raise ProtocolError("too many TCP connections in this session")
        self._seen.add(nonce)
        if magic != MAGIC:
            raise ProtocolError("a TCP connection without a forwarding request")
        sealed.chan.limit = seal.RECORD_MAX
        return sealed, port

    def close(self) -> None:
        for task in [*self._accepting, *self._tasks]:
            task.cancel()
        for sock in self.socks:
            sock.close()
        while not self._ready.empty():
            self._ready.get_nowait()[0].close()


async def map_port(port: int, timeout: float) -> tuple[KeptMapping, str, int]:
    """Ask the router to forward a public TCP port to our ``port`` (as ICE gathering does
    for its UDP port-mapped candidate): (the mapping kept alive, public IP, public port)."""
    gateway = default_gateway(await read_routes_async())
    mapping, kept = await keep_mapping(port, "tcp", local_address_for(gateway),
                                       gateway_ip=None, timeout=timeout,
                                       description="natkit p2p tcp")  # fmt: skip
    return kept, mapping.external_ip, mapping.external_port


def on_our_networks(host: str, local_hosts: Iterable[str]) -> bool:
    """Is private ``host`` on one of our own networks (the /24 or /64 of one of our
    addresses: the announcement carries no prefix length)?"""
    ip = ipaddress.ip_address(host)
    bits = 24 if ip.version == 4 else 64
    for local in local_hosts:
        with contextlib.suppress(ValueError):
            if ip in ipaddress.ip_network(f"{local}/{bits}", strict=False):
                return True
    return False


def usable_endpoints(announced: object, local_hosts: Iterable[str]) -> list[tuple[str, int]]:
    """The peer's announced endpoints we may connect to: well-formed, and private or
    loopback ones only when we have an address of that scope ourselves (the rule of
    :func:`natkit.p2p.candidates.reachable_remote`: no one can make us connect to our own
    network's private hosts). A private endpoint must also be on one of our own networks:
    behind two home routers (192.168.77.x and 192.168.78.x, say) the other LAN's address
    cannot answer, and trying it held each session's first forward for the whole connect
    timeout, right when the QUIC path was also being set up."""
    if not isinstance(announced, list):
        return []
    local_hosts = list(local_hosts)
    scopes = {address_scope(h) for h in local_hosts}
    kept: list[tuple[str, int]] = []
    for item in announced[:MAX_ENDPOINTS]:
        if not (isinstance(item, list) and len(item) == 2):
            continue
        host, port = item
        if not (isinstance(host, str) and isinstance(port, int) and 0 < port < 65536):
            continue
        try:
            scope = address_scope(host)
        except ValueError:
            continue
        if scope == "private" and not on_our_networks(host, local_hosts):
            continue
        if scope == "global" or scope in scopes:
            kept.append((host, port))
    return kept


@dataclasses.dataclass(frozen=True)
class Route:
    """One way to a TCP connection to the listener: ``direct`` to an endpoint it announced,
    or a dial back (``punch``, ``reverse``: :mod:`natkit.p2p.tcppunch`)."""

    kind: str
    attempt: Callable[[], Awaitable[socket.socket]]
    endpoint: tuple[str, int] | None = None

    @property
    def name(self) -> str:
        return f"{self.endpoint[0]}:{self.endpoint[1]}" if self.endpoint else self.kind


class TcpDialer:
    """The connecting peer's side: opens one sealed TCP connection per forwarded stream
    by the first route that gives one — straight to one of the peer's endpoints, else (a
    moment later, or at once when those failed) by having the peer dial us back —
    remembers which route worked, and that none did (the streams then go over QUIC without
    waiting again)."""

    def __init__(
        self,
        key: bytes,
        endpoints: list[tuple[str, int]],
        dialback: DialBack | None = None,
        on_route: Callable[[str], None] | None = None,
    ) -> None:
        self.key = key
        self.endpoints = endpoints
        self.dialback = dialback
        self.on_route = on_route
        self.route: Route | None = None
        self.remote = ""  # the peer's address on the first connection of the route found
        self.failed = False  # no route gave a connection: QUIC from now on
        self.misses = 0  # forwards in a row the route found gave no connection to
        self._search: asyncio.Future[tuple[Route, socket.socket] | None] | None = None

    @property
    def working(self) -> tuple[str, int] | None:
        """The endpoint of the direct route that worked (None: none, or a dial back)."""
        return self.route.endpoint if self.route else None

    async def _connect(self, endpoint: tuple[str, int]) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = socket.socket(family_of(endpoint[0]))
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, endpoint), CONNECT_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        return sock

    def _routes(self) -> list[Route]:
        routes = [Route("direct", functools.partial(self._connect, e), e) for e in self.endpoints]
        for kind, attempt in self.dialback.routes() if self.dialback else []:
            routes.append(Route(kind, _bounded(attempt, DIALBACK_TIMEOUT)))
        return routes

    async def _reach(self) -> socket.socket | None:
        """A connection by the route found, else by the first of all routes that gives one
        (the direct ones tried at once: an unreachable private address must not hold up
        the router's mapping; the dial backs DIALBACK_DELAY later, when the direct ones
        have not answered). One search at a time: a forward that comes during the search
        waits for its route."""
        if self.route is not None:
            won = await _race([self.route])
            if won is None:  # this one goes over QUIC; a route that keeps failing, all do
                self._missed()
                return None
            self.misses = 0
            return won[1]
        if self._search is not None:
            await asyncio.wait({self._search})
            return await self._reach() if self.route is not None else None
        search = self._search = asyncio.ensure_future(_race(self._routes()))
        search.add_done_callback(self._found)
        try:
            won = await asyncio.shield(search)
        except asyncio.CancelledError:
            search.add_done_callback(_close_found)  # nobody will take its connection
            raise
        return won[1] if won else None

    def _missed(self) -> None:
        self.misses += 1
        if self.misses >= MAX_MISSES:
            log.info("TCP path: %d forwards in a row found no connection; QUIC from now on",
                     self.misses)  # fmt: skip
            self.failed = True

    def close(self) -> None:
        """Stop a route search under way (the session is closing)."""
        if self._search is not None and not self._search.done():
            self._search.cancel()

    def _found(self, search: asyncio.Future[tuple[Route, socket.socket] | None]) -> None:
        won = None if search.cancelled() or search.exception() else search.result()
        if won is None:
            self.failed = True
            kind = "none"
        else:
            self.route, kind = won[0], won[0].kind
            host, port = won[1].getpeername()[:2]
            self.remote = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if self.on_route is not None:
            self.on_route(kind)

    async def warm_up(self) -> None:
        """Find the route before the first forward needs it: a sealed request for port 0,
        which the listener refuses (so the whole path is proven, the session key too)."""
        with contextlib.suppress(ForwardRefusedError, NatkitError, OSError):
            sealed = await self.open(0)
            if sealed is not None:
                sealed.close()

    async def open(self, port: int) -> sealpump.SealedSocket | None:
        """A sealed connection whose peer connected to ``port`` for us, or None when there
        is no TCP path (use QUIC). Raises ForwardRefusedError as the QUIC stream would."""
        if self.failed:
            return None
        sock = await self._reach()
        if sock is None:
            return None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cipher = seal.preferred_cipher()
        nonce = os.urandom(seal.NONCE_SIZE)
        send_key, recv_key = _keys(self.key, nonce, cipher)
        sealed = sealpump.SealedSocket(sock, seal.SealedChannel(send_key, recv_key, cipher))
        sealed.unsent.append(OPENING + seal.cipher_prefix(cipher) + nonce)
        sealed.chan.seal(_REQUEST.pack(MAGIC, port))
        try:
            await asyncio.wait_for(self._answer(sealed, port), HANDSHAKE_TIMEOUT)
        except (ProtocolError, OSError, asyncio.TimeoutError) as exc:
            # Something took the connection but is not our peer (another host at that
            # private address), or the peer went away: no TCP path, and no waiting again.
            sealed.close()
            self.failed = True
            log.info("TCP path: no answer to a forward (%s); using QUIC", exc)
            return None
        except BaseException:
            sealed.close()
            raise
        return sealed

    async def _answer(self, sealed: sealpump.SealedSocket, port: int) -> None:
        await sealpump.flush_all(sealed)
        answer = (await sealpump.recv_sealed_exact(sealed, 1))[0]
        if answer != OK:
            why = "not allowed there" if answer == REFUSED else "nothing answers there"
            raise ForwardRefusedError(f"the peer refused port {port}: {why}")


async def _race(routes: list[Route]) -> tuple[Route, socket.socket] | None:
    """The first route to give a connection (the others cancelled, or closed when they
    also connected); the dial backs join DIALBACK_DELAY after the direct ones, or at once
    when every direct one has failed."""
    loop = asyncio.get_running_loop()
    direct = [r for r in routes if r.kind == "direct"]
    later = [r for r in routes if r.kind != "direct"]
    tries: dict[asyncio.Future[socket.socket], Route] = {}
    won: tuple[Route, socket.socket] | None = None
    winner: asyncio.Future[socket.socket] | None = None

    def start(batch: list[Route]) -> None:
        for route in batch:
            tries[asyncio.ensure_future(route.attempt())] = route

    start(direct)
    if not direct:
        start(later)
        later = []
    join_at = loop.time() + DIALBACK_DELAY
    try:
        while won is None:
            pending = {t for t in tries if not t.done()}
            if later and (not pending or loop.time() >= join_at):
                start(later)
                later = []
                continue
            if not pending:
                break
            wait = max(0.0, join_at - loop.time()) if later else None
            done, _ = await asyncio.wait(pending, timeout=wait,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            for task in done:
                if task.exception() is None and won is None:
                    won, winner = (tries[task], task.result()), task
                elif task.exception() is not None:
                    log.info("TCP path: %s gave no connection: %s", tries[task].name,
                             task.exception() or "no answer")  # fmt: skip
    finally:
        for task in tries:
            if task is not winner:
                _drop(task)
    return won


def _bounded(
    attempt: Callable[[], Awaitable[socket.socket]], timeout: float
) -> Callable[[], Awaitable[socket.socket]]:
    async def run() -> socket.socket:
        # (not wait_for: its inner task, cancelled as it fails, leaves its error unretrieved)
        task = asyncio.ensure_future(attempt())
        try:
            await asyncio.wait({task}, timeout=timeout)
        except BaseException:
            _drop(task)
            raise
        if not task.done():
            _drop(task)
            raise asyncio.TimeoutError()
        return task.result()

    return run


def _close_found(search: asyncio.Future[tuple[Route, socket.socket] | None]) -> None:
    if not search.cancelled() and search.exception() is None and (won := search.result()):
        won[1].close()


def _drop(task: asyncio.Future[socket.socket]) -> None:
    task.cancel()
    task.add_done_callback(_close_unwanted)


def _close_unwanted(task: asyncio.Future[socket.socket]) -> None:
    """A connection that came for a race already won (or given up) is closed."""
    if not task.cancelled() and task.exception() is None:
        task.result().close()


async def serve_tcp_forward(
    sealed: sealpump.SealedSocket, port: int, *, target_host: str, allowed: Collection[int]
) -> None:
    """The listening side of one forwarded TCP connection: the same rules as
    :func:`natkit.p2p.forward.serve_forward` (only the named ports of the named host)."""
    if port not in allowed or port == 0:
        log.info("refused a forward to port %s", port)
        with contextlib.suppress(OSError):
            await sealpump.send_all(sealed, bytes([REFUSED]))
        sealed.close()
        return
    sock = await connect_target(target_host, port)
    if sock is None:
        with contextlib.suppress(OSError):
            await sealpump.send_all(sealed, bytes([FAILED]))
        sealed.close()
        return
    try:  # the answer leaves with the bridge's first records
        await sealpump.bridge(sealed, sock, prefix=bytes([OK]))
    except (NatkitError, OSError) as exc:
        log.info("a forwarded TCP connection ended: %s", exc)


async def serve_tcp_forwards(
    endpoint: TcpEndpoint, *, target_host: str, allowed: Collection[int]
) -> None:
    """Serve every forwarded connection that comes to ``endpoint`` until cancelled (which
    resets those still open)."""
    running: set[asyncio.Task[None]] = set()
    try:
        while True:
            sealed, port = await endpoint.accept()
            task = asyncio.ensure_future(
                serve_tcp_forward(sealed, port, target_host=target_host, allowed=allowed)
            )
            running.add(task)
            task.add_done_callback(running.discard)
    finally:
        for task in running:
            task.cancel()


async def bridge_client(sealed: sealpump.SealedSocket, client: socket.socket) -> None:
    """The connecting side of one forwarded TCP connection, until both ways have ended."""
    try:
        await sealpump.bridge(sealed, client)
    except (NatkitError, OSError, P2PError) as exc:
        log.info("a forwarded TCP connection ended: %s", exc)
