"""Moving bytes between two connections: the relay's data path.

Two plain TCP sockets are joined with non-blocking ``os.splice`` through a pipe per
direction (Linux): the bytes never enter Python. ``SPLICE_F_MORE`` is never set (it holds
small writes back for ~400 ms). Elsewhere they go through ``asyncio.Protocol`` pairs with
back-pressure (sealed data connections have their own path: :mod:`natkit.relay.sealpump`):
reading from one side pauses while the other side's write buffer is full. Streams stay off this path. Half-close is honoured both ways:
EOF on one side becomes ``shutdown(SHUT_WR)`` on the other, and the pair closes when both
directions are done. An abrupt end (a reset, an error) is passed on as a reset, never as a
clean EOF that would make a cut-off stream look complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Callable
from typing import Protocol, cast

from natkit.net.sockets import reset_on_close

CHUNK = 1 << 20
PIPE_SIZE = 1 << 20
# Capabilities, not a platform: os.splice and os.pipe2 are Linux's (macOS has neither).
HAVE_SPLICE = hasattr(os, "splice") and hasattr(os, "pipe2")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = 1031
TAP_PEEK = 256 * 1024  # a tapped direction moves at most this per read (it is copied)
_local = threading.local()


def _peek_buffer() -> memoryview:
    """This thread's buffer for peeking at tapped bytes (callbacks never hold it)."""
    view: memoryview | None = getattr(_local, "peek", None)
    if view is None:
        view = _local.peek = memoryview(bytearray(TAP_PEEK))
    return view


class Tap(Protocol):
    """What the data path tells a capture (:class:`natkit.inspect.tap.ConnectionTap`):
    bytes it passed to the service (``request``), bytes it passed back (``response``), the
    end. The pumps call it only while ``on``; it must copy what it keeps and return."""

    on: bool

    def request(self, data: bytes | memoryview) -> None: ...

    def response(self, data: bytes | memoryview) -> None: ...

    def closed(self) -> None: ...


def _abort(transport: asyncio.Transport) -> None:
    """``transport.abort()`` that resets the TCP connection (asyncio's alone sends a FIN)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        reset_on_close(sock)
    transport.abort()


def _grow_pipe(fd: int) -> None:
    try:
        import fcntl  # (only where splice is: Windows has no fcntl)
    except ImportError:
        return  # the pipe keeps the system's size
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)


class _PipePool:
    """Idle connections hold no pipe: a direction borrows one only while bytes are in
    flight and returns it empty. A visitor then costs 2 file descriptors instead of 6, and
    a new one costs no pipe2/fcntl system calls."""

    def __init__(self, keep: int = 256) -> None:
        self.keep = keep
        self.free: list[tuple[int, int]] = []

    def get(self) -> tuple[int, int]:
        if self.free:
            return self.free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _grow_pipe(w)
        return r, w

    def put(self, pipe: tuple[int, int]) -> None:
        if len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            for fd in pipe:
                os.close(fd)


_PIPES = _PipePool()


class _Direction:
    """src → pipe → dst, driven by readiness callbacks on the event loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket,
        done: Callable[[BaseException | None], None],
        tap: Callable[[bytes | memoryview], None] | None = None, tapping: Tap | None = None,
    ) -> None:  # fmt: skip
        self.loop, self.src, self.dst, self.done = loop, src, dst, done
        # With a tap, each read is first peeked (MSG_PEEK) and copied to it: one more
        # system call and a copy per read, only on tapped connections, only while it follows.
        self.tap, self.tapping = tap, tapping
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.r = self.w = -1  # a pipe from the pool while bytes are in flight
        self.pending = 0
        self.eof = False
        self.finished = False
        self.bytes = 0

    def start(self) -> None:
        self.loop.add_reader(self.src_fd, self._on_readable)

    def pump_now(self) -> None:
        """Move what is already waiting without waiting for a readiness event."""
        self._on_readable()

    def _on_readable(self) -> None:
        if self.r < 0:
            try:
                self.r, self.w = _PIPES.get()
            except OSError as exc:
                self._finish(exc)
                return
        peeked = 0
        if self.tap is not None:
            if self.tapping is not None and self.tapping.on:
                try:
                    peeked = self.src.recv_into(_peek_buffer(), TAP_PEEK, socket.MSG_PEEK)
                except BlockingIOError:
                    self._release_pipe()
                    return
                except OSError as exc:
                    self._finish(exc)
                    return
            else:
                self.tap = None  # the capture gave this connection up
        try:
            n = os.splice(self.src_fd, self.w, peeked or CHUNK, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            self._release_pipe()
            return
        except OSError as exc:
            self._finish(exc)
            return
        if peeked and n:
            assert self.tap is not None
            self.tap(_peek_buffer()[:n])  # (the tap copies it)
        if n == 0:
            self.eof = True
            self.loop.remove_reader(self.src_fd)
        self.pending += n
        self._flush()

    def _flush(self) -> None:
        while self.pending:
            try:
                m = os.splice(self.r, self.dst_fd, self.pending, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                # The receiver is slow: stop reading until it can take more (back-pressure).
                self.loop.remove_reader(self.src_fd)
                self.loop.add_writer(self.dst_fd, self._on_writable)
                return
            except OSError as exc:
                self._finish(exc)
                return
            self.pending -= m
            self.bytes += m
        self._release_pipe()
        if self.eof:
            self._finish(None)

    def _on_writable(self) -> None:
        self.loop.remove_writer(self.dst_fd)
        self._flush()
        if not self.pending and not self.eof and not self.finished:
            self.loop.add_reader(self.src_fd, self._on_readable)

    def _finish(self, exc: BaseException | None) -> None:
        if self.finished:
            return
        self.finished = True
        self.stop()
        if exc is None:
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)  # pass the half-close on
        self.done(exc)

    def _release_pipe(self) -> None:
        if self.r >= 0 and not self.pending:
            _PIPES.put((self.r, self.w))
            self.r = self.w = -1

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.src_fd)
        with contextlib.suppress(Exception):
            self.loop.remove_writer(self.dst_fd)
        if self.r >= 0 and not self.pending:
            self._release_pipe()
            return
        for fd in (self.r, self.w):  # bytes still inside: this pipe cannot be reused
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.r = self.w = -1


