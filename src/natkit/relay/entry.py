"""The relay's listen port: what each new connection is, told by its first bytes.

* ``0x16`` (a TLS handshake): an agent's control connection (:mod:`natkit.relay.sessions`);
* ``S``: a sealed data connection, which names its ticket only by its handle and proves
  the ticket by the keys it derives from it (:mod:`natkit.relay.seal`);
* a DATA frame in clear: a plaintext data connection (a tunnel whose agent asked for
  plaintext, on a relay that allows it) or a peer-to-peer relay path;
* ``0x00`` (no relay message has type 0): a STUN Binding request over TCP (RFC 8489
  6.2.2), answered with the connection's source address and closed. A P2P peer learns
  the public address of a TCP port this way before it hole-punches TCP
  (:mod:`natkit.p2p.tcppunch`); the UDP responder cannot tell it that.

Every connection here is unauthenticated until its ticket or its login checks out, and
counts against its address's limits (:mod:`natkit.relay.limits`) until then.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any, Protocol

from natkit.errors import NatkitError, ProtocolError
from natkit.relay import messages as M
from natkit.relay import seal, sealpump
from natkit.relay.limits import AddressLimits
from natkit.relay.sessions import AgentSession
from natkit.relay.sockframes import peek, read_frame, recv_exact
from natkit.relay.tickets import TicketBook, TicketRefused
from natkit.relay.tunnels import ParkedConn, ServedTunnel
from natkit.stun import codec as stuncodec
from natkit.stun import server as stunserver

log = logging.getLogger("natkit.relay")

HANDSHAKE_TIMEOUT = 10.0  # connect to authenticated, TLS handshake included
_PLAIN_DATA_PEEK = 256  # a plain DATA frame (its ticket is at most M.MAX_TICKET characters) fits


class Hub(Protocol):
    stats: Any
    limits: AddressLimits
    tickets: TicketBook[ServedTunnel]
    ssl: ssl.SSLContext

    def spawn(self, coro: Any) -> object: ...
    def new_session(self, peer_ip: str, deadline: float) -> AgentSession: ...
    def session_ended(self, s: AgentSession) -> None: ...
    def p2p_data_conn(self, conn: socket.socket, ticket: str) -> bool: ...
    def p2p_sealed_key(self, handle: str) -> tuple[str, bytes] | None: ...
    def answers_stun(self) -> bool: ...
    def interference(self, tunnel: ServedTunnel, what: str) -> None: ...


class ListenPort:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def on_connection(self, conn: socket.socket, addr: Any) -> None:
        """The accept callback. A plain data connection whose DATA frame came with it (the
        usual case: plaintext mode opens one per visitor) is taken here; anything else is
        read by a task."""
        ip = str(addr[0]) if isinstance(addr, tuple) else "?"
        why = self.hub.limits.admit(ip)
        if why:
            self.hub.stats["refused_unauthenticated"] += 1
            conn.close()
            return
        try:
            head = conn.recv(_PLAIN_DATA_PEEK, socket.MSG_PEEK)
            msg_type, length = M.decode_header(head) if len(head) >= M.HEADER.size else (0, 0)
        except (OSError, ProtocolError):  # not a relay frame (TLS, sealed, garbage)
            msg_type, length = 0, 0
        size = M.HEADER.size + length
        if msg_type != M.Data.TYPE or len(head) < size:  # TLS, sealed, or still coming
            self.hub.spawn(self._classify(conn, ip))
            return
        self.hub.limits.done(ip)
        try:
            msg = M.decode_body(msg_type, conn.recv(size)[M.HEADER.size :])
        except (OSError, ProtocolError) as exc:
            self._garbage(conn, ip, exc)
            return
        self._plain_data(conn, ip, msg)

    async def _classify(self, conn: socket.socket, ip: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANDSHAKE_TIMEOUT
        released = False
        try:
            try:
                first = await asyncio.wait_for(peek(conn, 1), HANDSHAKE_TIMEOUT)
            except (asyncio.TimeoutError, OSError):
                first = b""
            if not first:
                conn.close()
                return
            if first in seal.PREFIXES:
                await self._sealed(conn, ip)
            elif first == b"\x00" and self.hub.answers_stun():
                await self._stun(conn, ip, deadline)
            elif first[0] == 0x16:  # a TLS handshake: a control connection
                released = True  # the session gives its admission back (see RelayServer)
                await self._control(conn, ip, deadline)
            else:
                await self._plain(conn, ip)
        finally:
            if not released:
                self.hub.limits.done(ip)

    async def _control(self, conn: socket.socket, ip: str, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        session = self.hub.new_session(ip, deadline)
        try:
            await asyncio.wait_for(
                loop.connect_accepted_socket(lambda: session, conn, ssl=self.hub.ssl),
                max(0.1, deadline - loop.time()),
            )
        except (asyncio.TimeoutError, OSError, ssl.SSLError) as exc:
            log.info("TLS handshake with %s failed: %s", ip, exc)
            self.hub.stats["garbage"] += 1
            conn.close()
            if session.transport is None:  # never made: no connection_lost will come
                self.hub.session_ended(session)

    async def _stun(self, conn: socket.socket, ip: str, deadline: float) -> None:
        """One Binding request over TCP: answered (what the UDP responder would say) and
        the connection closed, all within the handshake's deadline; anything else is
        dropped as garbage."""
        loop = asyncio.get_running_loop()

        def left() -> float:
            return max(0.1, deadline - loop.time())

        try:
            header = await asyncio.wait_for(recv_exact(conn, stuncodec.HEADER_LEN), left())
            size = stuncodec.frame_length(header, max_size=stunserver.MAX_REQUEST)
            rest = await asyncio.wait_for(recv_exact(conn, size - stuncodec.HEADER_LEN), left())
            reply = stunserver.answer(header + rest, conn.getpeername())
            if reply is None:
                raise ProtocolError("not a plain STUN Binding request")
            await asyncio.wait_for(loop.sock_sendall(conn, reply), left())
            self.hub.stats["stun_tcp"] += 1
        except (asyncio.TimeoutError, OSError, NatkitError) as exc:
            self._garbage(conn, ip, exc)
            return
        conn.close()

    async def _plain(self, conn: socket.socket, ip: str) -> None:
        try:
            msg = await asyncio.wait_for(read_frame(conn), HANDSHAKE_TIMEOUT)
        except (asyncio.TimeoutError, OSError, ProtocolError) as exc:
            self._garbage(conn, ip, exc)
            return
        self._plain_data(conn, ip, msg)

    def _garbage(self, conn: socket.socket, ip: str, exc: BaseException) -> None:
        log.info("dropping a connection from %s: %s", ip, exc)
        self.hub.stats["garbage"] += 1
        conn.close()

    def _plain_data(self, conn: socket.socket, ip: str, msg: M.Message) -> None:
        """A plain connection's first frame: a plaintext tunnel's data connection (parked
        until a visitor comes). A P2P relay path opens sealed: its ticket never travels in
        clear, so one seen on the wire is worth nothing."""
        if not isinstance(msg, M.Data):
            self._garbage(conn, ip, ProtocolError(f"expected DATA, got {type(msg).__name__}"))
            return
        try:
            tunnel = self.hub.tickets.take_plain(msg.ticket)
        except TicketRefused as exc:
            self.hub.stats["bad_tickets"] += 1
            conn.close()
            if exc.owner is not None:
                self.hub.interference(exc.owner, f"{exc} (from {ip})")
            return
        if not tunnel.serving or not tunnel.plaintext:
            self.hub.stats["bad_tickets"] += 1
            conn.close()
            return
        tunnel.park(ParkedConn(conn))

    async def _sealed(self, conn: socket.socket, ip: str) -> None:
        found: list[ServedTunnel] = []
        p2p: list[str] = []

        def key_for(handle: str) -> tuple[str, bytes] | None:
            p2p_key = self.hub.p2p_sealed_key(handle)
            if p2p_key is not None:
                p2p.append(p2p_key[0])
                return p2p_key
            try:
                ticket, tunnel = self.hub.tickets.take_sealed(handle)
            except TicketRefused as exc:
                if exc.owner is not None:  # a replayed opening
                    self.hub.interference(exc.owner, f"{exc} (from {ip})")
                return None
            found.append(tunnel)
            if not tunnel.serving or tunnel.plaintext:
                return None
            return ticket, tunnel.session.data_key

        try:
            sealed = await asyncio.wait_for(
                sealpump.accept_sealed(conn, key_for), HANDSHAKE_TIMEOUT
            )
        except sealpump.UnknownTicketError as exc:
            log.info("dropping a connection from %s: %s", ip, exc)
            self.hub.stats["bad_tickets"] += 1
            conn.close()
            return
        except (asyncio.TimeoutError, OSError, ProtocolError) as exc:
            if found and isinstance(exc, ProtocolError):
                # A real ticket, and what followed did not open under its keys.
                self.hub.interference(found[0], f"a sealed data connection from {ip} failed "
                                      f"to authenticate ({exc})")  # fmt: skip
            self._garbage(conn, ip, exc)
            return
        if p2p:  # a relay path: sealed opening, then the peers' own (end-to-end) bytes
            if sealed.pushback or sealed.chan.has_input():  # spoke too early
                self.hub.stats["bad_tickets"] += 1
                sealed.close()
            else:
                self.hub.p2p_data_conn(sealed.sock, p2p[0])
            return
        tunnel = found[0]
        if sealed.pushback or sealed.chan.has_input():  # speaks before START
            self.hub.stats["bad_tickets"] += 1
            sealed.close()
            return
        tunnel.park(ParkedConn(sealed.sock, sealed))
