"""Datagram paths between two peers, and the switch that QUIC sends through.

A path moves datagrams to one peer: over UDP (:class:`UdpPath`, e.g. to a port-mapped
address), over an ICE connection (:class:`IcePath`: direct or via TURN), or framed over a
TCP connection through the relay (:class:`StreamPath`, the last resort). Sending never
blocks and never raises for network trouble: a datagram that cannot go now is dropped, and
QUIC retransmits what mattered.

:class:`PathSwitch` is the one endpoint QUIC talks to. It sends on the active path, accepts
datagrams from every path it holds (the peer may still be on another one), probes them to
tell live paths from dead ones, and moves to a standby path when the active one dies.

A datagram proves nothing: anyone on a path can send one. A path is live only when the
peer answered a probe on it: a fresh random token that the session (:mod:`natkit.p2p.session`)
sends inside the authenticated QUIC connection, answered inside it on the same path and
reported with :meth:`PathSwitch.confirm` — as WebRTC's consent checks and tailscale's disco
pings do. A forger can neither answer a probe nor make the switch answer one, and a
replayed answer carries a spent token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, cast

import aioice

from natkit.errors import ProtocolError
from natkit.p2p.errors import P2PError
from natkit.p2p.ice_conn import IceConnection
from natkit.p2p.udp_drain import DatagramSender, SocketDrainer

log = logging.getLogger(__name__)

#: Path kinds, most preferred first: a failover picks the best live standby.
KINDS = ("direct", "port-mapped", "turn", "relay")
#: The largest datagram a :class:`StreamPath` frames (QUIC sends at most 1200 bytes).
MAX_FRAMED_DATAGRAM = 1500
_EARLY_LIMIT = 64  # datagrams kept for a receiver that is not set yet
UDP_SOCKET_BUFFER_SIZE = 4 << 20  # (Linux caps it at net.core.rmem_max/wmem_max)

DatagramHandler = Callable[[bytes], None]
LostHandler = Callable[[Exception | None], None]


class DatagramPath(Protocol):
    """Datagrams to and from one peer over one way of reaching it."""

    @property
    def kind(self) -> str:
        """One of :data:`KINDS`."""
        ...

    @property
    def alive(self) -> bool:
        """False once the path is closed or its transport failed."""
        ...

    def set_receiver(self, on_datagram: DatagramHandler, on_lost: LostHandler) -> None:
        """Deliver incoming datagrams to ``on_datagram``; call ``on_lost`` if the transport
        fails (never after :meth:`close`)."""
        ...

    def send(self, data: bytes) -> None:
        """Send one datagram, or drop it (counted) if the path cannot take it now."""
        ...

    def send_many(self, datagrams: Sequence[bytes]) -> None:
        """Send these datagrams in order, as :meth:`send` would each (one system call for
        the lot where the path can)."""
        ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class BasePath:
    """Receiver bookkeeping and counters shared by the paths here."""

    def __init__(self, kind: str) -> None:
        if kind not in KINDS:
            raise P2PError(f"unknown path kind {kind!r}; use one of {', '.join(KINDS)}")
        self.kind = kind
        self.sent = self.received = self.dropped = 0
        self._on_datagram: DatagramHandler | None = None
        self._on_lost: LostHandler | None = None
        self._early: deque[bytes] = deque(maxlen=_EARLY_LIMIT)
        self._closed = False

    @property
    def alive(self) -> bool:
        return not self._closed

    def set_receiver(self, on_datagram: DatagramHandler, on_lost: LostHandler) -> None:
        self._on_datagram, self._on_lost = on_datagram, on_lost
        while self._early:
            on_datagram(self._early.popleft())

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def send_many(self, datagrams: Sequence[bytes]) -> None:
        for data in datagrams:
            self.send(data)

    def _deliver(self, data: bytes) -> None:
        self.received += 1
        if self._on_datagram is None:
            self._early.append(data)  # e.g. the peer's first QUIC packet, before the session
        else:
            self._on_datagram(data)

    def _lost(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._on_lost is not None:
            self._on_lost(exc)

    def close(self) -> None:
        self._closed = True

    async def wait_closed(self) -> None:
        return None

    def __repr__(self) -> str:
        state = "alive" if self.alive else "closed"
        return f"<{type(self).__name__} {self.kind} {state} sent={self.sent} received={self.received} dropped={self.dropped}>"


class UdpPath(BasePath, asyncio.DatagramProtocol):
    """Datagrams over a UDP socket connected to the peer (the kernel filters other sources)."""

    def __init__(self, kind: str = "direct") -> None:
        super().__init__(kind)
        self._transport: asyncio.DatagramTransport | None = None
        self._paused = False  # asyncio buffers when the socket is full; past 64 KiB, drop
        self._drainer: SocketDrainer | None = None

    @classmethod
    async def from_socket(cls, sock: socket.socket, kind: str = "direct") -> UdpPath:
        """Wrap a UDP socket already ``connect()``-ed to the peer."""
        path = cls(kind)
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: path, sock=sock)
        return path

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # CPython's selector transport does not subclass DatagramTransport, hence no check.
        self._transport = cast(asyncio.DatagramTransport, transport)
        self._drainer = SocketDrainer(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a QUIC burst must not overflow the kernel's default buffers
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, UDP_SOCKET_BUFFER_SIZE)
        self._drainer.take_over(transport, self.datagrams_received, self.error_received)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._deliver(data)
        if self._drainer is not None:
            self._drainer.drain(self.datagram_received)

    def datagrams_received(self, datagrams: list[bytes], addr: Any) -> None:
        """The datagrams of one read (SocketDrainer.take_over: the drainer reads already)."""
        for data in datagrams:
            self._deliver(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable) can be transient while NATs settle: the switch's
        # probes decide whether the path is dead, not one ICMP message.
        log.debug("%r: %s", self, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._drainer is not None:
            self._drainer.close()
        self._lost(exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False

    def send(self, data: bytes) -> None:
        t = self._transport
        if self._closed or t is None or self._paused:
            self.dropped += 1
            return
        t.sendto(data)
        self.sent += 1

    def send_many(self, datagrams: Sequence[bytes]) -> None:
        t = self._transport
        if self._closed or t is None or self._paused or self._drainer is None:
            super().send_many(datagrams)
            return
        dropped = self._drainer.send_many(cast(DatagramSender, t), datagrams)
        self.sent += len(datagrams) - dropped
        self.dropped += dropped

    def close(self) -> None:
        super().close()
        if self._drainer is not None:  # our reader stops now, as asyncio's does
            self._drainer.close()
        if self._transport is not None:
            self._transport.close()


class IcePath(BasePath):
    """Datagrams over an aioice :class:`aioice.Connection` that has already connected.

    aioice's ``send`` is a coroutine (a TURN channel may still be being bound), so datagrams
    wait in a bounded queue for one sender task, in order; when it is full they are dropped.
    """

    def __init__(
        self, connection: aioice.Connection, kind: str = "direct", *, queue_limit: int = 512,
        owns_connection: bool = True,
    ) -> None:  # fmt: skip
        super().__init__(kind)
        self.connection = connection
        self._queue: deque[bytes] = deque()
        self._queue_limit = queue_limit
        self._owns = owns_connection
        self._wakeup = asyncio.Event()
        # natkit's IceConnection hands datagrams over as they arrive and sends at once on
        # a plain UDP pair; recv() then only reports the end of the connection.
        self._fast = isinstance(connection, IceConnection)
        if isinstance(connection, IceConnection):
            connection.set_data_handler(self._deliver)
        self._recv_task = asyncio.create_task(self._recv_loop())
        self._send_task = asyncio.create_task(self._send_loop())
        self._closer: asyncio.Task[None] | None = None

    async def _recv_loop(self) -> None:
        try:
            while True:
                self._deliver(await self.connection.recv())
        except ConnectionError as exc:  # aioice closed it (consent lost, close())
            self._lost(exc)

    async def _send_loop(self) -> None:
        while True:
            while self._queue:
                try:
                    await self.connection.send(self._queue.popleft())
                    self.sent += 1
                except ConnectionError as exc:
                    self._lost(exc)
                    return
                except OSError as exc:  # a transient socket error: only this datagram is lost
                    self.dropped += 1
                    log.debug("%r: %s", self, exc)
            if self._closed:
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    def send(self, data: bytes) -> None:
        if self._closed or len(self._queue) >= self._queue_limit:
            self.dropped += 1
            return
        if self._fast and not self._queue:
            try:
                if cast(IceConnection, self.connection).send_now(data):
                    self.sent += 1
                    return
            except OSError as exc:  # a transient socket error: only this datagram is lost
                self.dropped += 1
                log.debug("%r: %s", self, exc)
                return
        self._queue.append(data)
        self._wakeup.set()

    def send_many(self, datagrams: Sequence[bytes]) -> None:
        if self._fast and not self._queue and not self._closed:
            try:
                dropped = cast(IceConnection, self.connection).send_many_now(datagrams)
            except OSError as exc:  # a transient socket error: only these datagrams are lost
                self.dropped += len(datagrams)
                log.debug("%r: %s", self, exc)
                return
            if dropped is not None:
                self.sent += len(datagrams) - dropped
                self.dropped += dropped
                return
        super().send_many(datagrams)

    def close(self) -> None:
        if self._closer is not None:
            return
        super().close()
        self._wakeup.set()  # the sender flushes what is queued (a CONNECTION_CLOSE), then ends
        self._closer = asyncio.create_task(self._shutdown())

    async def _shutdown(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._send_task), 1.0)
        for task in (self._send_task, self._recv_task):
            task.cancel()
        await asyncio.gather(self._send_task, self._recv_task, return_exceptions=True)
        if self._owns:
            await self.connection.close()

    async def wait_closed(self) -> None:
        if self._closer is not None:
            await self._closer


class Deframer:
    """Sans-I/O: split a byte stream of ``u16 length + datagram`` frames into datagrams."""

    def __init__(self, max_size: int = MAX_FRAMED_DATAGRAM) -> None:
        self.max_size = max_size
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Return the datagrams completed by ``data``; raise :class:`ProtocolError` on a
        frame larger than ``max_size`` (a peer not speaking this framing, or hostile)."""
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            size = (buf[pos] << 8) | buf[pos + 1]
            if size > self.max_size:
                raise ProtocolError(
                    f"relay path frame of {size} bytes (limit {self.max_size}): the other end "
                    "does not speak natkit's datagram framing"
                )
            if end - pos - 2 < size:
                break
            if size:  # an empty frame carries nothing (a keepalive at most)
                out.append(bytes(buf[pos + 2 : pos + 2 + size]))
            pos += 2 + size
        del buf[:pos]  # one move per read, not per frame
        return out