class SplicePair:
    """Two connected TCP sockets joined by splice until both directions end; then both
    are closed. ``done`` gets the bytes moved (a→b, b→a). Driven by callbacks alone: a
    joined pair costs no task."""

    __slots__ = ("a", "ab", "b", "ba", "broken", "done", "left", "tap")

    def __init__(self, a: socket.socket, b: socket.socket, tap: Tap | None = None) -> None:
        loop = asyncio.get_running_loop()
        a.setblocking(False)
        b.setblocking(False)
        self.a, self.b = a, b
        self.done: asyncio.Future[tuple[int, int]] = loop.create_future()
        self.left, self.broken = 2, False
        self.tap = tap  # a→b is the request, b→a the response
        self.ab = _Direction(loop, a, b, self._direction_done,
                             tap.request if tap else None, tap)  # fmt: skip
        self.ba = _Direction(loop, b, a, self._direction_done,
                             tap.response if tap else None, tap)  # fmt: skip
        self.ab.start()
        self.ba.start()
        # Bytes already waiting (a visitor's request, which came with its connection) go now,
        # not one loop iteration later: one wake-up less on a new visitor's path.
        for direction in (self.ab, self.ba):
            if not direction.finished and a.fileno() >= 0:
                direction.pump_now()

    def _direction_done(self, exc: BaseException | None) -> None:
        if exc is not None:
            self.broken, self.left = True, 0  # a broken connection ends both directions
        else:
            self.left -= 1
        if self.left <= 0:
            self._close()

    def abort(self) -> None:
        """End now: both sides get a reset, never a FIN."""
        self.broken = True
        self._close()

    def _close(self) -> None:
        if self.a.fileno() < 0:  # closed already
            return
        if self.tap is not None and self.tap.on:
            self.tap.closed()
        self.ab.stop()
        self.ba.stop()
        if self.broken:
            reset_on_close(self.a)
            reset_on_close(self.b)
        self.a.close()
        self.b.close()
        if not self.done.done():
            self.done.set_result((self.ab.bytes, self.ba.bytes))


async def splice_pair(a: socket.socket, b: socket.socket) -> tuple[int, int]:
    """Join two connected, non-blocking TCP sockets until both directions end; close both.

    Returns the bytes moved (a→b, b→a). Cancelled: both sides get a reset.
    """
    pair = SplicePair(a, b)
    try:
        return await asyncio.shield(pair.done)
    except asyncio.CancelledError:
        pair.abort()
        raise


