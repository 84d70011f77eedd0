"""The agent beside the service: ``natkit expose PORT --relay HOST:PORT``.

It keeps one control connection to the relay (TLS; the relay is verified by a pinned
fingerprint or a CA; the token is proven by HMAC, never sent), reconnects forever with
backoff and jitter, and opens data connections ahead of visitors when the relay hands it
tickets. Each data connection waits for START, then is joined to a fresh connection to
the local service: spliced when both are plain TCP (``--plaintext-data``), else sealed with
keys from the control session (:mod:`natkit.relay.seal`).

An agent also meets peers through the relay (:meth:`Agent.join_p2p`, see
:mod:`natkit.rendezvous.client`); it needs no tunnel for that.

Each agent process has its own identity (an instance name and a resumption secret, sent
with its login): the relay recognises this agent coming back on a new connection by it,
and tells apart two agents on one token, which get two addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import json
import logging
import random
import secrets
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from natkit.atomic import write_atomic
from natkit.errors import NatkitError, ProtocolError, RelayError, StateError
from natkit.net.certs import KnownRelays, RelayTrustError, client_context, fingerprint_der
from natkit.net.loops import require_socket_watching
from natkit.relay import control, seal
from natkit.relay import messages as M
from natkit.relay.access import AccessPolicy
from natkit.relay.dataconn import DataConn, Opening, TapFor
from natkit.relay.pump import Tap
from natkit.relay.resolve import RelayNameError, resolve_relay
from natkit.rendezvous.client import P2PRoom, RoomClient
from natkit.state import state_dir, state_error

log = logging.getLogger("natkit.relay")
PING_INTERVAL = 10.0
SILENCE_LIMIT = 30.0


class RelayAuthError(RelayError):
    """The relay rejected the token: final, not retried."""


class TunnelRefusedError(RelayError):
    """The relay refused to open the tunnel (name held by another token, limits…)."""


@dataclasses.dataclass
class TunnelSpec:
    local_port: int
    kind: str = "tcp"  # tcp | http | tls
    name: str = ""  # requested host name label for http/tls
    port: int = 0  # requested public port for tcp (0: any; remembered across reconnects)
    local_host: str = "127.0.0.1"
    id: str = "t0"
    public: str = ""
    exact: bool = False  # ``port`` or a refusal (else it is a preference)
    takeover: bool = False  # take the name from another live agent of the same token
    plaintext: bool = False  # set from the agent's plaintext_data
    access: AccessPolicy | None = None  # who may reach it, enforced by the relay


def parse_hostport(
    text: str, default_port: int | None = None, *, allow_zero: bool = False
) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"{text!r} is not HOST:PORT")
        return text, default_port
    host = host.strip("[]")
    if not host or not port.isdigit() or not (0 if allow_zero else 1) <= int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, int(port)


Listener = Callable[[str, dict[str, Any]], None]


class Agent:
    def __init__(
        self,
        relay: str,
        token: str,
        tunnels: list[TunnelSpec],
        *,
        plaintext_data: bool = False,
        fingerprint: str | None = None,
        cafile: Path | None = None,
        known_relays: Path | None = None,
        remember_ports: Path | None = None,
        max_backoff: float = 30.0,
        keep_session_on_refusal: bool = False,
    ) -> None:
        self.relay_host, self.relay_port = parse_hostport(relay)
        self.relay = relay
        self.token = token
        self.plaintext_data = plaintext_data
        self.tunnels: dict[str, TunnelSpec] = {}
        self.expected_fingerprint = fingerprint
        self.cafile = cafile  # with a CA, it vouches for the relay: no pinning on first use
        self.ssl = client_context(cafile)
        self.known = KnownRelays(known_relays or state_dir() / "known_relays.json")
        self.remembered = _RememberedPorts(remember_ports, relay) if remember_ports else None
        self.max_backoff = max_backoff
        # An agent whose tunnels come and go (natkit-ngrok): a tunnel refused before it
        # opened fails its own waiter and is dropped; the session and the others go on.
        self.keep_session_on_refusal = keep_session_on_refusal
        # This process's identity at the relay: how it knows us coming back.
        self.instance = secrets.token_hex(16)
        self._resume = secrets.token_hex(32)
        self.listeners: list[Listener] = []
        self.connected = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._conn: control.ControlConnection | None = None
        self._dials: dict[int, asyncio.Future[tuple[bool, str]]] = {}
        self._dial_seq = 0
        self._opened: dict[str, asyncio.Future[str]] = {}
        self.fingerprint = ""
        self._data_key = b""  # the session's secret for sealed data connections (WELCOME)
        self._cipher = seal.CHACHA  # their AEAD, agreed at WELCOME
        self.connections = 0
        self._resolving: set[asyncio.Task[None]] = set()  # tickets waiting for a name lookup
        self._openings: set[Opening] = set()  # data connections being opened
        self._relay_addr: tuple[str, int] = (self.relay_host, self.relay_port)  # as connected
        self._parked_conns: set[DataConn] = set()  # open, waiting for a visitor
        self._active_conns: set[DataConn] = set()  # carrying a visitor
        self._pings: dict[float, asyncio.Future[None]] = {}
        self._lost_all: TunnelRefusedError | None = None  # every tunnel taken over
        self._refusals: dict[str, int] = {}  # tunnel -> refusals in a row since it was open
        self._rendezvous = RoomClient(self._send, (self.relay_host, self.relay_port), self.relay,
                                      lambda: (self._data_key, self._cipher))  # fmt: skip
        self._taps: dict[str, TapFor] = {}  # tunnel id -> its visitors' captures (inspector)
        for spec in tunnels:
            self._add(spec)

    def _add(self, spec: TunnelSpec) -> None:
        spec.plaintext = self.plaintext_data
        if self.remembered is not None and spec.kind == "tcp" and not spec.port:
            spec.port = self.remembered.get(spec)  # a preference: another port if it is taken
        self.tunnels[spec.id] = spec

    def capture(self, tunnel_id: str, tap_for: TapFor | None) -> None:
        """Give each visitor of HTTP tunnel ``tunnel_id`` the capture ``tap_for`` returns
        for its address (see :mod:`natkit.inspect`); None stops capturing. Visitors that
        arrive after the call are captured."""
        if tap_for is None:
            self._taps.pop(tunnel_id, None)
        else:
            self._taps[tunnel_id] = tap_for

    def _tap_for(self, tunnel_id: str, visitor: str) -> Tap | None:
        tap_for = self._taps.get(tunnel_id)
        return tap_for(visitor) if tap_for is not None else None

    def _tapper(self, t: TunnelSpec) -> TapFor | None:
        """What a data connection of ``t`` asks for its visitor's capture (HTTP only: a
        capture parses HTTP)."""
        return functools.partial(self._tap_for, t.id) if t.kind == "http" else None

    def on_event(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def _emit(self, event: str, **info: Any) -> None:
        for listener in list(self.listeners):
            try:
                listener(event, info)
            except Exception:
                log.exception("agent event listener failed")

    def _resolved(self, task: asyncio.Task[None]) -> None:
        self._resolving.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("agent task failed: %r", exc, exc_info=exc)

    # ---- the control connection -------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected until cancelled; raises RelayAuthError/TunnelRefusedError/trust errors."""
        if self.tunnels:
            require_socket_watching("a relay tunnel's data path")
        delay = 0.5
        while True:
            started = time.monotonic()
            try:
                await self._session()
            except (RelayAuthError, TunnelRefusedError, RelayTrustError, StateError):
                raise
            except RelayNameError as exc:  # final at first; later, DNS may be down a while
                if not self.connections:
                    raise
                reason = str(exc)
            except (OSError, ProtocolError, ssl.SSLError, asyncio.TimeoutError, NatkitError) as exc:
                reason = str(exc) or type(exc).__name__
            else:
                reason = "the relay closed the connection"
            if self._lost_all is not None:
                raise self._lost_all
            self.connected.clear()
            if time.monotonic() - started > 10:
                delay = 0.5  # it had been up a while: start the backoff afresh
            wait = delay * random.uniform(0.8, 1.2)
            self._emit("reconnecting", reason=reason, delay=round(wait, 2))
            log.info("relay connection lost (%s); reconnecting in %.1f s", reason, wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, self.max_backoff)

    async def _session(self) -> None:
        try:
            address = await resolve_relay(self.relay_host, self.relay_port)
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(address, self.relay_port, ssl=self.ssl,
                                        server_hostname=self.relay_host),
                10.0,
            )  # fmt: skip
        except ssl.SSLCertVerificationError as exc:  # --cafile given: final, not retried
            raise RelayTrustError(
                f"relay {self.relay}'s certificate is not trusted for {self.relay_host}: "
                f"{exc.verify_message}"
            ) from None
        conn = control.ControlConnection(control.Side.AGENT)
        try:
            self._check_peer(writer.get_extra_info("ssl_object"))
            writer.write(conn.send(M.Hello(version=M.VERSION, agent="natkit")))
            msg = await _next(reader, conn)
            if isinstance(msg, M.Challenge):
                mac = control.auth_mac(
                    self.token, msg.nonce, self.fingerprint, self.instance, self._resume
                )
                writer.write(conn.send(M.Auth(token_id=control.token_id(self.token), mac=mac,
                                              instance=self.instance, resume=self._resume)))  # fmt: skip
                msg = await _next(reader, conn)
            if isinstance(msg, M.Error):
                if msg.code == "auth":
                    raise RelayAuthError(f"relay {self.relay} rejected the token: {msg.message}")
                raise NatkitError(f"relay {self.relay} refused the agent: {msg.message}")
            assert isinstance(msg, M.Welcome)  # the state machine allows nothing else here
            if self.plaintext_data and not msg.plaintext:
                raise TunnelRefusedError(
                    f"relay {self.relay} refuses plaintext data connections: drop "
                    "--plaintext-data (data connections are sealed by default)"
                )
            self._data_key = _data_key(msg.data_key)
            # AES-GCM only when both ends have AES instructions; ChaCha20 is fast anywhere.
            mine = seal.preferred_cipher()
            self._cipher = mine if msg.cipher == mine else seal.CHACHA
            # Data connections go to the address the control connection reached (no lookup).
            self._relay_addr = tuple(writer.get_extra_info("peername")[:2])
            self._writer, self._conn = writer, conn
            self.connections += 1
            for t in list(self.tunnels.values()):
                self._send(_open_message(t))
            self._rendezvous.attach()
            self.connected.set()
            ping = asyncio.get_running_loop().create_task(self._pinger())
            # One watchdog timer for the session, not a timeout per message (a TICKETS
            # message per visitor in plaintext mode).
            watch = _Watchdog(writer.transport, SILENCE_LIMIT)
            try:
                while True:
                    try:
                        msg = await _next(reader, conn)
                    except (OSError, ProtocolError):
                        if watch.fired:
                            raise ProtocolError(f"relay silent for {SILENCE_LIMIT:g} s") from None
                        raise
                    watch.heard()
                    self._handle(msg)
            finally:
                watch.cancel()
                ping.cancel()
        finally:
            self._writer = self._conn = None
            self._rendezvous.detach()
            # Data connections still waiting for a visitor belong to the lost session: the
            # relay forgot their tickets. Connections already carrying a visitor go on.
            for task in list(self._resolving):
                task.cancel()
            for opening in list(self._openings):
                opening.abort()
            for dconn in list(self._parked_conns):
                dconn.abort()
            for fut in self._dials.values():
                if not fut.done():
                    fut.set_exception(NatkitError("relay connection lost"))
            self._dials.clear()
            writer.close()

    def _check_peer(self, ssl_object: Any) -> None:
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise RelayTrustError(f"relay {self.relay} presented no certificate")
        self.fingerprint = fingerprint_der(der)
        if self.cafile is not None and self.expected_fingerprint is None:
            return
        try:
            pinned = self.known.check(self.relay, self.fingerprint, self.expected_fingerprint)
        except OSError as exc:  # the pin cannot be saved: final, retrying cannot help
            raise state_error(self.known.path.parent, exc) from None
        if pinned:
            self._emit("pinned", relay=self.relay, fingerprint=self.fingerprint)

    async def _pinger(self) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL)
            self._send(M.Ping(t=time.time()))

    async def ping(self, timeout: float = 2.0) -> float:
        """One PING/PONG round trip on the control connection, in seconds."""
        await asyncio.wait_for(self.connected.wait(), timeout)
        t0 = time.monotonic()
        fut = asyncio.get_running_loop().create_future()
        self._pings[t0] = fut
        try:
            if not self._send(M.Ping(t=t0)):
                raise NatkitError(f"not connected to relay {self.relay}")
            await asyncio.wait_for(fut, timeout)
        finally:
            self._pings.pop(t0, None)
        return time.monotonic() - t0

    def _send(self, msg: M.Message) -> bool:
        """Send ``msg`` on the control connection; False when not connected."""
        writer, conn = self._writer, self._conn
        if writer is None or conn is None or writer.is_closing():
            return False
        writer.write(conn.send(msg))
        return True

    async def join_p2p(self, name: str, role: str, *, timeout: float = 10.0) -> P2PRoom:
        """Join the relay's P2P room ``name`` as ``role`` (``listen`` or ``connect``) and
        wait for the relay's answer (``run()`` must be running). Peers meet only in a room
        of the same name under the same token. Raises RendezvousError (``code`` busy: the
        role is taken; limit: too many rooms for the token)."""
        return await self._rendezvous.join(name, role, timeout)

    def _handle(self, msg: M.Message) -> None:
        if self._rendezvous.handle(msg):
            return
        if isinstance(msg, M.Pong):
            pong = self._pings.get(msg.t)
            if pong is not None and not pong.done():
                pong.set_result(None)
        elif isinstance(msg, M.Opened):
            self._opened_tunnel(msg)
        elif isinstance(msg, M.Tickets):
            t = self.tunnels.get(msg.tunnel)
            if t is None:
                return
            local = _service_ip(t.local_host, t.local_port)
            if local is not None:
                self._open_data_conns(local, msg.tickets, self._tapper(t))
            else:  # a service named by host name: look it up first (off the loop)
                task = asyncio.get_running_loop().create_task(
                    self._resolve_then_open(t, msg.tickets)
                )
                self._resolving.add(task)
                task.add_done_callback(self._resolved)
        elif isinstance(msg, M.Ping):
            self._send(M.Pong(t=msg.t))
        elif isinstance(msg, M.Dialed):
            dialed = self._dials.pop(msg.id, None)
            if dialed is not None and not dialed.done():
                dialed.set_result((msg.ok, msg.error))
        elif isinstance(msg, M.Closed):
            self._closed_tunnel(msg)
        elif isinstance(msg, M.Notice):
            log.warning("relay %s: %s", self.relay, msg.message)
            # The event name is ours, not the relay's: "interference", else "notice".
            event = "interference" if msg.code == "interference" else "notice"
            self._emit(event, code=msg.code, message=msg.message)
        elif isinstance(msg, M.Refused):
            if msg.tunnel in self.tunnels:  # a visitor the tunnel's access policy kept out
                self._emit("refused", tunnel=msg.tunnel, visitor=msg.visitor, reason=msg.reason,
                           at=msg.at, more=msg.more)  # fmt: skip
        elif isinstance(msg, M.Error):
            log.warning("relay error %s: %s", msg.code, msg.message)
            if (
                msg.code == "protocol"
                and "relay Open: fields" in msg.message
                and any(t.access is not None for t in self.tunnels.values())
            ):  # a relay from before access control: reconnecting would not change that
                self._lost_all = TunnelRefusedError(
                    f"relay {self.relay} predates access control (--allow/--deny/--basic-auth/"
                    "--rate-limit): upgrade the relay, or drop those options"
                )

    def _opened_tunnel(self, msg: M.Opened) -> None:
        t = self.tunnels.get(msg.tunnel)
        if t is None:
            return
        previous, t.public = t.public, msg.public
        if t.kind != "tcp" and not t.name:  # a random name: ask for the same one next time
            t.name = msg.public.split("://", 1)[-1].rsplit(":", 1)[0]
        if t.kind == "tcp":
            t.port = int(t.public.rsplit(":", 1)[1])  # ask for the same port next time
            if self.remembered is not None:
                self.remembered.put(t)
        self._refusals.pop(t.id, None)
        event = "ready" if not previous else "restored"
        self._emit(
            event, tunnel=t.id, public=t.public, changed=bool(previous) and previous != t.public
        )
        fut = self._opened.get(t.id)
        if fut is not None and not fut.done():
            fut.set_result(t.public)

    def _closed_tunnel(self, msg: M.Closed) -> None:
        t = self.tunnels.get(msg.tunnel)
        if t is None:
            return
        if msg.code == "taken-over":
            # Another agent of this token took the name over, on purpose: ours is gone.
            del self.tunnels[t.id]
            self._emit("lost", tunnel=t.id, public=t.public, reason=msg.message, final=True)
            self._fail_waiters(t.id, TunnelRefusedError(f"relay {self.relay}: {msg.message}"))
            if not self.tunnels:
                self._lost_all = TunnelRefusedError(f"relay {self.relay}: {msg.message}")
                if self._writer is not None:
                    self._writer.close()
            return
        text = f"relay {self.relay} refused the tunnel: {msg.message}"
        if not t.public:  # never opened: the user's request is refused, say so and stop
            err = TunnelRefusedError(text)
            self._fail_waiters(t.id, err)
            if self.keep_session_on_refusal:
                del self.tunnels[t.id]
                self._opened.pop(t.id, None)
                return
            raise err
        # A reconnection that lost its name (another agent of the token holds it now, or a
        # quota is full): this tunnel alone asks again later; the session and the other
        # tunnels go on.
        delay = min(self.max_backoff, 2.0 * 2 ** self._refusals.get(t.id, 0))
        self._refusals[t.id] = self._refusals.get(t.id, 0) + 1
        self._emit("lost", tunnel=t.id, public=t.public, reason=text, retry_in=delay)
        log.info("%s; asking again in %.0f s", text, delay)
        asyncio.get_running_loop().call_later(delay, self._reopen, t.id)

    def _reopen(self, tunnel_id: str) -> None:
        t = self.tunnels.get(tunnel_id)
        if t is not None and self.connected.is_set():
            self._send(_open_message(t))

    def _fail_waiters(self, tunnel_id: str, err: BaseException) -> None:
        fut = self._opened.get(tunnel_id)
        if fut is not None and not fut.done():
            fut.set_exception(err)

    def open(self, spec: TunnelSpec) -> None:
        """Add a tunnel; it is opened now if connected, else at the next connection."""
        require_socket_watching("a relay tunnel's data path")
        self._add(spec)
        if self.connected.is_set():
            self._send(_open_message(spec))

    def close_tunnel(self, tunnel_id: str) -> None:
        """Stop serving one tunnel: the relay frees its port or name, the others go on.
        Visitors it is carrying now finish."""
        if self.tunnels.pop(tunnel_id, None) is None:
            return
        self._refusals.pop(tunnel_id, None)
        self._fail_waiters(tunnel_id, TunnelRefusedError(f"tunnel {tunnel_id} was closed"))
        self._opened.pop(tunnel_id, None)
        self._send(M.Close(tunnel=tunnel_id))

    async def wait_open(self, tunnel_id: str, timeout: float | None = None) -> str:
        t = self.tunnels[tunnel_id]
        if t.public and self.connected.is_set():
            return t.public
        fut = self._opened.setdefault(tunnel_id, asyncio.get_running_loop().create_future())
        return await asyncio.wait_for(asyncio.shield(fut), timeout)

    async def dial(self, host: str, port: int, timeout: float = 10.0) -> tuple[bool, str]:
        """Ask the relay to connect to host:port from the outside (proves reachability)."""
        await asyncio.wait_for(self.connected.wait(), timeout)
        self._dial_seq += 1
        fut: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()
        self._dials[self._dial_seq] = fut
        if not self._send(M.Dial(id=self._dial_seq, host=host, port=port)):
            self._dials.pop(self._dial_seq, None)
            raise NatkitError(f"not connected to relay {self.relay}")
        return await asyncio.wait_for(fut, timeout)

    # ---- data connections -------------------------------------------------------------------

    def _data_conn_state(self, conn: DataConn, state: str) -> None:
        """Parked connections belong to the session (dropped with it); those carrying a
        visitor go on until the visitor is done."""
        (self._parked_conns.add if state == "parked" else self._parked_conns.discard)(conn)
        (self._active_conns.add if state == "active" else self._active_conns.discard)(conn)

    def _open_data_conns(
        self, local: tuple[str, int], tickets: tuple[str, ...], tap_for: TapFor | None = None
    ) -> None:
        """A data connection per ticket, parked once open (:mod:`natkit.relay.dataconn`)."""
        key = None if self.plaintext_data else self._data_key
        for ticket in tickets:
            try:
                opening = Opening(
                    self._relay_addr, ticket, key, local, self._data_conn_state,
                    self._openings.discard, self._cipher, tap_for,
                )  # fmt: skip
            except OSError as exc:  # out of file descriptors: the relay's ticket expires
                log.debug("data connection failed: %s", exc)
                return
            if not opening.finished:
                self._openings.add(opening)

    async def _resolve_then_open(self, t: TunnelSpec, tickets: tuple[str, ...]) -> None:
        try:
            local = await _service_address(t)
        except OSError as exc:
            log.warning("cannot find the service %s: %s", t.local_host, exc)
            return
        self._open_data_conns(local, tickets, self._tapper(t))

    async def close(self) -> None:
        self._rendezvous.close()
        for task in list(self._resolving):
            task.cancel()
        for opening in list(self._openings):
            opening.abort()
        for conn in list(self._parked_conns) + list(self._active_conns):
            conn.abort()
        if self._writer is not None:
            self._writer.close()


