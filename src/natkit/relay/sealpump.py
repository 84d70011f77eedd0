"""The encrypted data path: a sealed data connection joined to a plain TCP socket.

Records are sealed and opened by :mod:`natkit.relay.seal` (sans-I/O); here they meet the
sockets. The event loop only says when a socket is ready (``add_reader``/``add_writer``):
one ``recv`` of up to 256 KiB feeds the channel, a record's plaintext goes on to the plain
socket without another copy, and the records one read produced leave in one ``sendmsg``.
An idle connection holds no buffer: the one read buffer is shared per thread.

Inside the sealed stream each direction is a sequence of chunks ``u32 length + bytes``; a
zero length ends that direction (half-close). An abrupt end on either side is passed on as
a TCP reset, never as a clean end that would make a cut-off stream look complete.
Back-pressure: a side is read only while the other side has nothing left to write, so at
most one buffer of bytes waits per direction.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
from collections.abc import Callable, Sequence

from natkit.errors import ProtocolError
from natkit.net.sockets import reset_on_close
from natkit.relay import messages as M
from natkit.relay import seal
from natkit.relay.control import ticket_handle
from natkit.relay.pump import Tap
from natkit.relay.sockframes import recv_exact, wait_ready

CHUNK = seal.RECORD_MAX - 4  # a chunk and its length prefix fill one record
MAX_CHUNK = 4 * 1024 * 1024  # a larger length is not our framing
FIRST_RECORD_MAX = 1024  # the agent's DATA frame
_LEN = struct.Struct("!I")
_EOF_CHUNK = b"\x00\x00\x00\x00"
_local = threading.local()


def _send_joined(sock: socket.socket, parts: Sequence[bytes | memoryview]) -> int:
    """``sendmsg`` where sockets have none (Windows): the parts joined, one ``send``."""
    return sock.send(b"".join(parts))


# Called as _sendmsg(sock, parts): as cheap as the bound method where it exists.
_sendmsg: Callable[[socket.socket, Sequence[bytes | memoryview]], int] = (
    getattr(socket.socket, "sendmsg", None) or _send_joined
)


def _shared_buffer() -> memoryview:
    """The read buffer of this thread's event loop: callbacks never hold it across awaits."""
    view: memoryview | None = getattr(_local, "buffer", None)
    if view is None:
        view = _local.buffer = memoryview(bytearray(seal.RECORD_MAX))
    return view


class SealedSocket:
    """A non-blocking TCP socket with a :class:`~natkit.relay.seal.SealedChannel` on it.

    ``feed`` moves ciphertext from the socket into the channel, ``flush`` moves the
    channel's records (plus what the socket did not take last time) to the socket.
    """

    __slots__ = ("chan", "closed", "eof", "pushback", "sock", "unsent")

    def __init__(self, sock: socket.socket, chan: seal.SealedChannel) -> None:
        sock.setblocking(False)
        self.sock, self.chan = sock, chan
        self.unsent: list[bytes | memoryview] = []  # what the socket has not taken yet
        self.eof = False  # the TCP peer finished (its ciphertext is all fed)
        self.pushback = b""  # plaintext that came after a visitor's stream ended
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def feed(self) -> int:
        """One ``recv`` into the channel; 0 at EOF. Raises BlockingIOError when nothing came."""
        target = self.chan.recv_buffer()  # the rest of a record arriving in parts
        if target is not None:
            n = self.sock.recv_into(target)
            if n:
                self.chan.received_into(n)
        else:
            buf = _shared_buffer()
            n = self.sock.recv_into(buf)
            if n:
                self.chan.receive(buf[:n])
        if not n:
            self.eof = True
            self.chan.receive_eof()
        return n

    def take(self, n: int) -> bytes | None:
        """Up to ``n`` plaintext bytes that are here now (what followed an end mark first,
        then the channel, fed from the socket as needed), None when none are; never a byte
        beyond ``n``. The stream ending here is a ProtocolError."""
        if self.pushback:
            got, self.pushback = self.pushback[:n], self.pushback[n:]
            return bytes(got)
        while True:
            try:
                view = self.chan.read(n)
            except seal.NeedData:
                try:
                    self.feed()
                except (BlockingIOError, InterruptedError):
                    return None
                continue
            if not view:
                raise ProtocolError("the data connection ended mid-frame")
            return bytes(view)

    def flush(self) -> bool:
        """Send what was sealed; True when the socket took everything. One ``sendmsg`` for
        all the records waiting (up to IOV_MAX buffers at a time)."""
        out = self.chan.take_output()
        if self.unsent:
            self.unsent += out
        elif out:
            self.unsent = out
        else:
            return True
        unsent = self.unsent
        while unsent:
            try:
                sent = _sendmsg(self.sock, unsent if len(unsent) <= _IOV_MAX else unsent[:_IOV_MAX])
            except (BlockingIOError, InterruptedError):
                return False
            done = 0
            for buf in unsent:
                if sent < len(buf):
                    break
                sent -= len(buf)
                done += 1
            if done:
                del unsent[:done]
            if sent:
                unsent[0] = memoryview(unsent[0])[sent:]
                return False
        return True

    def close(self, *, reset: bool = False) -> None:
        self.closed = True
        self.chan.forget()
        if reset:
            reset_on_close(self.sock)
        self.sock.close()


