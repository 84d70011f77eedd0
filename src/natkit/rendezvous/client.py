"""The agent's side of the relay's P2P rendezvous: rooms, signals, the relay-fallback path.

>>> room = await agent.join_p2p("cam-1", "connect")   # the relay answered
>>> ticket = await room.wait_peer(30)                  # the listener is there too
>>> room.send_signal(offer); answer = await room.recv_signal(10)
>>> sock = await room.open_relay_path(ticket)          # if no direct path: via the relay

A room lives until :meth:`P2PRoom.leave` (or the agent closes). After the agent reconnects
it joins its rooms again by itself, as the same *instance*, so it takes its own place over
even if the relay has not yet noticed its old connection die. While disconnected the peer
counts as absent. The relay's room semantics are in :mod:`natkit.rendezvous.rooms`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import socket
from collections.abc import Callable
from typing import Any

from natkit.errors import NatkitError, ProtocolError
from natkit.relay import messages as M
from natkit.relay import seal
from natkit.relay.sealpump import begin_sealed, flush_all
from natkit.relay.sockframes import read_frame

log = logging.getLogger("natkit.relay")

MAX_INBOX = 256  # signals received and not yet read; more are dropped (and reported)
PATH_TIMEOUT = 20.0  # a little more than the relay waits for the second peer (15 s)
CONNECT_TIMEOUT = 10.0

Listener = Callable[[str, dict[str, Any]], None]
# The agent's session secret for sealed data connections and its AEAD (from WELCOME).
DataKey = tuple[bytes, str]


class RendezvousError(NatkitError):
    """A room could not be joined or used; ``code`` is the relay's (busy, limit, rate,
    timeout, gone, replaced…) or natkit's own (closed, absent, disconnected)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class RendezvousTimeoutError(RendezvousError):
    """Waited for a peer, a signal or an answer, and it did not come in time."""


