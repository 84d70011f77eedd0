"""``natkit relay serve``: the public side of relay tunnels.

One listening port carries agents' control connections (TLS) and their data connections
(sealed with keys from the control session, :mod:`natkit.relay.seal`, or plain TCP with
``--plaintext-data``); the first byte tells them apart (0x16 is a TLS handshake, "S" a
sealed data connection). Visitors arrive on a tunnel's public TCP port, or on the shared HTTP port
(routed by Host) or HTTPS port (routed by TLS SNI, passed through untouched). Each visitor
takes a data connection the agent opened ahead of time, so it does not wait a round trip.

The relay is also a rendezvous for peer-to-peer (:mod:`natkit.relay.rooms`: rooms, signals,
a spliced relay-fallback path) and answers STUN Binding requests on UDP at the listen
address (:mod:`natkit.relay.stunserver`), so peers learn their public address from it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import os
import secrets
import socket
import ssl
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

from natkit.errors import NatkitError, ProtocolError
from natkit.relay import protocol as P
from natkit.relay import seal, sealpump, sniff, stunserver
from natkit.relay.certs import ensure_self_signed, fingerprint_file, server_context
from natkit.relay.pump import reset_on_close, start_join
from natkit.relay.rooms import Rendezvous
from natkit.relay.sockframes import read_frame

log = logging.getLogger("natkit.relay")

HANDSHAKE_TIMEOUT = 10.0
_PLAIN_DATA_PEEK = 256  # a plain DATA frame (its ticket is at most P.MAX_TICKET characters) fits
HEADER_TIMEOUT = 10.0  # slowloris: a visitor's routing bytes must arrive within this
VISITOR_WAIT = 10.0  # how long a visitor waits for a data connection
TICKET_TTL = 10.0  # an agent answers a ticket within milliseconds; older ones are lost
PING_INTERVAL = 10.0
IDLE_TIMEOUT = 35.0


@dataclasses.dataclass
class RelayConfig:
    listen_host: str = "0.0.0.0"
    listen_port: int = 7835
    tokens: dict[str, str] = dataclasses.field(default_factory=dict)  # label -> token
    ports: tuple[int, int] = (20000, 20999)
    http_port: int | None = None
    https_port: int | None = None
    domain: str | None = None
    public_host: str | None = None  # how visitors reach this relay (default: listen host)
    cert: Path | None = None
    key: Path | None = None
    state_dir: Path = Path(os.path.expanduser("~/.local/state/natkit/relay"))
    metrics: tuple[str, int] | None = None
    pool_size: int = 8
    max_tunnels_per_token: int = 16
    max_pending_visitors: int = 512
    max_agents: int = 1024
    grace: float = 60.0
    allow_plaintext_data: bool = True
    stun: bool = True  # answer STUN Binding requests on UDP at the listen address
    max_rooms_per_token: int = 64
    max_p2p_paths_per_token: int = 64


class _Conn:
    """A data connection parked in a tunnel's pool: plain, or sealed (then ``sealed`` is set)."""

    __slots__ = ("dead", "sealed", "sock")

    def __init__(self, sock: socket.socket, sealed: sealpump.SealedSocket | None = None) -> None:
        self.sock, self.sealed = sock, sealed
        self.dead = False

    def close(self) -> None:
        self.dead = True
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


class Tunnel:
    def __init__(self, tid: str, kind: str, key: str, public: str, session: Session) -> None:
        self.id, self.kind, self.key, self.public, self.session = tid, kind, key, public, session
        self.pool: collections.deque[_Conn] = collections.deque()
        self.waiting: collections.deque[asyncio.Future[_Conn]] = collections.deque()
        self.tickets: dict[str, float] = {}  # outstanding ticket -> when issued
        self.listener: socket.socket | None = None
        self.accept_ready: Callable[[], None] | None = None
        self.accept_paused = False
        self.refill_scheduled = False
        self.visitors = 0
        # Plain data connections serve one visitor each; sealed ones come back to the pool
        # (see RelayServer._repark), so they need far fewer refills.
        self.single_use = True


class Session:
    """One agent's control connection."""

    def __init__(self, server: RelayServer, transport: asyncio.Transport, fingerprint: str) -> None:
        self.server = server
        self.transport = transport
        self.fingerprint = fingerprint
        self.nonce = secrets.token_hex(16)
        # Sealed data connections derive their keys from this (sent in WELCOME, over TLS).
        self.data_key = secrets.token_bytes(seal.KEY_SIZE)
        self.token_label: str | None = None
        self.token_id: str | None = None
        self.plaintext_ok = False
        self.tunnels: dict[str, Tunnel] = {}
        self.last_seen = time.monotonic()
        self.id = secrets.token_hex(8)

    def send(self, msg_type: int, **fields: Any) -> None:
        if not self.transport.is_closing():
            self.transport.write(P.encode(msg_type, **fields))

    def fail(self, code: str, message: str) -> None:
        self.send(P.ERROR, code=code, message=message)
        self.transport.close()