_IOV_MAX = 512


async def flush_all(sealed: SealedSocket) -> None:
    while not sealed.flush():
        await wait_ready(sealed.sock, write=True)


class UnknownTicketError(ProtocolError):
    """A sealed data connection named a ticket the relay did not issue (or saw used)."""


def begin_sealed(
    sock: socket.socket, data_key: bytes, ticket: str, cipher: str = seal.CHACHA
) -> SealedSocket:
    """The agent's side, before any I/O: the clear opening (which names the ticket only by
    its handle), then DATA {ticket} sealed under keys derived from the ticket (which proves
    it), queued for :meth:`SealedSocket.flush`."""
    nonce = os.urandom(seal.NONCE_SIZE)
    up, down = seal.derive_keys(data_key, ticket, nonce, cipher)
    sealed = SealedSocket(sock, seal.SealedChannel(send_key=up, recv_key=down, cipher=cipher))
    sealed.unsent.append(seal.encode_opening(ticket_handle(ticket), nonce, cipher))
    sealed.chan.seal(M.encode(M.Data(ticket=ticket)))
    return sealed


async def open_sealed(sock: socket.socket, data_key: bytes, ticket: str) -> SealedSocket:
    """:func:`begin_sealed`, sent."""
    sealed = begin_sealed(sock, data_key, ticket)
    await flush_all(sealed)
    return sealed


async def accept_sealed(
    sock: socket.socket, key_for: Callable[[str], tuple[str, bytes] | None]
) -> SealedSocket:
    """The relay's side: read the opening, find the ticket and session secret behind its
    handle (``key_for``), and check the sealed DATA frame. The caller bounds the time."""
    head = await recv_exact(sock, 2)
    opening = head + await recv_exact(sock, seal.opening_size(head) - 2)
    handle, nonce = seal.decode_opening(opening)
    cipher = seal.opening_cipher(opening)
    found = key_for(handle)
    if found is None:
        raise UnknownTicketError("a sealed data connection with an unknown or used ticket")
    ticket, data_key = found
    up, down = seal.derive_keys(data_key, ticket, nonce, cipher)
    sealed = SealedSocket(sock, seal.SealedChannel(send_key=down, recv_key=up, cipher=cipher))
    sealed.chan.limit = FIRST_RECORD_MAX  # not authenticated yet: no large buffer for it
    msg = await read_frame(sealed)
    if not isinstance(msg, M.Data) or msg.ticket != ticket:
        raise ProtocolError("a sealed data connection must open with its DATA frame")
    sealed.chan.limit = seal.RECORD_MAX
    return sealed


async def send_all(sealed: SealedSocket, data: bytes) -> None:
    sealed.chan.seal(data)
    await flush_all(sealed)


