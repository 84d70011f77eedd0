"""A peer-to-peer session: QUIC over a :class:`~natkit.p2p.paths.PathSwitch`.

aioquic's QuicConnection runs sans-I/O: datagrams from the switch go into it, what it
wants to send goes out through the switch's active path, its timer is a ``call_at`` on the
event loop. QUIC sees one fake peer address, so moving between paths is invisible to it;
after a switch it is pinged so that what the old path swallowed is retransmitted at once.

Authentication (see :mod:`natkit.p2p.auth`) runs on the server's first stream before the
session is handed out: the server sends a nonce as soon as it has keys, the client (having
pinned the server's certificate) answers with its proof of the shared secret, the server
answers with its own proof; each side ends the stream with its proof. A failure closes the connection with
:data:`AUTH_FAILED` and a reason, and both sides raise :class:`P2PAuthError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, Literal, TypeVar

from aioquic._buffer import Buffer, BufferReadError  # aioquic.buffer re-exports them untyped
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicErrorCode, QuicPacketType, pull_quic_header

from natkit.p2p import auth
from natkit.p2p.errors import (
    P2PAuthError,
    P2PClosedError,
    P2PError,
    P2PStreamError,
    P2PTimeoutError,
)
from natkit.p2p.paths import PathEvent, PathSwitch
from natkit.p2p.quicconn import FlowControlledQuic
from natkit.p2p.streams import P2PStream

log = logging.getLogger(__name__)

ALPN = "natkit-p2p"
#: What QUIC believes the peer's address is: the switch stands behind it, whatever the path.
PEER_ADDRESS = ("natkit-peer", 0)
AUTH_STREAM = 1  # the server's first bidirectional stream
# Application error codes (CONNECTION_CLOSE, RESET_STREAM, STOP_SENDING).
NO_ERROR = 0x0
AUTH_FAILED = 0x101
STREAM_REFUSED = 0x102  # the accept backlog is full
STREAM_STOPPED = 0x103  # closed by the application with data unread
_DATAGRAM_OVERHEAD = 60  # short header, packet number, AEAD tag, frame header, with margin

Role = Literal["client", "server"]


@dataclass(frozen=True)
class SessionConfig:
    """Limits and timers of a session (the defaults suit the Internet)."""

    idle_timeout: float = 30.0  # QUIC closes a session that heard nothing for this long
    keepalive: float = 10.0  # a PING this often keeps the session and NAT bindings open
    handshake_timeout: float = 10.0  # QUIC handshake + authentication
    stream_window: int = 1 << 20  # unread bytes a stream may hold
    connection_window: int = 4 << 20  # unread bytes all streams together may hold
    write_buffer: int = 256 << 10  # drain() waits while more than this is unsent
    max_datagram_size: int = 1200  # QUIC packet size: fits any path, TURN included
    datagram_queue: int = 1024  # received datagrams kept unread (the oldest are dropped)
    accept_backlog: int = 256  # peer streams not yet accepted (more are refused)

    @property
    def max_datagram_payload(self) -> int:
        return self.max_datagram_size - _DATAGRAM_OVERHEAD


T = TypeVar("T")


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


class _Inbox(Generic[T]):
    """A bounded queue with one waiting reader (streams accepted, datagrams, path events)."""

    def __init__(self, maxlen: int | None = None) -> None:
        self.items: deque[T] = deque(maxlen=maxlen)
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: T) -> None:
        self.items.append(item)
        self.wake()

    def wake(self) -> None:
        _wake(self._waiter)

    async def wait(self) -> None:
        """Until something is put or :meth:`wake` is called."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def get(self, check: Callable[[], object]) -> T:
        """The next item; ``check`` raises once nothing more can come."""
        while not self.items:
            check()
            await self.wait()
        return self.items.popleft()