class _Half(asyncio.Protocol):
    """One side of a Protocol bridge: what it receives is sent on by its peer."""

    def __init__(self, closed: asyncio.Future[None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.closed = closed
        self.pending: list[bytes] = []
        self.pending_eof = False
        self.linked = False  # until link(): kept in order in ``pending``
        self.eof_in = False  # our remote finished sending
        self.eof_out = False  # we told our remote we finished
        self.bytes = 0
        self.tap: Callable[[bytes | memoryview], None] | None = (
            None  # what we receive is copied to it
        )
        self.tapping: Tap | None = None

    # -- sending to our own remote (called by the peer) --
    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def send_eof(self) -> None:
        assert self.transport is not None
        self.eof_out = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.eof_in and self.eof_out and self.transport is not None:
            self.transport.close()

    # -- receiving from our own remote --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not subclasses of asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.deliver(data)

    def deliver(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.tap is not None and self.tapping is not None and self.tapping.on:
            self.tap(data)
        peer = self.peer
        if peer is None or not self.linked:
            self.pending.append(data)
            return
        peer.send(data)

    def deliver_eof(self) -> None:
        self.eof_in = True
        peer = self.peer
        if peer is None or not self.linked:
            self.pending_eof = True
            return
        peer.send_eof()
        self._maybe_close()
        peer._maybe_close()

    def eof_received(self) -> bool | None:
        self.deliver_eof()
        return True  # keep our sending direction open (half-close)

    def pause_writing(self) -> None:
        # Our remote is slow: stop reading from the peer's remote (back-pressure).
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tapping is not None and self.tapping.on:
            self.tapping.closed()
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            if exc is not None or not self.eof_in:
                _abort(peer.transport)  # an abrupt end is passed on as one (a RST)
            elif peer.eof_in:
                peer.transport.close()
        if not self.closed.done():
            self.closed.set_result(None)


def bridge_protocols(
    loop: asyncio.AbstractEventLoop,
) -> tuple[_Half, _Half, asyncio.Future[None], asyncio.Future[None]]:
    """Two linked protocols for a Protocol bridge, plus futures that complete when each closes."""
    fa: asyncio.Future[None] = loop.create_future()
    fb: asyncio.Future[None] = loop.create_future()
    a, b = _Half(fa), _Half(fb)
    a.peer, b.peer = b, a
    return a, b, fa, fb


def link(a: _Half, b: _Half) -> None:
    """Start forwarding once both transports exist; flush what arrived before.

    Until then both sides only queue: a side whose peer's transport exists already must
    not send past what it queued earlier (asyncio delivers bytes and EOF to the first
    side while the second connects; a write after the EOF it passed on would fail)."""
    a.linked = b.linked = True
    for side in (a, b):
        peer = side.peer
        assert peer is not None and peer.transport is not None
        for chunk in side.pending:
            peer.send(chunk)
        side.pending.clear()
        if side.pending_eof:
            side.pending_eof = False
            side.eof_in = False
            side.deliver_eof()


async def bridge_sockets(
    a: socket.socket, b: socket.socket, tap: Tap | None = None
) -> tuple[int, int]:
    """Join two sockets through a Protocol bridge (no splice); returns bytes moved.
    ``tap``: what a sends is its request, what b sends its response."""
    loop = asyncio.get_running_loop()
    ha, hb, fa, fb = bridge_protocols(loop)
    if tap is not None:
        ha.tap, hb.tap = tap.request, tap.response
        ha.tapping = hb.tapping = tap
    await loop.connect_accepted_socket(lambda: ha, a)
    await loop.connect_accepted_socket(lambda: hb, b)
    link(ha, hb)
    await asyncio.gather(fa, fb)
    return ha.bytes, hb.bytes


USE_SPLICE = HAVE_SPLICE and not os.environ.get("NATKIT_NO_SPLICE")


async def join_sockets(a: socket.socket, b: socket.socket) -> tuple[int, int]:
    """The fastest way this system has to join two plain TCP sockets."""
    if USE_SPLICE:
        return await splice_pair(a, b)
    return await bridge_sockets(a, b)


class _TaskJoin:
    """The Protocol bridge (no splice here) as a task, with the SplicePair interface."""

    def __init__(self, a: socket.socket, b: socket.socket, tap: Tap | None = None) -> None:
        self.done: asyncio.Future[tuple[int, int]] = asyncio.ensure_future(
            bridge_sockets(a, b, tap)
        )

    def abort(self) -> None:
        self.done.cancel()


def start_join(
    a: socket.socket, b: socket.socket, tap: Tap | None = None
) -> SplicePair | _TaskJoin:
    """Join two plain TCP sockets now; the result has ``done`` (a future) and ``abort()``.
    ``tap`` is told what a sends (its request) and what b sends (its response)."""
    return SplicePair(a, b, tap) if USE_SPLICE else _TaskJoin(a, b, tap)


TLS_READ_BUFFER = 16 * 1024


def small_tls_buffers() -> None:
    """Use 16 KiB (one TLS record) read buffers for asyncio's TLS transports in this process.

    asyncio allocates a 256 KiB buffer for every TLS connection up front; only control
    connections use asyncio's TLS (one per agent), but a relay serving thousands of agents
    would hold a quarter of a gigabyte per thousand in them. A larger buffer buys nothing for
    small control frames. Process-wide, so only natkit's own relay and agent processes call
    it (the CLI), never the library.
    """
    import asyncio.sslproto

    # A class attribute of the stdlib implementation (not in the type stubs).
    setattr(asyncio.sslproto.SSLProtocol, "max_size", TLS_READ_BUFFER)  # noqa: B010