class P2PRoom:
    """One room joined through the relay, as ``role`` (``listen`` or ``connect``).

    Events (``on_event(callback)``, ``callback(event, info)``): ``peer`` (present, with a
    fresh ``ticket``; repeats when the peer reconnects), ``peer_left`` (``reason``: left,
    relay connection lost), ``signal_dropped`` (``reason``), ``closed`` (``reason``).
    """

    def __init__(self, owner: RoomClient, name: str, role: str) -> None:
        self._owner = owner
        self.name, self.role = name, role
        self.instance = secrets.token_hex(8)  # stays the same across reconnections
        self.peer_present = False
        self.ticket = ""  # the latest relay-fallback ticket ("" while the peer is absent)
        self.closed: str = ""  # why the room is closed ("" while open)
        self.signals_dropped = 0
        self._inbox: collections.deque[str] = collections.deque()
        self._change = asyncio.Event()
        self._answer: asyncio.Future[None] | None = None  # a JOIN waiting for the relay
        self._listeners: list[Listener] = []

    # ---- for the P2P layer -------------------------------------------------------------------

    def on_event(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def wait_peer(self, timeout: float | None = None) -> str:
        """Wait until the other peer is in the room; its relay-fallback ticket."""
        await self._until(lambda: self.peer_present, timeout, "no peer joined")
        return self.ticket

    async def wait_peer_left(self, timeout: float | None = None) -> None:
        await self._until(lambda: not self.peer_present, timeout, "the peer did not leave")

    def send_signal(self, data: str) -> None:
        """Send ``data`` to the other peer (relayed verbatim, in order; at most 16 KiB once
        JSON-escaped: send ASCII, e.g. JSON or base64). Raises if it cannot go now."""
        self._check_open()
        size = M.signal_size(data)
        if size > M.MAX_SIGNAL:
            raise RendezvousError(
                f"signal of {size} bytes (JSON-escaped) is over the relay's {M.MAX_SIGNAL}: "
                "send less, or ASCII (non-ASCII characters take 6 bytes each)",
                "too-large",
            )
        if not self.peer_present:
            raise RendezvousError(
                f"no peer in room {self.name!r} to signal: await wait_peer() first", "absent"
            )
        if not self._owner.send(M.P2PSignal(name=self.name, data=data)):
            raise RendezvousError(
                f"not connected to relay {self._owner.relay_text}: the room re-joins when the "
                "agent reconnects; wait_peer() again, then send",
                "disconnected",
            )

    async def recv_signal(self, timeout: float | None = None) -> str:
        """The next signal from the other peer (queued in arrival order)."""
        await self._until(lambda: bool(self._inbox) or bool(self.closed), timeout, "no signal")
        if not self._inbox:  # closed, and every signal read
            raise RendezvousError(f"room {self.name!r} is closed: {self.closed}", "closed")
        return self._inbox.popleft()

    async def new_ticket(self, timeout: float = CONNECT_TIMEOUT) -> str:
        """A fresh relay-fallback ticket for another relay path (each ticket is one-time;
        both peers need a fresh one to join again). Raises if the peer is absent."""
        self._check_open()
        await self._owner.join_again(self, timeout)
        if not self.peer_present:
            raise RendezvousError(f"no peer in room {self.name!r}: no ticket", "absent")
        return self.ticket

    async def open_relay_path(
        self, ticket: str | None = None, timeout: float = PATH_TIMEOUT
    ) -> socket.socket:
        """Open the relay-fallback path with ``ticket`` (default: the room's latest) and
        wait until the relay has joined it to the peer's: a connected, non-blocking TCP
        socket whose bytes go to and come from the peer (encrypt them end to end)."""
        ticket = ticket if ticket is not None else self.ticket
        if not ticket:
            raise RendezvousError(
                f"no relay-fallback ticket for room {self.name!r}: await wait_peer() (or "
                "new_ticket() once one was used)",
                "absent",
            )
        if ticket == self.ticket:
            self.ticket = ""  # one-time: the relay forgets it now
        return await open_relay_path(
            self._owner.relay_addr, ticket, timeout, key=self._owner.data_key()
        )

    def leave(self) -> None:
        """Leave the room (the peer is told); idempotent."""
        if self.closed:
            return
        self._owner.send(M.P2PLeave(name=self.name))
        self._owner.forget(self)
        self._close("left")

    async def __aenter__(self) -> P2PRoom:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.leave()

    def __repr__(self) -> str:
        state = self.closed or ("peer present" if self.peer_present else "waiting")
        return f"<P2PRoom {self.name!r} {self.role} {state}>"

    # ---- driven by the agent ---------------------------------------------------------------

    def _emit(self, event: str, **info: Any) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, info)
            except Exception:
                log.exception("P2P room event listener failed")

    def _changed(self) -> None:
        event, self._change = self._change, asyncio.Event()
        event.set()

    def _check_open(self) -> None:
        if self.closed:
            raise RendezvousError(f"room {self.name!r} is closed: {self.closed}", "closed")

    async def _until(self, done: Callable[[], bool], timeout: float | None, what: str) -> None:
        async def wait() -> None:
            while not done():
                self._check_open()
                await self._change.wait()

        try:
            await asyncio.wait_for(wait(), timeout)
        except asyncio.TimeoutError:
            raise RendezvousTimeoutError(
                f"{what} in room {self.name!r} within {timeout:g} s", "timeout"
            ) from None

    def _peer(self, present: bool, ticket: str, reason: str = "left") -> None:
        was = self.peer_present
        self.peer_present, self.ticket = present, ticket if present else ""
        if present:
            self._emit("peer", ticket=ticket)
        elif was:
            self._emit("peer_left", reason=reason)
        self._changed()

    def _signal(self, data: str) -> None:
        if len(self._inbox) >= MAX_INBOX:
            self._dropped(f"more than {MAX_INBOX} signals not read yet")
            return
        self._inbox.append(data)
        self._changed()

    def _dropped(self, reason: str) -> None:
        self.signals_dropped += 1
        log.warning("P2P room %r: signal dropped: %s", self.name, reason)
        self._emit("signal_dropped", reason=reason)

    def _fail_answer(self, error: RendezvousError) -> None:
        answer = self._answer
        if answer is not None and not answer.done():
            answer.set_exception(error)
            answer.exception()  # marked as seen: the JOIN that waited may have timed out

    def _close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = reason
        self.peer_present, self.ticket = False, ""
        self._fail_answer(RendezvousError(f"room {self.name!r} closed: {reason}", "closed"))
        self._emit("closed", reason=reason)
        self._changed()


