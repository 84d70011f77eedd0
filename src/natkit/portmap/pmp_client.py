"""asyncio clients for NAT-PMP and PCP, which share the gateway's UDP port 5351.

The socket is *connected* to gateway:5351, so the kernel drops datagrams from any other
source; replies are then decoded strictly (see natpmp.py/pcp.py) and anything that does not
answer our request is ignored, never trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from natkit.errors import DiscoveryError, ProtocolError
from natkit.net.retransmit import cap_schedule
from natkit.net.routes import default_gateway, local_address_for, read_routes_async
from natkit.portmap import natpmp, pcp
from natkit.portmap.epoch import EpochTracker

log = logging.getLogger("natkit.portmap")
T = TypeVar("T")
MAX_QUEUED = 64


class NotOfferedError(DiscoveryError):
    """The gateway does not answer this protocol (silence or ICMP port unreachable)."""


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.queue: asyncio.Queue[bytes | Exception] = asyncio.Queue(MAX_QUEUED)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if (addr[0], addr[1]) != self.peer:
            return  # belt and braces: the connected socket already filters
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(exc)


class GatewayUDP:
    """One connected UDP socket to ``gateway:5351`` and a request/response exchange on it.

    ``port`` is for tests only: a fake gateway on loopback listens on a free port."""

    def __init__(self, gateway_ip: str, local_ip: str, port: int = natpmp.SERVER_PORT) -> None:
        self.gateway_ip = gateway_ip
        self.local_ip = local_ip
        self.port = port
        self._transport: asyncio.DatagramTransport | None = None
        self._endpoint: _Endpoint | None = None
        self._lock = asyncio.Lock()

    @classmethod
    async def open(
        cls, gateway_ip: str | None = None, *, port: int = natpmp.SERVER_PORT
    ) -> GatewayUDP:
        gw = gateway_ip or default_gateway(await read_routes_async())
        self = cls(gw, local_address_for(gw), port)
        loop = asyncio.get_running_loop()
        peer = (gw, port)
        self._transport, self._endpoint = await loop.create_datagram_endpoint(
            lambda: _Endpoint(peer),
            local_addr=(self.local_ip, 0),
            remote_addr=peer,
            family=socket.AF_INET,
        )
        return self

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def exchange(
        self, request: bytes, decode: Callable[[bytes], T], schedule: Sequence[float], what: str
    ) -> T:
        """Send ``request`` (re-sent after each interval in ``schedule``) until ``decode`` accepts
        a reply. ProtocolError from ``decode`` means "not our answer": ignored. Other natkit
        errors (a result code) are raised."""
        assert self._transport is not None and self._endpoint is not None
        server = f"{self.gateway_ip}:{self.port}"
        async with self._lock:  # one outstanding request at a time on this socket
            queue = self._endpoint.queue
            while not queue.empty():
                queue.get_nowait()
            ignored = 0
            for interval in schedule:
                self._transport.sendto(request)
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        item = await asyncio.wait_for(queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                    if isinstance(item, Exception):
                        if isinstance(item, ConnectionRefusedError):
                            raise NotOfferedError(
                                f"{what}: nothing listens on {server} (port unreachable)"
                            )
                        continue
                    try:
                        return decode(item)
                    except ProtocolError as exc:
                        ignored += 1
                        log.info("%s: ignored a reply: %s", what, exc)
            note = f" ({ignored} invalid replies ignored)" if ignored else ""
            raise NotOfferedError(
                f"{what}: no answer from {server} within {sum(schedule):g} s{note}"
            )


class NatPmpClient:
    """NAT-PMP (RFC 6886) requests to the gateway, with its retransmission schedule."""

    def __init__(self, udp: GatewayUDP, *, timeout: float = 2.0) -> None:
        self.udp = udp
        self.timeout = timeout
        self.epoch = EpochTracker()
        self.rebooted = False  # set when a reply shows the gateway lost its state

    def _saw_epoch(self, epoch: int) -> None:
        if self.epoch.update(epoch, time.monotonic()):
            self.rebooted = True

    async def external_address(self, timeout: float | None = None) -> natpmp.ExternalAddress:
        sched = cap_schedule(natpmp.RETRANSMIT_SCHEDULE, timeout or self.timeout)
        res = await self.udp.exchange(
            natpmp.build_external_address_request(),
            natpmp.parse_external_address_response,
            sched,
            "NAT-PMP external address",
        )
        self._saw_epoch(res.epoch)
        return res

    async def map(
        self, protocol: str, internal_port: int, external_port: int, lifetime: int
    ) -> natpmp.MapResult:
        req = natpmp.build_map_request(protocol, internal_port, external_port, lifetime)
        res = await self.udp.exchange(
            req,
            lambda d: natpmp.parse_map_response(d, protocol, internal_port),
            cap_schedule(natpmp.RETRANSMIT_SCHEDULE, self.timeout),
            "NAT-PMP map",
        )
        self._saw_epoch(res.epoch)
        return res


class PcpClient:
    """PCP (RFC 6887) requests to the gateway."""

    def __init__(self, udp: GatewayUDP, *, timeout: float = 2.0) -> None:
        self.udp = udp
        self.timeout = timeout
        self.epoch = EpochTracker()
        self.rebooted = False

    def _saw_epoch(self, epoch: int) -> None:
        if self.epoch.update(epoch, time.monotonic()):
            self.rebooted = True

    def _schedule(self, timeout: float | None) -> list[float]:
        return cap_schedule(pcp.retransmit_schedule(), timeout or self.timeout)

    async def announce(self, timeout: float | None = None) -> pcp.Header:
        head = await self.udp.exchange(
            pcp.build_announce(self.udp.local_ip),
            pcp.parse_announce_response,
            self._schedule(timeout),
            "PCP announce",
        )
        self._saw_epoch(head.epoch)
        return head

    async def map(
        self,
        protocol: str,
        internal_port: int,
        lifetime: int,
        nonce: bytes,
        *,
        suggested_port: int = 0,
        suggested_ip: str | None = None,
    ) -> pcp.MapResult:
        req = pcp.build_map(
            client_ip=self.udp.local_ip,
            nonce=nonce,
            protocol=protocol,
            internal_port=internal_port,
            lifetime=lifetime,
            suggested_port=suggested_port,
            suggested_ip=suggested_ip,
        )
        res = await self.udp.exchange(
            req,
            lambda d: pcp.parse_map_response(
                d, nonce=nonce, protocol=protocol, internal_port=internal_port
            ),
            self._schedule(None),
            "PCP map",
        )
        self._saw_epoch(res.epoch)
        return res


__all__ = [
    "GatewayUDP",
    "NatPmpClient",
    "NotOfferedError",
    "PcpClient",
    "cap_schedule",
]
