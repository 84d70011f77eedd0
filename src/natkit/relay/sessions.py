"""The relay's end of one agent's control connection (TLS), on the shared state machine
(:mod:`natkit.relay.control`): authentication, then the agent's requests, each handed to
the relay (:class:`Hub`). A session that has not authenticated within the handshake
deadline is dropped; one silent for too long too."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Coroutine
from typing import Any, Protocol, cast

from natkit.errors import ProtocolError
from natkit.relay import control, seal
from natkit.relay import messages as M
from natkit.relay.names import Holder
from natkit.relay.tenants import Tenant
from natkit.relay.tunnels import ServedTunnel

log = logging.getLogger("natkit.relay")

MAX_DIALS = 4  # dial-backs in flight per session


class Hub(Protocol):
    """What a session needs of the relay."""

    fingerprint: str
    cipher: str  # the AEAD this relay seals fastest with

    def authenticate(self, s: AgentSession, msg: M.Auth) -> str: ...
    def open_tunnel(self, s: AgentSession, msg: M.Open) -> None: ...
    def close_tunnel(self, t: ServedTunnel, *, keep: bool) -> None: ...
    def dial(self, s: AgentSession, msg: M.Dial) -> Coroutine[Any, Any, None]: ...
    def spawn(self, coro: Coroutine[Any, Any, None]) -> object: ...
    def rendezvous_message(self, s: AgentSession, msg: M.Message) -> None: ...
    def session_ended(self, s: AgentSession) -> None: ...
    def handshake_done(self, s: AgentSession) -> None: ...


class AgentSession(asyncio.Protocol):
    def __init__(self, hub: Hub, peer_ip: str, deadline: float) -> None:
        self.hub, self.peer_ip = hub, peer_ip
        self.local_ip = ""  # which of the relay's addresses this agent reached
        self.conn = control.ControlConnection(control.Side.RELAY)
        self.transport: asyncio.Transport | None = None
        self.nonce = secrets.token_hex(16)
        # Sealed data connections derive their keys from this (sent in WELCOME, over TLS).
        self.data_key = secrets.token_bytes(seal.KEY_SIZE)
        self.id = secrets.token_hex(8)
        self.tenant: Tenant | None = None
        self.token_id: str | None = None  # set once authenticated
        self.holder: Holder | None = None
        self.plaintext_ok = False  # set by the relay at authentication
        self.resume_digest = ""
        self.tunnels: dict[str, ServedTunnel] = {}
        self.last_seen = time.monotonic()
        self.dials = 0
        self.ended = False
        self._deadline = deadline
        self._timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        label = self.tenant.label if self.tenant else "?"
        return f"<AgentSession {self.id} {label} from {self.peer_ip}>"

    @property
    def alive(self) -> bool:
        return not self.ended and self.token_id is not None

    @property
    def instance(self) -> str:
        return self.holder.instance if self.holder is not None else ""

    @property
    def label(self) -> str:
        return self.tenant.label if self.tenant is not None else "?"

    # ---- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not subclasses of asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)
        sockname = transport.get_extra_info("sockname")
        if isinstance(sockname, tuple) and sockname:
            self.local_ip = str(sockname[0]).removeprefix("::ffff:")
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(self._deadline, self._too_slow)

    def _too_slow(self) -> None:
        self._timer = None
        if self.token_id is None and self.transport is not None:
            log.info(
                "dropping a connection from %s that did not authenticate in time", self.peer_ip
            )
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        try:
            self.conn.receive_data(data)
            while (msg := self.conn.next_event()) is not None:
                self._handle(msg)
                if self.ended:
                    return
        except ProtocolError as exc:
            log.info("dropping %s: %s", self, exc)
            self.fail("protocol", str(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.ended = True
        self.conn.close()
        self.hub.session_ended(self)

    # ---- sending ---------------------------------------------------------------------------

    def send(self, msg: M.Message) -> None:
        if self.transport is None or self.transport.is_closing() or self.ended:
            return
        self.transport.write(self.conn.send(msg))

    def fail(self, code: str, message: str) -> None:
        """An error the agent is told about, then the end of the connection."""
        if self.transport is None or self.transport.is_closing():
            return
        try:
            self.transport.write(self.conn.end(M.Error(code=code, message=message[:400])))
        finally:
            self.conn.close()
            self.transport.close()

    def backlog(self) -> int:
        try:
            return 0 if self.transport is None else int(self.transport.get_write_buffer_size())
        except NotImplementedError:  # a transport that does not buffer
            return 0

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # ---- the agent's messages --------------------------------------------------------------------

    def _handle(self, msg: M.Message) -> None:
        if isinstance(msg, M.Hello):
            if msg.version != M.VERSION:
                self.fail("version", f"this relay speaks natkit relay protocol v{M.VERSION}, "
                          f"the agent v{msg.version}: use the same natkit version on both")  # fmt: skip
                return
            self.send(M.Challenge(nonce=self.nonce))
        elif isinstance(msg, M.Auth):
            why = self.hub.authenticate(self, msg)
            if why:
                code, _, text = why.partition(":")
                self.fail(code, text.strip())
                return
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.hub.handshake_done(self)
            self.send(M.Welcome(session=self.id, data_key=self.data_key.hex(),
                                plaintext=self.plaintext_ok, cipher=self.hub.cipher))  # fmt: skip
        elif isinstance(msg, M.Open):
            self.hub.open_tunnel(self, msg)
        elif isinstance(msg, M.Close):
            t = self.tunnels.pop(msg.tunnel, None)
            if t is not None:
                self.hub.close_tunnel(t, keep=False)
        elif isinstance(msg, M.Ping):
            self.send(M.Pong(t=msg.t))
        elif isinstance(msg, M.Pong):
            pass
        elif isinstance(msg, M.Dial):
            if self.dials >= MAX_DIALS:
                self.send(M.Dialed(id=msg.id, ok=False,
                                   error=f"over {MAX_DIALS} dial-backs in flight: wait for one"))  # fmt: skip
                return
            self.dials += 1
            self.hub.spawn(self._dial(msg))
        else:  # P2PJoin, P2PSignal, P2PLeave: the state machine lets nothing else through
            self.hub.rendezvous_message(self, msg)

    async def _dial(self, msg: M.Dial) -> None:
        try:
            await self.hub.dial(self, msg)
        finally:
            self.dials -= 1
