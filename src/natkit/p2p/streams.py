"""A QUIC stream of a :class:`~natkit.p2p.session.P2PSession`, shaped like asyncio's streams.

Reading hands credit back to the peer only for what was read (see
:mod:`natkit.p2p.quicconn`), so an unread stream holds at most one window of data;
:meth:`P2PStream.drain` waits while more than ``write_buffer`` written bytes have not been
sent yet. Either way nothing is buffered without bound.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from natkit.p2p.errors import P2PClosedError, P2PError


class StreamHost(Protocol):
    """What a stream needs from its session."""

    def _stream_send(self, stream_id: int, data: bytes, end: bool) -> None: ...

    def _stream_consumed(self, stream: P2PStream, count: int) -> None: ...

    def _stream_unsent(self, stream: P2PStream) -> int: ...

    def _stream_abandon(self, stream: P2PStream) -> None: ...

    def _stream_abort(self, stream: P2PStream, code: int) -> None: ...

    def _stream_drain_wait(self, stream: P2PStream, waiting: bool) -> None: ...


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


class P2PStream:
    """One bidirectional QUIC stream: ``read``/``readexactly``, ``write`` + ``drain``,
    ``write_eof`` (half-close) and ``close``."""

    def __init__(self, host: StreamHost, stream_id: int, write_buffer: int) -> None:
        self.stream_id = stream_id
        self.write_buffer = write_buffer
        self._host = host
        self._buf = bytearray()
        self._eof = False  # the peer's FIN arrived (data before it may still be buffered)
        self._read_error: P2PError | None = None
        self._write_error: P2PError | None = None
        self._reader: asyncio.Future[None] | None = None
        self._drainer: asyncio.Future[None] | None = None
        self._eof_sent = False
        self._read_closed = False
        self.written = 0  # bytes given to write()
        self.delivered = 0  # bytes QUIC handed to us
        self.settled = 0  # bytes read, or given up unread: their credit went back to the peer

    # ----------------------------------------------------------------- fed by the session

    @property
    def receive_done(self) -> bool:
        """Nothing more will arrive from the peer (FIN, reset or the session ended)."""
        return self._eof or self._read_error is not None

    @property
    def read_closed(self) -> bool:
        return self._read_closed

    @property
    def send_done(self) -> bool:
        return self._eof_sent or self._write_error is not None

    def feed(self, data: bytes, end: bool) -> None:
        self.delivered += len(data)
        if self._read_closed:
            return  # we closed it: the session gives the credit back
        self._buf += data
        self._eof = self._eof or end
        _wake(self._reader)

    def fail_read(self, exc: P2PError) -> None:
        if self._read_error is None and not self._eof:
            self._read_error = exc
        _wake(self._reader)

    def fail_write(self, exc: P2PError) -> None:
        if self._write_error is None:
            self._write_error = exc
        _wake(self._drainer)

    def fail(self, exc: P2PError) -> None:
        self.fail_read(exc)
        self.fail_write(exc)

    def wake_drain(self) -> None:
        _wake(self._drainer)

    # ----------------------------------------------------------------- reading

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (``-1``: everything until EOF); ``b""`` at EOF."""
        if n < 0:
            chunks = []
            while chunk := await self.read(1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)
        if n == 0:
            return b""
        while not self._buf:
            if self._read_closed:
                raise P2PClosedError(f"stream {self.stream_id} was closed for reading")
            if self._eof:
                return b""
            if self._read_error is not None:
                raise self._read_error
            self._reader = asyncio.get_running_loop().create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self.settled += len(data)
        self._host._stream_consumed(self, len(data))
        return data

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; :class:`P2PError` if the stream ends before."""
        parts, got = [], 0
        while got < n:
            chunk = await self.read(n - got)
            if not chunk:
                raise P2PError(f"stream {self.stream_id} ended after {got} of {n} bytes")
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def at_eof(self) -> bool:
        return self._eof and not self._buf

    # ----------------------------------------------------------------- writing

    def write(self, data: bytes) -> None:
        """Queue ``data``; call :meth:`drain` to wait while too much is queued."""
        if self._write_error is not None:
            raise self._write_error
        if self._eof_sent:
            raise P2PError(f"stream {self.stream_id}: write after write_eof()")
        if data:
            self._host._stream_send(self.stream_id, bytes(data), False)
            self.written += len(data)

    async def drain(self) -> None:
        """Wait until at most ``write_buffer`` written bytes are still unsent."""
        while True:
            if self._write_error is not None:
                raise self._write_error
            if self._host._stream_unsent(self) <= self.write_buffer:
                return
            self._drainer = asyncio.get_running_loop().create_future()
            self._host._stream_drain_wait(self, True)
            try:
                await self._drainer
            finally:
                self._drainer = None
                self._host._stream_drain_wait(self, False)

    def write_eof(self) -> None:
        """Half-close: the peer reads EOF after the data written so far; reading goes on."""
        if self._eof_sent or self._write_error is not None:
            return
        self._eof_sent = True
        self._host._stream_send(self.stream_id, b"", True)

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        """End both directions: EOF after what was written; unread data is discarded and
        the peer is told to stop sending."""
        self.write_eof()
        if not self._read_closed:
            self._read_closed = True
            unread = not (self._eof and not self._buf)
            self._buf.clear()
            if unread:
                self._host._stream_abandon(self)
            _wake(self._reader)

    def abort(self, code: int = 0) -> None:
        """End both directions abruptly (RESET_STREAM + STOP_SENDING): the peer's reads fail
        instead of ending cleanly, so a cut-off transfer never looks complete."""
        if self._read_closed and self.send_done:
            return
        self._host._stream_abort(self, code)
        self.fail_write(P2PError(f"stream {self.stream_id} was aborted"))
        self._read_closed = True
        self._buf.clear()
        _wake(self._reader)

    def __repr__(self) -> str:
        return f"<P2PStream {self.stream_id} written={self.written} delivered={self.delivered}>"
