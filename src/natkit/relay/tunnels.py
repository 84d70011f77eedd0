"""One open tunnel on the relay: its visitors and the pool of data connections its agent
opened ahead of them.

A visitor is joined to a parked data connection at once, in the callback that accepted
or routed it (no task, no loop iteration in between); only when the pool is empty does it
wait, as a task, for the agent's next connection (bounded in number and time). The pool
is refilled by asking the agent for more (TICKETS, coalesced to one message per loop
iteration). A sealed data connection whose visitor ended cleanly is parked again for the
next visitor (like HTTP keep-alive); a plaintext one serves one visitor.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import socket
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from natkit.net.sockets import reset_on_close
from natkit.relay import gate as G
from natkit.relay import messages as M
from natkit.relay import routing, sealpump, sniff
from natkit.relay.access import AccessPolicy
from natkit.relay.listeners import Acceptor
from natkit.relay.pump import start_join
from natkit.relay.tickets import TicketBook

log = logging.getLogger("natkit.relay")

VISITOR_WAIT = 10.0  # how long a visitor waits for a data connection


class ControlSession(Protocol):
    """What a tunnel needs of its agent's control connection."""

    tunnels: dict[str, ServedTunnel]
    data_key: bytes

    @property
    def alive(self) -> bool: ...

    def send(self, msg: M.Message) -> None: ...


class Hub(Protocol):
    """What a tunnel needs of the relay."""

    pool_size: int
    max_pending_visitors: int
    stats: collections.Counter[str]
    refusals: collections.Counter[str]  # visitors refused by access policies, by reason
    tickets: TicketBook[ServedTunnel]
    joins: set[Any]

    def spawn(self, coro: Coroutine[Any, Any, None]) -> object: ...


class ParkedConn:
    """A data connection in a tunnel's pool: plain, or sealed (then ``sealed`` is set)."""

    __slots__ = ("dead", "sealed", "sock")

    def __init__(self, sock: socket.socket, sealed: sealpump.SealedSocket | None = None) -> None:
        self.sock, self.sealed = sock, sealed
        self.dead = False

    def close(self) -> None:
        self.dead = True
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


