"""The relay as a rendezvous for peer-to-peer: rooms, signals, the relay-fallback path.

A room is keyed by (token_id, name): only agents proving the same token meet. It has at
most one member per role (``listen``, ``connect``). Each time the two are together (a
*pairing*) both get ``P2P_PEER present=true`` with a fresh one-time ticket; when one goes,
the other gets ``present=false`` and every ticket and parked connection of that pairing
dies. A JOIN for a role that is taken is refused (``busy``) unless it comes from the same
agent instance on a new connection: an agent back from an outage before the relay noticed
its old connection die takes its place over (the old connection gets ``P2P_LEAVE``). A JOIN
repeated on the same connection answers again with a fresh ticket (to open another path).

The relay-fallback path: each peer opens a TCP connection to the listen port with a sealed
opening (:mod:`natkit.relay.seal`: the ticket named by its handle, ``DATA {ticket}`` sealed
under keys from the agent's session secret and the ticket), so the ticket never travels in
clear and one lifted from the wire joins nobody; a plain ``DATA`` with a P2P ticket is
refused. The first waits (``PATH_WAIT``); when the other's arrives, both get ``P2P_JOINED
{}`` (plain) and then the sockets are spliced. After the opening the bytes are the peers'
own, end-to-end encrypted by the P2P layer, so the relay carries nothing it could read.
A joined path outlives the rooms and control connections (like a tunnel's visitor).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from natkit.errors import ProtocolError
from natkit.relay import messages as M
from natkit.relay.control import ticket_handle
from natkit.relay.pump import join_sockets


class Session(Protocol):
    """An agent's authenticated control connection, as a room sees it."""

    token_id: str | None
    data_key: bytes  # the session's secret for sealed data connections (WELCOME)

    @property
    def instance(self) -> str:
        """The agent process, as it proved at login."""
        ...

    def send(self, msg: M.Message) -> None: ...
    def backlog(self) -> int: ...


log = logging.getLogger("natkit.relay")

PATH_WAIT = 15.0  # how long the first data connection of a pair waits for the second
# Signals and JOINs share one token bucket per control connection, in bytes: each message
# costs its data plus SIGNAL_COST, so neither many tiny ones nor a few huge ones flood a peer.
SIGNAL_COST = 512
SIGNAL_BURST = 128 * 1024
SIGNAL_RATE = 32 * 1024  # per second
# A peer that does not read its control connection gets no more signals piled on it.
MAX_PEER_BACKLOG = 1 << 20

Key = tuple[str, str]  # (token_id, room name)


def other_role(role: str) -> str:
    return "connect" if role == "listen" else "listen"


class Bucket:
    """A token bucket: ``burst`` at most, refilled at ``rate`` a second; ``take`` spends
    ``cost`` if there is that much."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.level, self.at = burst, now

    def take(self, cost: float, now: float) -> bool:
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level < cost:
            return False
        self.level -= cost
        return True


@dataclasses.dataclass
class _Member:
    session: Session
    instance: str
    ticket: str = ""


class _Parked:
    """The first data connection of a pair, waiting for the other (bounded in time)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.timer: asyncio.TimerHandle | None = None

    def detach(self) -> socket.socket:
        """Stop watching the socket; it is the caller's now."""
        if self.timer is not None:
            self.timer.cancel()
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        return self.sock

    def fail(self, code: str, message: str) -> None:
        """Tell the waiting peer why (one small frame into an empty buffer) and close."""
        sock = self.detach()
        with contextlib.suppress(OSError):
            sock.send(M.encode(M.Error(code=code, message=message)))
        sock.close()


class Room:
    def __init__(self, key: Key) -> None:
        self.key = key
        self.name = key[1]
        self.members: dict[str, _Member] = {}
        self.generation = 0  # one per pairing: tickets and parked connections belong to one
        self.parked: dict[str, _Parked] = {}


Spawn = Callable[[Coroutine[Any, Any, None]], object]


