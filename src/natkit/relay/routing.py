"""Visitors to the shared HTTP and HTTPS ports, routed by Host or TLS SNI.

The routing bytes are peeked at, never consumed: they go on to the service untouched (TLS
is passed through). The usual visitor's request head or ClientHello comes with its
connection and is routed in the accept callback. A slow one is watched by callbacks and
one timer, not polled: the socket's receive low-water mark (SO_RCVLOWAT) is set just above
what has been peeked, so it turns readable only when more bytes (or the end) arrive —
2,000 slowloris visitors cost nothing until they send or time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from natkit.errors import ProtocolError
from natkit.relay import sniff

HEADER_TIMEOUT = 10.0  # a visitor's routing bytes must arrive within this
_POLL = 0.05  # where SO_RCVLOWAT does not exist: how often a slow visitor is looked at

Parse = Callable[[bytes], "str | None"]
ROUTE_BY: dict[str, tuple[Parse, int]] = {
    "http": (sniff.http_host, sniff.MAX_HTTP_HEAD),
    "tls": (sniff.tls_sni, sniff.MAX_CLIENT_HELLO),
}
_LOWAT = getattr(socket, "SO_RCVLOWAT", None)

Routed = Callable[[socket.socket, object, str, str], None]  # conn, addr, kind, host
Refused = Callable[[socket.socket, str, str], None]  # conn, kind, why ("" = too slow)


def peek_host(conn: socket.socket, kind: str) -> tuple[str | None, int]:
    """The host name the visitor's first bytes name (None when not yet), and how many
    bytes were there. ProtocolError when they cannot be routed."""
    parse, limit = ROUTE_BY[kind]
    data = conn.recv(limit + 1, socket.MSG_PEEK)
    if not data:
        raise ProtocolError("visitor closed before sending its request")
    host = parse(data)
    if host is None and len(data) > limit:
        raise ProtocolError("visitor's request head is too large")
    return host, len(data)


class SlowVisitor:
    """Waits, by callbacks and one timer, until a visitor's routing bytes are all here."""

    __slots__ = ("addr", "conn", "kind", "loop", "on_refused", "on_routed", "seen", "timer")

    def __init__(
        self,
        conn: socket.socket,
        addr: object,
        kind: str,
        seen: int,
        on_routed: Routed,
        on_refused: Refused,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.conn, self.addr, self.kind, self.seen = conn, addr, kind, seen
        self.on_routed, self.on_refused = on_routed, on_refused
        self.timer: asyncio.TimerHandle | None = self.loop.call_later(
            HEADER_TIMEOUT, self._too_slow
        )
        self._watch()

    def _watch(self) -> None:
        if _LOWAT is not None:
            with contextlib.suppress(OSError):
                self.conn.setsockopt(socket.SOL_SOCKET, _LOWAT, self.seen + 1)
            self.loop.add_reader(self.conn.fileno(), self._readable)
        else:
            self.loop.call_later(_POLL, self._readable)

    def _stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if _LOWAT is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.conn.fileno())
            with contextlib.suppress(OSError):
                self.conn.setsockopt(socket.SOL_SOCKET, _LOWAT, 1)

    def _readable(self) -> None:
        if self.timer is None:
            return  # done already
        try:
            host, seen = peek_host(self.conn, self.kind)
            if host is None and seen == self.seen and _LOWAT is not None:
                # Readable below the low-water mark: the visitor ended or failed mid-head.
                raise ProtocolError("visitor closed before sending its whole request")
        except BlockingIOError:
            return
        except (OSError, ProtocolError) as exc:
            self._stop()
            self.on_refused(self.conn, self.kind, str(exc))
            return
        if host is not None:
            self._stop()
            self.on_routed(self.conn, self.addr, self.kind, host)
            return
        self.seen = seen
        if _LOWAT is not None:
            with contextlib.suppress(OSError):
                self.conn.setsockopt(socket.SOL_SOCKET, _LOWAT, seen + 1)
        else:
            self.loop.call_later(_POLL, self._readable)

    def _too_slow(self) -> None:
        self.timer = None
        self._stop()
        self.on_refused(self.conn, self.kind, "")


def answer(conn: socket.socket, status: bytes, body: bytes, headers: bytes = b"") -> None:
    """An HTTP answer to a visitor the relay serves itself (no route, refused). What it
    sent is read first (its head was only peeked at): closing with unread data sends a
    RST, which may lose the answer. ``headers``: extra lines, each ending in CRLF."""
    with contextlib.suppress(OSError):
        for _ in range(8):
            if not conn.recv(65536):
                break
    with contextlib.suppress(OSError):
        conn.send(b"HTTP/1.1 %s\r\nConnection: close\r\nContent-Length: %d\r\n%s\r\n%s"
                  % (status, len(body), headers, body))  # fmt: skip
