"""Read a datagram socket in batches under asyncio (see :class:`SocketDrainer`)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

#: Datagrams read per wake-up beyond the one asyncio read (it reads one per loop iteration).
DRAIN_BATCH = 64


class SocketDrainer:
    """Reads what else waits on a datagram transport's socket, up to :data:`DRAIN_BATCH`,
    so that the session hands QUIC a batch rather than one datagram per event-loop
    iteration (asyncio's own reader then finds the socket empty, which it takes in its
    stride). It reads through a duplicate of the socket's descriptor: asyncio hands out
    only a wrapper without ``recvfrom``."""

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        wrapped = transport.get_extra_info("socket")
        self._sock: socket.socket | None = None
        if wrapped is not None:
            self._sock = socket.socket(fileno=os.dup(wrapped.fileno()))
            self._sock.setblocking(False)
        self._busy = False

    def drain(self, on_datagram: Callable[[bytes, Any], None]) -> None:
        if self._sock is None or self._busy:
            return
        self._busy = True  # on_datagram may come back here (it is datagram_received)
        try:
            for _ in range(DRAIN_BATCH):
                try:
                    data, addr = self._sock.recvfrom(65536)
                except OSError:  # empty (BlockingIOError), or an ICMP error asyncio reports
                    return
                on_datagram(data, addr)
        finally:
            self._busy = False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
