"""aioice's ICE connection, extended: what natkit's :class:`~natkit.p2p.ice.IceAgent` runs on.

Hooks of :class:`aioice.Connection` that are overridden here (aioice 0.13; the unit tests
check that they still exist): candidate gathering is delegated to natkit's gatherer; the
controlling agent holds checks of relayed pairs for a grace period, so that a working
direct pair wins (aioice nominates whichever pair works first); consent freshness runs with
natkit's interval and lifetime and says when it expires; losing the selected pair's socket
is reported; received data is bounded and taken only from the peer's known addresses, and
can go straight to a handler (:meth:`IceConnection.set_data_handler`) and out through the
selected socket (:meth:`IceConnection.send_now`) without a task per datagram.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, cast

from aioice import Candidate, Connection, stun
from aioice.ice import CandidatePair, StunProtocol

from natkit.p2p.candidates import COMPONENT, Addr
from natkit.p2p.ice_options import IceOptions
from natkit.p2p.udp_drain import DatagramSender, SocketDrainer

log = logging.getLogger("natkit.p2p.ice")

MAX_QUEUED_BYTES = 4 * 1024 * 1024  # received data waiting for recv(), like a socket buffer

DownReason = Literal["consent-expired", "socket-lost", "closed"]


class PeerProtocol(StunProtocol):
    """aioice's socket protocol, taking data only from the peer's known addresses."""

    def __init__(self, owner: IceConnection) -> None:
        super().__init__(owner)
        self.owner = owner
        self.drainer: SocketDrainer | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.drainer = SocketDrainer(transport)
        self.drainer.take_over(transport, self._take_many, self.error_received)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.drainer is not None:
            self.drainer.close()
        super().connection_lost(exc)

    async def close(self) -> None:
        if self.drainer is not None:  # our reader stops now, as asyncio's does
            self.drainer.close()
        await super().close()

    def datagram_received(self, data: bytes | str, addr: tuple[Any, ...]) -> None:
        self._take(data, addr)
        if self.drainer is not None and self.owner._data_handler is not None:
            # Data flows to a handler, not a queue: read what else waits now.
            self.drainer.drain(self._take)

    def _take_many(self, datagrams: list[bytes], addr: tuple[Any, ...]) -> None:
        """The datagrams of one (GRO) read, all from ``addr``: :meth:`_take` each, with the
        checks that depend on the address made once."""
        if not self.owner.knows((str(addr[0]), int(addr[1]))):
            for data in datagrams:
                self._take(data, addr)
            return
        data_received, component = self.owner.data_received, self.local_candidate.component
        for data in datagrams:
            if data and data[0] & _NOT_STUN:
                data_received(data, component)  # as in _take
            else:
                self._take(data, addr)

    def _take(self, data: bytes | str, addr: tuple[Any, ...]) -> None:
        if isinstance(data, str):
            return
        peer = (str(addr[0]), int(addr[1]))
        if data and data[0] & _NOT_STUN and self.owner.knows(peer):
            # Not STUN, so aioice would only fail to parse it before handing it over as data:
            # straight to the data, once per datagram of a QUIC burst.
            self.owner.data_received(data, self.local_candidate.component)
            return
        if not self.owner.knows(peer) and not _parses_as_stun(data):
            self.owner.dropped += 1  # data from a stranger: aioice would deliver it
            return
        try:
            super().datagram_received(data, peer)
        except Exception as exc:  # aioice's parser lets struct.error out of some attributes
            self.owner.dropped += 1
            log.debug("dropped a malformed datagram from %s: %r", peer, exc)


# A STUN message's first two bits are zero (RFC 8489 section 5); QUIC sets the second (its
# fixed bit, RFC 9000 section 17), as RFC 7983's demultiplexing of a shared port relies on.
_NOT_STUN = 0xC0


def _parses_as_stun(data: bytes) -> bool:
    try:
        stun.parse_message(data)
    except Exception:
        return False
    return True


GatherFn = Callable[
    ["IceConnection", list[str]], Awaitable[tuple[list[StunProtocol], list[Candidate]]]
]
DownFn = Callable[[DownReason, str], None]


class IceConnection(Connection):
    """aioice's Connection with natkit's gathering, relay grace, consent and data limits."""

    def __init__(
        self, *, controlling: bool, options: IceOptions, gather: GatherFn, on_down: DownFn
    ) -> None:
        super().__init__(ice_controlling=controlling, use_ipv6=options.use_ipv6)
        self._gather = gather
        self._on_down = on_down
        self._consent_interval = options.consent_interval
        self._consent_lifetime = options.consent_lifetime
        self.relay_grace_until = 0.0  # loop time until which relay pairs are held
        self.consent_at = 0.0  # time.monotonic() of the last answered consent check
        self.dropped = 0
        self._queued_bytes = 0
        self._data_handler: Callable[[bytes], None] | None = None
        self._known_peers: set[Addr] = set()  # addresses knows() has found (the peer's)

    # -- gathering

    async def get_component_candidates(
        self, component: int, addresses: list[str], timeout: int = 5
    ) -> list[Candidate]:
        protocols, candidates = await self._gather(self, addresses)
        self._protocols += protocols  # aioice pairs the peer's candidates with these sockets
        return candidates

    # -- checks

    async def check_start(self, pair: CandidatePair) -> None:
        hold = self.relay_grace_until - asyncio.get_running_loop().time()
        if hold > 0 and self.ice_controlling and uses_relay(pair):
            # In progress, so that aioice's pacing loop moves on to the other pairs; if one
            # of them is nominated meanwhile, aioice cancels this task.
            self.check_state(pair, CandidatePair.State.IN_PROGRESS)
            await asyncio.sleep(hold)
        await super().check_start(pair)

    def selected_pair(self) -> CandidatePair | None:
        return self._nominated.get(COMPONENT)

    def knows(self, addr: Addr) -> bool:
        """Is ``addr`` the peer's: a candidate it announced or one learned from its checks
        (including checks that arrived before connect(), which aioice holds back)?"""
        if addr in self._known_peers:  # aioice forgets no candidate: known once, known
            return True
        found = any(
            c.port == addr[1] and c._network_host == addr[0] for c in self._remote_candidates
        ) or any(source == addr for _, source, _ in self._early_checks)
        if found:
            self._known_peers.add(addr)
        return found

    # -- liveness

    async def query_consent(self) -> None:
        """Consent freshness (RFC 7675), as aioice's but with natkit's interval and lifetime,
        and reporting expiry before closing."""
        assert self.remote_password is not None  # connect() had it
        key = self.remote_password.encode("utf8")
        self.consent_at = time.monotonic()  # the checks that just succeeded count
        while True:
            await asyncio.sleep(self._consent_interval * random.uniform(0.8, 1.2))
            for pair in list(self._nominated.values()):
                request = self.build_request(pair, nominate=False)
                try:
                    await pair.protocol.request(
                        request, pair.remote_addr, integrity_key=key, retransmissions=0
                    )
                    self.consent_at = time.monotonic()
                except stun.TransactionError as exc:
                    log.debug("consent check on %s failed: %s", pair, exc)
            idle = time.monotonic() - self.consent_at
            if idle >= self._consent_lifetime:
                self._query_consent_task = None  # close() must not cancel this task
                self._on_down(
                    "consent-expired",
                    f"the peer answered no consent check for {idle:.0f} s (RFC 7675)",
                )
                # aioice wakes recv() only at the end of close(), which first deletes the
                # TURN allocation: on a dead network that is 63 s of retransmissions.
                self.wake_receivers()
                await self.close()
                return

    def protocol_lost(self, protocol: StunProtocol) -> None:
        selected = any(p.protocol is protocol for p in self._nominated.values())
        super().protocol_lost(protocol)
        if selected and not self._closing:
            if protocol.local_candidate.type == "relay":
                detail = "the TURN allocation of the selected pair was lost"
            else:
                detail = "the socket of the selected pair closed"
            self._on_down("socket-lost", detail)

    # -- data

    def set_data_handler(self, handler: Callable[[bytes], None]) -> None:
        """Hand received data to ``handler`` as it arrives, instead of queueing it for
        recv(): no task switch per datagram. recv() still reports the end (and returns what
        was queued before)."""
        self._data_handler = handler

    def send_now(self, data: bytes) -> bool:
        """Send on the selected pair at once when its socket is a plain UDP one (not a TURN
        allocation, whose sends are coroutines); False when the caller must use send()."""
        pair = self._nominated.get(COMPONENT)
        if pair is None or type(pair.protocol).send_data is not StunProtocol.send_data:
            return False
        pair.protocol.transport.sendto(data, pair.remote_addr)
        return True

    def send_many_now(self, datagrams: Sequence[bytes]) -> int | None:
        """:meth:`send_now` for a burst, in one system call where the kernel can (see
        :meth:`SocketDrainer.send_many`): how many were dropped, or None when the caller
        must use send()."""
        pair = self._nominated.get(COMPONENT)
        if pair is None or type(pair.protocol).send_data is not StunProtocol.send_data:
            return None
        drainer = getattr(pair.protocol, "drainer", None)
        if not isinstance(drainer, SocketDrainer):  # not one of natkit's sockets
            for data in datagrams:
                pair.protocol.transport.sendto(data, pair.remote_addr)
            return 0
        # (CPython's datagram transport has get_write_buffer_size; its stub does not say so)
        transport = cast(DatagramSender, pair.protocol.transport)
        return drainer.send_many(transport, datagrams, pair.remote_addr)

    def data_received(self, data: bytes, component: int) -> None:
        if self._data_handler is not None:
            self._data_handler(data)
            return
        if self._queued_bytes + len(data) > MAX_QUEUED_BYTES:
            self.dropped += 1  # nobody reads: drop, as a full socket buffer would
            return
        self._queued_bytes += len(data)
        super().data_received(data, component)

    async def recvfrom(self) -> tuple[bytes, int]:
        data, component = await super().recvfrom()
        self._queued_bytes -= len(data)
        return data, component

    def wake_receivers(self) -> None:
        self._queue.put_nowait(None)


def uses_relay(pair: CandidatePair) -> bool:
    return pair.local_candidate.type == "relay" or pair.remote_candidate.type == "relay"


def mapped_address(response: stun.Message) -> Addr | None:
    """XOR-MAPPED-ADDRESS of a Binding response, if it is a usable unicast address."""
    value = response.attributes.get("XOR-MAPPED-ADDRESS")
    if not isinstance(value, tuple) or len(value) != 2:
        return None
    host, port = value
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.is_unspecified or ip.is_multicast or not isinstance(port, int) or not 0 < port < 65536:
        return None
    return (str(ip), port)