@functools.lru_cache(maxsize=64)
def _service_ip(host: str, port: int) -> tuple[str, int] | None:
    """The service's address when it is given as an IP address (no lookup needed); cached,
    as plaintext mode asks once per visitor."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return host, port


class _Watchdog:
    """Aborts ``transport`` when nothing was heard on it for ``limit`` seconds."""

    def __init__(self, transport: asyncio.WriteTransport, limit: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport, self.limit = transport, limit
        self.last = self.loop.time()
        self.fired = False
        self.timer = self.loop.call_later(limit, self._check)

    def heard(self) -> None:
        self.last = self.loop.time()

    def _check(self) -> None:
        quiet = self.loop.time() - self.last
        if quiet < self.limit:
            self.timer = self.loop.call_later(self.limit - quiet, self._check)
            return
        self.fired = True
        self.transport.abort()

    def cancel(self) -> None:
        self.timer.cancel()


async def _service_address(t: TunnelSpec) -> tuple[str, int]:
    """The service's address as an IP and port: a data connection connects to it from a
    callback, where a name lookup would block the loop."""
    known = _service_ip(t.local_host, t.local_port)
    if known is not None:
        return known
    infos = await asyncio.get_running_loop().getaddrinfo(
        t.local_host, t.local_port, type=socket.SOCK_STREAM
    )
    if not infos:
        raise OSError(f"{t.local_host} has no address")
    host, port = infos[0][4][:2]
    return str(host), int(port)


async def _next(reader: asyncio.StreamReader, conn: control.ControlConnection) -> M.Message:
    """The relay's next message, checked by the state machine."""
    while True:
        msg = conn.next_event()
        if msg is not None:
            return msg
        data = await reader.read(65536)
        if not data:
            raise ProtocolError("relay closed the connection")
        conn.receive_data(data)


