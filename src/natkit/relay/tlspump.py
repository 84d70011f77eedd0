"""The encrypted data path: a TLS data connection joined to a plain TCP socket.

asyncio's TLS transport runs OpenSSL over memory BIOs with Python-level buffering: every
byte is copied several times and every connection holds a read buffer. Here OpenSSL reads
and writes the socket itself (a non-blocking :class:`ssl.SSLSocket`) and the event loop
only says when a socket is ready (``add_reader``/``add_writer``), so bytes are copied once
each way and an idle connection holds no buffer: the one read buffer is shared per thread.

Inside TLS each direction is a sequence of chunks ``u32 length + bytes``; a zero length
ends that direction (half-close: a TLS stream cannot be half-closed portably). An abrupt
end on either side is passed on as a TCP reset, never as a clean end that would make a
cut-off stream look complete. Back-pressure: a side is read only while the other side has
nothing left to write, so at most one buffer of bytes waits per direction.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
from typing import Any

from natkit.errors import ProtocolError
from natkit.relay import protocol as P

CHUNK = 256 * 1024
MAX_CHUNK = 4 * 1024 * 1024  # a larger length is not our framing
_LEN = struct.Struct("!I")
_EOF_CHUNK = b"\x00\x00\x00\x00"
_LINGER_RESET = struct.pack("ii", 1, 0)
_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
_local = threading.local()


def _shared_buffer() -> memoryview:
    """The read buffer of this thread's event loop: callbacks never hold it across awaits."""
    view: memoryview | None = getattr(_local, "buffer", None)
    if view is None:
        view = _local.buffer = memoryview(bytearray(CHUNK + _LEN.size))
    return view


def _reset_on_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError, ValueError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


async def _ready(sock: socket.socket, *, write: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await fut
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def handshake(
    sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool
) -> ssl.SSLSocket:
    """TLS handshake on a connected non-blocking socket; the caller bounds its time."""
    sock.setblocking(False)
    tls = ctx.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)
    try:
        while True:
            try:
                tls.do_handshake()
                return tls
            except ssl.SSLWantReadError:
                await _ready(tls, write=False)
            except ssl.SSLWantWriteError:
                await _ready(tls, write=True)
    except BaseException:
        tls.close()
        raise


async def send_all(tls: ssl.SSLSocket, data: bytes) -> None:
    while data:
        try:
            data = data[tls.send(data) :]
        except ssl.SSLWantWriteError:
            await _ready(tls, write=True)
        except ssl.SSLWantReadError:
            await _ready(tls, write=False)