class RoomClient:
    """The rooms of one agent; the agent feeds it frames and its connection's ups and downs."""

    def __init__(
        self,
        send: Callable[[M.Message], bool],
        relay_addr: tuple[str, int],
        relay_text: str,
        data_key: Callable[[], DataKey] = lambda: (b"", seal.CHACHA),
    ) -> None:
        self.send = send  # sends a message if connected; False when not
        self.relay_addr, self.relay_text = relay_addr, relay_text
        self.data_key = data_key  # the current session's (it changes on reconnection)
        self.rooms: dict[str, P2PRoom] = {}

    async def join(self, name: str, role: str, timeout: float) -> P2PRoom:
        problem = M.room_name_problem(name)
        if problem:
            raise RendezvousError(f"bad room name {name!r}: {problem}", "name")
        if role not in M.ROLES:
            raise RendezvousError(f"role must be one of {', '.join(M.ROLES)}, not {role!r}", "role")
        if name in self.rooms:
            raise RendezvousError(f"this agent is in room {name!r} already: leave it first", "busy")
        room = self.rooms[name] = P2PRoom(self, name, role)
        try:
            await self.join_again(room, timeout)
        except BaseException:
            self.forget(room)
            room._close("not joined")
            raise
        return room

    async def join_again(self, room: P2PRoom, timeout: float) -> None:
        """(Re)send JOIN and wait for the relay's answer. When not connected, the JOIN goes
        out with the others as soon as the agent is (see :meth:`attach`)."""
        if room._answer is None or room._answer.done():
            room._answer = asyncio.get_running_loop().create_future()
        answer = room._answer
        self._send_join(room)
        try:
            await asyncio.wait_for(asyncio.shield(answer), timeout)
        except asyncio.TimeoutError:
            raise RendezvousTimeoutError(
                f"relay {self.relay_text} did not answer the request to join room {room.name!r} "
                f"within {timeout:g} s (not connected to it: is the relay up and reachable?)",
                "timeout",
            ) from None

    def _send_join(self, room: P2PRoom) -> None:
        self.send(M.P2PJoin(name=room.name, role=room.role, instance=room.instance))

    def forget(self, room: P2PRoom) -> None:
        if self.rooms.get(room.name) is room:
            del self.rooms[room.name]

    def attach(self) -> None:
        """A new control session: join every room again."""
        for room in self.rooms.values():
            self._send_join(room)

    def detach(self) -> None:
        """The control session is gone: no peer can be reached through it."""
        for room in self.rooms.values():
            if room.peer_present:
                room._peer(False, "", reason="relay connection lost")

    def close(self) -> None:
        for room in list(self.rooms.values()):
            room.leave()

    def handle(self, msg: M.Message) -> bool:
        """Take a message about rooms (True), or leave it to the agent (False)."""
        if not isinstance(msg, (M.P2PError, M.P2PPeer, M.P2PSignal, M.P2PLeave)):
            return False
        room = self.rooms.get(msg.name)
        if room is None:
            return True  # a room we left: its last messages may still come
        if isinstance(msg, M.P2PError):
            self._error(room, msg)
        elif isinstance(msg, M.P2PPeer):
            room._peer(msg.present, msg.ticket)
            if room._answer is not None and not room._answer.done():
                room._answer.set_result(None)
        elif isinstance(msg, M.P2PSignal):
            room._signal(msg.data)
        else:
            self.forget(room)
            room._close("another connection of this agent took the room over")
        return True

    def _error(self, room: P2PRoom, msg: M.P2PError) -> None:
        code, text = msg.code, msg.message
        if msg.about == "signal":
            room._dropped(f"relay: {text}")
            return
        error = RendezvousError(f"relay {self.relay_text} refused room {room.name!r}: {text}", code)
        room._fail_answer(error)
        if code != "rate":  # busy or limit: the room is not ours (any more)
            self.forget(room)
            room._close(str(error))


async def open_relay_path(
    relay: tuple[str, int], ticket: str, timeout: float = PATH_TIMEOUT, *, key: DataKey
) -> socket.socket:
    """Connect to the relay, open sealed (the ticket named by its handle only, DATA
    {ticket} sealed under the agent's session secret: the ticket never travels in clear),
    wait for P2P_JOINED: the joined socket, whose bytes are the peers' own."""
    data_key, cipher = key
    if not data_key:
        raise RendezvousError(
            "no session secret from the relay to seal the relay path's opening with (the "
            "ticket must not travel in clear): reconnect to the relay",
            "disconnected",
        )
    loop = asyncio.get_running_loop()
    host, port = relay
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), CONNECT_TIMEOUT)
            await flush_all(begin_sealed(sock, data_key, ticket, cipher))
            msg = await asyncio.wait_for(read_frame(sock), timeout)
        except asyncio.TimeoutError:
            raise RendezvousTimeoutError(
                f"relay path via {host}:{port} not joined within {timeout:g} s", "timeout"
            ) from None
        except (ProtocolError, ConnectionResetError):  # the relay drops an opening it refuses
            raise RendezvousError(
                f"relay {host}:{port} refused the relay-path ticket (unknown, used, or from "
                "a pairing that ended): get a fresh one with new_ticket()",
                "ticket",
            ) from None
        except OSError as exc:
            raise RendezvousError(
                f"relay path via {host}:{port} failed: {exc}", "network"
            ) from None
        if isinstance(msg, M.Error):
            raise RendezvousError(f"relay path not joined: {msg.message}", msg.code)
        if not isinstance(msg, M.P2PJoined):
            raise ProtocolError(f"expected P2PJoined on the relay path, got {type(msg).__name__}")
    except BaseException:
        sock.close()
        raise
    return sock
