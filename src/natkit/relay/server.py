"""``natkit relay serve``: the public side of relay tunnels.

One listening port carries agents' control connections (TLS) and their data connections
(:mod:`natkit.relay.entry`). Visitors arrive on a tunnel's public TCP port, or on the
shared HTTP port (routed by Host) or HTTPS port (routed by TLS SNI, passed through
untouched, :mod:`natkit.relay.routing`), and are joined to a data connection the agent
opened ahead of time (:mod:`natkit.relay.tunnels`).

What each piece of state obeys lives in its own sans-I/O object: the conversation in
:mod:`natkit.relay.control`, names and reservations in :mod:`natkit.relay.names`, tickets
in :mod:`natkit.relay.tickets`, per-address bounds in :mod:`natkit.relay.limits`, tenants
and quotas in :mod:`natkit.relay.tenants`. This module wires them to sockets.

The relay is also a rendezvous for peer-to-peer (:mod:`natkit.rendezvous.rooms`) and
answers STUN Binding requests on UDP at the listen address (:mod:`natkit.stun.server`)
and over TCP on the listen port itself.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import ipaddress
import logging
import os
import secrets
import socket
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from natkit.errors import ProtocolError
from natkit.net.certs import ensure_self_signed, fingerprint_file, server_context
from natkit.relay import control, metrics, routing, seal, sniff
from natkit.relay import messages as M
from natkit.relay.access import ACCESS_VERSION
from natkit.relay.entry import ListenPort
from natkit.relay.limits import AddressLimits
from natkit.relay.listeners import Acceptor, listen
from natkit.relay.names import Holder, NameRefused, TunnelNames, host_key, port_key
from natkit.relay.sessions import AgentSession
from natkit.relay.tenants import Quota, Tenant
from natkit.relay.tickets import TicketBook
from natkit.relay.tunnels import ServedTunnel
from natkit.rendezvous.rooms import Rooms
from natkit.stun import server as stunserver

log = logging.getLogger("natkit.relay")

TICKET_TTL = 10.0  # an agent answers a ticket within milliseconds; older ones are lost
IDLE_TIMEOUT = 35.0
NOTICE_INTERVAL = 10.0  # interference is told to an agent at most this often per tunnel


@dataclasses.dataclass
class RelayConfig:
    listen_host: str = "0.0.0.0"
    listen_port: int = 7835
    tokens: dict[str, str] = dataclasses.field(default_factory=dict)  # label -> token
    tenants: list[Tenant] = dataclasses.field(default_factory=list)  # with quotas
    default_quota: Quota = dataclasses.field(default_factory=Quota)
    ports: tuple[int, int] = (20000, 20999)
    http_port: int | None = None
    https_port: int | None = None
    domain: str | None = None
    # How visitors reach this relay. Default: the listen host, or, when that is a wildcard
    # (0.0.0.0, ::), the address each agent's control connection reached.
    public_host: str | None = None
    cert: Path | None = None
    key: Path | None = None
    state_dir: Path = Path(os.path.expanduser("~/.local/state/natkit/relay"))
    metrics: tuple[str, int] | None = None
    pool_size: int = 8
    max_pending_visitors: int = 512
    max_agents: int = 1024
    grace: float = 60.0
    allow_plaintext_data: bool = True
    stun: bool = True  # answer STUN Binding requests on UDP at the listen address
    max_rooms_per_token: int = 64
    max_p2p_paths_per_token: int = 64
    max_unauthenticated_per_ip: int = 64
    max_unauthenticated: int = 4096
    failed_logins: int = 10  # per address within a minute, then it is refused for a minute


class RelayServer:
    def __init__(self, cfg: RelayConfig) -> None:
        self.cfg = cfg
        if cfg.cert is None or cfg.key is None:
            cfg.cert, cfg.key = ensure_self_signed(cfg.state_dir)
        self.fingerprint = fingerprint_file(cfg.cert)
        self.cipher = seal.preferred_cipher()  # offered to agents in WELCOME
        self.ssl = server_context(cfg.cert, cfg.key)
        tenants = [Tenant(label, tok, cfg.default_quota) for label, tok in cfg.tokens.items()]
        tenants += cfg.tenants
        labels = [t.label for t in tenants]
        if len(set(labels)) != len(labels) or len({t.token for t in tenants}) != len(tenants):
            raise ValueError("every tenant needs its own label and its own token")
        if cfg.domain:
            cfg.domain = sniff.normalize_hostname(cfg.domain)
        self.tenants = {control.token_id(t.token): t for t in tenants}
        self.pool_size, self.max_pending_visitors = cfg.pool_size, cfg.max_pending_visitors
        self.stats: collections.Counter[str] = collections.Counter()
        self.refusals: collections.Counter[str] = collections.Counter()  # by access policy
        self.names: TunnelNames[ServedTunnel] = TunnelNames(
            time.monotonic, cfg.grace, self._reserved_hosts(tenants)
        )
        self.tickets: TicketBook[ServedTunnel] = TicketBook(time.monotonic, TICKET_TTL)
        self.limits = AddressLimits(
            time.monotonic, per_address=cfg.max_unauthenticated_per_ip,
            total=cfg.max_unauthenticated, failures=cfg.failed_logins,
        )  # fmt: skip
        self.sessions: set[AgentSession] = set()  # authenticated
        self.instances: dict[tuple[str, str], AgentSession] = {}  # (tenant, instance) -> live
        self.joins: set[Any] = set()  # visitors joined to data connections (abort on close)
        self._unadmitted: set[AgentSession] = set()  # sessions holding an admission
        self._tasks: set[asyncio.Task[Any]] = set()
        self._acceptors: list[Acceptor] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._entry = ListenPort(self)
        self.listen_port = cfg.listen_port
        self.http_port = cfg.http_port
        self.https_port = cfg.https_port
        self.stun: stunserver.StunResponder | None = None
        self.rooms = Rooms(
            self.stats, self.spawn,
            max_rooms_per_token=cfg.max_rooms_per_token,
            max_paths_per_token=cfg.max_p2p_paths_per_token,
        )  # fmt: skip

    def _reserved_hosts(self, tenants: list[Tenant]) -> dict[str, str]:
        out: dict[str, str] = {}
        for tenant in tenants:
            for name in tenant.reserve:
                try:
                    host = self._full_host(name)
                except ProtocolError as exc:
                    raise ValueError(f"token {tenant.label!r}: reserve={name}: {exc}") from None
                if out.get(host, tenant.label) != tenant.label:
                    raise ValueError(f"host name {host} is reserved for two tokens")
                out[host] = tenant.label
        return out

    def _full_host(self, name: str) -> str:
        domain = self.cfg.domain
        label = sniff.normalize_hostname(name)
        if domain and not (label == domain or label.endswith("." + domain)):
            label = sniff.normalize_hostname(f"{label}.{domain}")
        return label

    # ---- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        sock = await self._listen_main()
        self.listen_port = sock.getsockname()[1]
        self._acceptors.append(Acceptor(sock, self._entry.on_connection, self.stats))
        if self.cfg.http_port is not None:
            s = listen(self.cfg.listen_host, self.cfg.http_port)
            self.http_port = s.getsockname()[1]
            self._acceptors.append(
                Acceptor(s, functools.partial(self._by_name, "http"), self.stats)
            )
        if self.cfg.https_port is not None:
            s = listen(self.cfg.listen_host, self.cfg.https_port)
            self.https_port = s.getsockname()[1]
            self._acceptors.append(Acceptor(s, functools.partial(self._by_name, "tls"), self.stats))
        if self.cfg.metrics is not None:
            serve = functools.partial(metrics.serve, self)
            self._servers.append(await asyncio.start_server(serve, *self.cfg.metrics))
        self.spawn(self._housekeeping())

    async def _listen_main(self) -> socket.socket:
        """The listen port (TCP), and STUN on UDP at the same address: with port 0, a port
        free for both (an ephemeral TCP port may be taken on UDP)."""
        host, port = self.cfg.listen_host, self.cfg.listen_port
        for _ in range(8 if port == 0 else 1):
            sock = listen(host, port)
            if not self.cfg.stun:
                return sock
            try:
                self.stun = await stunserver.serve(host, sock.getsockname()[1], self.stats)
            except OSError as exc:
                sock.close()
                if port == 0:
                    continue
                why = f"{exc.strerror} (another STUN server there? use --no-stun)"
                raise OSError(
                    exc.errno, f"cannot answer STUN on UDP {host}:{port}: {why}"
                ) from None
            return sock
        raise OSError(0, f"no port free for both TCP and UDP (STUN) on {host}")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for join in list(self.joins):
            join.abort()
        if self.stun is not None:
            self.stun.close()
        self.rooms.close()
        for acceptor in self._acceptors:
            acceptor.close()
        for srv in self._servers:
            srv.close()
        for session in list(self.sessions | self._unadmitted):
            session.abort()
            for t in list(session.tunnels.values()):
                t.close()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.stats["task_errors"] += 1
            log.error("relay task failed: %r", exc, exc_info=exc)

    # ---- control sessions --------------------------------------------------------------------

    def new_session(self, peer_ip: str, deadline: float) -> AgentSession:
        session = AgentSession(self, peer_ip, deadline)
        self._unadmitted.add(session)
        return session

    def _release_admission(self, s: AgentSession) -> None:
        if s in self._unadmitted:
            self._unadmitted.discard(s)
            self.limits.done(s.peer_ip)

    def handshake_done(self, s: AgentSession) -> None:
        self._release_admission(s)

    def authenticate(self, s: AgentSession, msg: M.Auth) -> str:
        """'' when ``msg`` proves a token we accept, else ``code: why``."""
        if self.limits.blocked(s.peer_ip):
            # Not "auth": the agent would give up, and its address may be shared (CGNAT).
            return "busy: too many failed logins from this address: try again later"
        tenant = self.tenants.get(msg.token_id)
        if tenant is None or not control.check_mac(
            tenant.token, s.nonce, self.fingerprint, msg.instance, msg.resume, msg.mac
        ):
            self.stats["auth_failures"] += 1
            line = self.limits.login_failed(s.peer_ip)
            if line:
                log.warning("%s", line)
            return "auth: the relay does not accept this token"
        digest = control.resume_digest(msg.resume)
        previous = self.instances.get((tenant.label, msg.instance))
        if previous is not None and previous.resume_digest != digest:
            return "auth: this agent instance is connected already (another resumption secret)"
        if len(self.sessions) >= self.cfg.max_agents:
            return "busy: the relay has too many agents connected"
        mine = sum(1 for x in self.sessions if x.tenant is tenant and x is not previous)
        if mine >= tenant.quota.sessions:
            return (f"limit: token {tenant.label!r} has {mine} agents connected, its quota "
                    f"is {tenant.quota.sessions}")  # fmt: skip
        if previous is not None:
            # The same agent process on a new connection before we noticed the old one die.
            log.info("agent %s of %s is back on a new connection", msg.instance[:8], tenant.label)
            self.stats["sessions_resumed"] += 1
            previous.abort()
            self._end_session(previous)
        s.tenant, s.token_id, s.resume_digest = tenant, msg.token_id, digest
        s.holder = Holder(tenant.label, msg.instance)
        s.plaintext_ok = self.cfg.allow_plaintext_data
        self.sessions.add(s)
        self.instances[(tenant.label, msg.instance)] = s
        self.limits.vouch(s.peer_ip)
        return ""

    def session_ended(self, s: AgentSession) -> None:
        self._release_admission(s)
        self._end_session(s)

    def _end_session(self, s: AgentSession) -> None:
        if s not in self.sessions:
            return
        self.sessions.discard(s)
        self.limits.unvouch(s.peer_ip)
        if s.holder is not None and self.instances.get((s.holder.tenant, s.holder.instance)) is s:
            del self.instances[(s.holder.tenant, s.holder.instance)]
        self.rooms.session_ended(s)
        for t in list(s.tunnels.values()):
            self.close_tunnel(t, keep=True)  # the address waits for the agent's return
        s.tunnels.clear()
        s.ended = True

    def rendezvous_message(self, s: AgentSession, msg: M.Message) -> None:
        self.rooms.on_message(s, msg)

    def p2p_data_conn(self, conn: socket.socket, ticket: str) -> bool:
        if not self.rooms.has_ticket(ticket):
            return False
        self.rooms.data_conn(conn, ticket)
        return True

    def p2p_sealed_key(self, handle: str) -> tuple[str, bytes] | None:
        return self.rooms.sealed_key(handle)

    def answers_stun(self) -> bool:
        return self.cfg.stun

    def interference(self, tunnel: ServedTunnel, what: str) -> None:
        """Someone on the path between an agent and the relay meddles with its data
        connections: tell the agent (over its TLS control connection)."""
        self.stats["interference"] += 1
        now = time.monotonic()
        if now - tunnel.last_notice < NOTICE_INTERVAL:  # one notice per interval is enough
            tunnel.notices_held += 1
            return
        if tunnel.notices_held:
            what += f" (and {tunnel.notices_held} more since the last notice)"
        tunnel.last_notice, tunnel.notices_held = now, 0
        log.warning("tunnel %s of %s: %s", tunnel.id, tunnel.session, what)
        tunnel.session.send(M.Notice(code="interference", message=(
            f"tunnel {tunnel.id}: {what}. Something on the path between this agent and the "
            "relay is tampering with its connections; visitors' data stays sealed")[:M.MAX_STRING]))  # fmt: skip

    # ---- tunnels -------------------------------------------------------------------------------

    def open_tunnel(self, s: AgentSession, msg: M.Open) -> None:
        assert s.tenant is not None and s.holder is not None
        tenant = s.tenant

        def refuse(code: str, message: str) -> None:
            s.send(M.Closed(tunnel=msg.tunnel, code=code, message=message[: M.MAX_STRING]))

        if msg.tunnel in s.tunnels:
            refuse("exists", f"tunnel {msg.tunnel} is already open on this connection")
            return
        if msg.access is not None and msg.access.version != ACCESS_VERSION:
            # Never serve a tunnel with a policy this relay cannot enforce.
            refuse("refused", f"this relay knows access policy version {ACCESS_VERSION}, "
                   f"the agent sent version {msg.access.version}: upgrade the relay")  # fmt: skip
            return
        if msg.plaintext and not self.cfg.allow_plaintext_data:
            refuse("refused", "this relay refuses plaintext data connections: drop "
                   "--plaintext-data (data connections are sealed by default)")  # fmt: skip
            return
        live = sum(len(x.tunnels) for x in self.sessions if x.tenant is tenant)
        if live >= tenant.quota.tunnels:
            refuse("limit", f"token {tenant.label!r} has {live} tunnels open, its quota is "
                   f"{tenant.quota.tunnels}")  # fmt: skip
            return
        try:
            tunnel = self._open_tcp(s, msg) if msg.kind == "tcp" else self._open_named(s, msg)
        except NameRefused as exc:
            refuse("refused", str(exc))
            return
        s.tunnels[msg.tunnel] = tunnel
        s.send(M.Opened(tunnel=msg.tunnel, public=tunnel.public))
        tunnel.refill()
        log.info("tunnel %s (%s) for %s at %s", msg.tunnel, msg.kind, tenant.label, tunnel.public)
        if tunnel.gate is not None:
            log.info("tunnel %s access: %s", msg.tunnel, tunnel.gate.policy.describe())

    def _room_for(self, s: AgentSession, key: str, kind: str, quota: int) -> None:
        """Make room under the tenant's quota for a new ``key``: its oldest reservation
        gives way; NameRefused when it holds its quota live."""
        assert s.tenant is not None
        claim = self.names.get(key)
        if claim is not None and claim.holder.tenant == s.tenant.label:
            return  # its own already: no new claim
        label = s.tenant.label
        while self.names.count(label, kind) >= quota:
            if not self.names.evict_oldest_reservation(label, kind):
                what = "public ports" if kind == "tcp" else "host names"
                raise NameRefused(
                    f"token {label!r} holds {quota} {what}, its quota: close a tunnel first"
                )
            self.stats["reservations_evicted"] += 1

    def _displace(self, key: str, s: AgentSession, takeover: bool) -> None:
        """Close the live tunnel ``key`` belongs to, before it is given to ``s``."""
        claim = self.names.get(key)
        if claim is None or claim.tunnel is None:
            return
        old = claim.tunnel
        if old.session is s:
            raise NameRefused(f"{old.public} is open on this connection already (tunnel {old.id})")
        old.session.tunnels.pop(old.id, None)
        self.close_tunnel(old, keep=False)
        if claim.holder != s.holder:  # taken over, not the same agent back
            self.stats["takeovers"] += 1
            old.session.send(M.Closed(tunnel=old.id, code="taken-over", message=(
                f"{old.public} was taken over by another agent of this token (--takeover)")))  # fmt: skip

    @property
    def listens_everywhere(self) -> bool:
        return self.cfg.listen_host in ("", "0.0.0.0", "::")

    def public_host_for(self, s: AgentSession) -> str:
        """The host of ``s``'s public ports: --public-host, else the listen host, else (a
        wildcard listen) the relay address the agent itself reached, which visitors on the
        agent's side of the network can reach too."""
        if self.cfg.public_host:
            return self.cfg.public_host
        host = self.cfg.listen_host
        if self.listens_everywhere and s.local_ip:
            host = s.local_ip
        return f"[{host}]" if ":" in host else host

    def _open_tcp(self, s: AgentSession, msg: M.Open) -> ServedTunnel:
        assert s.tenant is not None and s.holder is not None
        low, high = self.cfg.ports
        if msg.port and not low <= msg.port <= high:
            if msg.exact:
                raise NameRefused(f"port {msg.port} is outside the relay's range {low}-{high}")
            preferred: list[int] = []
        else:
            preferred = [msg.port] if msg.port else []
        # A takeover is of the port asked for, never of whichever port a search reaches.
        takeover = msg.takeover and msg.exact
        if msg.exact:
            candidates = preferred
        else:  # the preference, then free ports, then the tenant's own reservations
            free: list[int] = []
            claimed: list[int] = []
            for p in range(low, high + 1):
                if p not in preferred:
                    (free if self.names.get(port_key(p)) is None else claimed).append(p)
            candidates = preferred + free + claimed
        for p in candidates:
            key = port_key(p)
            why = self.names.problem(key, s.holder, takeover=takeover)
            if why:
                if msg.exact:
                    raise NameRefused(why)
                continue
            claim = self.names.get(key)
            if claim is not None and claim.tunnel is not None and claim.tunnel.session is s:
                if msg.exact:
                    raise NameRefused(f"port {p} is open on this connection already")
                continue
            self._displace(key, s, takeover)  # its listener must go before ours can bind
            try:
                sock = listen(self.cfg.listen_host, p)
            except OSError:
                if msg.exact:
                    raise NameRefused(f"port {p} is in use on the relay") from None
                continue
            try:
                self._room_for(s, key, "tcp", s.tenant.quota.ports)
            except NameRefused:
                sock.close()
                raise
            host = self.public_host_for(s)
            tunnel = ServedTunnel(self, s, msg.tunnel, "tcp", key, f"{host}:{p}",
                                  plaintext=msg.plaintext, access=msg.access)  # fmt: skip
            tunnel.acceptor = Acceptor(sock, tunnel.visitor, self.stats)
            self.names.claim(key, s.holder, tunnel, takeover=takeover)
            return tunnel
        raise NameRefused("no free public port on the relay")

    def _open_named(self, s: AgentSession, msg: M.Open) -> ServedTunnel:
        assert s.tenant is not None and s.holder is not None
        port = self.http_port if msg.kind == "http" else self.https_port
        if port is None or not self.cfg.domain:
            flag = "--http-port" if msg.kind == "http" else "--https-port"
            raise NameRefused(f"this relay does not serve {msg.kind} tunnels (no {flag}/--domain)")
        try:
            host = self._full_host(msg.name or secrets.token_hex(4))
        except ProtocolError as exc:
            raise NameRefused(f"bad host name {msg.name!r}: {exc}") from None
        if host == self.cfg.domain:
            raise NameRefused(f"the relay's own domain {host} cannot be a tunnel's name")
        key = host_key(host)
        why = self.names.problem(key, s.holder, takeover=msg.takeover)
        if why:
            raise NameRefused(why)
        self._room_for(s, key, "host", s.tenant.quota.hostnames)
        self._displace(key, s, msg.takeover)
        scheme, default = ("http", 80) if msg.kind == "http" else ("https", 443)
        public = f"{scheme}://{host}" + ("" if port == default else f":{port}")
        tunnel = ServedTunnel(self, s, msg.tunnel, msg.kind, key, public,
                              plaintext=msg.plaintext, access=msg.access)  # fmt: skip
        self.names.claim(key, s.holder, tunnel, takeover=msg.takeover)
        return tunnel

    def close_tunnel(self, t: ServedTunnel, *, keep: bool) -> None:
        self.names.release(t.key, t, keep=keep)
        t.close()

    async def dial(self, s: AgentSession, msg: M.Dial) -> None:
        """Dial back an address for the agent (is its port mapping reachable from outside?).

        Only the address the agent's own connection comes from: the relay is no port scanner
        or proxy. (Behind double NAT the mapped address differs, and is unreachable anyway.)
        """
        error = ""
        try:
            same = ipaddress.ip_address(msg.host) == ipaddress.ip_address(s.peer_ip)
        except ValueError:
            same = False
        if not same:
            self.stats["dials_refused"] += 1
            error = f"{msg.host[:64]} is not the address this agent connects from ({s.peer_ip})"
        elif not 0 < msg.port < 65536:
            error = f"port {msg.port} is not a TCP port"
        else:
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection(s.peer_ip, msg.port), 3.0)
                w.close()
            except (OSError, asyncio.TimeoutError) as exc:
                error = str(exc) or type(exc).__name__
        s.send(M.Dialed(id=msg.id, ok=not error, error=error[:200]))

    # ---- visitors by name --------------------------------------------------------------------

    def _by_name(self, kind: str, conn: socket.socket, addr: Any) -> None:
        """A visitor to the HTTP or HTTPS port: routed at once when its request head or
        ClientHello came with it, else watched until it does (or times out)."""
        try:
            host, seen = routing.peek_host(conn, kind)
        except BlockingIOError:
            host, seen = None, 0
        except (OSError, ProtocolError) as exc:
            self._unroutable(conn, kind, str(exc))
            return
        if host is None:
            routing.SlowVisitor(conn, addr, kind, seen, self._route, self._unroutable)
            return
        self._route(conn, addr, kind, host)

    def _route(self, conn: socket.socket, addr: Any, kind: str, host: str) -> None:
        tunnel = self.names.tunnel(host_key(host))
        if tunnel is None or tunnel.kind != kind:
            self.stats["unrouted_visitors"] += 1
            if kind == "http":
                routing.answer(conn, b"404 Not Found", b"no tunnel for this host\n")
            conn.close()
            return
        tunnel.visitor(conn, addr)

    def _unroutable(self, conn: socket.socket, kind: str, why: str) -> None:
        if not why:
            self.stats["slow_visitors"] += 1
        else:
            log.info("refusing a %s visitor: %s", kind, why)
            self.stats["bad_visitors"] += 1
            if kind == "http":
                routing.answer(conn, b"400 Bad Request", b"")
        conn.close()

    # ---- housekeeping --------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(5)
            try:
                self._tidy()
            except Exception:  # a bug here must not stop expiry for good
                log.exception("relay housekeeping failed")

    def _tidy(self) -> None:
        now = time.monotonic()
        self.names.expire()
        self.limits.expire()
        for tunnel in self.tickets.expire():
            self.stats["tickets_expired"] += 1
            tunnel.refill()
        for s in list(self.sessions):
            if now - s.last_seen > IDLE_TIMEOUT:
                log.info("agent %s silent for %.0f s: dropping", s, now - s.last_seen)
                s.abort()
        self._give_back_memory()

    def _give_back_memory(self) -> None:
        """After a flood of unauthenticated connections (TLS handshakes cost ~50 KB each
        in OpenSSL and Python), hand the freed heap back to the system: glibc keeps it."""
        peak = self.limits.peak
        if peak >= 64 and self.limits.unauthenticated <= peak // 8:  # the flood is over
            trim_heap()
            self.limits.reset_peak()


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


__all__ = ["RelayConfig", "RelayServer"]
