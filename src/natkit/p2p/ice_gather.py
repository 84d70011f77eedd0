"""ICE candidate gathering under one deadline: host, then STUN, TURN and the router at once.

Host sockets come first (every local address, or the ones given). Then, concurrently: a
Binding request to the STUN server from each IPv4 host socket (server-reflexive), an
allocation on the TURN server (relayed; a 438 Stale Nonce is retried once), and a UDP port
mapping of the host socket's port on the router (PCP, NAT-PMP or UPnP, kept alive by
:class:`~natkit.portmap.manager.KeptMapping`; the port-mapped candidate). Whatever has
answered by the deadline is used; the rest is cancelled and written in the report. No
failure of a server or the router is fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from typing import Any, TypeVar

from aioice import Candidate, stun
from aioice.ice import StunProtocol
from aioice.turn import UDP_SOCKET_BUFFER_SIZE, create_turn_endpoint

from natkit.errors import NatkitError
from natkit.net.routes import default_gateway, local_address_for, read_routes_async
from natkit.p2p.candidates import (
    Addr,
    IceCandidate,
    describe,
    host_candidate,
    port_mapped_candidate,
    relay_candidate,
    srflx_candidate,
    without_redundant,
)
from natkit.p2p.errors import P2PError
from natkit.p2p.ice_conn import IceConnection, PeerProtocol, mapped_address
from natkit.p2p.ice_options import IceOptions
from natkit.portmap.manager import KeptMapping
from natkit.portmap.mapping import PortMapping

log = logging.getLogger("natkit.p2p.ice")
T = TypeVar("T")

# A router answers PCP/NAT-PMP in milliseconds and SSDP within ~0.1 s; one that stays
# silent (no port mapping at all) must not hold up the connection for the whole gathering.
PORTMAP_BUDGET = 0.5
# Short, so that a mapping whose creation was cut off by the deadline (we never learn of
# it) does not outlive us by much; the kept mapping is renewed at half of it.
MAPPING_LEASE = 120
RELEASE_TIMEOUT = 3.0  # removing the router's mapping on close


def _succeeded(job: asyncio.Task[Any]) -> bool:
    return job.done() and not job.cancelled() and job.exception() is None


def _as_addr(value: object, what: str) -> Addr:
    if isinstance(value, tuple) and len(value) >= 2:
        host, port = value[0], value[1]
        if isinstance(host, str) and isinstance(port, int) and 0 < port < 65536:
            with contextlib.suppress(ValueError):
                return (str(ipaddress.ip_address(host)), port)
    raise P2PError(f"the TURN server gave no usable {what} ({value!r})")


async def _resolve(server: Addr, transport: str) -> Addr:
    host, port = server
    with contextlib.suppress(ValueError):
        return (str(ipaddress.ip_address(host)), port)
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, family=socket.AF_INET, type=kind
    )
    if not infos:
        raise P2PError(f"{host} has no IPv4 address")
    return (str(infos[0][4][0]), int(infos[0][4][1]))


class Gatherer:
    """Host candidates, then STUN, TURN and the router at once, under one deadline."""

    def __init__(self, options: IceOptions) -> None:
        self.options = options
        self.report: dict[str, str] = {}  # source -> what it gave, or why it gave nothing
        self.failed: set[str] = set()
        self.port_mapped: list[Candidate] = []
        self.kept: list[KeptMapping] = []

    async def run(
        self, conn: IceConnection, addresses: list[str]
    ) -> tuple[list[StunProtocol], list[Candidate]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.gather_timeout
        if self.options.host_addresses is not None:
            addresses = list(self.options.host_addresses)
        hosts = await self._bind_hosts(conn, addresses)
        self.report["host"] = describe(IceCandidate.from_aioice(p.local_candidate) for p in hosts)
        v4 = [p for p in hosts if ipaddress.ip_address(p.local_candidate.host).version == 4]
        opts = self.options
        stun_job = asyncio.create_task(self._srflx(v4)) if opts.stun_server and v4 else None
        turn_job = asyncio.create_task(self._relay(conn)) if opts.turn else None
        map_job = (
            asyncio.create_task(asyncio.wait_for(self._port_map(v4), PORTMAP_BUDGET))
            if opts.port_mapping and v4
            else None
        )
        jobs = [j for j in (stun_job, turn_job, map_job) if j is not None]
        try:
            try:
                if jobs:
                    await asyncio.wait(jobs, timeout=max(0.0, deadline - loop.time()))
            finally:
                for job in jobs:
                    job.cancel()  # a no-op for those that are done
                # Let the cancelled ones clean up (TURN closes its socket, the mapper its own).
                await asyncio.gather(*jobs, return_exceptions=True)
        except BaseException:  # gather_candidates() itself was cancelled: leave nothing open
            for protocol in hosts:
                protocol.transport.close()
            if turn_job is not None and _succeeded(turn_job):
                turn_job.result().transport.close()
            if map_job is not None and _succeeded(map_job):
                self.kept.append(map_job.result()[1])  # close() removes it
            raise
        srflx = self._outcome("stun", stun_job) or []
        relay = self._outcome("turn", turn_job)
        mapped = self._outcome("port mapping", map_job)
        host_candidates = [p.local_candidate for p in hosts]
        if mapped is not None:
            self.port_mapped.append(mapped[0])
            self.kept.append(mapped[1])
        srflx, self.port_mapped = without_redundant(host_candidates, srflx, self.port_mapped)
        protocols: list[StunProtocol] = list(hosts)
        candidates = host_candidates + self.port_mapped + srflx
        if relay is not None:
            protocols.append(relay)
            candidates.append(relay.local_candidate)
        return protocols, candidates

    def _outcome(self, name: str, job: asyncio.Task[T] | None) -> T | None:
        if job is None:
            return None
        if job.cancelled():
            self.failed.add(name)
            self.report[name] = f"no answer within {self.options.gather_timeout:g} s"
            return None
        exc = job.exception()
        if exc is None:
            return job.result()
        self.failed.add(name)
        self.report[name] = f"failed: {exc}"
        expected = (NatkitError, OSError, stun.TransactionError)
        log.log(logging.INFO if isinstance(exc, expected) else logging.WARNING,
                "ICE gathering: %s failed: %r", name, exc)  # fmt: skip
        return None

    async def _bind_hosts(self, conn: IceConnection, addresses: list[str]) -> list[StunProtocol]:
        loop = asyncio.get_running_loop()
        hosts: list[StunProtocol] = []
        for address in addresses:
            try:
                transport, protocol = await loop.create_datagram_endpoint(
                    lambda: PeerProtocol(conn), local_addr=(address, 0)
                )
            except OSError as exc:
                log.info("ICE gathering: cannot bind %s: %s", address, exc)
                continue
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_SOCKET_BUFFER_SIZE)
            name = transport.get_extra_info("sockname")
            protocol.local_candidate = host_candidate((str(name[0]), int(name[1])))
            hosts.append(protocol)
        if not hosts:
            raise P2PError(f"ICE found no local address to use (tried {addresses or 'none'})")
        return hosts

    async def _srflx(self, hosts: list[StunProtocol]) -> list[Candidate]:
        assert self.options.stun_server is not None
        server = await _resolve(self.options.stun_server, "udp")

        async def ask(protocol: StunProtocol) -> Candidate:
            request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
            response, _ = await protocol.request(request, server)
            mapped = mapped_address(response)
            if mapped is None:
                raise P2PError(f"the STUN server {server[0]}:{server[1]} gave no usable address")
            base = protocol.local_candidate
            return srflx_candidate(mapped, (base.host, base.port))

        found = await asyncio.gather(*(ask(p) for p in hosts), return_exceptions=True)
        candidates = [c for c in found if isinstance(c, Candidate)]
        if not candidates:
            raise next(e for e in found if isinstance(e, BaseException))
        self.report["stun"] = describe(IceCandidate.from_aioice(c) for c in candidates)
        return candidates

    async def _relay(self, conn: IceConnection) -> StunProtocol:
        turn = self.options.turn
        assert turn is not None
        server = await _resolve((turn.host, turn.port), turn.transport)

        async def allocate() -> StunProtocol:
            _, protocol = await create_turn_endpoint(
                lambda: PeerProtocol(conn),
                server_addr=server,
                username=turn.username,
                password=turn.password,
                transport=turn.transport,
            )
            return protocol

        try:
            try:
                protocol = await allocate()
            except stun.TransactionFailed as exc:
                if exc.response.error_code != 438:
                    raise
                log.info("TURN server %s:%d: 438 Stale Nonce, allocating again", *server)
                protocol = await allocate()
        except stun.TransactionFailed as exc:
            code = exc.response.error_code
            hint = ": check the TURN user name and password" if code == 401 else ""
            raise P2PError(
                f"the TURN server {server[0]}:{server[1]} refused the allocation for user "
                f"{turn.username!r} ({exc}){hint}"
            ) from None
        try:
            relayed = _as_addr(protocol.transport.get_extra_info("sockname"), "relayed address")
            mapped = _as_addr(
                protocol.transport.get_extra_info("related_address"), "mapped address"
            )
        except P2PError:
            protocol.transport.close()
            raise
        protocol.local_candidate = relay_candidate(relayed, mapped)
        self.report["turn"] = f"relay {relayed[0]}:{relayed[1]}"
        return protocol

    async def _port_map(self, hosts: list[StunProtocol]) -> tuple[Candidate, KeptMapping]:
        gateway = self.options.gateway_ip or default_gateway(await read_routes_async())
        local_ip = local_address_for(gateway)
        base = next((p.local_candidate for p in hosts if p.local_candidate.host == local_ip), None)
        if base is None:
            raise P2PError(f"no host candidate on {local_ip}, the address towards {gateway}")
        mapping, kept = await keep_mapping(
            base.port,
            "udp",
            base.host,
            gateway_ip=self.options.gateway_ip,
            timeout=min(self.options.gather_timeout, PORTMAP_BUDGET),
        )
        self.report["port mapping"] = f"{mapping.method} {mapping.public_address}"
        public = (mapping.external_ip, mapping.external_port)
        return port_mapped_candidate(public, (base.host, base.port)), kept

    async def release(self) -> None:
        kept, self.kept = self.kept, []
        await asyncio.gather(*(release(k) for k in kept))


async def release(kept: KeptMapping) -> None:
    try:
        await asyncio.wait_for(kept.close(), RELEASE_TIMEOUT)
    except (NatkitError, asyncio.TimeoutError) as exc:
        log.warning("could not remove the router's port mapping: %s", exc or "no answer")


def _log_mapping_event(event: str, mapping: PortMapping, info: dict[str, Any]) -> None:
    if event == "restored" and info.get("changed"):
        # The peer knows the old address; an ICE restart would announce the new one.
        log.warning("the router's mapping moved to %s (was %s)", mapping.public_address,
                    info.get("previous"))  # fmt: skip
    elif event == "lost":
        log.info("the router lost the mapping %s: %s", mapping.public_address, info.get("reason"))


async def keep_mapping(
    port: int,
    protocol: str,
    internal_ip: str,
    *,
    gateway_ip: str | None,
    timeout: float,
    description: str = "natkit ice",
) -> tuple[PortMapping, KeptMapping]:
    """A router mapping of ``internal_ip:port`` kept alive, or an error when the router
    gives none that the peer can reach (the caller releases it with :func:`release`)."""
    kept = KeptMapping(
        port,
        protocol=protocol,
        lease=MAPPING_LEASE,
        description=description,
        gateway_ip=gateway_ip,
        timeout=timeout,
    )
    try:
        mapping = await kept.start()
    except BaseException:
        if kept.mapper is not None:  # start() leaves the chosen mapper open on failure
            kept.mapper.close()
        raise
    if not mapping.publicly_reachable or mapping.internal_ip != internal_ip:
        await release(kept)
        raise P2PError(f"the router's mapping is not usable: {mapping.reachability_note}")
    kept.on_event(_log_mapping_event)
    return mapping, kept