async def _recv_exact(tls: ssl.SSLSocket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = tls.recv(n - len(buf))
        except ssl.SSLWantReadError:
            await _ready(tls, write=False)
            continue
        except ssl.SSLWantWriteError:
            await _ready(tls, write=True)
            continue
        if not chunk:
            raise ProtocolError("connection closed mid-frame")
        buf += chunk
    return bytes(buf)


async def read_frame(tls: ssl.SSLSocket) -> P.Message:
    """Read exactly one relay frame, no byte more (what follows belongs to the bridge)."""
    word = P.HEADER.unpack(await _recv_exact(tls, P.HEADER.size))[0]
    msg_type, length = word >> 24, word & 0xFFFFFF
    if msg_type not in P.SCHEMAS or length > P.MAX_FRAME:
        raise ProtocolError("not a natkit relay frame")
    return P.decode_body(msg_type, await _recv_exact(tls, length))


class TlsBridge:
    """Joins ``tls`` (framed chunks) and ``plain`` until both directions have ended.

    ``prefix`` is sent on ``tls`` before any chunk (the relay's START frame).
    ``done`` receives ``(bytes plain→tls, bytes tls→plain)``.
    """

    def __init__(self, tls: ssl.SSLSocket, plain: socket.socket, prefix: bytes = b"") -> None:
        self.loop = asyncio.get_running_loop()
        self.tls, self.plain = tls, plain
        self.done: asyncio.Future[tuple[int, int]] = self.loop.create_future()
        self.tfd, self.pfd = tls.fileno(), plain.fileno()
        self.up = self.down = 0
        # plain -> tls
        self.out_t: bytes | memoryview = prefix  # what tls still has to take (retried whole)
        self.plain_eof = False  # plain's remote finished; the end chunk is queued or sent
        # tls -> plain
        self.out_p = bytearray()
        self.header = bytearray()  # a length prefix split across reads
        self.need = 0  # bytes of the current chunk still to come
        self.tls_eof = False  # the end chunk arrived
        self.shutdown_pending = False
        self.tls_closed = False
        self.registered: dict[tuple[int, bool], bool] = {}
        self._update()
        # Bytes OpenSSL already decrypted (they arrived with START) raise no readiness event.
        self.loop.call_soon(self._on_tls_readable)

    # -- registrations -------------------------------------------------------------------
    def _want(self, fd: int, write: bool, on: bool, callback: Any) -> None:
        if self.registered.get((fd, write), False) == on:
            return
        self.registered[(fd, write)] = on
        if write:
            (self.loop.add_writer(fd, callback) if on else self.loop.remove_writer(fd))
        else:
            (self.loop.add_reader(fd, callback) if on else self.loop.remove_reader(fd))

    def _update(self) -> None:
        if self.done.done():
            return
        self._want(self.pfd, False, not self.plain_eof and not self.out_t, self._on_plain_readable)
        self._want(self.tfd, True, bool(self.out_t), self._on_tls_writable)
        self._want(self.tfd, False, not self.tls_closed and not self.out_p, self._on_tls_readable)
        self._want(self.pfd, True, bool(self.out_p), self._on_plain_writable)
        if self.plain_eof and not self.out_t and self.tls_eof and not self.out_p:
            self._finish(None)

    # -- plain -> tls --------------------------------------------------------------------
    def _on_plain_readable(self) -> None:
        if self.done.done() or self.out_t:
            return
        buf = _shared_buffer()
        try:
            n = self.plain.recv_into(buf[_LEN.size :])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(exc)
            return
        if n == 0:
            self.plain_eof = True
            self._send_tls(_EOF_CHUNK)
        else:
            self.up += n
            _LEN.pack_into(buf, 0, n)
            self._send_tls(buf[: _LEN.size + n])
        self._update()

    def _send_tls(self, data: bytes | memoryview) -> None:
        try:
            sent = self.tls.send(data)
        except _WANT:
            sent = 0  # OpenSSL wants the same bytes again: keep them all
        except OSError as exc:
            self._finish(exc)
            return
        self.out_t = bytes(data[sent:]) if sent < len(data) else b""

    def _on_tls_writable(self) -> None:
        if self.done.done():
            return
        self._send_tls(self.out_t)
        self._update()

    # -- tls -> plain --------------------------------------------------------------------
    def _on_tls_readable(self) -> None:
        if self.done.done() or self.out_p or self.tls_closed:
            return
        buf = _shared_buffer()
        got, size = 0, len(buf)
        while got < size:
            try:
                n = self.tls.recv_into(buf[got:], size - got)
            except _WANT:
                break
            except OSError as exc:
                self._finish(exc)
                return
            if n == 0:
                self.tls_closed = True
                break
            got += n
        if got:
            try:
                self._deframe(buf[:got])
            except (ProtocolError, OSError) as exc:
                self._finish(exc)
                return
        if self.tls_closed and not self.tls_eof:
            self._finish(ConnectionResetError("the data connection ended without its end mark"))
            return
        self._update()

    def _deframe(self, view: memoryview) -> None:
        pos, end = 0, len(view)
        while pos < end:
            if self.tls_eof:
                raise ProtocolError("bytes after the end of a data connection's stream")
            if self.need:
                take = min(self.need, end - pos)
                self._send_plain(view[pos : pos + take])
                self.need -= take
                pos += take
                continue
            want = _LEN.size - len(self.header)
            self.header += view[pos : pos + want]
            pos += min(want, end - pos)
            if len(self.header) < _LEN.size:
                return
            n = _LEN.unpack(self.header)[0]
            self.header.clear()
            if n == 0:
                self.tls_eof = True
                self.shutdown_pending = True
                self._flush_shutdown()
            elif n > MAX_CHUNK:
                raise ProtocolError(f"a data chunk of {n} bytes is not natkit framing")
            else:
                self.need = n

    def _send_plain(self, data: memoryview) -> None:
        self.down += len(data)
        if self.out_p:
            self.out_p += data
            return
        try:
            sent = self.plain.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(data):
            self.out_p += data[sent:]

    def _flush_shutdown(self) -> None:
        if self.shutdown_pending and not self.out_p:
            self.shutdown_pending = False
            with contextlib.suppress(OSError):
                self.plain.shutdown(socket.SHUT_WR)

    def _on_plain_writable(self) -> None:
        if self.done.done():
            return
        try:
            sent = self.plain.send(self.out_p)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(exc)
            return
        del self.out_p[:sent]
        if not self.out_p:
            self._flush_shutdown()
            self._update()
            self._on_tls_readable()  # OpenSSL may hold decrypted bytes: no event for those
            return
        self._update()

    # -- the end ---------------------------------------------------------------------------
    def _finish(self, exc: BaseException | None) -> None:
        if self.done.done():
            return
        for (fd, write), on in self.registered.items():
            if on:
                (self.loop.remove_writer if write else self.loop.remove_reader)(fd)
        self.registered.clear()
        if exc is not None:  # an abrupt end is passed on as one, both ways
            _reset_on_close(self.plain)
            _reset_on_close(self.tls)
        self.plain.close()
        self.tls.close()
        self.done.set_result((self.up, self.down))


async def bridge(tls: ssl.SSLSocket, plain: socket.socket, prefix: bytes = b"") -> tuple[int, int]:
    """Join a TLS data connection and a plain socket; returns the bytes moved each way."""
    return await TlsBridge(tls, plain, prefix).done
