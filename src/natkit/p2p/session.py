"""A peer-to-peer session: QUIC over a :class:`~natkit.p2p.paths.PathSwitch`.

qh3's QuicConnection runs sans-I/O (see :mod:`natkit.p2p.quicconn`): datagrams from the
switch go into it in batches, what it wants to send goes out through the switch's active
path, its timer is a ``call_at`` on the event loop. QUIC sees one fake peer address, so
moving between paths is invisible to it; after a switch it is pinged so that what the old
path swallowed is retransmitted at once.

Paths are judged only on what QUIC authenticated: the switch's probes are DATAGRAM frames
carrying a random token, answered by the peer inside QUIC on the path they came in on
(see :mod:`natkit.p2p.paths`). Every DATAGRAM frame starts with a type byte (application,
probe, answer).

Stream credit is natkit's own (see :mod:`natkit.p2p.credit`): each side opens one
unidirectional control stream once authenticated and grants there what its application
has read.

Authentication (see :mod:`natkit.p2p.auth` and :mod:`natkit.p2p.proof`) runs on the
server's first stream before the session is handed out: the server sends a nonce as soon as
it has keys, the client (having pinned the server's certificate) answers with its nonce,
certificate, signature and proof of the shared secret, the server answers with its own
signature and proof; each side ends the stream after its proof. Both proofs are bound to
this QUIC connection's TLS secrets. A failure closes the connection with
:data:`AUTH_FAILED` and a reason, and both sides raise :class:`P2PAuthError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, Literal, TypeVar

from qh3.quic import events as qe
from qh3.quic.packet import QuicErrorCode

from natkit.errors import ProtocolError
from natkit.p2p import auth, credit, proof
from natkit.p2p.errors import (
    P2PAuthError,
    P2PClosedError,
    P2PError,
    P2PStreamError,
    P2PTimeoutError,
)
from natkit.p2p.paths import PROBE_TOKEN_SIZE, DatagramPath, PathEvent, PathSwitch
from natkit.p2p.quicconn import (
    PEER_ADDRESS,
    PEER_STREAMS,
    NatkitQuic,
    QuicConnectionError,
    initial_destination_cid,
    new_connection,
)
from natkit.p2p.streams import P2PStream

log = logging.getLogger(__name__)

# 2: natkit's own stream credit and in-QUIC path probes; 3: proof version 3 (natkit.p2p.proof)
ALPN = f"natkit-p2p/{proof.VERSION}"
AUTH_STREAM = 1  # the server's first bidirectional stream
#: Each side's control stream (its first unidirectional one) carries its credit grants.
CONTROL_STREAM = {"client": 2, "server": 3}
# Application error codes (CONNECTION_CLOSE, RESET_STREAM, STOP_SENDING).
NO_ERROR = 0x0
AUTH_FAILED = 0x101
STREAM_REFUSED = 0x102  # the accept backlog is full
STREAM_STOPPED = 0x103  # closed by the application with data unread
CREDIT_VIOLATION = 0x104  # the peer sent beyond natkit's stream credit
# The first byte of every DATAGRAM frame.
DGRAM_APP, DGRAM_PROBE, DGRAM_ANSWER = 0, 1, 2
# A CONNECTION_CLOSE reason must fit in one packet with the rest (qh3 fails on a long one
# while handshaking: "packet builder capacity exhausted").
_REASON_MAX = 200
# Short header, packet number, AEAD tag, frame header, type byte, with margin.
_DATAGRAM_OVERHEAD = 61

Role = Literal["client", "server"]


@dataclass(frozen=True)
class SessionConfig:
    """Limits and timers of a session (the defaults suit the Internet)."""

    idle_timeout: float = 30.0  # QUIC closes a session that heard nothing for this long
    keepalive: float = 10.0  # a PING this often keeps the session and NAT bindings open
    handshake_timeout: float = 10.0  # QUIC handshake + authentication
    stream_window: int = 1 << 20  # unread bytes a stream that is being read may hold
    # Unread bytes all the streams nobody has read yet may hold together: each may hold
    # this divided by the streams the peer may open at once (qh3: 100), 40 KiB by default.
    connection_window: int = 4 << 20
    write_buffer: int = 256 << 10  # drain() waits while more than this is unsent
    max_datagram_size: int = 1200  # QUIC packet size: fits any path, TURN included
    datagram_queue: int = 1024  # received datagrams kept unread (the oldest are dropped)
    accept_backlog: int = 256  # peer streams not yet accepted (more are refused)

    @property
    def initial_stream_window(self) -> int:
        """What a stream may receive before the application first reads it."""
        return max(1, min(self.stream_window, self.connection_window // PEER_STREAMS))

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


class _SeenIds:
    """Which of the peer's stream IDs (``first``, ``first + step``, ...) have been seen, in
    constant space for streams that start in order: a watermark plus the few seen above it
    (a stream's first packet may overtake an older one's)."""

    def __init__(self, first: int, step: int) -> None:
        self._next = first  # every ID below this one has been seen
        self._step = step
        self._above: set[int] = set()

    def first_time(self, stream_id: int) -> bool:
        """Record ``stream_id``; False if it had been seen before."""
        if stream_id < self._next or stream_id in self._above:
            return False
        self._above.add(stream_id)
        while self._next in self._above:
            self._above.discard(self._next)
            self._next += self._step
        return True


class _Broadcast:
    """Wakes every task waiting at the time of :meth:`wake`."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def wake(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()


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
        self._quic: NatkitQuic | None = None
        self._authenticated = self._loop.create_future()
        self._auth_buf = bytearray()
        self._auth_end = False  # the peer ended the authentication stream
        self._nonce: bytes | None = None  # the server's, on the server
        self._pinned = False
        self._proof_ctx: proof.ProofContext | None = None  # the client's, once it sent its proof
        self._error: P2PError | None = None  # set once the session is over
        self._streams: dict[int, P2PStream] = {}
        self._accept: _Inbox[P2PStream] = _Inbox()
        self._draining: set[P2PStream] = set()
        self._datagrams: _Inbox[bytes] = _Inbox(maxlen=self.config.datagram_queue)
        self._stream_slots = _Broadcast()  # woken whenever the peer was heard
        self._path_events: _Inbox[PathEvent] = _Inbox(maxlen=64)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._flush_pending = False
        self._ping_ids = itertools.count()
        self.datagrams_dropped = 0  # sent or received datagrams dropped for lack of room
        self._datagrams_unflushed = 0  # queued in QUIC since the last flush
        # Received datagrams waiting for the next batch, by the path they came in on.
        self._rx: dict[DatagramPath, list[bytes]] = {}
        self._answers: list[tuple[DatagramPath, bytes]] = []  # probe answers to send
        # natkit's stream credit (see natkit.p2p.credit)
        self._grants = credit.GrantReader()
        self._peer_window: int | None = None  # the first window of each stream we open
        self._send_queues: dict[int, credit.SendQueue] = {}
        self._recv_credit: dict[int, credit.ReceiveCredit] = {}
        # The peer's bidirectional streams (the server's first one is AUTH_STREAM).
        self._peer_streams = _SeenIds(AUTH_STREAM + 4 if role == "client" else 0, step=4)
        switch.on_event(self._on_path_event)
        switch.set_receiver(self._on_datagram)
        switch.set_prober(self._probe)

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
        while not quic.can_open_stream():  # until the peer's MAX_STREAMS lets us
            await self._stream_slots.wait()  # (several tasks may wait here)
            quic = self._ready()
        stream_id = quic.get_next_available_stream_id()
        quic.send_stream_data(stream_id, b"")  # claims the id, so the next call gets another
        return self._new_stream(stream_id)

    def _new_stream(self, stream_id: int) -> P2PStream:
        stream = self._streams[stream_id] = P2PStream(self, stream_id, self.config.write_buffer)
        self._send_queues[stream_id] = credit.SendQueue(self._peer_window)
        c = self.config
        self._recv_credit[stream_id] = credit.ReceiveCredit(
            c.stream_window, c.initial_stream_window
        )
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
        # Bounded here, between two flushes: qh3 sends them all on the next flush, congestion
        # window or not (it holds none back), so nothing piles up inside it either.
        if self._datagrams_unflushed >= self.config.datagram_queue:
            self.datagrams_dropped += 1
            return
        self._datagrams_unflushed += 1
        quic.send_datagram_frame(bytes([DGRAM_APP]) + data)
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

    def _new_quic(self, original_dcid: bytes | None) -> NatkitQuic:
        c = self.config
        return new_connection(
            is_client=self.role == "client",
            alpn=ALPN,
            identity=self._identity,
            idle_timeout=c.idle_timeout,
            max_datagram_size=c.max_datagram_size,
            # QUIC's windows only need to cover what natkit's credit lets in flight.
            stream_window=2 * c.stream_window,
            connection_window=max(c.connection_window, 4 * c.stream_window),
            original_dcid=original_dcid,
        )

    def _on_datagram(self, path: DatagramPath, data: bytes) -> None:
        if self._error is not None:
            return
        if self._quic is None:
            if self.role == "client" or (dcid := initial_destination_cid(data)) is None:
                return  # not (yet) ours
            self._quic = self._new_quic(dcid)
        batch = self._rx.get(path)
        if batch is None:
            batch = self._rx[path] = []
            if len(self._rx) == 1:
                # Everything that arrives in this loop iteration goes to QUIC in one call.
                self._loop.call_soon(self._receive_batches)
        batch.append(data)

    def _receive_batches(self) -> None:
        batches, self._rx = self._rx, {}
        quic = self._quic
        if quic is None or self._error is not None:
            return
        for path, datagrams in batches.items():
            try:
                quic.receive_batch(datagrams, self._loop.time())
            except QuicConnectionError as exc:  # qh3 refused its own state: the session ends
                self._quic_failed(exc)
                return
            self._process_events(path)
        self._flush()
        self._send_answers()
        self._stream_slots.wake()

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
        self._datagrams_unflushed = 0
        try:
            datagrams = quic.packets_to_send(now=self._loop.time())
        except QuicConnectionError as exc:
            self._quic_failed(exc)
            return
        self.switch.send_many(datagrams)
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
        try:
            self._quic.handle_timer(now=self._loop.time())
        except QuicConnectionError as exc:
            self._quic_failed(exc)
            return
        self._process_events(None)
        self._flush()

    # ------------------------------------------------------------------ path probes

    def _probe(self, path: DatagramPath, token: bytes) -> bool:
        """The switch's prober: a DATAGRAM frame with ``token``, sent on ``path``."""
        quic = self._quic
        if quic is None or self._error is not None or not self._authenticated.done():
            return False
        self._send_on(path, bytes([DGRAM_PROBE]) + token)
        return True

    def _send_answers(self) -> None:
        answers, self._answers = self._answers, []
        for path, token in answers:
            self._send_on(path, bytes([DGRAM_ANSWER]) + token)

    def _send_on(self, path: DatagramPath, frame: bytes) -> None:
        """Send one DATAGRAM frame on ``path``, not on the active one. What QUIC had due
        goes out first on the active path; the frame is padded to a full packet, so that
        its size does not tell a probe from data."""
        assert self._quic is not None
        self._flush()
        if self._error is not None:
            return
        pad = self.config.max_datagram_payload + 1 - len(frame)
        try:
            # qh3 sends DATAGRAM frames at once, congestion window or not.
            self._quic.send_datagram_frame(frame + bytes(max(0, pad)))
            datagrams = self._quic.packets_to_send(now=self._loop.time())
        except QuicConnectionError as exc:
            self._quic_failed(exc)
            return
        path.send_many(datagrams)
        self._flush()  # (re)arms the timer

    def _on_control_datagram(self, path: DatagramPath | None, data: bytes) -> None:
        kind, token = data[0], data[1 : 1 + PROBE_TOKEN_SIZE]
        if len(token) != PROBE_TOKEN_SIZE or path is None:
            return
        if kind == DGRAM_PROBE:
            self._answers.append((path, token))  # answered on the path it came in on
        elif kind == DGRAM_ANSWER:
            self.switch.confirm(path, token)

    def _ping(self) -> None:
        if self._quic is None or self._error is not None:
            return
        self._quic.send_ping(next(self._ping_ids))
        self._flush()
        self._keepalive = self._loop.call_later(self.config.keepalive, self._ping)

    def _process_events(self, path: DatagramPath | None) -> None:
        """Handle what QUIC has to say (``path``: where the datagrams came in)."""
        assert self._quic is not None
        # Once the session has ended (an authentication failure), the rest is not for us.
        while self._error is None and (event := self._quic.next_event()) is not None:
            if isinstance(event, qe.StreamDataReceived):
                if event.stream_id == AUTH_STREAM:
                    self._on_auth_data(event.data, event.end_stream)
                elif event.stream_id == CONTROL_STREAM[self._peer_role]:
                    self._on_control_data(event.data)
                else:
                    self._on_stream_data(event)
            elif isinstance(event, qe.DatagramFrameReceived):
                if not self._peer_trusted() or not event.data:
                    continue  # nothing unauthenticated reaches the user
                if event.data[0] != DGRAM_APP:
                    self._on_control_datagram(path, event.data)
                    continue
                if len(self._datagrams.items) == self._datagrams.items.maxlen:
                    self.datagrams_dropped += 1
                self._datagrams.put(event.data[1:])
            elif isinstance(event, qe.StreamReset):
                self._on_stream_reset(event)
            elif isinstance(event, qe.StopSendingReceived):
                if (stream := self._streams.get(event.stream_id)) is not None:
                    stream.fail_write(P2PStreamError(
                        f"the peer stopped reading stream {event.stream_id} (code {event.error_code})",
                        event.error_code,
                    ))  # fmt: skip
                    if (queue := self._send_queues.get(event.stream_id)) is not None:
                        queue.discard()
                    self._forget_if_done(stream)
            elif isinstance(event, qe.ProtocolNegotiated):
                if self.role == "server" and self._nonce is None:
                    self._nonce = proof.new_nonce()
                    self._quic.send_stream_data(AUTH_STREAM, self._nonce)
            elif isinstance(event, qe.HandshakeCompleted):
                if self.role == "client":
                    self._on_handshake()
            elif isinstance(event, qe.ConnectionTerminated):
                self._on_terminated(event)

    @property
    def _peer_role(self) -> Role:
        return "server" if self.role == "client" else "client"

    # ------------------------------------------------------------------ stream credit

    def _on_authenticated(self) -> None:
        """Both sides proved themselves: open our control stream with our first window."""
        assert self._quic is not None
        self._authenticated.set_result(None)
        try:
            self._quic.send_stream_data(
                CONTROL_STREAM[self.role],
                credit.encode_default(self.config.initial_stream_window),
            )
        except QuicConnectionError as exc:  # the connection ended meanwhile
            self._quic_failed(exc)
            return
        self._schedule_flush()

    def _on_control_data(self, data: bytes) -> None:
        for key, value in self._grants.feed(data):
            if key == credit.DEFAULT_KEY:
                if self._peer_window is None:
                    self._peer_window = value
                    for sid, waiting in list(self._send_queues.items()):
                        waiting.learn_default(value)
                        self._push(sid)
            elif (queue := self._send_queues.get(key)) is not None:
                queue.grant(value)
                self._push(key)

    def _push(self, stream_id: int) -> None:
        """Hand QUIC what the stream's credit allows of what the application wrote."""
        queue = self._send_queues.get(stream_id)
        if queue is None or self._quic is None:
            return
        data, fin = queue.take()
        if data or fin:
            try:
                self._quic.send_stream_data(stream_id, data, end_stream=fin)
            except QuicConnectionError:  # reset or stopped meanwhile: it will never go
                queue.discard()
            self._schedule_flush()

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
            return  # the exchange is over
        self._auth_buf += data
        self._auth_end = self._auth_end or end
        if len(self._auth_buf) > proof.MAX_CLIENT_MESSAGE:
            self._auth_failed(P2PAuthError(
                "the peer sent an oversized authentication message: is it running a "
                "compatible natkit?"
            ))  # fmt: skip
        elif self.role == "client":
            self._continue_client_auth()
        elif self._auth_end:
            self._check_client_proof(bytes(self._auth_buf))

    def _binding(self) -> bytes:
        assert self._quic is not None
        binding = self._quic.channel_binding()
        if binding is None:  # QUIC delivers stream data only under 1-RTT keys: a bug
            raise P2PAuthError("the TLS connection has no key material to bind the proof to")
        return binding

    def _check_client_proof(self, data: bytes) -> None:
        assert self._quic is not None and self._nonce is not None
        try:
            theirs = proof.ClientProof.decode(data)
            ctx = proof.ProofContext(
                self._identity.fingerprint, self._peer_fp, self._nonce, theirs.nonce,
                self._binding(),
            )  # fmt: skip
            proof.check_client_proof(self._secret, theirs, ctx)
        except P2PAuthError as exc:
            self._auth_failed(exc)
            return
        answer = proof.make_server_proof(self._secret, self._identity, ctx)
        self._quic.send_stream_data(AUTH_STREAM, answer.encode(), end_stream=True)
        self._on_authenticated()

    def _continue_client_auth(self) -> None:
        assert self._quic is not None
        buf = self._auth_buf
        if self._auth_end and len(buf) < proof.NONCE_SIZE:
            self._auth_failed(P2PAuthError("the peer ended authentication early"))
            return
        if not self._pinned or len(buf) < proof.NONCE_SIZE:
            return
        try:
            if self._proof_ctx is None:
                self._proof_ctx = proof.ProofContext(
                    self._peer_fp, self._identity.fingerprint, bytes(buf[: proof.NONCE_SIZE]),
                    proof.new_nonce(), self._binding(),
                )  # fmt: skip
                ours = proof.make_client_proof(self._secret, self._identity, self._proof_ctx)
                self._quic.send_stream_data(AUTH_STREAM, ours.encode(), end_stream=True)
            if not self._auth_end:
                return
            answer = proof.ServerProof.decode(bytes(buf[proof.NONCE_SIZE :]))
            server_der = self._quic.peer_certificate_der()
            assert server_der is not None  # pinned
            proof.check_server_proof(self._secret, answer, self._proof_ctx, server_der)
        except P2PAuthError as exc:
            self._auth_failed(exc)
            return
        self._on_authenticated()

    def _auth_failed(self, exc: P2PAuthError) -> None:
        if self._error is not None:
            return
        log.warning("p2p authentication failed: %s", exc)
        assert self._quic is not None
        self._quic.close(error_code=AUTH_FAILED, reason_phrase=str(exc)[:_REASON_MAX])
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
                and self._peer_streams.first_time(sid)  # not one we already forgot
                and len(self._accept.items) < self.config.accept_backlog
            ):
                stream = self._new_stream(sid)
                self._accept.put(stream)
            else:  # unidirectional (unused by natkit), over the backlog, or done: refuse
                self._refuse(sid)
                return
        stream.feed(event.data, event.end_stream)
        try:
            self._recv_credit[sid].check(sid, stream.delivered)
        except ProtocolError as exc:
            self._violation(str(exc))
            return
        self._forget_if_done(stream)

    def _violation(self, reason: str) -> None:
        assert self._quic is not None
        log.warning("p2p session: %s", reason)
        self._quic.close(error_code=CREDIT_VIOLATION, reason_phrase=reason[:_REASON_MAX])
        self._flush()
        self._end(P2PClosedError(f"the session failed: {reason}"))

    def _refuse(self, stream_id: int) -> None:
        assert self._quic is not None
        with contextlib.suppress(QuicConnectionError):  # the stream is already finished
            self._quic.stop_stream(stream_id, STREAM_REFUSED)
            if stream_id % 4 < 2:  # bidirectional: our half ends too
                self._quic.reset_stream(stream_id, STREAM_REFUSED)
        self._schedule_flush()

    def _on_stream_reset(self, event: qe.StreamReset) -> None:
        assert self._quic is not None
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        stream.fail_read(P2PStreamError(
            f"the peer reset stream {event.stream_id} (code {event.error_code})", event.error_code
        ))  # fmt: skip
        self._forget_if_done(stream)

    def _forget_if_done(self, stream: P2PStream) -> None:
        if (
            stream.receive_done
            and stream.send_done
            and self._streams.get(stream.stream_id) is stream
        ):
            del self._streams[stream.stream_id]
            self._send_queues.pop(stream.stream_id, None)
            self._recv_credit.pop(stream.stream_id, None)
            self._draining.discard(stream)

    # ------------------------------------------------------------------ the StreamHost side

    def _stream_send(self, stream_id: int, data: bytes, end: bool) -> None:
        self._ready()
        queue = self._send_queues.get(stream_id)
        if queue is None or queue.fin_sent:
            raise P2PStreamError(f"stream {stream_id} can no longer be written", 0)
        queue.push(data, end)
        self._push(stream_id)
        if end and (stream := self._streams.get(stream_id)) is not None:
            self._forget_if_done(stream)

    def _stream_consumed(self, stream: P2PStream, count: int) -> None:
        rc = self._recv_credit.get(stream.stream_id)
        if self._quic is None or self._error is not None or rc is None:
            return
        limit = rc.consumed(stream.settled)
        if limit is not None and not stream.receive_done:
            self._quic.send_stream_data(
                CONTROL_STREAM[self.role], credit.encode_grant(stream.stream_id, limit)
            )
            self._schedule_flush()

    def _stream_unsent(self, stream: P2PStream) -> int:
        queue = self._send_queues.get(stream.stream_id)
        queued = 0 if queue is None else queue.queued
        return queued + (0 if self._quic is None else self._quic.unsent(stream.stream_id))

    def _stream_abandon(self, stream: P2PStream) -> None:
        quic = self._quic
        if quic is None or self._error is not None:
            return
        if not stream.receive_done:
            with contextlib.suppress(QuicConnectionError):  # qh3 already forgot it
                quic.stop_stream(stream.stream_id, STREAM_STOPPED)
        self._schedule_flush()
        self._forget_if_done(stream)

    def _stream_abort(self, stream: P2PStream, code: int) -> None:
        quic = self._quic
        if quic is None or self._error is not None:
            return
        queue = self._send_queues.get(stream.stream_id)
        with contextlib.suppress(QuicConnectionError):  # qh3 already forgot it
            if not stream.send_done:
                if queue is not None:
                    queue.discard()
                quic.reset_stream(stream.stream_id, code)
            if not stream.receive_done:
                quic.stop_stream(stream.stream_id, code)
        self._schedule_flush()

    def _stream_drain_wait(self, stream: P2PStream, waiting: bool) -> None:
        if waiting:
            self._draining.add(stream)
            self._schedule_flush()
        else:
            self._draining.discard(stream)

    # ------------------------------------------------------------------ the end

    def _ready(self) -> NatkitQuic:
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
        elif "ALPN" in reason and not self._authenticated.done():
            # qh3's reason ("No common ALPN protocols") when the peers offer different ALPNs;
            # natkit's names its P2P protocol version.
            exc = P2PClosedError(
                f"the peer does not speak {ALPN} (a natkit with another P2P protocol "
                "version?): run compatible natkit versions on both sides",
                code,
            )
        elif event.reason_phrase == "Idle timeout":  # qh3's own, local timer
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

    def _quic_failed(self, exc: QuicConnectionError) -> None:
        if self._authenticated.done():
            self._end(P2PClosedError(f"the QUIC connection failed: {exc}"))
        else:
            # qh3 2.1 fails this way ("packet builder capacity exhausted") when the peer
            # closes the connection mid-handshake, as a peer refusing our certificate does.
            self._end(P2PAuthError(
                f"the QUIC handshake failed ({exc.reason_phrase}): most likely the peer "
                "refused to authenticate this session"
            ))  # fmt: skip

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
        for inbox in (self._accept, self._datagrams, self._path_events, self._stream_slots):
            inbox.wake()
        self.switch.close()

    def __repr__(self) -> str:
        state = (
            "closed" if self._error else ("open" if self._authenticated.done() else "connecting")
        )
        return f"<P2PSession {self.role} {state} path={self.path} streams={len(self._streams)}>"
