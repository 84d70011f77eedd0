"""The encrypted data path: a TLS data connection joined to a plain TCP socket.

asyncio's TLS transport moves each TLS record through several Python-level buffers and
holds a read buffer per connection. Here OpenSSL works on memory BIOs that we fill and
drain in large batches: one ``recv`` of up to 256 KiB feeds many records to OpenSSL, and
all records one write produced leave in one ``send`` (OpenSSL on the socket itself would
make two system calls per 16 KiB record when reading and one when writing). The event loop
only says when a socket is ready (``add_reader``/``add_writer``); an idle connection holds
no buffer: the one read buffer is shared per thread.

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
from natkit.relay.pump import reset_on_close

CHUNK = 256 * 1024
MAX_CHUNK = 4 * 1024 * 1024  # a larger length is not our framing
_LEN = struct.Struct("!I")
_EOF_CHUNK = b"\x00\x00\x00\x00"
_local = threading.local()


def _shared_buffer() -> memoryview:
    """The read buffer of this thread's event loop: callbacks never hold it across awaits."""
    view: memoryview | None = getattr(_local, "buffer", None)
    if view is None:
        view = _local.buffer = memoryview(bytearray(CHUNK + _LEN.size))
    return view


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


class TlsSocket:
    """A non-blocking TCP socket with OpenSSL between memory BIOs.

    ``feed`` moves ciphertext from the socket into OpenSSL, ``flush`` moves OpenSSL's
    output (plus what the socket did not take last time) to the socket.
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side)
        self.unsent: bytes | memoryview = b""  # ciphertext the socket has not taken yet
        self.eof = False  # the TCP peer finished (its ciphertext is all fed)
        self.pushback = b""  # decrypted bytes that came after a visitor's stream ended
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def feed(self) -> int:
        """One ``recv`` into OpenSSL; 0 at EOF. Raises BlockingIOError when nothing came."""
        buf = _shared_buffer()
        n = self.sock.recv_into(buf)
        if n:
            self.incoming.write(buf[:n])
        else:
            self.eof = True
            self.incoming.write_eof()
        return n

    def flush(self) -> bool:
        """Send what OpenSSL produced; True when the socket took everything."""
        if self.outgoing.pending:
            data = self.outgoing.read()
            self.unsent = bytes(self.unsent) + data if self.unsent else data
        if self.unsent:
            try:
                sent = self.sock.send(self.unsent)
            except (BlockingIOError, InterruptedError):
                sent = 0
            self.unsent = memoryview(self.unsent)[sent:] if sent < len(self.unsent) else b""
        return not self.unsent

    def peer_der(self) -> bytes:
        return self.obj.getpeercert(binary_form=True) or b""

    def close(self, *, reset: bool = False) -> None:
        self.closed = True
        if reset:
            reset_on_close(self.sock)
        self.sock.close()


async def _flush_all(tls: TlsSocket) -> None:
    while not tls.flush():
        await _ready(tls.sock, write=True)


async def _feed_some(tls: TlsSocket) -> None:
    while True:
        try:
            tls.feed()
            return
        except (BlockingIOError, InterruptedError):
            await _ready(tls.sock, write=False)


async def handshake(sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool) -> TlsSocket:
    """TLS handshake on a connected socket; the caller bounds its time."""
    tls = TlsSocket(sock, ctx, server_side=server_side)
    try:
        while True:
            try:
                tls.obj.do_handshake()
                await _flush_all(tls)
                return tls
            except ssl.SSLWantReadError:
                await _flush_all(tls)
                if tls.eof:
                    raise ConnectionResetError("the peer closed during the TLS handshake") from None
                await _feed_some(tls)
    except BaseException:
        tls.close()
        raise


async def send_all(tls: TlsSocket, data: bytes) -> None:
    tls.obj.write(data)
    await _flush_all(tls)


async def _recv_exact(tls: TlsSocket, n: int) -> bytes:
    buf = bytearray(tls.pushback[:n])
    tls.pushback = tls.pushback[n:]
    while len(buf) < n:
        try:
            chunk = tls.obj.read(n - len(buf))
        except ssl.SSLWantReadError:
            if tls.eof:
                raise ProtocolError("connection closed mid-frame") from None
            await _feed_some(tls)
            continue
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            chunk = b""
        if not chunk:
            raise ProtocolError("connection closed mid-frame")
        buf += chunk
    return bytes(buf)


async def read_frame(tls: TlsSocket) -> P.Message:
    """Read exactly one relay frame, no byte more (what follows belongs to the bridge)."""
    msg_type, length = P.decode_header(await _recv_exact(tls, P.HEADER.size))
    return P.decode_body(msg_type, await _recv_exact(tls, length))


class TlsBridge:
    """Joins ``tls`` (framed chunks) and ``plain`` until both directions have ended.

    ``prefix`` is sent on ``tls`` before any chunk (the relay's START frame).
    ``done`` receives ``(bytes plain→tls, bytes tls→plain)``. With ``keep``, a TLS
    connection whose both directions ended cleanly stays open for the next visitor (what
    followed the end mark waits in ``tls.pushback``); otherwise it is closed.
    """

    def __init__(
        self, tls: TlsSocket, plain: socket.socket, prefix: bytes = b"", keep: bool = False
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.tls, self.plain, self.keep = tls, plain, keep
        self.done: asyncio.Future[tuple[int, int]] = self.loop.create_future()
        self.tfd, self.pfd = tls.fileno(), plain.fileno()
        self.up = self.down = 0
        # plain -> tls
        self.plain_eof = False  # plain's remote finished; the end chunk is queued or sent
        # tls -> plain
        self.out_p = bytearray()
        self.header = bytearray()  # a length prefix split across reads
        self.need = 0  # bytes of the current chunk still to come
        self.tls_eof = False  # the end chunk arrived
        self.shutdown_pending = False
        self.registered: dict[tuple[int, bool], bool] = {}
        if prefix:
            tls.obj.write(prefix)
        self._flush_tls()
        self._update()
        # Records that came with START are inside OpenSSL already: no readiness event for them.
        self.loop.call_soon(self._drain)

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
        tls_busy = bool(self.tls.unsent)
        self._want(self.pfd, False, not self.plain_eof and not tls_busy, self._on_plain_readable)
        self._want(self.tfd, True, tls_busy, self._on_tls_writable)
        reading = not self.tls.eof and not self.out_p and not self.tls_eof
        self._want(self.tfd, False, reading, self._on_tls_readable)
        self._want(self.pfd, True, bool(self.out_p), self._on_plain_writable)
        if self.plain_eof and not tls_busy and self.tls_eof and not self.out_p:
            self._finish(None)

    def _flush_tls(self) -> None:
        try:
            self.tls.flush()
        except OSError as exc:
            self._finish(exc)

    # -- plain -> tls --------------------------------------------------------------------
    def _on_plain_readable(self) -> None:
        if self.done.done() or self.tls.unsent:
            return
        buf = _shared_buffer()
        try:
            n = self.plain.recv_into(buf[_LEN.size :])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(exc)
            return
        try:
            if n == 0:
                self.plain_eof = True
                self.tls.obj.write(_EOF_CHUNK)
            else:
                self.up += n
                _LEN.pack_into(buf, 0, n)
                self.tls.obj.write(buf[: _LEN.size + n])
        except ssl.SSLError as exc:
            self._finish(exc)
            return
        self._flush_tls()
        self._update()

    def _on_tls_writable(self) -> None:
        if not self.done.done():
            self._flush_tls()
            self._update()

    # -- tls -> plain --------------------------------------------------------------------
    def _on_tls_readable(self) -> None:
        if self.done.done() or self.out_p or self.tls_eof:
            return
        try:
            self.tls.feed()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(exc)
            return
        self._drain()

    def _drain(self) -> None:
        """Decrypt what OpenSSL holds and pass it on, until it holds nothing or plain is full.

        Records (16 KiB each) are gathered into one buffer first: one ``send`` per buffer,
        not one per record.
        """
        if self.done.done():
            return
        buf = _shared_buffer()
        size = len(buf)
        ended = False
        while not self.out_p and not ended and not self.tls_eof:
            got = 0
            while got < size:
                try:
                    n: int = self.tls.obj.read(size - got, buf[got:])  # type: ignore[assignment]
                except ssl.SSLWantReadError:
                    break
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    n = 0
                except ssl.SSLError as exc:
                    self._finish(exc)
                    return
                if n == 0:
                    ended = True
                    break
                got += n
            if not got and not ended:
                break
            try:
                self._deframe(buf[:got])
            except (ProtocolError, OSError) as exc:
                self._finish(exc)
                return
            if ended and not self.tls_eof:  # cut off without the end mark: an abrupt end
                self._finish(ConnectionResetError("the data connection ended early"))
                return
        if self.tls.outgoing.pending:  # OpenSSL answered something (a key update)
            self._flush_tls()
        self._update()

    def _deframe(self, view: memoryview) -> None:
        pos, end = 0, len(view)
        while pos < end:
            if self.tls_eof:  # the next visitor's START: kept for read_frame
                self.tls.pushback += view[pos:]
                return
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
            self._drain()  # OpenSSL may still hold records: no readiness event for those
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
            reset_on_close(self.plain)
        self.plain.close()
        if exc is not None or not self.keep or self.tls.eof:
            self.tls.close(reset=exc is not None)
        self.done.set_result((self.up, self.down))


async def bridge(
    tls: TlsSocket, plain: socket.socket, prefix: bytes = b"", *, keep: bool = False
) -> tuple[int, int]:
    """Join a TLS data connection and a plain socket; returns the bytes moved each way.
    With ``keep``, a cleanly ended TLS connection stays open (``tls.closed`` tells)."""
    return await TlsBridge(tls, plain, prefix, keep).done