class Rooms:
    """Every room of one relay, driven by its control sessions and data connections."""

    def __init__(
        self,
        stats: collections.Counter[str],
        spawn: Spawn,
        *,
        max_rooms_per_token: int = 64,
        max_paths_per_token: int = 64,
    ) -> None:
        self.stats = stats
        self.spawn = spawn
        self.max_rooms_per_token = max_rooms_per_token
        self.max_paths_per_token = max_paths_per_token
        self.rooms: dict[Key, Room] = {}
        self.tickets: dict[str, tuple[Room, str, int]] = {}  # ticket -> room, role, generation
        self.handles: dict[str, str] = {}  # ticket_handle(ticket) -> ticket, for sealed openings
        self.joined: dict[Session, dict[str, str]] = {}  # session -> room name -> role
        self.buckets: dict[Session, Bucket] = {}
        self.rooms_per_token: collections.Counter[str] = collections.Counter()
        self.paths: collections.Counter[str] = collections.Counter()  # joined pairs per token

    # ---- control messages ----------------------------------------------------------------

    def on_message(self, s: Session, msg: M.Message) -> None:
        if isinstance(msg, M.P2PJoin):
            # The room's member is the authenticated agent instance (and its own name for
            # the room): a JOIN cannot claim another agent's place by naming its instance.
            member = f"{s.instance}/{msg.instance}" if msg.instance else ""
            self._join(s, msg.name, msg.role, member)
        elif isinstance(msg, M.P2PSignal):
            self._signal(s, msg.name, msg.data)
        elif isinstance(msg, M.P2PLeave):
            role = self.joined.get(s, {}).get(msg.name)
            room = self.rooms.get(self._key(s, msg.name))
            if role is not None and room is not None:
                self._remove(room, role)
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} from an agent")

    def _key(self, s: Session, name: str) -> Key:
        assert s.token_id is not None
        return (s.token_id, name)

    def _afford(self, s: Session, cost: int) -> bool:
        now = time.monotonic()
        bucket = self.buckets.get(s)
        if bucket is None:
            bucket = self.buckets[s] = Bucket(SIGNAL_RATE, SIGNAL_BURST, now)
        return bucket.take(cost, now)

    @staticmethod
    def _refuse(s: Session, name: str, about: str, code: str, message: str) -> None:
        s.send(M.P2PError(name=name, about=about, code=code, message=message))

    def _join(self, s: Session, name: str, role: str, instance: str) -> None:
        if not self._afford(s, SIGNAL_COST):
            self.stats["p2p_rate_limited"] += 1
            self._refuse(s, name, "join", "rate", f"too many P2P messages: JOIN {name!r} later")
            return
        mine = self.joined.get(s, {})
        if mine.get(name, role) != role:
            self._refuse(
                s,
                name,
                "join",
                "busy",
                f"this connection already is the {mine[name]} peer of room {name!r}",
            )
            return
        key = self._key(s, name)
        room = self.rooms.get(key)
        if room is None:
            if self.rooms_per_token[key[0]] >= self.max_rooms_per_token:
                self._refuse(
                    s,
                    name,
                    "join",
                    "limit",
                    f"this token has {self.max_rooms_per_token} P2P rooms already: leave one",
                )
                return
            room = self.rooms[key] = Room(key)
            self.rooms_per_token[key[0]] += 1
            self.stats["p2p_rooms"] += 1
        current = room.members.get(role)
        if current is not None and current.session is s:
            self._answer(room, role)  # a repeated JOIN: a fresh ticket
            return
        if current is not None:
            if not instance or current.instance != instance:
                self._refuse(
                    s,
                    name,
                    "join",
                    "busy",
                    f"room {name!r} already has a {role} peer (another agent with this token)",
                )
                return
            # The same agent on a new connection, before the relay noticed its old one die.
            log.info("P2P room %r: the %s peer is back on a new connection", name, role)
            self.stats["p2p_takeovers"] += 1
            del room.members[role]
            self._drop_ticket(current.ticket)
            self._forget(current.session, name)
            current.session.send(M.P2PLeave(name=name))
        room.members[role] = _Member(s, instance)
        self.joined.setdefault(s, {})[name] = role
        if other_role(role) in room.members:
            self._pair(room)
        else:
            s.send(M.P2PPeer(name=name, present=False, ticket=""))

    def _issue(self, room: Room, role: str) -> str:
        member = room.members[role]
        self._drop_ticket(member.ticket)
        member.ticket = secrets.token_urlsafe(18)
        self.tickets[member.ticket] = (room, role, room.generation)
        self.handles[ticket_handle(member.ticket)] = member.ticket
        return member.ticket

    def _drop_ticket(self, ticket: str) -> None:
        if self.tickets.pop(ticket, None) is not None:
            self.handles.pop(ticket_handle(ticket), None)

    def _pair(self, room: Room) -> None:
        """Both peers are here: a new pairing, fresh tickets, and each is told."""
        room.generation += 1
        self._end_paths(
            room, "gone", "the other peer came back on a new connection: use the new ticket"
        )
        for role, member in room.members.items():
            member.session.send(
                M.P2PPeer(name=room.name, present=True, ticket=self._issue(room, role))
            )

    def _answer(self, room: Room, role: str) -> None:
        member = room.members[role]
        if other_role(role) in room.members:
            member.session.send(
                M.P2PPeer(name=room.name, present=True, ticket=self._issue(room, role))
            )
        else:
            member.session.send(M.P2PPeer(name=room.name, present=False, ticket=""))

    def _remove(self, room: Room, role: str) -> None:
        member = room.members.pop(role)
        self._drop_ticket(member.ticket)
        self._forget(member.session, room.name)
        self._end_paths(room, "gone", "the other peer left the room")
        other = room.members.get(other_role(role))
        if other is not None:
            self._drop_ticket(other.ticket)
            other.ticket = ""
            other.session.send(M.P2PPeer(name=room.name, present=False, ticket=""))
        elif self.rooms.get(room.key) is room:
            del self.rooms[room.key]
            self.rooms_per_token[room.key[0]] -= 1
            if self.rooms_per_token[room.key[0]] <= 0:
                del self.rooms_per_token[room.key[0]]

    def _forget(self, s: Session, name: str) -> None:
        mine = self.joined.get(s)
        if mine is not None:
            mine.pop(name, None)
            if not mine:
                del self.joined[s]

    def _signal(self, s: Session, name: str, data: str) -> None:
        role = self.joined.get(s, {}).get(name)
        room = self.rooms.get(self._key(s, name))
        peer = room.members.get(other_role(role)) if room and role else None
        if peer is None:
            # Not in the room, or alone in it: the sender learns from P2P_PEER, not from us.
            self.stats["p2p_signals_dropped"] += 1
            return
        if not self._afford(s, len(data) + SIGNAL_COST):
            self.stats["p2p_rate_limited"] += 1
            self._refuse(
                s,
                name,
                "signal",
                "rate",
                f"signal to room {name!r} dropped: over {SIGNAL_RATE // 1024} KiB/s",
            )
            return
        if peer.session.backlog() > MAX_PEER_BACKLOG:
            self.stats["p2p_signals_dropped"] += 1
            self._refuse(
                s,
                name,
                "signal",
                "rate",
                f"signal to room {name!r} dropped: the peer is not reading",
            )
            return
        peer.session.send(M.P2PSignal(name=name, data=data))
        self.stats["p2p_signals"] += 1

    def session_ended(self, s: Session) -> None:
        self.buckets.pop(s, None)
        for name, role in list(self.joined.get(s, {}).items()):
            room = self.rooms.get(self._key(s, name))
            if room is not None and (m := room.members.get(role)) is not None and m.session is s:
                self._remove(room, role)
        self.joined.pop(s, None)

    # ---- the relay-fallback data path --------------------------------------------------------

    def has_ticket(self, ticket: str) -> bool:
        return ticket in self.tickets

    def sealed_key(self, handle: str) -> tuple[str, bytes] | None:
        """The P2P ticket behind a sealed opening's handle and the session secret of the
        peer it was issued to (the opening must be sealed under both), or None."""
        ticket = self.handles.get(handle)
        entry = self.tickets.get(ticket or "")
        if ticket is None or entry is None:
            return None
        room, role, _ = entry
        member = room.members.get(role)
        if member is None or member.ticket != ticket or not member.session.data_key:
            return None
        return ticket, member.session.data_key

    def data_conn(self, conn: socket.socket, ticket: str) -> None:
        """A data connection whose sealed opening proved a P2P ticket (taken: one-time);
        after the opening its bytes are the peers' own (encrypted end to end by them)."""
        room, role, generation = self.tickets.pop(ticket)
        self.handles.pop(ticket_handle(ticket), None)
        member = room.members.get(role)
        if member is not None and member.ticket == ticket:
            member.ticket = ""
        if self.rooms.get(room.key) is not room or generation != room.generation:
            self.stats["bad_tickets"] += 1
            conn.close()
            return
        waiting = room.parked.pop(other_role(role), None)
        if waiting is None:
            self._park(room, role, conn)
            return
        first = waiting.detach()
        token = room.key[0]
        if self.paths[token] >= self.max_paths_per_token:
            self.stats["p2p_paths_refused"] += 1
            message = f"this token has {self.max_paths_per_token} relay paths open already"
            for sock in (first, conn):
                with contextlib.suppress(OSError):
                    sock.send(M.encode(M.Error(code="limit", message=message)))
                sock.close()
            return
        self.paths[token] += 1  # counted now: several pairs may come in one loop iteration
        self.spawn(self._bridge(token, first, conn))

    def _park(self, room: Room, role: str, conn: socket.socket) -> None:
        old = room.parked.pop(role, None)
        if old is not None:
            old.fail("replaced", "a newer relay path of the same peer replaced this one")
        parked = _Parked(conn)
        loop = asyncio.get_running_loop()
        # While it waits, readable means the peer gave up (EOF) or spoke too early: drop it.
        loop.add_reader(conn.fileno(), self._drop_parked, room, role, parked)
        parked.timer = loop.call_later(PATH_WAIT, self._expire, room, role, parked)
        room.parked[role] = parked

    def _drop_parked(self, room: Room, role: str, parked: _Parked) -> None:
        if room.parked.get(role) is parked:
            del room.parked[role]
        parked.detach().close()

    def _expire(self, room: Room, role: str, parked: _Parked) -> None:
        if room.parked.get(role) is parked:
            del room.parked[role]
        self.stats["p2p_path_timeouts"] += 1
        parked.fail("timeout", f"the other peer opened no relay path within {PATH_WAIT:g} s")

    def _end_paths(self, room: Room, code: str, message: str) -> None:
        for parked in room.parked.values():
            parked.fail(code, message)
        room.parked.clear()

    async def _bridge(self, token: str, a: socket.socket, b: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self.stats["p2p_bridged"] += 1
        try:
            marker = M.encode(M.P2PJoined())
            try:
                # Both markers go out before any byte is spliced: each side reads exactly
                # one frame, and what follows is the other peer's.
                await loop.sock_sendall(a, marker)
                await loop.sock_sendall(b, marker)
            except OSError:
                a.close()
                b.close()
                return
            await join_sockets(a, b)
        finally:
            self.paths[token] -= 1
            if self.paths[token] <= 0:
                del self.paths[token]

    def close(self) -> None:
        for room in self.rooms.values():
            self._end_paths(room, "gone", "the relay is shutting down")
        self.rooms.clear()
        self.tickets.clear()
        self.handles.clear()
