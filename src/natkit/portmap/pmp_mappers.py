"""Port mapping through NAT-PMP (RFC 6886) and PCP (RFC 6887)."""

from __future__ import annotations

import time

from natkit.errors import PcpError
from natkit.portmap import natpmp, pcp
from natkit.portmap.mapping import Method, PortMapping, normalize_protocol
from natkit.portmap.pmp_client import GatewayUDP, NatPmpClient, PcpClient

MAX_LIFETIME = 0xFFFFFFFF


def _check_ports(internal_port: int, external_port: int | None) -> None:
    if not 0 < internal_port < 65536 or (
        external_port is not None and not 0 < external_port < 65536
    ):
        raise ValueError("ports must be between 1 and 65535")


class NatPmpMapper:
    """NAT-PMP has no permanent leases and no listing; a lease of 0 would delete."""

    method: Method = "natpmp"

    def __init__(self, udp: GatewayUDP, *, timeout: float = 2.0) -> None:
        self.udp = udp
        self.client = NatPmpClient(udp, timeout=timeout)
        self.external_ip_cache = ""
        self.external_ip_at = 0.0

    @classmethod
    async def open(
        cls, gateway_ip: str | None = None, *, timeout: float = 2.0, port: int = natpmp.SERVER_PORT
    ) -> NatPmpMapper:
        return cls(await GatewayUDP.open(gateway_ip, port=port), timeout=timeout)

    @property
    def internal_ip(self) -> str:
        return self.udp.local_ip

    async def external_ip(self) -> str:
        if not self.external_ip_cache or time.monotonic() - self.external_ip_at > 60:
            self.external_ip_cache = (await self.client.external_address()).address
            self.external_ip_at = time.monotonic()
        return self.external_ip_cache

    async def add(
        self,
        internal_port: int,
        *,
        external_port: int | None = None,
        protocol: str = "tcp",
        lease: int = 3600,
        description: str = "natkit",
    ) -> PortMapping:
        proto = normalize_protocol(protocol)
        _check_ports(internal_port, external_port)
        lifetime = lease if lease > 0 else natpmp.RECOMMENDED_LIFETIME
        res = await self.client.map(proto, internal_port, external_port or internal_port, lifetime)
        ext_ip = await self.external_ip()
        return PortMapping(
            "natpmp",
            proto,
            self.internal_ip,
            internal_port,
            ext_ip,
            res.external_port,
            res.lifetime,
            description,
        )

    async def renew(self, mapping: PortMapping) -> PortMapping:
        return await self.add(
            mapping.internal_port,
            external_port=mapping.external_port,
            protocol=mapping.protocol,
            lease=mapping.lease or 3600,
            description=mapping.description,
        )

    async def remove(self, mapping: PortMapping) -> None:
        # RFC 6886 3.4: lifetime 0 and suggested external port 0 delete the mapping.
        await self.client.map(mapping.protocol, mapping.internal_port, 0, 0)

    async def check(self, mapping: PortMapping) -> bool:
        """NAT-PMP cannot look a mapping up; the epoch in a cheap request tells of a reboot."""
        await self.client.external_address(timeout=1.0)
        if self.client.rebooted:
            self.client.rebooted = False
            return False
        return True

    def close(self) -> None:
        self.udp.close()


class PcpMapper:
    """PCP MAP with a nonce per mapping; the same nonce renews and deletes it."""

    method: Method = "pcp"

    def __init__(self, udp: GatewayUDP, *, timeout: float = 2.0) -> None:
        self.udp = udp
        self.client = PcpClient(udp, timeout=timeout)

    @classmethod
    async def open(
        cls, gateway_ip: str | None = None, *, timeout: float = 2.0, port: int = pcp.SERVER_PORT
    ) -> PcpMapper:
        return cls(await GatewayUDP.open(gateway_ip, port=port), timeout=timeout)

    @property
    def internal_ip(self) -> str:
        return self.udp.local_ip

    async def add(
        self,
        internal_port: int,
        *,
        external_port: int | None = None,
        protocol: str = "tcp",
        lease: int = 3600,
        description: str = "natkit",
        nonce: bytes | None = None,
        suggested_ip: str | None = None,
    ) -> PortMapping:
        proto = normalize_protocol(protocol)
        _check_ports(internal_port, external_port)
        nonce = nonce or pcp.new_nonce()
        lifetime = min(lease, MAX_LIFETIME) if lease > 0 else 7200  # 0 would delete
        res = await self.client.map(
            proto,
            internal_port,
            lifetime,
            nonce,
            suggested_port=external_port or internal_port,
            suggested_ip=suggested_ip,
        )
        return PortMapping(
            "pcp",
            proto,
            self.internal_ip,
            internal_port,
            res.external_ip,
            res.external_port,
            res.lifetime,
            description,
            nonce.hex(),
        )

    async def renew(self, mapping: PortMapping) -> PortMapping:
        # Same nonce, and the current address as the suggestion (RFC 6887 11.2.1).
        return await self.add(
            mapping.internal_port,
            external_port=mapping.external_port,
            protocol=mapping.protocol,
            lease=mapping.lease or 3600,
            description=mapping.description,
            nonce=bytes.fromhex(mapping.nonce) if mapping.nonce else None,
            suggested_ip=mapping.external_ip or None,
        )

    async def remove(self, mapping: PortMapping) -> None:
        nonce = bytes.fromhex(mapping.nonce) if mapping.nonce else pcp.new_nonce()
        await self.client.map(mapping.protocol, mapping.internal_port, 0, nonce)

    async def held(self, mapping: PortMapping) -> bool:
        """Does the router still hold a mapping of our internal port? Asked without touching it.

        A delete (lifetime 0) under a nonce of no mapping: a server that checks nonces
        (RFC 6887 11.3) refuses with NOT_AUTHORIZED while the mapping exists and deletes
        nothing; without one there is nothing to refuse. Seen on miniupnpd 2.3.1 in the lab
        (docs/miniupnpd-silent-loss.md, tests/lab/test_silent_loss.py): NOT_AUTHORIZED while
        held, NO_RESOURCES once lost (RFC 6887 would say SUCCESS). A MAP with our own nonce
        cannot tell: it is answered the same whether it renews the mapping or re-creates it.
        A server that does not check nonces (draft-cheshire-pcp-unsupp-family drops the
        check) would delete the mapping: so the manager asks once right after making it, and
        makes it again unless the answer was NOT_AUTHORIZED.
        """
        try:
            await self.client.map(mapping.protocol, mapping.internal_port, 0, pcp.new_nonce())
        except PcpError as exc:
            if exc.code == pcp.NOT_AUTHORIZED:
                return True
            if exc.code == pcp.NO_RESOURCES:
                return False
            raise
        return False

    async def check(self, mapping: PortMapping) -> bool:
        await self.client.announce(timeout=1.0)
        if self.client.rebooted:
            self.client.rebooted = False
            return False
        return True

    def close(self) -> None:
        self.udp.close()