class P2PSession:
    """An authenticated QUIC session with a peer: streams, datagrams, path events.

    Use :meth:`connect`; the session owns ``switch`` (closing it closes the paths)."""

    def __init__(
        self,
        switch: PathSwitch,
        *,
        role: Role,
        identity: auth.PeerIdentity,
        peer_fingerprint: str,
        secret: bytes | str,
        config: SessionConfig | None = None,
    ) -> None:
        if role not in ("client", "server"):
            raise P2PError(f"role must be 'client' or 'server', not {role!r}")
        self.role = role
        self.switch = switch
        self.config = config or SessionConfig()
        self._identity = identity
        self._peer_fp = auth.normalize_fingerprint(peer_fingerprint)
        self._secret = secret
        auth.check_secret(secret)  # an empty secret fails here, not mid-handshake
        self._loop = asyncio.get_running_loop()
        self._quic: FlowControlledQuic | None = None
        self._authenticated = self._loop.create_future()
        self._auth_buf = bytearray()
        self._nonce: bytes | None = None
        self._pinned = False
        self._proof_sent = b""
        self._error: P2PError | None = None  # set once the session is over
        self._streams: dict[int, P2PStream] = {}
        self._accept: _Inbox[P2PStream] = _Inbox()
        self._draining: set[P2PStream] = set()
        self._datagrams: _Inbox[bytes] = _Inbox(maxlen=self.config.datagram_queue)
        self._path_events: _Inbox[PathEvent] = _Inbox(maxlen=64)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._flush_pending = False
        self._ping_ids = itertools.count()
        self.datagrams_dropped = 0  # sent or received datagrams dropped for lack of room
        switch.on_event(self._on_path_event)
        switch.set_receiver(self._on_datagram)

    # ------------------------------------------------------------------ life cycle

    @classmethod
    async def connect(
        cls,
        switch: PathSwitch,
        *,
        role: Role,
        identity: auth.PeerIdentity,
        peer_fingerprint: str,
        secret: bytes | str,
        config: SessionConfig | None = None,
    ) -> P2PSession:
        """Run the QUIC handshake and mutual authentication; return the ready session."""
        session = cls(
            switch, role=role, identity=identity, peer_fingerprint=peer_fingerprint,
            secret=secret, config=config,
        )  # fmt: skip
        try:
            await session.start()
        except BaseException:
            await session.close()
            raise
        return session

    async def start(self) -> None:
        if self.role == "client" and self._quic is None:
            self._quic = self._new_quic(None)
            self._quic.connect(PEER_ADDRESS, now=self._loop.time())
            self._flush()
        timeout = self.config.handshake_timeout
        try:
            await asyncio.wait_for(asyncio.shield(self._authenticated), timeout)
        except asyncio.TimeoutError:
            raise P2PTimeoutError(
                f"no authenticated session with the peer within {timeout:g} s: the path "
                "carries no datagrams, or the peer is not running a natkit-p2p session"
            ) from None
        self._keepalive = self._loop.call_later(self.config.keepalive, self._ping)

    async def close(self, reason: str = "closed") -> None:
        """Close the session (the peer sees a clean close) and its paths. Safe twice."""
        if self._error is None and self._quic is not None:
            self._quic.close(error_code=NO_ERROR, reason_phrase=reason)
            self._flush()
        self._end(P2PClosedError("the session is closed"))
        await self.switch.wait_closed()

    @property
    def closed(self) -> bool:
        return self._error is not None

    async def __aenter__(self) -> P2PSession:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ streams and datagrams

    async def open_stream(self) -> P2PStream:
        """A new bidirectional stream (the peer learns of it with the first data or EOF)."""
        quic = self._ready()
        stream_id = quic.get_next_available_stream_id()
        quic.send_stream_data(stream_id, b"")  # claims the id, so the next call gets another
        stream = self._streams[stream_id] = P2PStream(self, stream_id, self.config.write_buffer)
        return stream

    async def accept_stream(self) -> P2PStream:
        """The next stream the peer opened."""
        return await self._accept.get(self._ready)

    def send_datagram(self, data: bytes) -> None:
        """Send an unreliable datagram (dropped, and counted, if too many are queued)."""
        quic = self._ready()
        limit = self.config.max_datagram_payload
        if len(data) > limit:
            raise P2PError(f"datagram of {len(data)} bytes exceeds the limit of {limit} bytes")
        if quic.datagrams_queued() >= self.config.datagram_queue:
            self.datagrams_dropped += 1
            return
        quic.send_datagram_frame(bytes(data))
        self._schedule_flush()

    async def recv_datagram(self) -> bytes:
        return await self._datagrams.get(self._ready)

    # ------------------------------------------------------------------ paths

    @property
    def path(self) -> str:
        """The kind of the path datagrams go out on now."""
        return self.switch.kind

    def on_path_event(self, callback: Callable[[PathEvent], None]) -> None:
        self.switch.on_event(callback)

    async def events(self) -> AsyncIterator[PathEvent]:
        """Path events as they happen (one consumer; the last 64 are kept), until closed."""
        while True:
            while self._path_events.items:
                yield self._path_events.items.popleft()
            if self._error is not None:
                return
            await self._path_events.wait()

    def _on_path_event(self, event: PathEvent) -> None:
        self._path_events.put(event)
        if event.type == "switched" and self._quic is not None and self._error is None:
            # Packets in flight on the old path are gone: an ACK-eliciting PING on the new
            # one makes QUIC declare them lost and resend them now, not after its backed-off
            # probe timeout.
            self._quic.send_ping(next(self._ping_ids))
            self._schedule_flush()

    # ------------------------------------------------------------------ QUIC driving

    def _new_quic(self, original_dcid: bytes | None) -> FlowControlledQuic:
        c = self.config
        cfg = QuicConfiguration(
            is_client=self.role == "client",
            alpn_protocols=[ALPN],
            idle_timeout=c.idle_timeout,
            max_datagram_size=c.max_datagram_size,
            max_datagram_frame_size=65536,
            max_stream_data=c.stream_window,
            max_data=c.connection_window,
            # No CA vouches for a peer: its certificate is pinned to the fingerprint that
            # came sealed through signalling (see _on_handshake).
            verify_mode=ssl.CERT_NONE,
        )
        if self.role == "server":
            cfg.certificate = self._identity.certificate
            cfg.private_key = self._identity.private_key
        return FlowControlledQuic(
            configuration=cfg, original_destination_connection_id=original_dcid
        )

    def _on_datagram(self, data: bytes) -> None:
        if self._error is not None:
            return
        if self._quic is None:
            if self.role == "client" or not self._is_initial(data):
                return  # not (yet) ours
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
            self._quic = self._new_quic(header.destination_cid)
        self._quic.receive_datagram(data, PEER_ADDRESS, now=self._loop.time())
        self._process_events()
        self._flush()

    @staticmethod
    def _is_initial(data: bytes) -> bool:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
        except (BufferReadError, ValueError):
            return False
        return header.packet_type == QuicPacketType.INITIAL

    def _schedule_flush(self) -> None:
        # Many writes in one loop iteration become one pass over the connection.
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        quic = self._quic
        if quic is None:
            return
        for data, _addr in quic.datagrams_to_send(now=self._loop.time()):
            self.switch.send(data)
        at = quic.get_timer()
        if self._timer is not None and self._timer_at != at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and at is not None and self._error is None:
            self._timer, self._timer_at = self._loop.call_at(at, self._on_timer), at
        for stream in list(self._draining):
            if self._stream_unsent(stream) <= stream.write_buffer:
                stream.wake_drain()

    def _on_timer(self) -> None:
        self._timer = None
        if self._quic is None or self._error is not None:
            return
        self._quic.handle_timer(now=self._loop.time())
        self._process_events()
        self._flush()

    def _ping(self) -> None:
        if self._quic is None or self._error is not None:
            return
        self._quic.send_ping(next(self._ping_ids))
        self._flush()
        self._keepalive = self._loop.call_later(self.config.keepalive, self._ping)

    def _process_events(self) -> None:
        assert self._quic is not None
        # Once the session has ended (an authentication failure), the rest is not for us.
        while self._error is None and (event := self._quic.next_event()) is not None:
            if isinstance(event, qe.StreamDataReceived):
                if event.stream_id == AUTH_STREAM:
                    self._on_auth_data(event.data, event.end_stream)
                else:
                    self._on_stream_data(event)
            elif isinstance(event, qe.DatagramFrameReceived):
                if self._peer_trusted():  # nothing unauthenticated reaches the user
                    if len(self._datagrams.items) == self._datagrams.items.maxlen:
                        self.datagrams_dropped += 1
                    self._datagrams.put(event.data)
            elif isinstance(event, qe.StreamReset):
                self._on_stream_reset(event)
            elif isinstance(event, qe.StopSendingReceived):
                if (stream := self._streams.get(event.stream_id)) is not None:
                    stream.fail_write(P2PStreamError(
                        f"the peer stopped reading stream {event.stream_id} (code {event.error_code})",
                        event.error_code,
                    ))  # fmt: skip
                    self._forget_if_done(stream)
            elif isinstance(event, qe.ProtocolNegotiated):
                if self.role == "server" and self._nonce is None:
                    self._nonce = auth.new_connection_nonce()
                    self._quic.send_stream_data(AUTH_STREAM, self._nonce)
            elif isinstance(event, qe.HandshakeCompleted):
                if self.role == "client":
                    self._on_handshake()
            elif isinstance(event, qe.ConnectionTerminated):
                self._on_terminated(event)

    # ------------------------------------------------------------------ authentication

    def _peer_trusted(self) -> bool:
        """May the peer's streams and datagrams reach the user? The server trusts once the
        client's proof checked out; the client once the server's certificate matched its
        pin (the server's answer may be overtaken by its first stream after a loss)."""
        return self._authenticated.done() or (self.role == "client" and self._pinned)

    def _on_handshake(self) -> None:
        assert self._quic is not None
        try:
            auth.check_pinned(self._quic.peer_certificate_der(), self._peer_fp)
        except P2PAuthError as exc:
            self._auth_failed(exc)
            return
        self._pinned = True
        self._continue_client_auth()

    def _on_auth_data(self, data: bytes, end: bool) -> None:
        if self._error is not None or self._authenticated.done():
            return  # the exchange is over (the server's FIN arrives with its proof)
        buf = self._auth_buf
        buf += data
        # client: the server's nonce, then its proof; server: the client's proof
        expected = auth.PROOF_SIZE + (auth.NONCE_SIZE if self.role == "client" else 0)
        if len(buf) > expected or (end and len(buf) != expected):
            self._auth_failed(P2PAuthError(
                "the peer sent a malformed authentication exchange: is it running a "
                "compatible natkit?"
            ))  # fmt: skip
        elif self.role == "client":
            self._continue_client_auth()
        elif len(buf) == expected:
            self._check_client_proof(bytes(buf))

    def _check_client_proof(self, proof: bytes) -> None:
        assert self._quic is not None and self._nonce is not None
        ours, theirs, nonce = self._identity.fingerprint, self._peer_fp, self._nonce
        if not auth.proofs_equal(proof, auth.client_proof(self._secret, ours, theirs, nonce)):
            self._auth_failed(P2PAuthError(
                "the peer's proof of the shared secret is wrong: the two peers were not "
                "given the same secret (or the peer is not the one announced in signalling)"
            ))  # fmt: skip
            return
        answer = auth.server_proof(self._secret, ours, theirs, nonce)
        self._quic.send_stream_data(AUTH_STREAM, answer, end_stream=True)
        self._authenticated.set_result(None)

    def _continue_client_auth(self) -> None:
        assert self._quic is not None
        buf = self._auth_buf
        if not self._pinned or len(buf) < auth.NONCE_SIZE:
            return
        nonce = bytes(buf[: auth.NONCE_SIZE])
        server_fp, client_fp = self._peer_fp, self._identity.fingerprint
        if not self._proof_sent:
            self._proof_sent = auth.client_proof(self._secret, server_fp, client_fp, nonce)
            self._quic.send_stream_data(AUTH_STREAM, self._proof_sent, end_stream=True)
        if len(buf) == auth.NONCE_SIZE + auth.PROOF_SIZE:
            answer = bytes(buf[auth.NONCE_SIZE :])
            if auth.proofs_equal(
                answer, auth.server_proof(self._secret, server_fp, client_fp, nonce)
            ):
                self._authenticated.set_result(None)
            else:
                self._auth_failed(P2PAuthError(
                    "the peer's answer does not prove the shared secret: the two peers were "
                    "not given the same secret"
                ))  # fmt: skip

    def _auth_failed(self, exc: P2PAuthError) -> None:
        if self._error is not None:
            return
        log.warning("p2p authentication failed: %s", exc)
        assert self._quic is not None
        self._quic.close(error_code=AUTH_FAILED, reason_phrase=str(exc)[:500])
        self._flush()
        self._end(exc)

    # ------------------------------------------------------------------ stream events

    def _on_stream_data(self, event: qe.StreamDataReceived) -> None:
        assert self._quic is not None
        sid = event.stream_id
        if not self._peer_trusted():
            # A natkit client opens streams only once the server has accepted its proof.
            self._auth_failed(P2PAuthError("the peer opened a stream before authenticating"))
            return
        stream = self._streams.get(sid)
        if stream is None:
            if (
                sid % 4 == (1 if self.role == "client" else 0)
                and len(self._accept.items) < self.config.accept_backlog
            ):
                stream = self._streams[sid] = P2PStream(self, sid, self.config.write_buffer)
                self._accept.put(stream)
            else:  # unidirectional (unused by natkit) or over the backlog: refuse
                self._refuse(sid, len(event.data))
                return
        stream.feed(event.data, event.end_stream)
        if stream.read_closed:
            self._release(stream)
        self._forget_if_done(stream)

    def _release(self, stream: P2PStream) -> None:
        assert self._quic is not None
        extra, due = self._quic.release(stream.stream_id, stream.settled, stream.delivered)
        stream.settled += extra
        if due:
            self._schedule_flush()

    def _refuse(self, stream_id: int, size: int) -> None:
        assert self._quic is not None
        self._quic.release(stream_id, 0, size)
        try:
            self._quic.stop_stream(stream_id, STREAM_REFUSED)
            if stream_id % 4 < 2:  # bidirectional: our half ends too
                self._quic.reset_stream(stream_id, STREAM_REFUSED)
        except ValueError:  # the stream is already finished
            pass
        self._schedule_flush()

    def _on_stream_reset(self, event: qe.StreamReset) -> None:
        assert self._quic is not None
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        stream.fail_read(P2PStreamError(
            f"the peer reset stream {event.stream_id} (code {event.error_code})", event.error_code
        ))  # fmt: skip
        self._release(stream)
        self._forget_if_done(stream)

    def _forget_if_done(self, stream: P2PStream) -> None:
        if (
            stream.receive_done
            and stream.send_done
            and self._streams.get(stream.stream_id) is stream
        ):
            del self._streams[stream.stream_id]
            self._draining.discard(stream)

    # ------------------------------------------------------------------ the StreamHost side

    def _stream_send(self, stream_id: int, data: bytes, end: bool) -> None:
        quic = self._ready()
        try:
            quic.send_stream_data(stream_id, data, end_stream=end)
        except (RuntimeError, ValueError) as exc:  # reset or finished meanwhile
            raise P2PStreamError(f"stream {stream_id} can no longer be written: {exc}", 0) from exc
        self._schedule_flush()
        if end and (stream := self._streams.get(stream_id)) is not None:
            self._forget_if_done(stream)

    def _stream_consumed(self, stream: P2PStream, count: int) -> None:
        quic = self._quic
        if (
            quic is not None
            and self._error is None
            and quic.consumed(stream.stream_id, count, stream.settled)
        ):
            self._schedule_flush()

    def _stream_unsent(self, stream: P2PStream) -> int:
        return 0 if self._quic is None else self._quic.unsent(stream.stream_id, stream.written)

    def _stream_abandon(self, stream: P2PStream) -> None:
        quic = self._quic
        if quic is None or self._error is not None:
            return
        if not stream.receive_done:
            with contextlib.suppress(ValueError):  # aioquic already forgot it
                quic.stop_stream(stream.stream_id, STREAM_STOPPED)
        self._release(stream)
        self._schedule_flush()
        self._forget_if_done(stream)

    def _stream_abort(self, stream: P2PStream, code: int) -> None:
        quic = self._quic
        if quic is None or self._error is not None:
            return
        with contextlib.suppress(ValueError):  # aioquic already forgot it
            if not stream.send_done:
                quic.reset_stream(stream.stream_id, code)
            if not stream.receive_done:
                quic.stop_stream(stream.stream_id, code)
        self._release(stream)
        self._schedule_flush()

    def _stream_drain_wait(self, stream: P2PStream, waiting: bool) -> None:
        if waiting:
            self._draining.add(stream)
            self._schedule_flush()
        else:
            self._draining.discard(stream)

    # ------------------------------------------------------------------ the end

    def _ready(self) -> FlowControlledQuic:
        if self._error is not None:
            raise self._error
        if self._quic is None or not self._authenticated.done():
            raise P2PError("the session is not established yet: await connect() or start() first")
        return self._quic

    def _on_terminated(self, event: qe.ConnectionTerminated) -> None:
        reason = event.reason_phrase or "no reason given"
        code = event.error_code
        exc: P2PError
        if code == AUTH_FAILED and event.frame_type is None:
            exc = P2PAuthError(f"the peer refused to authenticate this session: {reason}")
        elif code == QuicErrorCode.APPLICATION_ERROR and not self._authenticated.done():
            # A close before the handshake is confirmed travels in handshake packets, where
            # QUIC must replace the application's code and reason by APPLICATION_ERROR.
            exc = P2PAuthError(
                "the peer refused to authenticate this session during the handshake (most "
                "likely our certificate is not the fingerprint it was given through signalling)"
            )
        elif event.reason_phrase == "Idle timeout":  # aioquic's own, local timer
            exc = P2PClosedError(
                f"nothing heard from the peer for {self.config.idle_timeout:g} s (idle "
                "timeout): no path to it carries datagrams any more",
                code,
            )
        elif code == NO_ERROR:
            exc = P2PClosedError(f"the peer closed the session ({reason})", code)
        else:
            exc = P2PClosedError(f"the session failed: {reason} (QUIC error {code:#x})", code)
        self._end(exc)

    def _end(self, exc: P2PError) -> None:
        if self._error is not None:
            return
        self._error = exc
        for handle in (self._timer, self._keepalive):
            if handle is not None:
                handle.cancel()
        if not self._authenticated.done():
            self._authenticated.set_exception(exc)
            self._authenticated.exception()  # retrieved: no "never retrieved" warning
        for stream in list(self._streams.values()):
            stream.fail(exc)
        for inbox in (self._accept, self._datagrams, self._path_events):
            inbox.wake()
        self.switch.close()

    def __repr__(self) -> str:
        state = (
            "closed" if self._error else ("open" if self._authenticated.done() else "connecting")
        )
        return f"<P2PSession {self.role} {state} path={self.path} streams={len(self._streams)}>"
