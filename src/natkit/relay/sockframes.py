"""One relay frame from a plain non-blocking socket, read exactly (no byte more: what
follows belongs to whatever the frame starts, e.g. a spliced visitor stream)."""

from __future__ import annotations

import asyncio
import socket

from natkit.errors import ProtocolError
from natkit.relay import protocol as P


async def read_frame(conn: socket.socket) -> P.Message:
    loop = asyncio.get_running_loop()
    msg_type, length = P.decode_header(await _recv_exact(loop, conn, P.HEADER.size))
    return P.decode_body(msg_type, await _recv_exact(loop, conn, length))


async def _recv_exact(loop: asyncio.AbstractEventLoop, conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(conn, n - len(buf))
        if not chunk:
            raise ProtocolError("connection closed mid-frame")
        buf += chunk
    return bytes(buf)
