"""The relay's STUN responder: RFC 8489 Binding on UDP, at the relay's listen address.

Peers about to connect peer-to-peer learn their public (server-reflexive) address from the
relay they already use, not from a third party. Only a plain Binding request is answered,
with XOR-MAPPED-ADDRESS and FINGERPRINT and nothing else (40 bytes for IPv4, 52 for IPv6);
everything else is dropped without a word, since any answer to junk would make the relay
a reflector. Dropped too: requests with credentials (an ICE check meant for a peer), with
unknown comprehension-required attributes, and with an RFC 5780 CHANGE-REQUEST (there is no
second address to answer from, and answering from this one would fake open filtering).
Token buckets per source address and for the whole responder cap what a flood of requests
with forged sources can make it send.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import time
from typing import Any, cast

from aioice import stun

from natkit.stun import codec
from natkit.stun.errors import StunDecodeError

# RFC 8489 6.1: without path MTU knowledge, UDP STUN messages stay under 576 bytes of IP;
# a Binding request is ~28 bytes, so anything near this is not one.
MAX_REQUEST = 548
PER_SOURCE_RATE, PER_SOURCE_BURST = 10.0, 20.0  # answers per second to one address
TOTAL_RATE, TOTAL_BURST = 2000.0, 4000.0  # answers per second in all
MAX_SOURCES = 8192  # addresses with a bucket; past this, new ones wait for idle ones to go
_CREDENTIALS = ("USERNAME", "MESSAGE-INTEGRITY")


def answer(data: bytes, source: tuple[str, int]) -> bytes | None:
    """The response to the datagram ``data`` from ``source``, or None to drop it (pure)."""
    if len(data) > MAX_REQUEST:
        return None
    try:
        decoded = codec.decode(data)
    except StunDecodeError:
        return None
    msg = decoded.message
    if msg.message_method != stun.Method.BINDING or msg.message_class != stun.Class.REQUEST:
        return None
    if decoded.unknown_required or any(a in msg.attributes for a in _CREDENTIALS):
        return None
    if msg.attributes.get("CHANGE-REQUEST"):
        return None
    return codec.binding_success(msg, client_address(source))


def client_address(source: Any) -> tuple[str, int]:
    """The client's address as it should be reported: an IPv4 client reaching a dual-stack
    socket appears as ``::ffff:a.b.c.d``, and it is IPv4 that it must learn."""
    host = str(source[0]).split("%", 1)[0]  # a link-local scope is ours, not the client's
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        host = str(ip.ipv4_mapped)
    return host, int(source[1])


class Limiter:
    """Token buckets per source address and one for all (pure: the caller gives the time)."""

    def __init__(self, now: float) -> None:
        self.sources: dict[str, tuple[float, float]] = {}  # address -> (level, at)
        self.total, self.total_at = TOTAL_BURST, now
        self.swept = now - 1.0

    def allow(self, address: str, now: float) -> bool:
        self.total = min(TOTAL_BURST, self.total + (now - self.total_at) * TOTAL_RATE)
        self.total_at = now
        entry = self.sources.get(address)
        if entry is None:
            if len(self.sources) >= MAX_SOURCES and not self._forget_idle(now):
                return False
            level = PER_SOURCE_BURST
        else:
            level = min(PER_SOURCE_BURST, entry[0] + (now - entry[1]) * PER_SOURCE_RATE)
        if level < 1 or self.total < 1:
            self.sources[address] = (level, now)
            return False
        self.total -= 1
        self.sources[address] = (level - 1, now)
        return True

    def _forget_idle(self, now: float) -> bool:
        """Drop the buckets that have refilled (forgetting them changes nothing); True if
        there is room now. At most once a second: under a flood of forged sources the scan
        must not cost more than the packets do."""
        if now - self.swept < 1.0:
            return False
        self.swept = now
        full = PER_SOURCE_BURST / PER_SOURCE_RATE
        for address in [a for a, (_, at) in self.sources.items() if now - at >= full]:
            del self.sources[address]
        return len(self.sources) < MAX_SOURCES


class StunResponder(asyncio.DatagramProtocol):
    def __init__(self, stats: collections.Counter[str]) -> None:
        self.stats = stats
        self.limiter = Limiter(time.monotonic())
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's own UDP transport is not a DatagramTransport subclass everywhere (3.11).
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            response = answer(data, addr)
        except (ValueError, StunDecodeError):  # an address aioice cannot pack
            response = None
        if response is None:
            self.stats["stun_dropped"] += 1
            return
        if not self.limiter.allow(str(addr[0]), time.monotonic()):
            self.stats["stun_rate_limited"] += 1
            return
        assert self.transport is not None
        self.transport.sendto(response, addr)
        self.stats["stun_requests"] += 1

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for answers to vanished clients: nothing to do

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        sockname = self.transport.get_extra_info("sockname")
        return str(sockname[0]), int(sockname[1])

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def serve(host: str, port: int, stats: collections.Counter[str]) -> StunResponder:
    """Answer STUN on UDP ``host:port``; raises OSError when that cannot be bound."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(
        lambda: StunResponder(stats), local_addr=(host, port)
    )
    return protocol