class _Entry(asyncio.Protocol):
    """First frames on a TLS connection to the listen port: a control session or a data conn."""

    def __init__(self, server: RelayServer) -> None:
        self.server = server
        self.decoder = P.Decoder()
        self.session: Session | None = None
        self.transport: asyncio.Transport | None = None
        self.handshake_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not subclasses of asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self.handshake_timer = loop.call_later(HANDSHAKE_TIMEOUT, self._too_slow)

    def _too_slow(self) -> None:
        if self.transport is not None and (self.session is None or self.session.token_id is None):
            log.info("dropping a connection that did not authenticate in time")
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            messages = self.decoder.feed(data)
        except ProtocolError as exc:
            peer = self.transport.get_extra_info("peername")
            log.warning("dropping %s: %s", peer, exc)
            self.server.stats["garbage"] += 1
            if self.session is not None:
                self.session.fail("protocol", str(exc))
            else:
                self.transport.abort()
            return
        for msg in messages:
            if self.session is None:
                if msg.type != P.HELLO:
                    self.transport.abort()
                    return
                fp = self.server.fingerprint
                self.session = Session(self.server, self.transport, fp)
                self.session.send(P.CHALLENGE, nonce=self.session.nonce)
                continue
            try:
                self.server.on_control(self.session, msg)
            except ProtocolError as exc:
                self.session.fail("protocol", str(exc))
                return
            if self.session.token_id is not None and self.handshake_timer is not None:
                self.handshake_timer.cancel()
                self.handshake_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.handshake_timer:
            self.handshake_timer.cancel()
        if self.session is not None:
            self.server.session_ended(self.session)


