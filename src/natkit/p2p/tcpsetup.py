"""The direct TCP path's part in setting up a P2P session (:mod:`natkit.p2p.peer`).

Everything here happens after both peers proved the secret. The listener opens its TCP
port, asks its router for a TCP mapping of it and learns the port's public address by STUN
over TCP (both within TCP_BUDGET, while ICE gathers), and announces them in its sealed
offer: ``"tcp"`` (mapping first, then each host address) and ``"punch"`` (the STUN answer).
The connector opens a port of its own for reverse dials and asks its router to map it (in
the background: it is needed only at the first forward), then builds its
:class:`~natkit.p2p.tcppath.TcpDialer` from the listener's offer. The listener answers the
connector's dials (:class:`~natkit.p2p.tcppunch.DialServer`) only towards the addresses
the connector announced as ICE candidates.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable
from typing import Any

from natkit.errors import NatkitError
from natkit.p2p import tcppath
from natkit.p2p.candidates import IceDescription, address_scope
from natkit.p2p.ice_gather import release
from natkit.p2p.tcppath import TcpDialer, TcpEndpoint
from natkit.p2p.tcppunch import (
    Addr,
    DialAcceptor,
    DialBack,
    DialServer,
    OpenStream,
    shared_port_socket,
    stun_tcp,
)
from natkit.portmap.manager import KeptMapping
from natkit.stun.address import resolve

log = logging.getLogger("natkit.p2p")

TCP_BUDGET = 0.5  # the listener's TCP mapping and STUN (ICE gathering's budget for its own)
CONNECTOR_MAP_BUDGET = 2.0  # the connector's mapping for reverse dials (in the background)
DIAL_TYPES = ("host", "srflx", "prflx")  # a relay candidate is the TURN server's: not the peer


class TcpSide:
    """One peer's direct-TCP-path state for one session; :meth:`close` undoes it all."""

    def __init__(self, role: str, key: bytes, *, stun: tuple[str, int], port_mapping: bool) -> None:
        self.role, self.key, self.stun = role, key, stun
        self.port_mapping = port_mapping
        self.endpoint: TcpEndpoint | None = None  # listener
        self.dial_server: DialServer | None = None  # listener
        self.dialer: TcpDialer | None = None  # connector
        self.acceptor: DialAcceptor | None = None  # connector
        self.kept: KeptMapping | None = None  # the router's mapping of our TCP port
        self.own_ipv6: str | None = None  # our global IPv6 address (no NAT: our public one)
        self.own_public: set[str] = set()  # our router's public address (mapping, STUN)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._mapping: asyncio.Task[Addr | None] | None = None
        self._stun: asyncio.Task[Addr | None] | None = None

    def start(self) -> None:
        """Open our TCP port and start asking about it (router, STUN) while ICE gathers."""
        self.own_ipv6 = _global_ipv6()
        try:
            if self.role == "listen":
                self.endpoint = TcpEndpoint.open(self.key, ipv6=self.own_ipv6 is not None)
                port = self.endpoint.port
            else:
                self.acceptor = DialAcceptor.open()
                port = self.acceptor.port
        except OSError as exc:
            log.warning("no direct TCP path: cannot listen on TCP: %s", exc)
            return
        budget = TCP_BUDGET if self.role == "listen" else CONNECTOR_MAP_BUDGET
        if self.port_mapping:
            self._mapping = self._spawn(self._map(port, budget))
        if self.role == "listen":
            self._stun = self._spawn(self._public(port))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _map(self, port: int, budget: float) -> Addr | None:
        try:
            # (the outer limit a little later than the router's own: a mapping the router
            # made just in time is kept, and released with the others, not left behind)
            kept, ip, public = await asyncio.wait_for(tcppath.map_port(port, budget), budget + 0.5)
        except (NatkitError, OSError, asyncio.TimeoutError) as exc:
            log.info("no TCP port mapping for the direct TCP path: %s", exc or "no answer")
            return None
        self.kept = kept
        return ip, public

    async def _public(self, port: int) -> Addr | None:
        """The public address of our TCP port (the punch endpoint), by STUN over TCP."""
        try:
            # IPv4: the endpoint's IPv6 address is its own public one (no STUN needed)
            server = await resolve(self.stun, family=socket.AF_INET, timeout=TCP_BUDGET)
            sock = shared_port_socket(socket.AF_INET, port)
            return await stun_tcp(sock, server, TCP_BUDGET)
        except (NatkitError, OSError) as exc:
            log.info("no public address for the TCP port (no TCP hole punching): %s", exc)
            return None

    async def offer(self, hosts: list[str]) -> dict[str, Any]:
        """What the sealed offer says: (listener) where our TCP port may be reached, and
        its public addresses to punch to; (connector) our IPv6 address, to be dialled at."""
        if self.endpoint is None:
            return {"tcp6": self.own_ipv6} if self.own_ipv6 else {}
        v6 = [self.own_ipv6] if self.own_ipv6 else []
        mapped = await _result(self._mapping)
        public = await _result(self._stun)
        self.own_public = {a[0] for a in (mapped, public) if a}
        punch = ([public] if public else []) + self.endpoint.endpoints(v6)
        return {
            "tcp": ([mapped] if mapped else []) + self.endpoint.endpoints([*hosts, *v6]),
            "punch": [list(e) for e in punch],
        }

    def take(
        self,
        body: dict[str, Any],
        hosts: list[str],
        remote: IceDescription,
        open_stream: OpenStream,
    ) -> None:
        """The peer's offer: the listener learns where it may dial, the connector how it
        may reach the listener."""
        if self.endpoint is not None:
            announced = [c.host for c in remote.candidates if c.type in DIAL_TYPES]
            if isinstance(body.get("tcp6"), str):
                announced.append(body["tcp6"])
            local = [*hosts, *([self.own_ipv6] if self.own_ipv6 else [])]
            self.dial_server = DialServer(
                self.key, self.endpoint.port, dial_targets(announced, local, self.own_public),
                self.endpoint.adopt, self.own_ipv6,
            )  # fmt: skip
            return
        if self.role != "connect":
            return
        endpoints = tcppath.usable_endpoints(body.get("tcp"), hosts)
        punch = tcppath.usable_endpoints(body.get("punch"), hosts)
        dialback = DialBack(
            open_stream,
            key=self.key,
            stun_server=self.stun,
            punch_to=punch,
            own_ipv6=self.own_ipv6,
            acceptor=self.acceptor,
            mapped=self._mapped_address if self._mapping is not None else None,
        )
        if endpoints or punch or self._mapping is not None:  # (a mapping may still come)
            self.dialer = TcpDialer(self.key, endpoints, dialback)

    async def _mapped_address(self) -> Addr | None:
        return await _result(self._mapping)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.dialer is not None:
            self.dialer.close()
        if self.endpoint is not None:
            self.endpoint.close()
        if self.acceptor is not None:
            self.acceptor.close()
        if self.kept is not None:
            kept, self.kept = self.kept, None
            await release(kept)


