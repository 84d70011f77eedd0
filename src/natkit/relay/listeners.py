"""Listening sockets and accepting on them from event-loop callbacks (no task per
connection; a burst at a time; a pause instead of a spin when out of descriptors)."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("natkit.relay")

# Linux copies TCP_NODELAY and the keepalive settings of a listening socket to the sockets
# it accepts: set once on the listener, they cost no system calls per visitor.
ACCEPTED_INHERIT_TUNING = sys.platform.startswith("linux")


def tune(conn: socket.socket) -> None:
    """No Nagle delay; and TCP keepalive so half-open connections (a peer that vanished
    without a FIN) expire in about two minutes instead of lingering forever."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # macOS names the idle time TCP_KEEPALIVE (Linux's TCP_KEEPALIVE does not exist).
    idle = "TCP_KEEPIDLE" if hasattr(socket, "TCP_KEEPIDLE") else "TCP_KEEPALIVE"
    for opt, value in ((idle, 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4)):
        if hasattr(socket, opt):
            conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


def listen(host: str, port: int, backlog: int = 4096) -> socket.socket:
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
    tune(sock)  # what Linux's accepted sockets inherit
    return sock


Handler = Callable[[socket.socket, Any], None]


class Acceptor:
    """Calls ``handler(conn, addr)`` for each connection ``sock`` accepts; ``pause`` leaves
    new ones in the kernel's backlog. ``handler`` must not raise."""

    _last_warning = 0.0

    def __init__(self, sock: socket.socket, handler: Handler, stats: Any) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock, self.handler, self.stats = sock, handler, stats
        self.paused = False  # by its owner (a tunnel with too many visitors waiting)
        self.cooling = False  # by itself, after a failed accept
        self.closed = False
        self.loop.add_reader(sock.fileno(), self._ready)

    @property
    def watching(self) -> bool:
        return not (self.paused or self.cooling or self.closed)

    def pause(self) -> None:
        if self.watching:
            self.loop.remove_reader(self.sock.fileno())
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        if self.watching:
            self.loop.add_reader(self.sock.fileno(), self._ready)

    def _cool_down(self) -> None:
        self.cooling = False
        if self.watching:
            self.loop.add_reader(self.sock.fileno(), self._ready)

    def close(self) -> None:
        if not self.closed:
            if self.watching:
                self.loop.remove_reader(self.sock.fileno())
            self.closed = True
            self.sock.close()

    def _ready(self) -> None:
        for _ in range(64):  # accept a burst, then let others run
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of file descriptors (EMFILE/ENFILE) or memory: the connection stays
                # in the backlog and the socket stays readable, so retrying at once would
                # spin. Stop accepting for a moment instead.
                now = time.monotonic()
                if now - Acceptor._last_warning > 5:
                    Acceptor._last_warning = now
                    log.warning("accept failed: %s; pausing accepts for 0.1 s", exc)
                self.stats["accept_errors"] += 1
                if self.watching:
                    self.loop.remove_reader(self.sock.fileno())
                    self.cooling = True
                    self.loop.call_later(0.1, self._cool_down)
                return
            conn.setblocking(False)
            if not ACCEPTED_INHERIT_TUNING:
                tune(conn)
            self.handler(conn, addr)