class RelayServer:
    def __init__(self, cfg: RelayConfig) -> None:
        self.cfg = cfg
        if cfg.cert is None or cfg.key is None:
            cfg.cert, cfg.key = ensure_self_signed(cfg.state_dir)
        self.fingerprint = fingerprint_file(cfg.cert)
        self.ssl = server_context(cfg.cert, cfg.key)
        self.tokens = {P.token_id(tok): (label, tok) for label, tok in cfg.tokens.items()}
        self.tunnels_by_key: dict[str, Tunnel] = {}
        self.reservations: dict[str, tuple[str, float]] = {}  # key -> (token_id, until)
        self.tickets: dict[str, Tunnel] = {}
        self.sessions: set[Session] = set()
        self.stats: collections.Counter[str] = collections.Counter()
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._joins: set[Any] = set()  # visitors joined to data connections (abort on close)
        self._servers: list[asyncio.AbstractServer] = []
        self.listen_port = cfg.listen_port
        self._last_accept_warning = 0.0
        self.http_port = cfg.http_port
        self.https_port = cfg.https_port
        self.stun: stunserver.StunResponder | None = None
        self.rendezvous = Rendezvous(
            self.stats,
            self._spawn,
            max_rooms_per_token=cfg.max_rooms_per_token,
            max_paths_per_token=cfg.max_p2p_paths_per_token,
        )

    # ---- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        sock = await self._listen_main()
        self.listen_port = sock.getsockname()[1]
        self._accept(sock, self._on_listen_conn_now)
        if self.cfg.http_port is not None:
            s = self._listen(self.cfg.listen_host, self.cfg.http_port)
            self.http_port = s.getsockname()[1]
            self._accept(s, lambda c, a: self._visitor_by_name_now(c, a, "http"))
        if self.cfg.https_port is not None:
            s = self._listen(self.cfg.listen_host, self.cfg.https_port)
            self.https_port = s.getsockname()[1]
            self._accept(s, lambda c, a: self._visitor_by_name_now(c, a, "tls"))
        if self.cfg.metrics is not None:
            self._servers.append(await asyncio.start_server(self._metrics, *self.cfg.metrics))
        self._spawn(self._housekeeping())

    async def _listen_main(self) -> socket.socket:
        """The listen port (TCP), and STUN on UDP at the same address: with port 0, a port
        free for both (an ephemeral TCP port may be taken on UDP)."""
        host, port = self.cfg.listen_host, self.cfg.listen_port
        for _ in range(8 if port == 0 else 1):
            sock = self._listen(host, port)
            if not self.cfg.stun:
                return sock
            try:
                self.stun = await stunserver.serve(host, sock.getsockname()[1], self.stats)
            except OSError as exc:
                sock.close()
                if port == 0:
                    continue
                why = f"{exc.strerror} (another STUN server there? use --no-stun)"
                raise OSError(
                    exc.errno, f"cannot answer STUN on UDP {host}:{port}: {why}"
                ) from None
            return sock
        raise OSError(0, f"no port free for both TCP and UDP (STUN) on {host}")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for join in list(self._joins):
            join.abort()
        if self.stun is not None:
            self.stun.close()
        self.rendezvous.close()
        for sock in self._listeners:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        for srv in self._servers:
            srv.close()
        for session in list(self.sessions):
            session.transport.abort()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    def _listen(host: str, port: int, backlog: int = 4096) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
        sock.listen(backlog)
        sock.setblocking(False)
        _tune(sock)  # what Linux's accepted sockets inherit (see _accept)
        return sock

    def _accept(
        self, sock: socket.socket, handler: Callable[[socket.socket, Any], Any]
    ) -> Callable[[], None]:
        """Accept connections on ``sock`` as they come; returns the readiness callback (so a
        tunnel can pause accepting, leaving visitors in the kernel's backlog)."""
        loop = asyncio.get_running_loop()
        self._listeners.append(sock)

        def ready() -> None:
            for _ in range(64):  # accept a burst, then let others run
                try:
                    conn, addr = sock.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    # Out of file descriptors (EMFILE/ENFILE) or memory: the connection stays
                    # in the backlog and the socket stays readable, so retrying at once would
                    # spin. Stop accepting on this socket for a moment instead.
                    now = time.monotonic()
                    if now - self._last_accept_warning > 5:
                        self._last_accept_warning = now
                        log.warning("accept failed: %s; pausing accepts for 0.1 s", exc)
                    self.stats["accept_errors"] += 1
                    loop.remove_reader(sock.fileno())
                    loop.call_later(0.1, _resume_if_open, loop, sock, ready)
                    return
                conn.setblocking(False)
                if not _ACCEPTED_INHERIT_TUNING:
                    _tune(conn)
                result = handler(conn, addr)
                if asyncio.iscoroutine(result):
                    self._spawn(result)

        loop.add_reader(sock.fileno(), ready)
        return ready

    # ---- the listen port: TLS control, sealed data or plaintext data ----------------------

    def _on_listen_conn_now(
        self, conn: socket.socket, addr: Any
    ) -> Coroutine[Any, Any, None] | None:
        """A plain data connection whose DATA frame came with it (the usual case: the agent
        sends it as soon as it connects, and plaintext mode opens one per visitor) is parked
        here, in the accept callback; anything else is read by a task."""
        try:
            head = conn.recv(_PLAIN_DATA_PEEK, socket.MSG_PEEK)
            if len(head) < P.HEADER.size:
                return self._on_listen_conn(conn, addr)  # nothing yet, or too little
            msg_type, length = P.decode_header(head)
        except (OSError, ProtocolError):  # not a relay frame (TLS, sealed, garbage)
            return self._on_listen_conn(conn, addr)
        size = P.HEADER.size + length
        if msg_type != P.DATA or len(head) < size:  # TLS, sealed, or still coming
            return self._on_listen_conn(conn, addr)
        try:
            msg = P.decode_body(msg_type, conn.recv(size)[P.HEADER.size :])
        except (OSError, ProtocolError) as exc:
            self._garbage(conn, addr, exc)
            return None
        self._plain_data_msg(conn, msg)
        return None

    async def _on_listen_conn(self, conn: socket.socket, addr: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            first = await asyncio.wait_for(_peek(conn, 1), HANDSHAKE_TIMEOUT)
        except (asyncio.TimeoutError, OSError):
            conn.close()
            return
        if not first:
            conn.close()
            return
        if first == seal.PREFIX:
            await self._data_conn_sealed(conn, addr)
            return
        if first[0] == 0x16:  # a TLS handshake: a control connection
            try:
                await asyncio.wait_for(
                    loop.connect_accepted_socket(lambda: _Entry(self), conn, ssl=self.ssl),
                    HANDSHAKE_TIMEOUT,
                )
            except (asyncio.TimeoutError, OSError, ssl.SSLError) as exc:
                log.info("TLS handshake with %s failed: %s", addr, exc)
                self.stats["garbage"] += 1
                conn.close()
            return
        await self._data_conn_plain(conn, addr)

    async def _data_conn_plain(self, conn: socket.socket, addr: Any) -> None:
        try:
            msg = await asyncio.wait_for(read_frame(conn), HANDSHAKE_TIMEOUT)
        except (asyncio.TimeoutError, OSError, ProtocolError) as exc:
            self._garbage(conn, addr, exc)
            return
        self._plain_data_msg(conn, msg)

    def _garbage(self, conn: socket.socket, addr: Any, exc: BaseException) -> None:
        log.warning("dropping %s: %s", addr, exc)
        self.stats["garbage"] += 1
        conn.close()

    def _plain_data_msg(self, conn: socket.socket, msg: P.Message) -> None:
        """A plain connection's first frame: a P2P fallback path, or a tunnel's data
        connection (parked until a visitor comes)."""
        if msg.type == P.DATA and self.rendezvous.has_ticket(msg["ticket"]):
            # A P2P relay-fallback path: always plain, the peers encrypt end to end.
            self.rendezvous.data_conn(conn, msg["ticket"])
            return
        tunnel = self._take_ticket(msg["ticket"]) if msg.type == P.DATA else None
        if tunnel is None or not tunnel.session.plaintext_ok:
            self.stats["bad_tickets"] += 1
            conn.close()
            return
        entry = _Conn(sock=conn)
        loop = asyncio.get_running_loop()
        # While parked, readable means the agent went away (or misbehaves): drop it.
        loop.add_reader(conn.fileno(), lambda: self._drop_parked(tunnel, entry))
        self._park(tunnel, entry)

    async def _data_conn_sealed(self, conn: socket.socket, addr: Any) -> None:
        def key_for(ticket: str) -> bytes | None:
            tunnel = self.tickets.get(ticket)
            return None if tunnel is None else tunnel.session.data_key

        try:
            sealed, ticket = await asyncio.wait_for(
                sealpump.accept_sealed(conn, key_for), HANDSHAKE_TIMEOUT
            )
        except sealpump.UnknownTicketError as exc:
            log.warning("dropping %s: %s", addr, exc)
            self.stats["bad_tickets"] += 1
            conn.close()
            return
        except (asyncio.TimeoutError, OSError, ProtocolError) as exc:
            self._garbage(conn, addr, exc)
            return
        tunnel = self._take_ticket(ticket)
        if tunnel is None or sealed.pushback or sealed.chan.has_input():  # speaks after START
            self.stats["bad_tickets"] += 1
            sealed.close()
            return
        entry = _Conn(sealed.sock, sealed)
        loop = asyncio.get_running_loop()
        # While parked, readable means the agent went away (or misbehaves): drop it.
        loop.add_reader(sealed.fileno(), lambda: self._drop_parked(tunnel, entry))
        self._park(tunnel, entry)

    def _take_ticket(self, ticket: str) -> Tunnel | None:
        tunnel = self.tickets.pop(ticket, None)
        if tunnel is not None:
            tunnel.tickets.pop(ticket, None)
            if tunnel.session not in self.sessions:
                return None
        return tunnel

    def _park(self, tunnel: Tunnel, entry: _Conn) -> None:
        tunnel.single_use = entry.sealed is None
        try:
            while tunnel.waiting:
                fut = tunnel.waiting.popleft()
                if not fut.done():
                    fut.set_result(entry)
                    return
            tunnel.pool.append(entry)
        finally:
            if tunnel.accept_paused and len(tunnel.waiting) < self.cfg.max_pending_visitors:
                self._resume_accept(tunnel)

    def _pause_accept(self, tunnel: Tunnel) -> None:
        if tunnel.listener is not None and not tunnel.accept_paused:
            tunnel.accept_paused = True
            self.stats["accept_pauses"] += 1
            asyncio.get_running_loop().remove_reader(tunnel.listener.fileno())

    def _resume_accept(self, tunnel: Tunnel) -> None:
        if tunnel.listener is not None and tunnel.accept_ready is not None and tunnel.accept_paused:
            tunnel.accept_paused = False
            asyncio.get_running_loop().add_reader(tunnel.listener.fileno(), tunnel.accept_ready)

    def _repark(self, tunnel: Tunnel, entry: _Conn) -> None:
        """A sealed data connection whose visitor ended cleanly serves the next one: no new
        connection for it (like HTTP keep-alive). The pool stays bounded."""
        alive = tunnel.session in self.sessions and self.tunnels_by_key.get(tunnel.key) is tunnel
        if (
            not alive
            or entry.sealed is None
            or entry.sealed.pushback
            or entry.sealed.chan.has_input()  # the agent spoke after its end mark
            or len(tunnel.pool) >= self.cfg.pool_size
        ):
            entry.close()
            return
        self.stats["data_conns_reused"] += 1
        loop = asyncio.get_running_loop()
        loop.add_reader(entry.sock.fileno(), lambda: self._drop_parked(tunnel, entry))
        self._park(tunnel, entry)

    def _drop_parked(self, tunnel: Tunnel, entry: _Conn) -> None:
        with contextlib.suppress(ValueError):
            tunnel.pool.remove(entry)
        if not entry.dead:
            entry.close()
            self._refill(tunnel)

    def _refill(self, tunnel: Tunnel, extra: int = 0) -> None:
        """Ask the agent for data connections: the pool target plus the visitors waiting.

        Coalesced: one TICKETS message per tunnel per loop iteration; for sealed data connections
        (reused) only once the pool has drained to half its target (or visitors wait).
        """
        if tunnel.refill_scheduled or tunnel.session not in self.sessions:
            return
        have = len(tunnel.pool) + len(tunnel.tickets)
        # Single-use (plain) connections: one new one per visitor, so the cost of opening them
        # is spread evenly instead of arriving in bursts that delay the next visitors. Reused
        # (sealed) connections: only once the pool has drained to half, as most come back.
        low = self.cfg.pool_size if tunnel.single_use else self.cfg.pool_size // 2 + 1
        if not tunnel.waiting and not extra and have >= low:
            return
        tunnel.refill_scheduled = True
        asyncio.get_running_loop().call_soon(self._send_tickets, tunnel, extra)

    def _send_tickets(self, tunnel: Tunnel, extra: int) -> None:
        tunnel.refill_scheduled = False
        if tunnel.session not in self.sessions or self.tunnels_by_key.get(tunnel.key) is not tunnel:
            return
        want = self.cfg.pool_size + len(tunnel.waiting) + extra
        have = len(tunnel.pool) + len(tunnel.tickets)
        n = min(want - have, P.MAX_TICKETS)
        if n <= 0:
            return
        new = [secrets.token_urlsafe(18) for _ in range(n)]
        now = time.monotonic()
        for t in new:
            self.tickets[t] = tunnel
            tunnel.tickets[t] = now
        tunnel.session.send(P.TICKETS, tunnel=tunnel.id, tickets=new)

    # ---- control messages -------------------------------------------------------------------

    def on_control(self, s: Session, msg: P.Message) -> None:
        s.last_seen = time.monotonic()
        if s.token_id is None:
            if msg.type != P.AUTH:
                raise ProtocolError(f"expected AUTH, got {msg.name}")
            found = self.tokens.get(msg["token_id"])
            if found is None or not P.check_mac(found[1], s.nonce, s.fingerprint, msg["mac"]):
                self.stats["auth_failures"] += 1
                log.warning(
                    "agent %s failed authentication", s.transport.get_extra_info("peername")
                )
                s.fail("auth", "the relay does not accept this token")
                return
            if len(self.sessions) >= self.cfg.max_agents:
                s.fail("busy", "the relay has too many agents connected")
                return
            s.token_label, s.token_id = found[0], msg["token_id"]
            s.plaintext_ok = self.cfg.allow_plaintext_data
            self.sessions.add(s)
            s.send(P.WELCOME, session=s.id, data_key=s.data_key.hex())
            return
        if msg.type == P.OPEN:
            self._open(s, msg)
        elif msg.type == P.CLOSE:
            t = s.tunnels.pop(msg["tunnel"], None)
            if t is not None:
                self._close_tunnel(t, keep=False)
        elif msg.type == P.PING:
            s.send(P.PONG, t=msg["t"])
        elif msg.type == P.PONG:
            pass
        elif msg.type == P.DIAL:
            self._spawn(self._dial(s, msg["id"], msg["host"], msg["port"]))
        elif msg.type in P.P2P_AGENT_TYPES:
            self.rendezvous.on_message(s, msg)
        else:
            raise ProtocolError(f"unexpected {msg.name} from an agent")

    def _open(self, s: Session, msg: P.Message) -> None:
        kind, name, port, tid = msg["kind"], msg["name"], msg["port"], msg["tunnel"]
        assert s.token_id is not None
        if tid in s.tunnels:
            s.send(P.ERROR, code="exists", message=f"tunnel {tid} is already open")
            return
        if (
            sum(len(x.tunnels) for x in self.sessions if x.token_id == s.token_id)
            >= self.cfg.max_tunnels_per_token
        ):
            s.send(P.ERROR, code="limit", message="too many tunnels for this token")
            return
        try:
            if kind == "tcp":
                tunnel = self._open_tcp(s, tid, port)
            else:
                tunnel = self._open_named(s, tid, kind, name)
        except NatkitError as exc:
            s.send(P.ERROR, code="refused", message=str(exc))
            return
        s.tunnels[tid] = tunnel
        self.tunnels_by_key[tunnel.key] = tunnel
        self.reservations.pop(tunnel.key, None)
        s.send(P.OPENED, tunnel=tid, public=tunnel.public)
        self._refill(tunnel)
        log.info("tunnel %s (%s) for %s at %s", tid, kind, s.token_label, tunnel.public)

    def _held_by_other(self, key: str, token_id: str, session: Session) -> bool:
        t = self.tunnels_by_key.get(key)
        if t is not None:
            if t.session.token_id != token_id or t.session is session:
                return True
            # Our own token's tunnel: the agent came back before the relay noticed that its
            # old connection died (no FIN after an outage or a crash). The new one takes over.
            log.info("tunnel %s taken over by a new connection of the same token", key)
            t.session.tunnels.pop(t.id, None)
            self._close_tunnel(t, keep=False)
            return False
        r = self.reservations.get(key)
        return r is not None and r[0] != token_id and r[1] > time.monotonic()

    def _open_tcp(self, s: Session, tid: str, port: int) -> Tunnel:
        low, high = self.cfg.ports
        assert s.token_id is not None
        if port:
            if not low <= port <= high:
                raise NatkitError(f"port {port} is outside the relay's range {low}-{high}")
            candidates = [port]
        else:
            mine = [int(k.split(":")[1]) for k, (tok, until) in self.reservations.items()
                    if k.startswith("tcp:") and tok == s.token_id and until > time.monotonic()]  # fmt: skip
            candidates = mine + [p for p in range(low, high + 1) if p not in mine]
        for p in candidates:
            key = f"tcp:{p}"
            if self._held_by_other(key, s.token_id, s):
                if port:
                    raise NatkitError(f"port {p} is held by another tunnel")
                continue
            try:
                sock = self._listen(self.cfg.listen_host, p)
            except OSError:
                if port:
                    raise NatkitError(f"port {p} is in use on the relay") from None
                continue
            host = self.cfg.public_host or self.cfg.listen_host
            tunnel = Tunnel(tid, "tcp", key, f"{host}:{p}", s)
            tunnel.listener = sock
            tunnel.accept_ready = self._accept(sock, functools.partial(self._tcp_visitor, tunnel))
            return tunnel
        raise NatkitError("no free public port on the relay")

    def _open_named(self, s: Session, tid: str, kind: str, name: str) -> Tunnel:
        assert s.token_id is not None
        port = self.http_port if kind == "http" else self.https_port
        if port is None or not self.cfg.domain:
            raise NatkitError(
                f"this relay does not serve {kind} tunnels (no --{'http' if kind == 'http' else 'https'}-port/--domain)"
            )
        label = sniff.normalize_hostname(name or secrets.token_hex(4))
        host = label if label.endswith("." + self.cfg.domain) else f"{label}.{self.cfg.domain}"
        host = sniff.normalize_hostname(host)
        key = f"{kind}:{host}"
        if self._held_by_other(key, s.token_id, s):
            raise NatkitError(f"host name {host} is held by another tunnel")
        scheme = "http" if kind == "http" else "https"
        default = 80 if kind == "http" else 443
        public = f"{scheme}://{host}" + ("" if port == default else f":{port}")
        return Tunnel(tid, kind, key, public, s)

    def _close_tunnel(self, t: Tunnel, *, keep: bool) -> None:
        if self.tunnels_by_key.get(t.key) is t:
            del self.tunnels_by_key[t.key]
        if keep and t.session.token_id:
            self.reservations[t.key] = (t.session.token_id, time.monotonic() + self.cfg.grace)
        if t.listener is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(t.listener.fileno())
            t.listener.close()
            with contextlib.suppress(ValueError):
                self._listeners.remove(t.listener)
        for entry in t.pool:
            entry.close()
        t.pool.clear()
        for fut in t.waiting:
            if not fut.done():
                fut.cancel()
        for ticket in t.tickets:
            self.tickets.pop(ticket, None)

    def session_ended(self, s: Session) -> None:
        self.sessions.discard(s)
        if s.token_id is not None:
            self.rendezvous.session_ended(s)
        for t in s.tunnels.values():
            self._close_tunnel(t, keep=True)  # the address waits for the agent's return
        s.tunnels.clear()

    async def _dial(self, s: Session, dial_id: int, host: str, port: int) -> None:
        """Dial back an address for the agent (is its port mapping reachable from outside?).

        Only the address the agent's own connection comes from: the relay is no port scanner
        or proxy. (Behind double NAT the mapped address differs, and is unreachable anyway.)
        """
        error = ""
        peer = s.transport.get_extra_info("peername")
        source = str(peer[0]) if peer else ""
        if host != source:
            self.stats["dials_refused"] += 1
            s.send(P.DIALED, id=dial_id, ok=False,
                   error=f"{host} is not the address this agent connects from ({source})")  # fmt: skip
            return
        if not 0 < port < 65536:  # else connect() raises OverflowError and no DIALED is sent
            s.send(P.DIALED, id=dial_id, ok=False, error=f"port {port} is not a TCP port")
            return
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(host, port), 3.0)
            w.close()
        except (OSError, asyncio.TimeoutError) as exc:
            error = str(exc) or type(exc).__name__
        s.send(P.DIALED, id=dial_id, ok=not error, error=error[:200])

    # ---- visitors ----------------------------------------------------------------------------

    def _visitor_by_name_now(
        self, conn: socket.socket, addr: Any, kind: str
    ) -> Coroutine[Any, Any, None] | None:
        """A visitor whose request head (HTTP) or ClientHello (TLS) came with its connection,
        the usual case, is routed here in the accept callback; any other is read by a task,
        which also answers the ones that cannot be routed."""
        parse, limit = _ROUTE_BY[kind]
        try:
            host = parse(conn.recv(limit + 1, socket.MSG_PEEK))
        except (OSError, ProtocolError):
            host = None
        if not host:
            return self._visitor_by_name(conn, addr, kind)
        return self._route(conn, addr, kind, host)

    async def _visitor_by_name(self, conn: socket.socket, addr: Any, kind: str) -> None:
        """HTTP: route by Host; TLS: route by SNI. The bytes are peeked, not consumed."""
        parse, limit = _ROUTE_BY[kind]
        try:
            host = await asyncio.wait_for(_peek_until(conn, parse, limit), HEADER_TIMEOUT)
        except asyncio.TimeoutError:
            self.stats["slow_visitors"] += 1
            conn.close()
            return
        except (OSError, ProtocolError) as exc:
            log.info("refusing a %s visitor: %s", kind, exc)
            self.stats["bad_visitors"] += 1
            if kind == "http" and isinstance(exc, ProtocolError):
                _drain(conn)
                with contextlib.suppress(OSError):
                    conn.send(
                        b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
                    )
            conn.close()
            return
        waiting = self._route(conn, addr, kind, host)
        if waiting is not None:
            await waiting

    def _route(
        self, conn: socket.socket, addr: Any, kind: str, host: str | None
    ) -> Coroutine[Any, Any, None] | None:
        """The visitor to the tunnel holding ``host``, or an answer that there is none."""
        tunnel = self.tunnels_by_key.get(f"{kind}:{host}") if host else None
        if tunnel is None:
            self.stats["unrouted_visitors"] += 1
            if kind == "http":
                _drain(conn)
                with contextlib.suppress(OSError):
                    body = b"no tunnel for this host\n"
                    conn.send(
                        b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(body), body)
                    )
            conn.close()
            return None
        return self._visitor(conn, tunnel, addr)

    def _tcp_visitor(self, tunnel: Tunnel, conn: socket.socket, addr: Any) -> Any:
        return self._visitor(conn, tunnel, addr)

    def _visitor(
        self, conn: socket.socket, tunnel: Tunnel, addr: Any
    ) -> Coroutine[Any, Any, None] | None:
        """Join a visitor to a pooled data connection at once (no task, no loop iteration
        in between), or return a coroutine that waits for one."""
        self.stats["visitors"] += 1
        tunnel.visitors += 1
        while tunnel.pool:
            entry = tunnel.pool.popleft()
            if not entry.dead:
                self._refill(tunnel)
                self._serve(conn, tunnel, addr, entry)
                return None
        return self._wait_for_data_conn(conn, tunnel, addr)

    async def _wait_for_data_conn(self, conn: socket.socket, tunnel: Tunnel, addr: Any) -> None:
        if len(tunnel.waiting) >= self.cfg.max_pending_visitors and tunnel.listener is None:
            self.stats["visitors_refused"] += 1  # a shared HTTP(S) port cannot pause
            _reset(conn)
            return
        fut: asyncio.Future[_Conn] = asyncio.get_running_loop().create_future()
        tunnel.waiting.append(fut)
        if len(tunnel.waiting) >= self.cfg.max_pending_visitors:
            self._pause_accept(tunnel)  # the rest wait in the kernel's backlog
        self._refill(tunnel)
        try:
            entry = await asyncio.wait_for(fut, VISITOR_WAIT)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self.stats["visitors_timed_out"] += 1
            with contextlib.suppress(ValueError):
                tunnel.waiting.remove(fut)
            if fut.done() and not fut.cancelled():  # handed over just as time ran out
                self._park(tunnel, fut.result())
            if tunnel.accept_paused and len(tunnel.waiting) < self.cfg.max_pending_visitors:
                self._resume_accept(tunnel)
            _reset(conn)  # a refusal, not an empty answer
            return
        if entry.dead:  # the agent dropped it before this visitor could take it
            await self._wait_for_data_conn(conn, tunnel, addr)
            return
        self._serve(conn, tunnel, addr, entry)

    def _serve(self, conn: socket.socket, tunnel: Tunnel, addr: Any, entry: _Conn) -> None:
        """START on the data connection, then join it to the visitor (callbacks only)."""
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(entry.sock.fileno())  # the parked watch
        # The address accept() gave: getpeername() fails once a visitor has reset.
        visitor = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else "?"
        start = P.encode(P.START, tunnel=tunnel.id, visitor=visitor)
        join: Any
        try:
            if entry.sealed is not None:
                join = sealpump.Bridge(entry.sealed, conn, start, keep=True)
            else:  # a parked connection's send buffer is empty: START goes at once
                if entry.sock.send(start) != len(start):
                    raise BlockingIOError("START did not fit the send buffer")
                join = start_join(conn, entry.sock)
        except OSError as exc:
            log.debug("data connection for %s failed: %s", visitor, exc)
            entry.close()
            _reset(conn)
            return
        self.stats["active"] += 1
        self._joins.add(join)
        join.done.add_done_callback(lambda _: self._served(tunnel, entry, join))

    def _served(self, tunnel: Tunnel, entry: _Conn, join: Any) -> None:
        self._joins.discard(join)
        self.stats["active"] -= 1
        if entry.sealed is not None and not entry.sealed.closed:
            self._repark(tunnel, entry)

    # ---- housekeeping and metrics ---------------------------------------------------------

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(5)
            now = time.monotonic()
            for key in [k for k, (_, until) in self.reservations.items() if until <= now]:
                del self.reservations[key]
            # A ticket the agent never used (its connection failed: out of descriptors, a
            # network hiccup) must not count against the pool forever, or the tunnel starves.
            for ticket, issued in [(t, tun.tickets.get(t, now)) for t, tun in self.tickets.items()]:
                if now - issued > TICKET_TTL:
                    tunnel = self.tickets.pop(ticket)
                    tunnel.tickets.pop(ticket, None)
                    self.stats["tickets_expired"] += 1
                    self._refill(tunnel)
            for s in list(self.sessions):
                if now - s.last_seen > IDLE_TIMEOUT:
                    log.info(
                        "agent %s silent for %.0f s: dropping", s.token_label, now - s.last_seen
                    )
                    s.transport.abort()

    async def _metrics(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            lines = [
                f"natkit_relay_agents {len(self.sessions)}",
                f"natkit_relay_tunnels {len(self.tunnels_by_key)}",
                f"natkit_relay_p2p_rooms {len(self.rendezvous.rooms)}",
                f"natkit_relay_p2p_paths {sum(self.rendezvous.paths.values())}",
            ] + [
                f'natkit_relay_events_total{{event="{k}"}} {v}'
                for k, v in sorted(self.stats.items())
            ]
            body = ("\n".join(lines) + "\n").encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))  # fmt: skip
            await writer.drain()
        writer.close()


