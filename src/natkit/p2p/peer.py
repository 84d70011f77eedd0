"""Two peers, one session: rendezvous on the relay, ICE, QUIC on the best path.

The order of things, on both sides at once:

1. Connect to the relay (an :class:`~natkit.relay.agent.Agent` with no tunnels), join the
   room as ``listen`` or ``connect`` and wait for the other peer. The relay sees the room
   as an HMAC of ``name`` under the secret (:func:`natkit.p2p.auth.room_id`).
2. Say hello with a fresh nonce, sealed (encrypted, authenticated, naming our role) with
   the shared secret; the session id is both nonces, sorted, so a sealed message of another
   session is refused. Then each peer proves it holds the secret *in this session* (a
   sealed ``auth`` message under the session id) before the other does anything for it.
3. Only then ICE gathering: host, server-reflexive (the relay answers STUN on its listen
   port), port-mapped (the router), relayed (TURN, when configured): no router mapping for
   a peer that has not authenticated. Send the ICE description and the certificate
   fingerprint, sealed; open the relay's fallback path at the same time (both peers must,
   for the relay to join them); run ICE checks.
4. QUIC over a :class:`~natkit.p2p.paths.PathSwitch`: the ICE path when it connected, else
   the relay path; the relay path stays as the standby the switch falls back to when the
   direct path dies. While on the relay, ICE is retried now and then, and the session moves
   back when a direct path works again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from natkit.errors import NatkitError, ProtocolError, RelayError
from natkit.net.loops import watches_sockets
from natkit.p2p import auth, tcppath
from natkit.p2p.candidates import IceDescription
from natkit.p2p.errors import P2PAuthError, P2PError, P2PTimeoutError
from natkit.p2p.ice import IceAgent, TurnServer
from natkit.p2p.paths import DatagramPath, IcePath, PathEvent, PathSwitch, StreamPath
from natkit.p2p.session import P2PSession
from natkit.p2p.tcppath import TcpDialer, TcpEndpoint
from natkit.p2p.tcppunch import DialServer
from natkit.p2p.tcpsetup import TcpSide
from natkit.relay.agent import Agent, parse_hostport
from natkit.rendezvous.client import RendezvousError, RendezvousTimeoutError

log = logging.getLogger("natkit.p2p")

Role = Literal["listen", "connect"]
Listener = Callable[[str, dict[str, Any]], None]
# What a peer tells of its progress before the session is up (``connect_peer(on_event=)``):
#   waiting  in the room, the other peer not there yet: room, role, peer_role, relay, timeout
#            (seconds it will wait; None: for ever)
#   peer     the other peer is in the room: room
#   rejected (listener only) a peer came but the session could not be set up (no hello, a
#            wrong secret, a reflected or forged message, a failed proof), or the relay
#            refused the room (the token's room limit, the room taken): reason, retry_in
#            (seconds before the listener tries again)
Progress = Callable[[str, dict[str, Any]], None]

HELLO = "H:"
SEALED = "S:"
ICE_TIMEOUT = 8.0  # ICE checks; then the relay path carries the session
ICE_HEAD_START = 2.5  # how long the session waits for ICE before it starts on the relay
SIGNAL_TIMEOUT = 15.0
HELLO_REPEAT = 1.0
CONNECT_PEER_TIMEOUT = 60.0
RELAY_PROBE = 3.0  # the TCP connect that tells an unreachable relay after a failed attempt
RETRY_DIRECT = 10.0  # seconds between attempts to get back from the relay to a direct path
# A listener that failed to set up a session with a peer waits this long before it waits in
# the room again, doubling for each failure in a row up to the maximum: a peer that keeps
# failing (or an attacker) costs it at most one attempt per REJECT_BACKOFF_MAX.
REJECT_BACKOFF = 1.0
REJECT_BACKOFF_MAX = 30.0
MAX_HELLO_NONCE = 64
MAX_PENDING = 64  # sealed messages kept until asked for
ROOM_REFUSALS = ("limit", "busy", "rate")  # the relay's refusals of a JOIN that may clear


@dataclasses.dataclass(frozen=True)
class P2POptions:
    relay: str
    token: str
    secret: str = (
        ""  # the peers' own secret (never the token); required, see auth.check_peer_secret
    )
    stun: tuple[str, int] | None = None  # default: the relay (it answers STUN)
    turn: TurnServer | None = None
    port_mapping: bool = True
    fingerprint: str | None = None  # the relay's certificate, else pinned on first use
    ice_timeout: float = ICE_TIMEOUT
    peer_timeout: float | None = None  # how long to wait for the other peer (None: forever)
    use_ipv6: bool = False
    host_addresses: tuple[str, ...] | None = None  # host candidates only on these (default: all)
    # The direct TCP path for forwarded streams (natkit.p2p.tcppath): a listener with it
    # opens a TCP port and must serve ``P2PConnection.tcp_endpoint`` (``p2p listen`` does);
    # a connector with it gets ``tcp_dialer`` when the listener offered a reachable port.
    tcp: bool = False


class _Signals:
    """The room's signalling channel: every message sealed with the secret and our role."""

    HELLO_SESSION = "hello"  # hellos come before the session id exists

    def __init__(self, room: Any, name: str, secret: str, role: Role) -> None:
        self.room, self.name, self.secret, self.role = room, name, secret, role
        self.peer_role: Role = "connect" if role == "listen" else "listen"
        self.session = ""
        self.guard = auth.ReplayGuard()
        self.pending: list[dict[str, Any]] = []
        self.ignored = ""  # why the last message was not taken (for a timeout's message)
        # Once the session id is agreed, one reader takes every signal: sealed messages
        # queue for recv(); a hello with a nonce not of this session (a new peer process)
        # sets new_peer.
        self.new_peer = asyncio.Event()
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._nonces: set[str] = set()
        self.peer_hello_at = 0.0  # the time in our peer's hello (its own clock)
        self._reader: asyncio.Task[None] | None = None
        self._ended = ""

    def _open(self, text: str, session: str, guard: auth.ReplayGuard | None) -> Any:
        """The body of a sealed message of the peer, or None for one to ignore (another
        session's, a repeat, our own reflected). A message under another secret raises."""
        try:
            return auth.unseal(self.secret, text, session=session, sender=self.peer_role,
                               guard=guard)  # fmt: skip
        except auth.WrongSecretError:
            raise P2PAuthError(
                f"a message in room {self.name!r} is not sealed with our secret: the peer "
                "holds another secret, or someone forged it"
            ) from None
        except ProtocolError as exc:
            log.warning("ignoring a signalling message: %s", exc)
            self.ignored = str(exc)
            return None

    def _late(self, what: str, timeout: float) -> P2PError:
        why = f" (the last message ignored: {self.ignored})" if self.ignored else ""
        return P2PError(f"the peer sent no {what} within {timeout:g} s{why}")

    async def hello(self, timeout: float = SIGNAL_TIMEOUT) -> None:
        """Agree on the session id, then make sure the peer holds the secret now.

        Our sealed hello is repeated until the peer's arrives (a peer that joined after our
        first one never saw it), and once more after. A hello proves the secret but not
        that it is fresh (the relay could replay an old one), so each side then sends a
        sealed ``auth`` under the new session id and waits for the peer's."""
        mine = secrets.token_urlsafe(16)
        # "at": when (by our clock) this process said hello; a later hello of the peer's
        # role with an earlier time is a replay of an old one, not a new peer process.
        hello = {"t": "hello", "n": mine, "at": round(time.time(), 3)}
        sealed = HELLO + auth.seal(self.secret, hello, session=self.HELLO_SESSION,
                                   sender=self.role)  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            self.room.send_signal(sealed)
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._late("hello", timeout)
            try:
                text = await self.room.recv_signal(min(HELLO_REPEAT, left))
            except NatkitError:
                continue  # nothing yet: say it again
            if not text.startswith(HELLO):
                continue
            body = self._open(text[len(HELLO) :], self.HELLO_SESSION, None)
            theirs = body.get("n") if isinstance(body, dict) else None
            if isinstance(theirs, str) and 0 < len(theirs) <= MAX_HELLO_NONCE and theirs != mine:
                self.peer_hello_at = _hello_time(body)
                break
        self.session = ".".join(sorted((mine, theirs)))
        self._nonces = {mine, theirs}
        self._reader = asyncio.ensure_future(self._read())
        self.room.send_signal(sealed)
        self.send({"t": "auth"})
        await self.recv("auth", max(0.1, deadline - time.monotonic()))

    async def _read(self) -> None:
        try:
            while True:
                text = await self.room.recv_signal()
                if text.startswith(SEALED):
                    if self._queue.qsize() >= MAX_PENDING:
                        log.warning("dropping a signalling message: %d unread", MAX_PENDING)
                        continue
                    self._queue.put_nowait(text)
                elif text.startswith(HELLO):
                    self._hello_later(text[len(HELLO) :])
        except NatkitError as exc:  # the room closed
            self._ended = str(exc)
        finally:
            self._queue.put_nowait(None)

    def _hello_later(self, text: str) -> None:
        try:
            body = self._open(text, self.HELLO_SESSION, None)
        except P2PAuthError as exc:
            log.warning("ignoring a hello: %s", exc)
            return
        if not isinstance(body, dict) or body.get("n") in self._nonces:
            return
        if _hello_time(body) <= self.peer_hello_at:
            # An older hello than our peer's, replayed (by the relay, who sees them all):
            # it must not end a working session.
            log.warning("ignoring a hello older than our peer's (a replay)")
            return
        self.new_peer.set()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()

    def send(self, body: dict[str, Any]) -> None:
        self.room.send_signal(
            SEALED + auth.seal(self.secret, body, session=self.session, sender=self.role)
        )

    async def recv(self, kind: str, timeout: float = SIGNAL_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for i, body in enumerate(self.pending):
            if body.get("t") == kind:
                return self.pending.pop(i)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._late(repr(kind), timeout)
            try:
                text = await asyncio.wait_for(self._queue.get(), left)
            except asyncio.TimeoutError:
                raise self._late(repr(kind), timeout) from None
            if text is None:
                self._queue.put_nowait(None)  # for the next reader too
                raise P2PError(f"signalling in room {self.name!r} ended: {self._ended}")
            body = self._open(text[len(SEALED) :], self.session, self.guard)
            if body is None:
                continue
            if body.get("t") == kind:
                return dict(body)
            if len(self.pending) >= MAX_PENDING:
                raise P2PError(f"the peer sent over {MAX_PENDING} messages nobody asked for")
            self.pending.append(body)


def _hello_time(body: dict[str, Any]) -> float:
    at = body.get("at")
    return float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else 0.0


class P2PConnection:
    """An authenticated peer-to-peer session: streams and datagrams on the best path."""

    def __init__(self, session: P2PSession, peer: _Peer, elapsed: float) -> None:
        self.session = session
        self._peer = peer
        self.elapsed = elapsed

    @property
    def path(self) -> str:
        return self.session.path

    @property
    def tcp_dialer(self) -> TcpDialer | None:
        """(connector) Opens forwarded streams over the direct TCP path; None: QUIC only."""
        return self._peer.tcp.dialer if self._peer.tcp else None

    @property
    def tcp_endpoint(self) -> TcpEndpoint | None:
        """(listener) The TCP port the peer's forwarded streams may come to; None: none."""
        return self._peer.tcp.endpoint if self._peer.tcp else None

    @property
    def tcp_dial_server(self) -> DialServer | None:
        """(listener) Answers the peer's dial requests (``serve_forward``'s ``dial``)."""
        return self._peer.tcp.dial_server if self._peer.tcp else None

    def on_path_change(self, callback: Callable[[str, str], None]) -> None:
        """``callback(new_kind, reason)`` whenever the session moves to another path."""
        self._peer.path_listeners.append(callback)

    async def open_stream(self) -> Any:
        return await self.session.open_stream()

    async def accept_stream(self) -> Any:
        return await self.session.accept_stream()

    def send_datagram(self, data: bytes) -> None:
        self.session.send_datagram(data)

    async def recv_datagram(self) -> bytes:
        return await self.session.recv_datagram()

    async def close(self) -> None:
        await self._peer.close()

    async def __aenter__(self) -> P2PConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Peer:
    def __init__(
        self, name: str, role: Role, opts: P2POptions, on_event: Progress | None = None
    ) -> None:
        self.name, self.role, self.opts = name, role, opts
        self.on_event = on_event
        self.agent = Agent(opts.relay, opts.token, [], fingerprint=opts.fingerprint)
        self.identity = auth.PeerIdentity.generate(f"natkit-p2p-{role}")
        self.tasks: set[asyncio.Task[Any]] = set()
        self.room: Any = None
        self.signals: _Signals | None = None
        self.switch: PathSwitch | None = None
        self.session: P2PSession | None = None
        self.ice: IceAgent | None = None
        self.relay_path: DatagramPath | None = None
        self.path_listeners: list[Callable[[str, str], None]] = []
        self.switched = asyncio.Event()  # set once the session's path switch exists
        self.peer_fp = ""  # the peer's certificate fingerprint, from its sealed offer
        self.tcp: TcpSide | None = None  # the direct TCP path (natkit.p2p.tcpsetup)
        self.elapsed = 0.0
        self.closed = False

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _stun_server(self) -> tuple[str, int]:
        return self.opts.stun or parse_hostport(self.opts.relay)  # the relay answers STUN

    def _ice_agent(self) -> IceAgent:
        return IceAgent(
            controlling=self.role == "connect",
            stun_server=self._stun_server(),
            turn=self.opts.turn,
            port_mapping=self.opts.port_mapping,
            use_ipv6=self.opts.use_ipv6,
            host_addresses=self.opts.host_addresses,
        )

    async def _exchange(self, ice: IceAgent, kind: str) -> IceDescription:
        """Send our ICE description (and fingerprint, and our TCP port), return the peer's."""
        assert self.signals is not None
        if self.tcp is not None:  # its router and STUN questions run while ICE gathers
            self.tcp.start()
        local = await ice.gather()
        hosts = [c.host for c in local.candidates if c.type == "host"]
        offer: dict[str, Any] = {"t": kind, "ice": local.to_dict(), "fp": self.identity.fingerprint}
        if self.tcp is not None:
            offer.update(await self.tcp.offer(hosts))
        self.signals.send(offer)
        body = await self.signals.recv(kind)
        self.peer_fp = str(body.get("fp", ""))
        remote = IceDescription.from_dict(body.get("ice"))
        if self.tcp is not None:
            self.tcp.take(body, hosts, remote, self._open_stream)
        return remote

    async def _open_stream(self) -> Any:
        """A QUIC stream of the session (for the TCP path's dial requests)."""
        if self.session is None:
            raise P2PError("the session is not up")
        return await self.session.open_stream()

    def _tcp_side(self) -> TcpSide | None:
        """(after the secret proof) The direct TCP path's state, when it is wanted."""
        assert self.signals is not None
        if not self.opts.tcp:
            return None
        if not watches_sockets(asyncio.get_running_loop()):
            log.info("no direct TCP path on this event loop (it cannot watch sockets)")
            return None
        key = tcppath.session_key(self.opts.secret, self.signals.session)
        return TcpSide(
            self.role, key, stun=self._stun_server(), port_mapping=self.opts.port_mapping
        )

    async def start(self) -> P2PSession:
        started = time.monotonic()
        runner = self._spawn(self.agent.run())
        try:
            self.room = await self._joined(runner)
        except RendezvousError as exc:
            # The token's room limit filled (by any holder of the token), the room taken,
            # JOINs too fast: a listener waits for it to clear rather than end.
            if self.role != "listen" or exc.code not in ROOM_REFUSALS:
                raise
            raise _PeerRejectedError(str(exc)) from exc
        wait = self.opts.peer_timeout
        if wait is None and self.role == "connect":
            wait = CONNECT_PEER_TIMEOUT  # a listener waits for ever; a connector does not
        await self._wait_peer(wait)
        try:
            return await self._set_up(started)
        except Exception as exc:
            if self.role != "listen":
                raise
            raise _PeerRejectedError(str(exc) or type(exc).__name__) from exc

    async def _set_up(self, started: float) -> P2PSession:
        """Everything after the peer came: it must prove the secret before we gather."""
        self.signals = _Signals(self.room, self.name, self.opts.secret, self.role)
        await self.signals.hello()
        self.tcp = self._tcp_side()
        ice = self.ice = self._ice_agent()
        remote = await self._exchange(ice, "offer")
        # The ticket of the peer we said hello to (a peer that came and went before got
        # another one).
        relay_task = self._spawn(self.room.open_relay_path(self.room.ticket))
        # ICE gets a head start; when it has not connected by then the session starts on
        # the relay and moves to the ICE path if that connects later (before ice_timeout).
        checks = self._spawn(ice.connect(remote, timeout=self.opts.ice_timeout))
        await asyncio.wait({checks}, timeout=min(ICE_HEAD_START, self.opts.ice_timeout))
        active: DatagramPath
        if checks.done() and checks.exception() is None:
            active = IcePath(ice.connection, ice.path or "direct", owns_connection=False)
        else:
            if checks.done():
                log.info("no direct path (%s); using the relay", checks.exception())
                self.ice = None
            else:
                self._spawn(self._late_ice(ice, checks))
            active = await self._relay_path(relay_task)
        self.switch = PathSwitch(active)
        self.switched.set()
        if active.kind != "relay":  # the relay path joins as the standby once it is up
            self._spawn(self._add_standby(relay_task))
        self.switch.on_event(self._on_path_event)
        self.session = await P2PSession.connect(
            self.switch,
            role="client" if self.role == "connect" else "server",
            identity=self.identity,
            peer_fingerprint=self.peer_fp,
            secret=self.opts.secret,
        )
        self.elapsed = time.monotonic() - started
        if self.tcp is not None and self.tcp.dialer is not None:  # its route, before a forward
            self._spawn(self.tcp.dialer.warm_up())
        self._spawn(self._keep_direct())
        self._spawn(self._watch_peer())
        return self.session

    async def _watch_peer(self) -> None:
        """A new peer process in the room says hello (sealed, with a nonce not of this
        session): ours is gone for good (restarted), so this session ends and its owner
        meets the new one. A peer whose relay connection only blinked rejoins the room
        without a hello, and the session goes on; a peer gone for good without a successor
        shows in the session itself (it times out)."""
        assert self.signals is not None
        await self.signals.new_peer.wait()
        log.info("a new peer said hello in the room: ending this session")
        if self.session is not None:
            await self.session.close("the peer was replaced")

    def _progress(self, event: str, **info: Any) -> None:
        if self.on_event is not None:
            self.on_event(event, info)

    async def _wait_peer(self, timeout: float | None) -> None:
        other = "connect" if self.role == "listen" else "listen"
        if not self.room.peer_present:
            self._progress("waiting", room=self.name, role=self.role, peer_role=other,
                           relay=self.opts.relay, timeout=timeout)  # fmt: skip
        try:
            await self.room.wait_peer(timeout)
        except RendezvousTimeoutError:
            raise P2PTimeoutError(
                f"no peer came to room {self.name!r} on relay {self.opts.relay} within "
                f"{timeout:g} s: start the other side (natkit p2p {other} {self.name}) with the "
                "same relay, token and secret (a peer with another secret waits in another room)"
            ) from None
        self._progress("peer", room=self.name)

    async def _joined(self, runner: asyncio.Task[Any]) -> Any:
        # The agent retries a failed relay connection for ever. When its first attempt
        # fails, one plain TCP connect tells a relay that cannot be reached (refused,
        # unreachable, a name that does not resolve: an error at once, naming it) from a
        # passing failure (the agent's retry then gets through).
        first_failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_agent_event(event: str, info: dict[str, Any]) -> None:
            failed = event == "reconnecting" and self.agent.connections == 0
            if failed and not first_failure.done():
                first_failure.set_result(None)

        self.agent.on_event(on_agent_event)
        room = auth.room_id(self.opts.secret, self.name)
        join = asyncio.ensure_future(self.agent.join_p2p(room, self.role))
        waiting: set[asyncio.Future[Any]] = {join, runner, first_failure}
        try:
            while True:
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if join in done:
                    return join.result()
                if runner in done:
                    runner.result()  # the agent's final error (a rejected token, an untrusted relay)
                    raise P2PError(f"relay {self.opts.relay} closed the connection")
                waiting.discard(first_failure)
                unreachable = await self._relay_unreachable()
                if unreachable is not None:
                    raise RelayError(unreachable)
        finally:
            if not join.done():
                join.cancel()
                with contextlib.suppress(BaseException):
                    await join

    async def _relay_unreachable(self) -> str | None:
        """Why the relay cannot be reached over TCP, or None when it can."""
        host, port = self.agent.relay_host, self.agent.relay_port
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), RELAY_PROBE)
        except asyncio.TimeoutError:
            why = f"no answer within {RELAY_PROBE:g} s"
        except socket.gaierror as exc:
            why = f"the name {host!r} does not resolve ({exc.strerror})"
        except OSError as exc:  # "Connection refused" rather than asyncio's wording
            why = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
        else:
            writer.close()
            return None
        return (
            f"cannot connect to the relay at {host}:{port}: {why} (is it running, and are "
            "the address and port right?)"
        )

    async def _add_standby(self, relay_task: asyncio.Task[Any]) -> None:
        try:
            path = await self._relay_path(relay_task)
        except (NatkitError, OSError, asyncio.TimeoutError) as exc:
            log.warning("no relay path to fall back on: %s", exc)
            return
        if self.switch is not None and not self.closed:
            self.switch.add(path)

    async def _relay_path(self, task: asyncio.Task[Any]) -> DatagramPath:
        if self.relay_path is None:
            sock = await task
            self.relay_path = await StreamPath.from_socket(sock, "relay")
        return self.relay_path

    def _on_path_event(self, event: PathEvent) -> None:
        if event.type == "switched":
            for callback in list(self.path_listeners):
                callback(event.path.kind, event.reason)

    async def _keep_direct(self) -> None:
        """While the relay carries the session, try ICE again now and then; when a path
        connects, move the session back onto it. The connecting peer asks (``restart``),
        the listening peer answers (``restart-answer``) with a fresh agent of its own."""
        assert self.signals is not None
        signals, attempt = self.signals, 0
        while not self.closed:
            if self.role == "connect":
                await asyncio.sleep(RETRY_DIRECT)
                if self.switch is None or self.switch.kind != "relay":
                    continue
                attempt += 1
                ice = self._ice_agent()
                try:
                    local = await ice.gather()
                    signals.send({"t": "restart", "n": attempt, "ice": local.to_dict()})
                    body = await signals.recv(f"restart-answer-{attempt}")
                    remote = IceDescription.from_dict(body.get("ice"))
                except (NatkitError, OSError, asyncio.TimeoutError) as exc:
                    log.info("ICE restart: %s", exc)
                    await ice.close()
                    continue
            else:
                try:
                    body = await signals.recv("restart", timeout=3600)
                except NatkitError:
                    if self.closed or self.room.closed:
                        return
                    continue
                ice = self._ice_agent()
                try:
                    remote = IceDescription.from_dict(body.get("ice"))
                    local = await ice.gather()
                    signals.send({"t": f"restart-answer-{body.get('n')}", "ice": local.to_dict()})
                except (NatkitError, OSError) as exc:
                    log.info("ICE restart: %s", exc)
                    await ice.close()
                    continue
            try:
                await ice.connect(remote, timeout=self.opts.ice_timeout)
            except (NatkitError, OSError, asyncio.TimeoutError) as exc:
                log.info("direct path still unavailable: %s", exc)
                continue
            self._adopt(ice)

    async def _late_ice(self, ice: IceAgent, checks: asyncio.Task[Any]) -> None:
        """ICE connected after the session had started on the relay: move onto it."""
        try:
            await checks
        except (NatkitError, OSError) as exc:
            log.info("no direct path (%s); staying on the relay", exc)
            if self.ice is ice:
                self.ice = None
            return
        await self.switched.wait()  # the session may still be being set up
        if not self.closed:
            self._adopt(ice)

    def _adopt(self, ice: IceAgent) -> None:
        old, self.ice = self.ice, ice
        if old is ice:
            old = None
        path = IcePath(ice.connection, ice.path or "direct", owns_connection=False)
        if self.switch is not None:
            self.switch.add(path)
            self.switch.switch(path, "direct path back")
            for stale in self.switch.paths:  # the ICE path that died: stop probing it
                if isinstance(stale, IcePath) and stale is not path:
                    self.switch.remove(stale)
        if old is not None:
            self._spawn(old.close())

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.session is not None:
            with contextlib.suppress(Exception):
                await self.session.close()
        if self.ice is not None:
            with contextlib.suppress(Exception):
                await self.ice.close()
        if self.signals is not None:
            self.signals.close()
        if self.tcp is not None:
            await self.tcp.close()
        if self.room is not None:
            with contextlib.suppress(Exception):
                self.room.leave()
        for task in list(self.tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await self.agent.close()


class _PeerRejectedError(P2PError):
    """A listener could not set up a session with the peer that came (the reason)."""


async def connect_peer(
    name: str, role: Role, opts: P2POptions, *, on_event: Progress | None = None
) -> P2PConnection:
    """Meet the peer named ``name`` through the relay and open an authenticated session.

    ``role`` is ``listen`` on one side and ``connect`` on the other; ``on_event`` hears of
    the progress before the session is up (see :data:`Progress`). A listener survives a
    peer that fails before the session is up (``rejected``, then it waits again, slower
    after each failure in a row). Raises :class:`~natkit.p2p.errors.P2PError` (or the
    relay's own errors, a :class:`~natkit.errors.RelayError` when it cannot be reached)
    when it cannot."""
    auth.check_peer_secret(opts.secret)
    failures = 0
    while True:
        peer = _Peer(name, role, opts, on_event)
        try:
            session = await peer.start()
        except _PeerRejectedError as exc:
            await peer.close()
            failures += 1
            delay = min(REJECT_BACKOFF * 2 ** (failures - 1), REJECT_BACKOFF_MAX)
            cause = exc.__cause__
            log.warning("room %r: peer rejected (%s); waiting again in %g s", name, exc, delay,
                        exc_info=not isinstance(cause, (NatkitError, OSError, TimeoutError)))  # fmt: skip
            peer._progress("rejected", room=name, reason=str(exc), retry_in=delay)
            await asyncio.sleep(delay)
            continue
        except BaseException:
            await peer.close()
            raise
        return P2PConnection(session, peer, peer.elapsed)
