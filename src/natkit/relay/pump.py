"""Moving bytes between two connections: the relay's data path.

Two plain TCP sockets are joined with non-blocking ``os.splice`` through a pipe per
direction (Linux): the bytes never enter Python. ``SPLICE_F_MORE`` is never set (it holds
small writes back for ~400 ms). Anything else (TLS, other systems) goes through
``asyncio.Protocol`` pairs with back-pressure: reading from one side pauses while the other
side's write buffer is full. Streams stay off this path. Half-close is honoured both ways:
EOF on one side becomes ``shutdown(SHUT_WR)`` on the other, and the pair closes when both
directions are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
from collections.abc import Callable

CHUNK = 1 << 20
PIPE_SIZE = 1 << 20
HAVE_SPLICE = hasattr(os, "splice")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = 1031


class _Direction:
    """src → pipe → dst, driven by readiness callbacks on the event loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket,
        done: Callable[[BaseException | None], None],
    ) -> None:  # fmt: skip
        self.loop, self.src, self.dst, self.done = loop, src, dst, done
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.w, _F_SETPIPE_SZ, PIPE_SIZE)
        self.pending = 0
        self.eof = False
        self.finished = False
        self.bytes = 0

    def start(self) -> None:
        self.loop.add_reader(self.src_fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            n = os.splice(self.src_fd, self.w, CHUNK, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self._finish(exc)
            return
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

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.src_fd)
        with contextlib.suppress(Exception):
            self.loop.remove_writer(self.dst_fd)
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.r = self.w = -1


async def splice_pair(a: socket.socket, b: socket.socket) -> tuple[int, int]:
    """Join two connected, non-blocking TCP sockets until both directions end; close both.

    Returns the bytes moved (a→b, b→a).
    """
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    state = {"left": 2}
    errors: list[BaseException] = []

    def done(exc: BaseException | None) -> None:
        if exc is not None:
            errors.append(exc)
            state["left"] = 0  # a broken connection ends both directions
        else:
            state["left"] -= 1
        if state["left"] <= 0 and not finished.done():
            finished.set_result(None)

    a.setblocking(False)
    b.setblocking(False)
    ab, ba = _Direction(loop, a, b, done), _Direction(loop, b, a, done)
    try:
        ab.start()
        ba.start()
        await finished
    finally:
        ab.stop()
        ba.stop()
        a.close()
        b.close()
    return ab.bytes, ba.bytes


class _Half(asyncio.Protocol):
    """One side of a Protocol bridge: what it receives is written to its peer."""

    def __init__(self, closed: asyncio.Future[None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.closed = closed
        self.pending: list[bytes] = []
        self.eof = False
        self.bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
            return
        peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
            both = peer.eof
            return not both  # keep the connection open for the other direction
        return False

    def pause_writing(self) -> None:
        # Our write buffer is full: stop the peer from reading more for us.
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            if exc is None and self.peer.eof:
                self.peer.transport.close()
            elif exc is not None:
                self.peer.transport.abort()
            elif not self.peer.transport.is_closing():
                self.peer.transport.close()
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
    """Start forwarding once both transports exist; flush what arrived before."""
    for side in (a, b):
        peer = side.peer
        assert peer is not None and peer.transport is not None
        for chunk in side.pending:
            peer.transport.write(chunk)
        side.pending.clear()


async def bridge_sockets(a: socket.socket, b: socket.socket) -> tuple[int, int]:
    """Join two sockets through a Protocol bridge (no splice); returns bytes moved."""
    loop = asyncio.get_running_loop()
    ha, hb, fa, fb = bridge_protocols(loop)
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