# How a visitor to the HTTP or HTTPS port is routed: its host name from what bytes, at most how many.
_ROUTE_BY: dict[str, tuple[Callable[[bytes], str | None], int]] = {
    "http": (sniff.http_host, sniff.MAX_HTTP_HEAD),
    "tls": (sniff.tls_sni, sniff.MAX_CLIENT_HELLO),
}


def _resume_if_open(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, ready: Callable[[], None]
) -> None:
    if sock.fileno() >= 0:
        loop.add_reader(sock.fileno(), ready)


def _reset(conn: socket.socket) -> None:
    """Close with a TCP reset, so the visitor sees a refusal rather than an empty reply."""
    reset_on_close(conn)
    conn.close()


# Linux copies TCP_NODELAY and the keepalive settings of a listening socket to the sockets
# it accepts: set once on the listener, they cost no system calls per visitor.
_ACCEPTED_INHERIT_TUNING = sys.platform.startswith("linux")


def _tune(conn: socket.socket) -> None:
    """No Nagle delay; and TCP keepalive so half-open connections (a peer that vanished
    without a FIN) expire in about two minutes instead of lingering forever."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4)):
        if hasattr(socket, opt):
            conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


def _drain(conn: socket.socket) -> None:
    """Read what a refused visitor sent (its head was only peeked at): closing a socket
    with unread data sends a RST, and the visitor may lose our answer to it."""
    with contextlib.suppress(OSError):
        for _ in range(8):
            if not conn.recv(65536):
                return


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _peek(conn: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    while True:
        try:
            return conn.recv(n, socket.MSG_PEEK)
        except BlockingIOError:
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_reader(conn.fileno(), _wake, fut)
            try:
                await fut
            finally:
                loop.remove_reader(conn.fileno())


async def _peek_until(
    conn: socket.socket, parse: Callable[[bytes], str | None], limit: int
) -> str | None:
    """Peek at the visitor's first bytes until ``parse`` can route them (the bytes stay queued)."""
    seen = 0
    pause = 0.001
    while True:
        data = await _peek(conn, limit + 1)
        if not data:
            raise ProtocolError("visitor closed before sending its request")
        result = parse(data)
        if result is not None:
            return result
        if len(data) > limit:
            raise ProtocolError("visitor's request head is too large")
        if len(data) == seen:
            # Nothing new. The peeked bytes keep the socket readable, so readiness cannot
            # tell us when more arrive: poll, backing off so slow visitors cost little.
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)
        else:
            pause = 0.001
        seen = len(data)