async def recv_sealed_exact(sealed: SealedSocket, n: int) -> bytes:
    """Exactly ``n`` plaintext bytes, no byte more."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sealed.take(n - len(buf))
        if chunk is None:
            await wait_ready(sealed.sock)
        else:
            buf += chunk
    return bytes(buf)


async def read_frame(sealed: SealedSocket) -> M.Message:
    """Read exactly one relay frame, no byte more (what follows belongs to the bridge)."""
    msg_type, length = M.decode_header(await recv_sealed_exact(sealed, M.HEADER.size))
    return M.decode_body(msg_type, await recv_sealed_exact(sealed, length))


class Bridge:
    """Joins ``sealed`` (framed chunks) and ``plain`` until both directions have ended.

    ``prefix`` is sent on ``sealed`` before any chunk (the relay's START frame).
    ``done`` receives ``(bytes plain→sealed, bytes sealed→plain)``. With ``keep``, a sealed
    connection whose both directions ended cleanly stays open for the next visitor (what
    followed the end mark waits in ``sealed.pushback``); otherwise it is closed.

    Per message the work is one ``recv``, one record sealed and one ``sendmsg`` one way;
    one ``recv``, the records it brought opened and their chunks passed on in one
    ``sendmsg`` the other way. Readers stay registered while a direction flows: the event
    loop's registrations change only when a socket is full or a direction ends.
    """

    __slots__ = (
        "buf", "done", "down", "finished", "header", "keep", "loop", "need", "out_p", "pfd",
        "plain", "plain_eof", "plain_in", "registered", "sealed", "sealed_eof", "sfd",
        "shutdown_pending", "tap", "up",
    )  # fmt: skip

    def __init__(
        self, sealed: SealedSocket, plain: socket.socket, prefix: bytes = b"", keep: bool = False,
        tap: Tap | None = None,
    ) -> None:  # fmt: skip
        self.loop = asyncio.get_running_loop()
        # The inspector's copy of what passes (natkit.inspect.tap), only while it follows.
        self.tap = tap
        self.sealed, self.plain, self.keep = sealed, plain, keep
        self.done: asyncio.Future[tuple[int, int]] = self.loop.create_future()
        self.finished = False  # not done.done(): a cancelled ``done`` must not stop the cleanup
        self.sfd, self.pfd = sealed.fileno(), plain.fileno()
        self.buf = _shared_buffer()  # this loop's thread's: callbacks run on it
        self.plain_in = self.buf[_LEN.size : _LEN.size + CHUNK]  # after the length prefix
        self.up = self.down = 0
        # plain -> sealed
        self.plain_eof = False  # plain's remote finished; the end chunk is queued or sent
        # sealed -> plain
        self.out_p = bytearray()
        self.header = b""  # a length prefix split across records
        self.need = 0  # bytes of the current chunk still to come
        self.sealed_eof = False  # the end chunk arrived
        self.shutdown_pending = False
        self.registered = 0  # bit set of _READ_P, _WRITE_P, _READ_S, _WRITE_S
        if prefix:
            sealed.chan.seal(prefix)
        self._update()
        # What is already waiting goes now, not one loop iteration later: plain bytes (a
        # visitor's request, which came with its connection) leave sealed behind the prefix
        # in the same send, and records that came with START are in the channel already
        # (no readiness event would come for them).
        self._on_plain_readable()
        if not self.finished:
            self._flush_sealed()
            self._update()
            self._drain()

    # -- registrations -------------------------------------------------------------------
    def _want(self, bit: int, on: bool) -> None:
        if bool(self.registered & bit) == on:
            return
        self.registered ^= bit
        fd = self.pfd if bit in (_READ_P, _WRITE_P) else self.sfd
        if bit == _READ_P:
            (
                self.loop.add_reader(fd, self._on_plain_readable)
                if on
                else self.loop.remove_reader(fd)
            )
        elif bit == _WRITE_P:
            (
                self.loop.add_writer(fd, self._on_plain_writable)
                if on
                else self.loop.remove_writer(fd)
            )
        elif bit == _READ_S:
            (
                self.loop.add_reader(fd, self._on_sealed_readable)
                if on
                else self.loop.remove_reader(fd)
            )
        else:
            (
                self.loop.add_writer(fd, self._on_sealed_writable)
                if on
                else self.loop.remove_writer(fd)
            )

    def _update(self) -> None:
        if self.finished:
            return
        busy = bool(self.sealed.unsent)
        want = _WRITE_S if busy else (0 if self.plain_eof else _READ_P)
        if self.out_p:
            want |= _WRITE_P
        elif not self.sealed.eof and not self.sealed_eof:
            want |= _READ_S
        changed = want ^ self.registered
        if changed:
            for bit in (_READ_P, _WRITE_P, _READ_S, _WRITE_S):
                if changed & bit:
                    self._want(bit, bool(want & bit))
        if self.plain_eof and not busy and self.sealed_eof and not self.out_p:
            self._finish(None)

    def _flush_sealed(self) -> None:
        try:
            self.sealed.flush()
        except OSError as exc:
            self._finish(exc)

    # -- plain -> sealed -----------------------------------------------------------------
    def _on_plain_readable(self) -> None:
        sealed = self.sealed
        if self.finished or sealed.unsent:
            return
        buf = self.buf
        try:
            n = self.plain.recv_into(self.plain_in)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(exc)
            return
        if n:
            self.up += n
            tap = self.tap
            if tap is not None and tap.on:
                tap.response(self.plain_in[:n])  # before sealing: it overwrites the buffer
            _LEN.pack_into(buf, 0, n)
            chan = sealed.chan
            if not chan.has_output():  # the usual case: one record, sent now
                header, body = chan.seal_record(buf[: _LEN.size + n])
                try:
                    sent = _sendmsg(sealed.sock, (header, body))
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as exc:
                    self._finish(exc)
                    return
                if sent != len(header) + len(body):  # sealed is full: keep (a copy of) the rest
                    sealed.unsent = (  # (body is the thread's scratch buffer: copied)
                        [header[sent:], bytes(body)]
                        if sent < len(header)
                        else [bytes(body[sent - len(header) :])]
                    )
                    self._update()
                return
            chan.seal(buf[: _LEN.size + n])
        else:
            self.plain_eof = True
            sealed.chan.seal(_EOF_CHUNK)
        try:
            sent = sealed.flush()
        except OSError as exc:
            self._finish(exc)
            return
        if not sent or not n:  # the registrations change only when sealed is full or at EOF
            self._update()

    def _on_sealed_writable(self) -> None:
        if not self.finished:
            self._flush_sealed()
            self._update()

    # -- sealed -> plain -----------------------------------------------------------------
    def _on_sealed_readable(self) -> None:
        if self.finished or self.out_p or self.sealed_eof:
            return
        sealed = self.sealed
        if self.need or self.header or sealed.pushback or sealed.chan.in_record():
            try:  # in the middle of a chunk or a record: the general path
                sealed.feed()
            except (BlockingIOError, InterruptedError):
                return
            except (OSError, ProtocolError) as exc:
                self._finish(exc)
                return
            self._drain()
            return
        buf = self.buf
        try:
            n = sealed.sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(exc)
            return
        if not n:
            sealed.eof = True
            sealed.chan.receive_eof()
            self._drain()
            return
        view = buf[:n]
        try:
            plain = sealed.chan.open_record(view)
            if plain is None:  # several records, or part of one
                sealed.chan.receive(view)
                self._drain()
                return
        except ProtocolError as exc:
            self._finish(exc)
            return
        size = len(plain) - _LEN.size
        if size <= 0 or _LEN.unpack_from(plain)[0] != size:  # not one whole chunk
            self._drain([memoryview(plain)])
            return
        self.down += size  # the usual case: one record, one chunk, passed on now
        try:
            sent = self.plain.send(memoryview(plain)[_LEN.size :])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._finish(exc)
            return
        tap = self.tap
        if tap is not None and tap.on:
            tap.request(memoryview(plain)[_LEN.size :])
        if sent < size:
            self.out_p += memoryview(plain)[_LEN.size + sent :]
            self._update()  # plain is full: stop reading sealed, wait to write

    def _drain(self, opened: list[memoryview] | None = None) -> None:
        """Open what the channel holds and pass it on, until it holds nothing whole: the
        chunks of all the records one ``recv`` brought leave in one ``sendmsg``.
        ``opened``: plaintext already taken out of the channel, which comes first."""
        if self.finished:
            return
        sealed = self.sealed
        chan = sealed.chan
        parts: list[memoryview] = []
        try:
            for view in opened or ():
                self._deframe(view, parts)
            if sealed.pushback:  # what followed the last visitor's end mark in its record
                rest, sealed.pushback = sealed.pushback, b""
                self._deframe(memoryview(rest), parts)
            while not self.sealed_eof:
                views = chan.take_ready()
                if not views:  # why not: more is needed, the stream failed, or it ended
                    if not chan.eof and not chan.has_input():
                        break  # more is needed (known without raising NeedData)
                    try:
                        view = chan.read(seal.RECORD_MAX)
                    except seal.NeedData:
                        break
                    if not view:  # cut off without the end mark: an abrupt end
                        raise ConnectionResetError("the data connection ended early")
                    views = [view]
                for view in views:  # (after an end mark: kept for the next visitor)
                    self._deframe(view, parts)
            if parts:
                self._send_plain(parts)
        except (ProtocolError, OSError) as exc:
            self._finish(exc)
            return
        if self.shutdown_pending:
            self._flush_shutdown()
        self._update()

    def _deframe(self, view: memoryview, parts: list[memoryview]) -> None:
        pos, end = 0, len(view)
        if (  # one whole chunk, the usual case
            not self.need
            and not self.header
            and not self.sealed_eof
            and end > _LEN.size
            and _LEN.unpack_from(view)[0] == end - _LEN.size
        ):
            parts.append(view[_LEN.size :])
            return
        while pos < end:
            if self.sealed_eof:  # the next visitor's START: kept for read_frame
                self.sealed.pushback += view[pos:]
                return
            if self.need:
                take = min(self.need, end - pos)
                parts.append(view[pos : pos + take])
                self.need -= take
                pos += take
                continue
            if not self.header and end - pos >= _LEN.size:  # a whole length prefix
                n = _LEN.unpack_from(view, pos)[0]
                pos += _LEN.size
            else:
                want = _LEN.size - len(self.header)
                self.header += view[pos : pos + want]
                pos += min(want, end - pos)
                if len(self.header) < _LEN.size:
                    return
                n = _LEN.unpack(self.header)[0]
                self.header = b""
            if n == 0:
                self.sealed_eof = True
                self.shutdown_pending = True  # once what came before it has gone
            elif n > MAX_CHUNK:
                raise ProtocolError(f"a data chunk of {n} bytes is not natkit framing")
            else:
                self.need = n

    def _send_plain(self, parts: list[memoryview]) -> None:
        """Send ``parts`` on plain in one call; what it does not take waits in ``out_p``
        (which is empty here: nothing is read while it holds bytes)."""
        total = sum(map(len, parts)) if len(parts) > 1 else len(parts[0])
        self.down += total
        tap = self.tap
        if tap is not None and tap.on:
            for part in parts:
                tap.request(part)
        try:
            if len(parts) == 1:
                sent = self.plain.send(parts[0])
            else:
                sent = _sendmsg(self.plain, parts[:_IOV_MAX])
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < total:
            out = self.out_p
            for part in parts:
                if sent >= len(part):
                    sent -= len(part)
                else:
                    out += part[sent:]
                    sent = 0

    def _flush_shutdown(self) -> None:
        if self.shutdown_pending and not self.out_p:
            self.shutdown_pending = False
            with contextlib.suppress(OSError):
                self.plain.shutdown(socket.SHUT_WR)

    def _on_plain_writable(self) -> None:
        if self.finished:
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
            self.out_p = bytearray()  # let the buffer go: an idle bridge holds none
            self._flush_shutdown()
            self._drain()  # the channel may still hold records: no readiness event for those
            return
        self._update()

    # -- the end ---------------------------------------------------------------------------
    def abort(self) -> None:
        """End now: both sides get a reset."""
        self._finish(ConnectionAbortedError("the bridge was aborted"))

    def _finish(self, exc: BaseException | None) -> None:
        if self.finished:
            return
        self.finished = True
        if self.tap is not None:
            self.tap.closed()
        for bit in (_READ_P, _WRITE_P, _READ_S, _WRITE_S):
            self._want(bit, False)
        if exc is not None:  # an abrupt end is passed on as one, both ways
            reset_on_close(self.plain)
        self.plain.close()
        if exc is not None or not self.keep or self.sealed.eof:
            self.sealed.close(reset=exc is not None)
        if not self.done.done():
            self.done.set_result((self.up, self.down))


_READ_P, _WRITE_P, _READ_S, _WRITE_S = 1, 2, 4, 8


async def bridge(
    sealed: SealedSocket, plain: socket.socket, prefix: bytes = b"", *, keep: bool = False
) -> tuple[int, int]:
    """Join a sealed data connection and a plain socket; returns the bytes moved each way.
    With ``keep``, a cleanly ended sealed connection stays open (``sealed.closed`` tells).
    Cancelled: both sides get a reset."""
    joined = Bridge(sealed, plain, prefix, keep)
    try:
        return await asyncio.shield(joined.done)
    except asyncio.CancelledError:
        joined.abort()
        raise