def _open_message(t: TunnelSpec) -> M.Open:
    return M.Open(tunnel=t.id, kind=t.kind, name=t.name, port=t.port, exact=t.exact,
                  plaintext=t.plaintext, takeover=t.takeover, access=t.access)  # fmt: skip


class _RememberedPorts:
    """The public port each tcp tunnel last had at a relay (a file in the state directory),
    asked for again by the next agent process: a restarted ``natkit expose`` keeps its
    address while the relay still holds it for this token. A preference only: when another
    live agent holds it, the relay gives another port."""

    def __init__(self, path: Path, relay: str) -> None:
        self.path, self.relay = path, relay

    def _key(self, t: TunnelSpec) -> str:
        return f"{self.relay} {t.local_host}:{t.local_port}"

    def _load(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # a cache: unreadable means nothing remembered
        if not isinstance(data, dict):
            return {}
        return {str(k): v for k, v in data.items() if isinstance(v, int) and 0 < v < 65536}

    def get(self, t: TunnelSpec) -> int:
        return self._load().get(self._key(t), 0)

    def put(self, t: TunnelSpec) -> None:
        data = self._load()
        if data.get(self._key(t)) == t.port:
            return
        data[self._key(t)] = t.port
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(self.path, json.dumps(data, indent=1))


def _data_key(text: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != seal.KEY_SIZE:
        raise ProtocolError("the relay sent no usable data key: is it an older natkit?")
    return key


__all__ = [
    "Agent",
    "RelayAuthError",
    "TunnelRefusedError",
    "TunnelSpec",
    "parse_hostport",
]
