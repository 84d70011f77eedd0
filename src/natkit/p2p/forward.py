"""TCP port forwarding over a peer-to-peer session (like ``ssh -L``, with no server between).

Each forwarded TCP connection is one QUIC stream. The connecting side opens it with a
request ``b"NKF1" + u16 port``; the listening side answers one byte (0: connected, else
refused) and then both sides copy bytes, honouring half-close both ways. The listening
side connects only to its own ``target_host`` and only to the ports it allows: nothing the
listener did not name is reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from natkit.errors import NatkitError
from natkit.net.sockets import reset_on_close, unpaced_on_loopback
from natkit.p2p.errors import P2PError
from natkit.stun.address import resolve

log = logging.getLogger("natkit.p2p")

MAGIC = b"NKF1"
DIAL_MAGIC = b"NKD1"  # a dial request of the direct TCP path (natkit.p2p.tcppunch)
_REQUEST = struct.Struct("!4sH")
OK, REFUSED, FAILED = 0, 1, 2
CHUNK = 64 * 1024
CONNECT_TIMEOUT = 10.0  # the listener's connection to its target


class ForwardRefusedError(P2PError):
    """The peer refused or could not reach the port we asked for."""


async def _copy_to_stream(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, stream: Any
) -> None:
    while data := await loop.sock_recv(sock, CHUNK):
        stream.write(data)
        await stream.drain()
    stream.write_eof()


async def _copy_to_socket(
    loop: asyncio.AbstractEventLoop, stream: Any, sock: socket.socket
) -> None:
    while data := await stream.read(CHUNK):
        await loop.sock_sendall(sock, data)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


async def splice_stream(sock: socket.socket, stream: Any) -> None:
    """Copy both ways until both have ended; an error on either side ends both."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    jobs = [
        asyncio.ensure_future(_copy_to_stream(loop, sock, stream)),
        asyncio.ensure_future(_copy_to_socket(loop, stream, sock)),
    ]
    try:
        done, pending = await asyncio.wait(jobs, return_when=asyncio.FIRST_EXCEPTION)
        failed = [j for j in done if j.exception() is not None]
        if failed:  # an abrupt end is passed on as one, both ways
            for j in pending:
                j.cancel()
            stream.abort()
            reset_on_close(sock)
        else:
            await asyncio.gather(*pending)
    finally:
        for j in jobs:
            j.cancel()
        stream.close()
        sock.close()


async def open_forward(conn: Any, port: int) -> Any:
    """Open a stream to ``port`` on the peer's side; raises ForwardRefusedError."""
    stream = await conn.open_stream()
    stream.write(_REQUEST.pack(MAGIC, port))
    await stream.drain()
    answer = await stream.readexactly(1)
    if answer[0] != OK:
        stream.close()
        why = "not allowed there" if answer[0] == REFUSED else "nothing answers there"
        raise ForwardRefusedError(f"the peer refused port {port}: {why}")
    return stream


async def connect_target(host: str, port: int) -> socket.socket | None:
    """A connection to the listener's target for one forward, or None when none answers."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:  # a name (--to localhost:PORT) resolved first: its address decides the pacing
        address = await resolve((host, port), family=family, timeout=CONNECT_TIMEOUT)
    except NatkitError:
        return None
    sock = socket.socket(family)
    sock.setblocking(False)
    unpaced_on_loopback(sock, address[0])  # before connecting: BBR, once started, stays paced
    try:
        await asyncio.wait_for(loop.sock_connect(sock, address), CONNECT_TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        sock.close()
        return None
    return sock


async def serve_forward(
    stream: Any,
    *,
    target_host: str,
    allowed: Collection[int],
    dial: Callable[[Any, int], Awaitable[None]] | None = None,
) -> None:
    """Answer one forwarding request on ``stream`` (the listening side): a port not in
    ``allowed`` is refused (an empty ``allowed`` refuses all). A dial request of the direct
    TCP path goes to ``dial`` (with the port it names) when there is one."""
    try:
        magic, port = _REQUEST.unpack(await stream.readexactly(_REQUEST.size))
    except (NatkitError, asyncio.IncompleteReadError, struct.error):
        stream.close()
        return
    if magic == DIAL_MAGIC and dial is not None:
        await dial(stream, port)
        return
    if magic != MAGIC or port not in allowed or port == 0:
        stream.write(bytes([REFUSED]))
        stream.write_eof()
        log.info("refused a forward to port %s", port)
        return
    sock = await connect_target(target_host, port)
    if sock is None:
        stream.write(bytes([FAILED]))
        stream.write_eof()
        return
    stream.write(bytes([OK]))
    await splice_stream(sock, stream)