def frame(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


class StreamPath(BasePath, asyncio.Protocol):
    """Datagrams framed as ``u16 length + bytes`` over a connected TCP socket (the relay).

    TCP never loses them, but a full send buffer would only add delay on top of QUIC's own
    retransmissions, so above ``write_limit`` bytes queued datagrams are dropped instead.
    """

    def __init__(
        self, kind: str = "relay", *, write_limit: int = 256 * 1024,
        max_datagram: int = MAX_FRAMED_DATAGRAM,
    ) -> None:  # fmt: skip
        super().__init__(kind)
        self.write_limit = write_limit
        self.max_datagram = max_datagram
        self._deframer = Deframer(max_datagram)
        self._transport: asyncio.Transport | None = None
        self._paused = False

    @classmethod
    async def from_socket(
        cls, sock: socket.socket, kind: str = "relay", **kwargs: Any
    ) -> StreamPath:
        """Wrap a connected stream socket (TCP to the relay, or a socketpair in tests)."""
        path = cls(kind, **kwargs)
        await asyncio.get_running_loop().create_connection(lambda: path, sock=sock)
        return path

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # QUIC packets are small and latency-bound: never hold one back (Nagle).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=self.write_limit)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False

    def data_received(self, data: bytes) -> None:
        try:
            datagrams = self._deframer.feed(data)
        except ProtocolError as exc:
            if self._transport is not None:
                self._transport.abort()
            self._lost(exc)
            return
        for d in datagrams:
            if self._closed:
                return
            self._deliver(d)

    def eof_received(self) -> bool:
        return False  # the relay or the peer went away: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc or P2PError("the relay connection was closed"))

    def send(self, data: bytes) -> None:
        if len(data) > self.max_datagram:
            raise P2PError(
                f"datagram of {len(data)} bytes exceeds this path's limit of {self.max_datagram}"
            )
        t = self._transport
        if (
            self._closed
            or t is None
            or self._paused
            or t.get_write_buffer_size() > self.write_limit
        ):
            self.dropped += 1
            return
        t.write(frame(data))
        self.sent += 1

    def close(self) -> None:
        super().close()
        if self._transport is not None:
            self._transport.close()  # flushes what is queued (a CONNECTION_CLOSE) first


# --------------------------------------------------------------------------- the switch

#: How many probe tokens a path remembers (answers to older probes prove nothing).
_TOKENS = 8
PROBE_TOKEN_SIZE = 8

#: Sends an authenticated probe with this token on this path; False when it cannot yet.
Prober = Callable[["DatagramPath", bytes], bool]
#: Takes a datagram and the path it came in on.
PathDatagramHandler = Callable[["DatagramPath", bytes], None]


@dataclass(frozen=True)
class Liveness:
    """How paths are watched. The active path is probed once it has been silent for
    ``probe_after`` seconds while we expect an answer, and is dead when nothing came for
    ``dead_after`` seconds since then; standbys are probed every ``standby_interval``
    seconds, which also keeps their NAT bindings open (they expire after ~30 s)."""

    probe_after: float = 1.0
    dead_after: float = 5.0
    standby_interval: float = 10.0


@dataclass(frozen=True)
class PathEvent:
    """``switched`` (``previous`` → ``path``; reason ``owner``, ``dead``, ``lost`` or
    ``peer``: the peer moved there while ours went silent), ``dead`` (a path stopped
    answering), ``alive`` (a dead path answers again: the owner may switch back) or ``lost``
    (a path's transport failed; it is never used again)."""

    type: str
    path: DatagramPath
    previous: DatagramPath | None = None
    reason: str = ""


def _rank(kind: str) -> int:
    return KINDS.index(kind) if kind in KINDS else len(KINDS)


class _Watch:
    __slots__ = ("dead", "expect_since", "last_ok", "last_probe", "lost", "order", "path", "tokens")

    def __init__(self, path: DatagramPath, order: int) -> None:
        self.path = path
        self.order = order
        self.last_ok: float | None = None  # when the session last confirmed this path
        self.expect_since: float | None = None  # first send not yet confirmed
        self.last_probe = float("-inf")
        self.dead = self.lost = False
        self.tokens: deque[bytes] = deque(maxlen=_TOKENS)


class PathSwitch:
    """The single datagram endpoint QUIC talks to: it sends on :attr:`active` and takes in
    datagrams from every path it holds. Paths are ranked by :data:`KINDS` for failover."""

    def __init__(
        self,
        active: DatagramPath,
        standby: Iterable[DatagramPath] = (),
        *,
        liveness: Liveness | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._clock = clock or self._loop.time
        self.liveness = liveness or Liveness()
        self._watches: dict[DatagramPath, _Watch] = {}
        self._order = 0
        self._active = active
        self._receiver: PathDatagramHandler | None = None
        self._prober: Prober | None = None
        self._listeners: list[Callable[[PathEvent], None]] = []
        self._early: deque[tuple[DatagramPath, bytes]] = deque(maxlen=_EARLY_LIMIT)
        self._closed = False
        for path in (active, *standby):
            self.add(path)
        self._ticker: asyncio.TimerHandle | None = None
        self._tick()

    @property
    def active(self) -> DatagramPath:
        return self._active

    @property
    def kind(self) -> str:
        return self._active.kind

    @property
    def paths(self) -> list[DatagramPath]:
        return list(self._watches)

    def is_live(self, path: DatagramPath) -> bool:
        """Not dead (it answered within ``dead_after``) and not lost."""
        w = self._watches.get(path)
        return w is not None and not (w.dead or w.lost) and path.alive

    def on_event(self, callback: Callable[[PathEvent], None]) -> None:
        self._listeners.append(callback)

    def set_receiver(self, on_datagram: PathDatagramHandler) -> None:
        """Deliver every datagram, with the path it came in on. The switch takes none of
        them as proof of anything: the receiver calls :meth:`confirm` for those it has
        authenticated."""
        self._receiver = on_datagram
        while self._early:
            on_datagram(*self._early.popleft())

    def set_prober(self, prober: Prober) -> None:
        """How to probe a path: the session sends the token inside its authenticated
        connection, and the peer's authenticated answer comes back to :meth:`confirm`."""
        self._prober = prober

    def confirm(self, path: DatagramPath, token: bytes) -> None:
        """The peer answered our probe ``token`` on ``path``, in a packet the session
        authenticated. Only this makes a path live, and only this makes the switch follow
        the peer to a standby. An unknown token proves nothing, and each counts once: a
        replayed answer carries a token already used. (That QUIC decrypted a packet that
        came in on a path is no proof: an on-path attacker can copy the peer's genuine
        packets onto a black-holed path, and the copy that arrives first is accepted.)"""
        w = self._watches.get(path)
        if w is None or w.lost or token not in w.tokens:
            return
        w.tokens.remove(token)
        now = self._clock()
        self._heard(w, now)
        if w.path is not self._active and self._silent(self._watches[self._active], now):
            # The peer speaks on this path while ours has gone quiet: it has moved; follow.
            self.switch(w.path, "peer")

    def _silent(self, w: _Watch, now: float) -> bool:
        return w.expect_since is not None and now - w.expect_since >= self.liveness.probe_after

    def add(self, path: DatagramPath) -> None:
        """Hold ``path`` as a standby (receiving from it at once) and probe it."""
        if path in self._watches:
            return
        self._order += 1
        w = self._watches[path] = _Watch(path, self._order)
        path.set_receiver(partial(self._on_datagram, w), partial(self._on_lost, w))
        self._probe(w, self._clock())

    def remove(self, path: DatagramPath) -> None:
        """Stop using a standby path (e.g. to release a TURN allocation) and close it."""
        if path is self._active:
            raise P2PError(f"cannot remove the active {path.kind} path: switch() to another first")
        w = self._watches.pop(path, None)
        if w is not None:
            w.lost = True  # datagrams it still delivers are ignored
            path.close()

    def switch(self, path: DatagramPath, reason: str = "owner") -> None:
        """Send on ``path`` from now on (QUIC does not notice: it sees one peer address)."""
        self.add(path)
        if path is self._active:
            return
        previous, self._active = self._active, path
        log.info("p2p path: %s -> %s (%s)", previous.kind, path.kind, reason)
        self._emit(PathEvent("switched", path, previous, reason))

    def send(self, data: bytes) -> None:
        self.send_many((data,))

    def send_many(self, datagrams: Sequence[bytes]) -> None:
        """Send on the active path, in order."""
        if not datagrams:
            return
        w = self._watches[self._active]
        if w.expect_since is None:
            w.expect_since = self._clock()
        self._active.send_many(datagrams)

    def check(self, now: float | None = None) -> None:
        """Probe and judge every path (runs by itself every ``probe_after / 2`` seconds)."""
        now = self._clock() if now is None else now
        lv = self.liveness
        for w in list(self._watches.values()):
            if w.lost or not w.path.alive:
                continue
            if w.path is self._active:
                silent = w.expect_since is not None and now - w.expect_since >= lv.probe_after
                if silent and now - w.last_probe >= lv.probe_after:
                    self._probe(w, now)
            elif now - max(w.last_probe, w.last_ok or float("-inf")) >= lv.standby_interval:
                self._probe(w, now)
            if not w.dead and w.expect_since is not None and now - w.expect_since >= lv.dead_after:
                w.dead = True
                log.info(
                    "p2p path %s is dead (nothing received for %.1f s)",
                    w.path.kind,
                    now - w.expect_since,
                )
                self._emit(PathEvent("dead", w.path))
                if w.path is self._active:
                    self._failover("dead")

    def close(self) -> None:
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
        for path in self._watches:
            path.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*(p.wait_closed() for p in self._watches))

    # internals

    def _tick(self) -> None:
        if self._closed:
            return
        self.check()
        self._ticker = self._loop.call_later(max(0.01, self.liveness.probe_after / 2), self._tick)

    def _probe(self, w: _Watch, now: float) -> None:
        if self._prober is None:
            return  # nothing sent, so nothing expected: the next check() tries again
        token = os.urandom(PROBE_TOKEN_SIZE)
        before = w.expect_since, w.last_probe
        # All set before sending: the answer may come at once.
        w.tokens.append(token)
        w.last_probe = now
        if w.expect_since is None:
            w.expect_since = now
        if not self._prober(w.path, token):
            w.tokens.remove(token)
            w.expect_since, w.last_probe = before  # nothing sent, so nothing expected

    def _on_datagram(self, w: _Watch, data: bytes) -> None:
        if w.lost:
            return
        now = self._clock()
        if (
            w.path is not self._active
            and self._silent(self._watches[self._active], now)
            and now - w.last_probe >= self.liveness.probe_after
        ):
            # Traffic on a standby while ours is quiet: perhaps the peer has moved. A datagram
            # proves nothing; the answer to a probe will (and then the switch follows).
            self._probe(w, now)
        if self._receiver is None:
            self._early.append((w.path, data))
        else:
            self._receiver(w.path, data)

    def _heard(self, w: _Watch, now: float) -> None:
        w.last_ok = now
        w.expect_since = None
        if w.dead:
            w.dead = False
            log.info("p2p path %s answers again", w.path.kind)
            self._emit(PathEvent("alive", w.path))

    def _on_lost(self, w: _Watch, exc: Exception | None) -> None:
        if w.lost or self._closed:
            return
        w.lost = True
        log.info("p2p path %s lost: %s", w.path.kind, exc)
        self._emit(PathEvent("lost", w.path, reason=str(exc or "closed")))
        if w.path is self._active:
            self._failover("lost")

    def _failover(self, reason: str) -> None:
        live = [
            w for w in self._watches.values() if w.path is not self._active and self.is_live(w.path)
        ]
        if live:
            best = min(live, key=lambda w: (_rank(w.path.kind), w.order))
            self.switch(best.path, reason)

    def _emit(self, event: PathEvent) -> None:
        for cb in list(self._listeners):
            try:
                cb(event)
            except Exception:  # a listener's bug must not break the data path
                log.exception("path event listener failed on %s", event)
