"""Waiting on plain non-blocking sockets: one relay frame read exactly (no byte more: what
follows belongs to whatever the frame starts, e.g. a spliced visitor stream), a peek, and
readiness itself."""

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


async def wait_ready(sock: socket.socket, *, write: bool = False) -> None:
    """Until ``sock`` is readable (or writable)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await fut
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def peek(conn: socket.socket, n: int) -> bytes:
    """Up to ``n`` bytes that wait on ``conn``, left there (b"" at its end)."""
    while True:
        try:
            return conn.recv(n, socket.MSG_PEEK)
        except BlockingIOError:
            await wait_ready(conn)
