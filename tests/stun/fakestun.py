"""A scripted RFC 5780 server on loopback that also plays the NAT in front of the client.

coturn on loopback can only show "no NAT". This server answers from four sockets (two IPs ×
two ports, like coturn) and *simulates* a NAT's mapping (the mapped address it reports
depends on which of its addresses the client asked) and filtering (an answer from an address
the client never contacted is dropped unless the simulated filter lets it in), so every
classification path runs against real sockets. It can also misbehave: answer
CHANGE-REQUEST with 420, ignore it, drop the first requests, send junk first.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import defaultdict
from typing import Any

from aioice import stun

from natkit.stun import codec
from natkit.stun.errors import StunDecodeError

from .conftest import free_port_pair

IPS = ("127.0.0.1", "127.0.0.2")
PUBLIC_IP = "127.0.0.9"  # the simulated NAT's "public" address: still loopback
Addr = tuple[str, int]


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, server: FakeStun, addr: Addr) -> None:
        self.server = server
        self.addr = addr
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, client: Any) -> None:
        self.server.handle(self.addr, data, (client[0], client[1]))


class FakeStun:
    def __init__(
        self,
        *,
        mapping: str = "eim",  # eim | adm | apdm
        filtering: str = "eif",  # eif | adf | apdf
        change: str = "obey",  # obey | ignore | 420
        other_address: str = "other",  # other | none | same-ip
        drop_first: int = 0,
        junk: bool = False,
    ) -> None:
        self.mapping = mapping
        self.filtering = filtering
        self.change = change
        self.other_address = other_address
        self.drop_first = drop_first
        self.junk = junk
        self.port = 0
        self.requests = 0
        self.endpoints: dict[Addr, _Endpoint] = {}
        self.contacted: defaultdict[Addr, set[Addr]] = defaultdict(set)

    async def __aenter__(self) -> FakeStun:
        self.port = free_port_pair(IPS)
        loop = asyncio.get_running_loop()
        for ip in IPS:
            for port in (self.port, self.port + 1):
                addr = (ip, port)
                _, ep = await loop.create_datagram_endpoint(
                    lambda a=addr: _Endpoint(self, a), local_addr=addr
                )
                self.endpoints[addr] = ep
        return self

    async def __aexit__(self, *exc: object) -> None:
        for ep in self.endpoints.values():
            if ep.transport is not None:
                ep.transport.close()

    @property
    def spec(self) -> str:
        return f"{IPS[0]}:{self.port}"

    @property
    def other(self) -> Addr:
        return IPS[1], self.port + 1

    def flip(self, port: int) -> int:
        """The other of the server's two ports."""
        return self.port + 1 if port == self.port else self.port

    def mapped(self, client: Addr, dest: Addr) -> Addr:
        ip_index = IPS.index(dest[0])
        port_index = dest[1] - self.port
        if self.mapping == "eim":
            return PUBLIC_IP, client[1]
        if self.mapping == "adm":
            return PUBLIC_IP, 10000 + ip_index
        return PUBLIC_IP, 10000 + 2 * ip_index + port_index

    def lets_in(self, client: Addr, source: Addr) -> bool:
        seen = self.contacted[client]
        if self.filtering == "eif":
            return True
        if self.filtering == "adf":
            return any(c[0] == source[0] for c in seen)
        return source in seen

    def send(self, source: Addr, message: stun.Message, client: Addr) -> None:
        transport = self.endpoints[source].transport
        if transport is not None and self.lets_in(client, source):
            transport.sendto(codec.encode(message, fingerprint=True), client)

    def handle(self, here: Addr, data: bytes, client: Addr) -> None:
        try:
            request = codec.decode(data).message
        except StunDecodeError:
            return
        self.contacted[client].add(here)
        self.requests += 1
        if self.requests <= self.drop_first:
            return
        if self.junk:
            self.endpoints[here].transport.sendto(b"\x00\x01junk", client)  # type: ignore[union-attr]
            foreign = stun.Message(
                stun.Method.BINDING, stun.Class.RESPONSE, secrets.token_bytes(12)
            )
            foreign.attributes["XOR-MAPPED-ADDRESS"] = ("127.0.0.66", 6)
            self.send(here, foreign, client)
        tid = request.transaction_id
        flags = request.attributes.get("CHANGE-REQUEST", 0)
        if flags and self.change == "420":
            error = stun.Message(stun.Method.BINDING, stun.Class.ERROR, tid)
            error.attributes["ERROR-CODE"] = (420, "Unknown Attribute")
            self.send(here, error, client)
            return
        source = here
        if flags and self.change == "obey":
            ip = IPS[1 - IPS.index(here[0])] if flags & codec.CHANGE_IP else here[0]
            port = self.flip(here[1]) if flags & codec.CHANGE_PORT else here[1]
            source = (ip, port)
        reply = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE, tid)
        reply.attributes["XOR-MAPPED-ADDRESS"] = self.mapped(client, here)
        reply.attributes["RESPONSE-ORIGIN"] = source
        if self.other_address == "other":
            reply.attributes["OTHER-ADDRESS"] = (IPS[1 - IPS.index(here[0])], self.flip(here[1]))
        elif self.other_address == "same-ip":
            reply.attributes["OTHER-ADDRESS"] = (here[0], self.flip(here[1]))
        self.send(source, reply, client)
