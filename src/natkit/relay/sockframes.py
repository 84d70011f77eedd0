"""One relay frame from a plain non-blocking socket, read exactly (no byte more: what
follows belongs to whatever the frame starts, e.g. a spliced visitor stream)."""

from __future__ import annotations

import asyncio
import socket

from natkit.errors import ProtocolError
from natkit.relay import messages as M


async def read_frame(conn: socket.socket) -> M.Message:
    msg_type, length = M.decode_header(await recv_exact(conn, M.HEADER.size))
    return M.decode_body(msg_type, await recv_exact(conn, length))


async def recv_exact(conn: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes, no byte more; ProtocolError if the connection ends first."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(conn, n - len(buf))
        if not chunk:
            raise ProtocolError("connection closed mid-frame")
        buf += chunk
    return bytes(buf)
