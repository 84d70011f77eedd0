"""The agent's side of one data connection, driven by event-loop callbacks alone.

An :class:`Opening` connects to the relay and sends the connection's ticket; then the
connection parks as a :class:`DataConn`. A parked connection waits for the relay's START with a reader callback (no task, no
future); START starts the connection to the service, and once that is up the two are
joined: spliced when plain, a :class:`~natkit.relay.sealpump.Bridge` when sealed. A sealed
connection whose visitor ended cleanly parks again for the next visitor. Between a visitor's
arrival at the relay and its first byte reaching the service there is then no task wake-up
at all, and a held visitor costs no task.

Any failure after START (the service refused, the relay went away) ends the data
connection with a reset, so the visitor sees an abrupt end, never a clean, empty answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

from natkit.errors import ProtocolError
from natkit.net.sockets import reset_on_close, unpaced_on_loopback
from natkit.relay import messages as M
from natkit.relay import seal
from natkit.relay.pump import Tap, start_join
from natkit.relay.sealpump import Bridge, SealedSocket, begin_sealed

log = logging.getLogger("natkit.relay")

# What a data connection tells its owner: "parked", "active" (carries a visitor), "gone".
Owner = Callable[["DataConn", str], None]
# Given a visitor's address (from START): the capture of its connection, or None.
TapFor = Callable[[str], "Tap | None"]
OPEN_TIMEOUT = 10.0  # connect and send the ticket within this, or give the ticket up


class Opening:
    """A data connection on its way to the relay at ``relay_addr`` (an IP address and
    port): connect, send the ticket (a plain DATA frame, or the sealed opening when
    ``data_key`` is given), then park as a :class:`DataConn`. Callbacks only, no task: the
    relay asks for one per visitor in plaintext mode. ``ended`` is told when it is parked
    or has failed (the relay's unused ticket then expires). The constructor raises
    OSError when no socket can be had (out of file descriptors)."""

    __slots__ = (
        "ended",
        "finished",
        "local_addr",
        "loop",
        "out",
        "owner",
        "sealed",
        "sock",
        "tap_for",
        "timer",
    )

    def __init__(
        self,
        relay_addr: tuple[str, int],
        ticket: str,
        data_key: bytes | None,
        local_addr: tuple[str, int],
        owner: Owner,
        ended: Callable[[Opening], None],
        cipher: str = seal.CHACHA,
        tap_for: TapFor | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.local_addr, self.owner, self.ended = local_addr, owner, ended
        self.tap_for = tap_for
        sock = socket.socket(socket.AF_INET6 if ":" in relay_addr[0] else socket.AF_INET)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.sealed = None if data_key is None else begin_sealed(sock, data_key, ticket, cipher)
        self.out = M.encode(M.Data(ticket=ticket)) if data_key is None else b""
        self.timer: asyncio.TimerHandle | None = None
        self.finished = False  # parked (the DataConn owns the socket now) or failed
        err = sock.connect_ex(relay_addr)
        if err == 0 or (err in _IN_PROGRESS and _connected(sock)):
            self._send()  # loopback, or a connection that completed at once
        elif err in _IN_PROGRESS:
            self._wait_writable()
        else:
            self._fail(_refused(err))

    def _wait_writable(self) -> None:
        self.loop.add_writer(self.sock.fileno(), self._on_writable)
        if self.timer is None:
            self.timer = self.loop.call_later(
                OPEN_TIMEOUT, self._fail, TimeoutError("the relay did not take the connection")
            )

    def _on_writable(self) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(_refused(err))
            return
        self._send()

    def _send(self) -> None:
        try:
            if self.sealed is not None:
                complete = self.sealed.flush()
            else:
                self.out = self.out[self.sock.send(self.out) :]
                complete = not self.out
        except (BlockingIOError, InterruptedError):
            complete = False
        except OSError as exc:
            self._fail(exc)
            return
        if not complete:
            self._wait_writable()
            return
        self._stop_watching()
        self.finished = True
        DataConn(self.sock, self.sealed, self.local_addr, self.owner, self.tap_for).park()
        self.ended(self)

    def _stop_watching(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        with contextlib.suppress(Exception):
            self.loop.remove_writer(self.sock.fileno())

    def _fail(self, exc: BaseException) -> None:
        log.debug("data connection failed: %s", exc)
        self.abort()

    def abort(self) -> None:
        """Give up (the agent stops, or its session with the relay was lost)."""
        if self.finished:
            return
        self.finished = True
        self._stop_watching()
        self.sock.close()
        self.ended(self)


class DataConn:
    """A data connection (plain ``sock``, or ``sealed`` on it) for the service at ``local``
    (an IP address and port)."""

    __slots__ = ("frame", "join", "local", "local_addr", "loop", "owner", "sealed", "sock", "state",
                 "tap_for", "visitor")  # fmt: skip

    def __init__(
        self,
        sock: socket.socket,
        sealed: SealedSocket | None,
        local_addr: tuple[str, int],
        owner: Owner,
        tap_for: TapFor | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock, self.sealed, self.local_addr, self.owner = sock, sealed, local_addr, owner
        self.tap_for = tap_for  # an HTTP tunnel with the inspector on
        self.visitor = ""  # the visitor's address, from START
        self.frame = b""  # START as it arrives
        self.local: socket.socket | None = None
        self.join: Any = None  # the Bridge or splice pair while a visitor is carried
        self.state = "new"

    # -- parked ----------------------------------------------------------------------------
    def park(self) -> None:
        self._set_state("parked")
        self.frame = b""
        self.loop.add_reader(self.sock.fileno(), self._on_readable)
        if self.sealed is not None and (self.sealed.pushback or self.sealed.chan.has_input()):
            # START came with the last visitor's end mark: no readiness event for it.
            self.loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        if self.state != "parked":
            return
        try:
            start = self._read_start()
        except (OSError, ProtocolError) as exc:
            self._fail(exc)
            return
        if start is None:
            return
        self.loop.remove_reader(self.sock.fileno())
        if not isinstance(start, M.Start):
            self._fail(ProtocolError(f"expected START, got {type(start).__name__}"))
            return
        self.visitor = start.visitor
        self._set_state("active")
        try:
            self._connect_local()
        except OSError as exc:  # out of file descriptors, no route: the visitor gets a reset
            self._fail(exc)

    def _read_start(self) -> M.Message | None:
        """START once it is whole (None until then), reading no byte beyond it."""
        while True:
            size = M.HEADER.size
            if len(self.frame) >= size:
                msg_type, length = M.decode_header(self.frame[:size])
                if len(self.frame) == size + length:
                    return M.decode_body(msg_type, self.frame[size:])
                size += length
            more = self._take(size - len(self.frame))
            if more is None:
                return None
            self.frame += more

    def _take(self, n: int) -> bytes | None:
        """Up to ``n`` bytes of what the relay sent, None when none are here yet."""
        if self.sealed is not None:
            return self.sealed.take(n)
        try:
            got = self.sock.recv(n)
        except (BlockingIOError, InterruptedError):
            return None
        if not got:
            raise ConnectionResetError("the relay closed the data connection")
        return got

    # -- the service -----------------------------------------------------------------------
    def _connect_local(self) -> None:
        host, _ = self.local_addr
        local = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        local.setblocking(False)
        local.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        unpaced_on_loopback(local, host)
        self.local = local
        err = local.connect_ex(self.local_addr)
        if err == 0:
            self._join()  # (an OSError here is the caller's to handle)
        elif err in _IN_PROGRESS:
            # Joined only once connected: a visitor's half-close passed on as shutdown() to a
            # socket still connecting would abort the connection. Over loopback the handshake
            # is usually done when connect() returns: then no loop iteration is spent on it.
            if _connected(local):
                self._join()
            else:
                self.loop.add_writer(local.fileno(), self._on_connected)
        else:
            self._fail(OSError(err, f"the service at {host}:{self.local_addr[1]} refused"))

    def _on_connected(self) -> None:
        assert self.local is not None
        self.loop.remove_writer(self.local.fileno())
        err = self.local.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(OSError(err, f"the service at {self.local_addr[0]} is unreachable"))
            return
        try:
            self._join()
        except OSError as exc:
            self._fail(exc)

    def _join(self) -> None:
        local = self.local
        assert local is not None
        tap = self.tap_for(self.visitor) if self.tap_for is not None else None
        join = (
            Bridge(self.sealed, local, keep=True, tap=tap)
            if self.sealed
            else start_join(self.sock, local, tap)
        )
        self.local, self.join = None, join  # the join owns the service connection now
        join.done.add_done_callback(self._joined)

    def _joined(self, _: Any) -> None:
        self.join = None
        if self.sealed is not None and not self.sealed.closed:
            self.park()  # a clean end: the next visitor may come on this connection
        else:
            self._set_state("gone")

    # -- the end ---------------------------------------------------------------------------
    def abort(self) -> None:
        """End now (the agent stops, or its session with the relay was lost)."""
        if self.join is not None:
            self.join.abort()  # its done callback says "gone"
        else:
            self._fail(ConnectionAbortedError("the agent let go of this data connection"))

    def _fail(self, exc: BaseException) -> None:
        if self.state == "gone":
            return
        log.debug("data connection ended: %s", exc)
        fd = self.sock.fileno()
        if fd >= 0:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(fd)
        if self.local is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_writer(self.local.fileno())
            self.local.close()
            self.local = None
        if self.sealed is not None:
            self.sealed.close(reset=True)
        else:
            reset_on_close(self.sock)
            self.sock.close()
        self._set_state("gone")

    def _set_state(self, state: str) -> None:
        self.state = state
        self.owner(self, state)


# (Windows' non-blocking connect_ex answers WSAEWOULDBLOCK, where errno has it)
_IN_PROGRESS = (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK, *(
    getattr(errno, name) for name in ("WSAEWOULDBLOCK",) if hasattr(errno, name)
))  # fmt: skip


def _refused(err: int) -> OSError:
    return OSError(err, f"cannot connect to the relay: {errno.errorcode.get(err)}")


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True