def _global_ipv6() -> str | None:
    """This host's global IPv6 address, if it has one."""
    from natkit.portmap.pinhole_addr import global_ipv6

    try:
        return global_ipv6()
    except NatkitError:
        return None


async def _result(task: asyncio.Task[Addr | None] | None) -> Addr | None:
    """A budgeted task's answer (None if it had none, or was cancelled: the session is
    closing; our own cancellation is not swallowed)."""
    if task is None:
        return None
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if task.cancelled():
            return None
        raise
    except Exception:
        return None


def dial_targets(announced: list[str], local: list[str], public: Iterable[str]) -> list[str]:
    """The peer's announced addresses the listener may dial: global ones (never loopback,
    link-local — cloud metadata services live there —, private, multicast or reserved
    addresses), none on the network of one of our own interface addresses ``local`` (a /24
    or /64: our LAN's neighbours; a peer on our LAN reaches our port without a dial), and
    none of our own public addresses ``public`` (a hairpin to ourselves)."""
    ours = {_canonical(h) for h in [*local, *public]}
    kept: list[str] = []
    for host in announced:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if address_scope(host) != "global" or ip.is_multicast or ip.is_reserved:
            continue
        if ip.compressed in ours or tcppath.on_our_networks(host, local):
            continue
        kept.append(ip.compressed)
    return list(dict.fromkeys(kept))


def _canonical(host: str) -> str:
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host
