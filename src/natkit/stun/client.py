"""STUN Binding over asyncio: UDP (one socket, many transactions at once) and TCP.

A UDP socket here is *not* connected: RFC 5780's answers come from other addresses than the
one asked. Datagrams are tied to requests only by their 96-bit random transaction id;
whatever does not decode, or answers nothing we asked, is dropped and counted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import Awaitable, Sequence
from types import TracebackType
from typing import Any, TypeVar, cast

from aioice import stun

from natkit.errors import NatkitError
from natkit.stun.address import ServerLike, family_of, format_addr, plain, resolve, resolve_all
from natkit.stun.codec import (
    HEADER_LEN,
    MAX_MESSAGE,
    Addr,
    BindingResponse,
    binding_request,
    binding_response,
    decode,
    encode,
    frame_length,
)
from natkit.stun.errors import StunDecodeError, StunTimeoutError, StunTransportError
from natkit.stun.retransmit import RTO, TI, retransmit_schedule

T = TypeVar("T")
# A TCP server may send us other messages first (indications); not forever.
MAX_TCP_MESSAGES = 8
MAX_PENDING = 256  # transactions outstanding on one socket


@dataclasses.dataclass(frozen=True)
class BindingResult:
    """One Binding transaction: where it went, where the answer came from, what it said."""

    server: Addr  # where the request was sent
    source: Addr  # where the answer came from (elsewhere after a CHANGE-REQUEST)
    local: Addr  # our socket's address
    response: BindingResponse
    rtt: float  # seconds from the last transmission to the answer
    transmissions: int  # 1 = no retransmission, so ``rtt`` is a clean sample
    transport: str = "udp"

    @property
    def mapped(self) -> Addr | None:
        return self.response.mapped

    def to_json(self) -> dict[str, Any]:
        r = self.response
        return {
            "server": format_addr(self.server),
            "source": format_addr(self.source),
            "local": format_addr(self.local),
            "transport": self.transport,
            "mapped": format_addr(r.mapped) if r.mapped else None,
            "other_address": format_addr(r.other_address) if r.other_address else None,
            "error_code": r.error_code,
            "error_reason": r.error_reason or None,
            "rtt_ms": round(self.rtt * 1000, 3),
            "transmissions": self.transmissions,
        }


class StunUdp(asyncio.DatagramProtocol):
    """One UDP socket with any number of concurrent Binding transactions on it."""

    def __init__(self) -> None:
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: dict[bytes, asyncio.Future[tuple[BindingResponse, Addr, float]]] = {}
        self._expected: dict[bytes, asyncio.Future[Addr]] = {}  # requests we wait to receive
        self.foreign = 0  # datagrams that were not STUN or answered nothing we asked
        self.last_error: OSError | None = None

    @classmethod
    async def open(
        cls, local_ip: str | None = None, local_port: int = 0, *, family: int = socket.AF_INET
    ) -> StunUdp:
        """A socket bound to ``local_ip:local_port`` (the wildcard by default)."""
        if local_ip is not None:
            family = family_of(local_ip)
        host = local_ip or ("::" if family == socket.AF_INET6 else "0.0.0.0")
        loop = asyncio.get_running_loop()
        try:
            _, proto = await loop.create_datagram_endpoint(
                cls, local_addr=(host, local_port), family=family
            )
        except OSError as exc:
            where = format_addr((host, local_port))
            raise StunTransportError(f"cannot bind a UDP socket to {where}: {exc}") from None
        return proto

    # asyncio.DatagramProtocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        source = plain(addr)
        try:
            decoded = decode(data)
        except StunDecodeError:
            self.foreign += 1
            return
        tid = decoded.transaction_id
        if decoded.message.message_class == stun.Class.REQUEST:
            waiter = self._expected.get(tid)
            if waiter is not None and not waiter.done():
                waiter.set_result(source)
            else:
                self.foreign += 1
            return
        fut = self._pending.get(tid)
        if fut is None or fut.done():  # unknown, or a copy answering a retransmission
            self.foreign += 1
            return
        try:
            response = binding_response(decoded)
        except StunDecodeError:
            self.foreign += 1  # keep waiting: a valid answer may still come
            return
        fut.set_result((response, source, time.monotonic()))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors and failed sends; retransmission goes on, the last one is reported.
        if isinstance(exc, OSError):
            self.last_error = exc

    # -----------------------------------------------------------------------------------

    @property
    def local_address(self) -> Addr:
        assert self._transport is not None
        return plain(self._transport.get_extra_info("sockname"))

    @property
    def family(self) -> int:
        assert self._transport is not None
        sock = self._transport.get_extra_info("socket")
        return int(sock.family)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def __aenter__(self) -> StunUdp:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def send(self, data: bytes, addr: Addr) -> None:
        assert self._transport is not None
        self._transport.sendto(data, addr)

    def expect_request(self, transaction_id: bytes) -> asyncio.Future[Addr]:
        """A future for the source of a Binding *request* with this id (hairpinning)."""
        fut: asyncio.Future[Addr] = asyncio.get_running_loop().create_future()
        self._expected[transaction_id] = fut
        return fut

    def forget_request(self, transaction_id: bytes) -> None:
        self._expected.pop(transaction_id, None)

    async def binding(
        self,
        server: Addr,
        schedule: Sequence[float],
        *,
        change_ip: bool = False,
        change_port: bool = False,
    ) -> BindingResult:
        """One Binding transaction to ``server`` (an IP address), sent and re-sent after
        each wait in ``schedule`` until answered; :class:`StunTimeoutError` when not."""
        if not schedule:
            raise ValueError("empty retransmission schedule")
        if len(self._pending) >= MAX_PENDING:
            raise StunTransportError("too many STUN transactions outstanding on one socket")
        request = binding_request(change_ip=change_ip, change_port=change_port)
        data = encode(request, fingerprint=True)
        tid = request.transaction_id
        fut: asyncio.Future[tuple[BindingResponse, Addr, float]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[tid] = fut
        sent, last = 0, 0.0
        try:
            for wait in schedule:
                self.send(data, server)
                sent, last = sent + 1, time.monotonic()
                await asyncio.wait((fut,), timeout=wait)
                if fut.done():
                    break
        finally:
            self._pending.pop(tid, None)
        if not fut.done():
            fut.cancel()
            why = f"; last socket error: {self.last_error}" if self.last_error else ""
            raise StunTimeoutError(
                f"no STUN answer from {format_addr(server)} within {sum(schedule):.2f} s "
                f"({sent} requests sent){why}"
            )
        response, source, at = fut.result()
        return BindingResult(server, source, self.local_address, response, at - last, sent)


async def binding_udp(
    servers: Sequence[ServerLike],
    *,
    local_ip: str | None = None,
    local_port: int = 0,
    rto: float = RTO,
    timeout: float | None = None,
) -> list[BindingResult | NatkitError]:
    """Binding requests to every server at once from one UDP socket.

    Returns one entry per server, in order: its result, or the natkit error that ended it
    (:class:`StunTimeoutError`, :class:`StunTransportError`). ``timeout`` cuts the RFC 8489
    schedule (39.5 s with the default ``rto``).
    """
    if not servers:
        raise ValueError("name at least one STUN server (--stun HOST:PORT)")
    schedule = retransmit_schedule(rto, timeout=timeout)
    family = family_of(local_ip) if local_ip else 0
    addrs = await resolve_all(servers, family=family, timeout=timeout or 2.0)
    if not family:
        first = next((a for a in addrs if not isinstance(a, NatkitError)), None)
        family = family_of(first[0]) if first else socket.AF_INET
    async with await StunUdp.open(local_ip, local_port, family=family) as sock:

        async def one(addr: Addr | NatkitError) -> BindingResult | NatkitError:
            if isinstance(addr, NatkitError):
                return addr
            if family_of(addr[0]) != sock.family:
                return StunTransportError(
                    f"STUN server {format_addr(addr)} is of another address family than the socket"
                )
            return await attempt(sock.binding(addr, schedule))

        return list(await asyncio.gather(*(one(a) for a in addrs)))


async def binding_tcp(
    server: ServerLike,
    *,
    local_ip: str | None = None,
    local_port: int = 0,
    timeout: float = TI,
) -> BindingResult:
    """One Binding transaction over TCP (RFC 8489 6.2.2: no retransmission, ``timeout``
    for the whole exchange, connection included)."""
    family = family_of(local_ip) if local_ip else 0
    start = time.monotonic()
    addr = await resolve(server, family=family, timeout=timeout)
    left = max(0.001, timeout - (time.monotonic() - start))
    try:
        return await asyncio.wait_for(_binding_tcp(addr, local_ip, local_port), left)
    except asyncio.TimeoutError:
        raise StunTimeoutError(
            f"no STUN answer from {format_addr(addr)} over TCP within {timeout:g} s"
        ) from None


async def binding_tcp_from(sock: socket.socket, server: Addr, timeout: float = TI) -> BindingResult:
    """One Binding over TCP from ``sock``, a socket bound already (to a port it shares with
    others through SO_REUSEPORT: the public address of *that* port is the question); the
    socket is closed afterwards."""
    try:
        return await asyncio.wait_for(_binding_tcp(server, None, 0, sock=sock), timeout)
    except BaseException as exc:  # (cancelled too: the socket is ours to close)
        sock.close()
        if not isinstance(exc, asyncio.TimeoutError):
            raise
        raise StunTimeoutError(
            f"no STUN answer from {format_addr(server)} over TCP within {timeout:g} s"
        ) from None


async def _binding_tcp(
    addr: Addr, local_ip: str | None, local_port: int, sock: socket.socket | None = None
) -> BindingResult:
    local = (local_ip, local_port) if local_ip else None
    where = format_addr(addr)
    try:
        if sock is not None:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, addr)
            reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_MESSAGE)
        else:
            reader, writer = await asyncio.open_connection(
                addr[0], addr[1], local_addr=local, limit=MAX_MESSAGE
            )
    except OSError as exc:  # (a socket of the caller's: binding_tcp_from closes it)
        raise StunTransportError(f"cannot connect to STUN server {where} over TCP: {exc}") from None
    try:
        request = binding_request()
        writer.write(encode(request, fingerprint=True))
        sent = time.monotonic()
        await writer.drain()
        for _ in range(MAX_TCP_MESSAGES):
            header = await reader.readexactly(HEADER_LEN)
            rest = await reader.readexactly(frame_length(header) - HEADER_LEN)
            decoded = decode(header + rest)
            if decoded.transaction_id != request.transaction_id:
                continue
            return BindingResult(
                server=addr,
                source=plain(writer.get_extra_info("peername")),
                local=plain(writer.get_extra_info("sockname")),
                response=binding_response(decoded),
                rtt=time.monotonic() - sent,
                transmissions=1,
                transport="tcp",
            )
        raise StunDecodeError(
            f"STUN server {where} sent {MAX_TCP_MESSAGES} messages, none answering our request"
        )
    except asyncio.IncompleteReadError:
        raise StunTransportError(
            f"STUN server {where} closed the TCP connection before answering"
        ) from None
    except OSError as exc:
        raise StunTransportError(f"TCP connection to STUN server {where} failed: {exc}") from None
    finally:
        writer.close()  # not awaited: the timeout must bound the whole call


async def attempt(aw: Awaitable[T]) -> T | NatkitError:
    """Await ``aw``; a natkit error is returned instead of raised (for gather)."""
    try:
        return await aw
    except NatkitError as exc:
        return exc