class ServedTunnel:
    """A tunnel as the relay serves it (the agent's side is a
    :class:`~natkit.relay.agent.TunnelSpec`, the Python API's a :class:`natkit.Tunnel`)."""

    def __init__(
        self,
        hub: Hub,
        session: ControlSession,
        tid: str,
        kind: str,
        key: str,
        public: str,
        *,
        plaintext: bool,
        access: AccessPolicy | None = None,
    ) -> None:
        self.hub, self.session = hub, session
        self.id, self.kind, self.key, self.public = tid, kind, key, public
        self.plaintext = plaintext  # data connections in clear: the agent asked, the relay allows
        self.pool: collections.deque[ParkedConn] = collections.deque()
        self.waiting: collections.deque[asyncio.Future[ParkedConn]] = collections.deque()
        self.acceptor: Acceptor | None = None  # a tcp tunnel's public port
        self.open = True
        self.refill_scheduled = False
        self.visitors = 0
        self.last_notice = -1e9  # when the agent was last told of interference
        self.notices_held = 0
        # Who may in (None: anyone, and no check at all); refusals told to the agent.
        self.gate: G.Gate | None = None
        self.reports: G.RefusalReports | None = None
        if access is not None and not access.empty:
            self.gate = G.Gate(access, time.monotonic)
            self.reports = G.RefusalReports(time.monotonic)

    def __repr__(self) -> str:
        return f"<ServedTunnel {self.id} {self.public}>"

    @property
    def serving(self) -> bool:
        return self.open and self.session.alive

    # ---- visitors --------------------------------------------------------------------------

    def visitor(self, conn: socket.socket, addr: Any) -> None:
        """Join a visitor to a pooled data connection now, or wait for one (a task)."""
        if self.gate is not None and not self._admitted(conn, addr, self.gate):
            return
        hub = self.hub
        hub.stats["visitors"] += 1
        self.visitors += 1
        while self.pool:
            entry = self.pool.popleft()
            if not entry.dead:
                self.refill()
                self._serve(conn, addr, entry)
                return
        if len(self.waiting) >= hub.max_pending_visitors and self.acceptor is None:
            hub.stats["visitors_refused"] += 1  # a shared HTTP(S) port cannot pause
            reset(conn)
            return
        hub.spawn(self._wait_for_data_conn(conn, addr))

    def _admitted(self, conn: socket.socket, addr: Any, gate: G.Gate) -> bool:
        """The access policy's word on a visitor, before anything goes to the agent. An
        HTTP visitor's request head is complete here (it was routed by it) and still
        unread: for basic auth it is peeked at again."""
        host = str(addr[0]) if isinstance(addr, tuple) and addr else ""
        head = None
        if gate.needs_head:
            try:
                head = conn.recv(sniff.MAX_HTTP_HEAD + 1, socket.MSG_PEEK)
            except OSError:
                head = b""
        reason = gate.check(host, head)
        if not reason:
            return True
        self.hub.refusals[reason] += 1
        if self.kind == "http":
            routing.answer(conn, *_REFUSAL_ANSWERS[reason](gate))
            conn.close()
        else:
            reset(conn)
        assert self.reports is not None
        more = self.reports.report()
        if more is not None:
            visitor = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else "?"
            self.session.send(M.Refused(tunnel=self.id, visitor=visitor[: M.MAX_DIAL_HOST + 8],
                                        reason=reason, at=time.time(), more=more))  # fmt: skip
        return False

    async def _wait_for_data_conn(self, conn: socket.socket, addr: Any) -> None:
        fut: asyncio.Future[ParkedConn] = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        if len(self.waiting) >= self.hub.max_pending_visitors and self.acceptor is not None:
            self.acceptor.pause()  # the rest wait in the kernel's backlog
            self.hub.stats["accept_pauses"] += 1
        self.refill()
        try:
            entry = await asyncio.wait_for(fut, VISITOR_WAIT)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self.hub.stats["visitors_timed_out"] += 1
            with contextlib.suppress(ValueError):
                self.waiting.remove(fut)
            if fut.done() and not fut.cancelled():  # handed over just as time ran out
                self.park(fut.result())
            self._resume_accepting()
            reset(conn)  # a refusal, not an empty answer
            return
        if entry.dead:  # the agent dropped it before this visitor could take it
            await self._wait_for_data_conn(conn, addr)
            return
        self._serve(conn, addr, entry)

    def _serve(self, conn: socket.socket, addr: Any, entry: ParkedConn) -> None:
        """START on the data connection, then join it to the visitor (callbacks only)."""
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(entry.sock.fileno())  # the parked watch
        # The address accept() gave: getpeername() fails once a visitor has reset.
        visitor = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else "?"
        start = M.encode(M.Start(tunnel=self.id, visitor=visitor))
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
            reset(conn)
            return
        self.hub.stats["active"] += 1
        self.hub.joins.add(join)
        join.done.add_done_callback(lambda _: self._served(entry, join))

    def _served(self, entry: ParkedConn, join: Any) -> None:
        self.hub.joins.discard(join)
        self.hub.stats["active"] -= 1
        if entry.sealed is not None and not entry.sealed.closed:
            self._repark(entry)

    # ---- the pool ----------------------------------------------------------------------------

    def park(self, entry: ParkedConn) -> None:
        """A data connection ready for a visitor: to the first one waiting, or the pool.
        While parked, readable means the agent went away (or misbehaves): it is dropped."""
        if not self.serving:  # closed while the connection was on its way (or its wait)
            entry.close()
            return
        loop = asyncio.get_running_loop()
        loop.add_reader(entry.sock.fileno(), self._drop_parked, entry)
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_result(entry)
                self._resume_accepting()
                return
        self.pool.append(entry)
        self._resume_accepting()

    def _resume_accepting(self) -> None:
        acceptor = self.acceptor
        waiting = len(self.waiting)
        if acceptor is not None and acceptor.paused and waiting < self.hub.max_pending_visitors:
            acceptor.resume()

    def _repark(self, entry: ParkedConn) -> None:
        """A sealed data connection whose visitor ended cleanly serves the next one: no new
        connection for it. The pool stays bounded."""
        sealed = entry.sealed
        if (
            not self.serving
            or sealed is None
            or sealed.pushback
            or sealed.chan.has_input()  # the agent spoke after its end mark
            or len(self.pool) >= self.hub.pool_size
        ):
            entry.close()
            return
        self.hub.stats["data_conns_reused"] += 1
        self.park(entry)

    def _drop_parked(self, entry: ParkedConn) -> None:
        with contextlib.suppress(ValueError):
            self.pool.remove(entry)
        if not entry.dead:
            entry.close()
            self.refill()

    def refill(self) -> None:
        """Ask the agent for data connections: the pool target plus the visitors waiting.

        Coalesced: one TICKETS message per tunnel per loop iteration. Single-use (plain)
        connections: one new one per visitor, so the cost of opening them is spread evenly
        instead of arriving in bursts. Reused (sealed) ones: only once the pool has drained
        to half its target (or visitors wait), as most come back.
        """
        if self.refill_scheduled or not self.serving:
            return
        size = self.hub.pool_size
        have = len(self.pool) + self.hub.tickets.outstanding(self)
        low = size if self.plaintext else size // 2 + 1
        if not self.waiting and have >= low:
            return
        self.refill_scheduled = True
        asyncio.get_running_loop().call_soon(self._send_tickets)

    def _send_tickets(self) -> None:
        self.refill_scheduled = False
        if not self.serving:
            return
        want = self.hub.pool_size + len(self.waiting)
        have = len(self.pool) + self.hub.tickets.outstanding(self)
        n = min(want - have, M.MAX_TICKETS)
        if n > 0:
            tickets = self.hub.tickets.issue(self, n, sealed=not self.plaintext)
            self.session.send(M.Tickets(tunnel=self.id, tickets=tuple(tickets)))

    # ---- the end -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving: the public port closes, parked connections and waiting visitors go
        (visitors already joined go on to their end)."""
        if not self.open:
            return
        self.open = False
        if self.acceptor is not None:
            self.acceptor.close()
        for entry in self.pool:
            entry.close()
        self.pool.clear()
        for fut in self.waiting:
            if not fut.done():
                fut.cancel()
        self.hub.tickets.drop(self)


def _forbidden(gate: G.Gate) -> tuple[bytes, bytes, bytes]:
    return b"403 Forbidden", b"this address may not reach this tunnel\n", b""


def _too_many(gate: G.Gate) -> tuple[bytes, bytes, bytes]:
    rate = gate.policy.rate
    wait = 1 if rate is None else max(1, math.ceil(rate.per / rate.count))
    return (
        b"429 Too Many Requests",
        b"too many connections: slow down\n",
        b"Retry-After: %d\r\n" % wait,
    )


def _unauthorized(gate: G.Gate) -> tuple[bytes, bytes, bytes]:
    challenge = (
        b'WWW-Authenticate: Basic realm="%s", charset="UTF-8"\r\n' % gate.policy.realm.encode()
    )
    return b"401 Unauthorized", b"this tunnel needs a user name and password\n", challenge


# The relay's own answer to a refused HTTP visitor, by reason (other kinds get a reset).
_REFUSAL_ANSWERS = {
    G.DENIED: _forbidden,
    G.NOT_ALLOWED: _forbidden,
    G.RATE_LIMITED: _too_many,
    G.AUTH_MISSING: _unauthorized,
    G.AUTH_WRONG: _unauthorized,
}


def reset(conn: socket.socket) -> None:
    """Close with a TCP reset, so the visitor sees a refusal rather than an empty reply."""
    reset_on_close(conn)
    conn.close()
