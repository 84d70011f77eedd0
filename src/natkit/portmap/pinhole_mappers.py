"""IPv6 pinholes through UPnP IGD2 (WANIPv6FirewallControl) or PCP: open, renew, check, remove.

A pinhole opens this host's own global address and port in the router's inbound firewall:
nothing is translated, so the public address *is* the host's. ``open_pinholer`` finds which
protocol the IPv6 router offers (PCP first: one UDP exchange; then UPnP). pinhole_keeper.py
keeps one open.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from typing import Any, Literal
from typing import Protocol as TypingProtocol

from natkit.errors import DiscoveryError, NatkitError, PcpError, UPnPError
from natkit.portmap import natpmp, pcp
from natkit.portmap.discovery import discover_igd
from natkit.portmap.mapping import Protocol, normalize_protocol
from natkit.portmap.pinhole import MAX_LEASE, SERVICE_TYPE, PinholeClient
from natkit.portmap.pinhole_addr import global_ipv6, ipv6_gateway
from natkit.portmap.pmp_client import GatewayUDP, PcpClient, _Endpoint
from natkit.portmap.ssdp import parse_http_url

log = logging.getLogger("natkit.portmap")

PinholeMethod = Literal["upnp", "pcp"]
NOT_AUTHORIZED = 2  # PCP result code
PINHOLE_METHODS: tuple[PinholeMethod, ...] = ("pcp", "upnp")  # in order of preference
# "This pinhole is not (or no longer) on the router": 704 NoSuchEntry per the service's
# specification; miniupnpd 2.3.1 answers 402 Invalid Args to Update/Check/DeletePinhole for
# a UniqueID it does not hold (seen in the lab, docs/miniupnpd-ipv6.md).
NO_SUCH_ENTRY = (704, 402)
# CheckPinholeWorking's 709 NoPacketSent: the pinhole exists, nothing has used it yet.
NO_PACKET_SENT = 709
# The shortest lifetime a PCP server grants is its own choice (miniupnpd: 120 s); asking
# for 1 s gets it.
SHORTEST = 1


@dataclasses.dataclass(frozen=True)
class Pinhole:
    method: PinholeMethod
    protocol: Protocol
    address: str  # this host's global IPv6 address: what the Internet connects to
    port: int
    lease: int  # seconds granted
    gateway: str  # the IPv6 router that holds it
    unique_id: int = -1  # UPnP: the router's handle for it
    nonce: str = dataclasses.field(default="", repr=False)  # PCP: hex nonce that owns it

    @property
    def public_address(self) -> str:
        return f"[{self.address}]:{self.port}"

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "protocol": self.protocol,
            "address": self.address,
            "port": self.port,
            "public_address_v6": self.public_address,
            "lease": self.lease,
            "gateway": self.gateway,
            **({"unique_id": self.unique_id} if self.method == "upnp" else {}),
        }


class Pinholer(TypingProtocol):
    method: PinholeMethod

    @property
    def address(self) -> str: ...

    async def add(self, port: int, protocol: str = "tcp", lease: int = 3600) -> Pinhole: ...

    async def renew(self, pinhole: Pinhole) -> Pinhole: ...

    async def remove(self, pinhole: Pinhole) -> int:
        """Delete it; 0, or how many seconds it stays open if the router would not."""
        ...

    async def check(self, pinhole: Pinhole) -> bool:
        """False if the router has visibly lost the pinhole."""
        ...

    def close(self) -> None: ...


def _lease(lease: int) -> int:
    # The firewall service knows no permanent pinholes; PCP's 0 would delete.
    return min(lease, MAX_LEASE) if lease > 0 else 3600


def _where(gateway6: str | None, local6: str | None) -> tuple[str, str]:
    """The IPv6 router (the default route's unless given) and our global address (on the
    default route's interface; on any interface when the router was given)."""
    iface: str | None = None
    if gateway6 is None:
        gateway6, iface = ipv6_gateway()
    return gateway6, local6 or global_ipv6(iface)


class UPnPPinholer:
    method: PinholeMethod = "upnp"

    def __init__(self, client: PinholeClient) -> None:
        self.client = client

    @classmethod
    async def discover(
        cls,
        *,
        timeout: float = 2.0,
        gateway_ip: str | None = None,
        gateway6: str | None = None,
        local6: str | None = None,
    ) -> UPnPPinholer:
        """Find the IGD (SSDP over IPv4, ``gateway_ip`` as for mappings) and its firewall
        service, then speak to that service at the IPv6 router's address from ours."""
        gw6, local = _where(gateway6, local6)
        igd = await discover_igd(timeout=timeout, gateway_ip=gateway_ip)
        service = next(
            (s for s in igd.description.services if s.service_type == SERVICE_TYPE), None
        )
        if service is None:
            raise DiscoveryError(
                f"the router's UPnP IGD ({igd.location}) offers no IPv6 firewall control "
                "(WANIPv6FirewallControl): open the port in its web interface, or try --via pcp"
            )
        _, port, path = parse_http_url(service.control_url)
        self = cls(PinholeClient(gw6, port, path, local_ip=local, timeout=timeout))
        status = await self.client.firewall_status()
        if not status.enabled:
            raise NatkitError(
                f"the router's IPv6 firewall is off: [{local}] is reachable without a pinhole"
            )
        if not status.inbound_pinhole_allowed:
            raise NatkitError(
                "the router refuses inbound IPv6 pinholes (InboundPinholeAllowed=0): allow "
                "them in its settings, or open the port in its web interface"
            )
        return self

    @property
    def address(self) -> str:
        return self.client.local_ip

    async def add(self, port: int, protocol: str = "tcp", lease: int = 3600) -> Pinhole:
        proto, lease = normalize_protocol(protocol), _lease(lease)
        unique_id = await self.client.add(port, proto, lease)
        return Pinhole("upnp", proto, self.address, port, lease, self.client.host, unique_id)

    async def renew(self, pinhole: Pinhole) -> Pinhole:
        try:
            await self.client.update(pinhole.unique_id, pinhole.lease)
            return pinhole
        except UPnPError as exc:
            if exc.code not in NO_SUCH_ENTRY:
                raise
        return await self.add(pinhole.port, pinhole.protocol, pinhole.lease)  # it was lost

    async def remove(self, pinhole: Pinhole) -> int:
        try:
            await self.client.delete(pinhole.unique_id)
        except UPnPError as exc:
            if exc.code not in NO_SUCH_ENTRY:
                raise  # else it is gone already (expired, or the router restarted)
        return 0

    async def check(self, pinhole: Pinhole) -> bool:
        """Is the pinhole still held? (Whether traffic used it is not the question.)"""
        try:
            await self.client.is_working(pinhole.unique_id)
        except UPnPError as exc:
            if exc.code in NO_SUCH_ENTRY:
                return False
            if exc.code == NO_PACKET_SENT:
                return True
            raise
        return True

    def close(self) -> None:
        pass


class _GatewayUDP6(GatewayUDP):
    """GatewayUDP over IPv6 (pmp_client's opens IPv4 only): the same exchange, another family."""

    @classmethod
    async def open6(cls, gateway_ip: str, local_ip: str) -> _GatewayUDP6:
        self = cls(gateway_ip, local_ip)
        peer = (gateway_ip, natpmp.SERVER_PORT)
        loop = asyncio.get_running_loop()
        try:
            self._transport, self._endpoint = await loop.create_datagram_endpoint(
                lambda: _Endpoint(peer),
                local_addr=(local_ip, 0),
                remote_addr=peer,
                family=socket.AF_INET6,
            )
        except OSError as exc:  # a zone naming no interface, an address not (or no longer) ours
            raise DiscoveryError(
                f"cannot reach the IPv6 router {gateway_ip} from [{local_ip}]: {exc}; "
                "name the router with --gateway (a link-local one with its zone: fe80::1%en0)"
            ) from None
        return self


class PcpPinholer:
    """PCP MAP over IPv6 (RFC 6887 section 11): internal and suggested external address are
    both ours, so an IPv6 firewall opens a pinhole rather than translating."""

    method: PinholeMethod = "pcp"

    def __init__(self, udp: GatewayUDP, *, timeout: float = 2.0) -> None:
        self.udp = udp
        self.client = PcpClient(udp, timeout=timeout)

    @classmethod
    async def open(
        cls, *, gateway6: str | None = None, local6: str | None = None, timeout: float = 2.0
    ) -> PcpPinholer:
        gw6, local = _where(gateway6, local6)
        self = cls(await _GatewayUDP6.open6(gw6, local), timeout=timeout)
        try:
            await self.client.announce(timeout=timeout)
        except BaseException:
            self.close()
            raise
        return self

    @property
    def address(self) -> str:
        return self.udp.local_ip

    async def add(
        self, port: int, protocol: str = "tcp", lease: int = 3600, nonce: bytes | None = None
    ) -> Pinhole:
        proto, lease = normalize_protocol(protocol), _lease(lease)
        nonce = nonce or pcp.new_nonce()
        res = await self.client.map(
            proto, port, lease, nonce, suggested_port=port, suggested_ip=self.address
        )
        if res.external_port != port:
            # A router doing NAT66 maps rather than opening a pinhole: not what was asked for,
            # and a Pinhole renews and deletes by the one port it has. Undo, and say so.
            with contextlib.suppress(NatkitError):
                await self.client.map(proto, port, 0, nonce)
            raise NatkitError(
                f"the router translated [{self.address}]:{port} to [{res.external_ip}]:"
                f"{res.external_port} (NAT66) instead of opening a pinhole: map the port "
                "over IPv4, or without --ipv6"
            )
        # NPTv6 (prefix translation) may change the address, never the port: report its own.
        return Pinhole(
            "pcp", proto, res.external_ip, port, res.lifetime, self.udp.gateway_ip,
            nonce=nonce.hex(),
        )  # fmt: skip

    async def renew(self, pinhole: Pinhole) -> Pinhole:
        return await self.add(
            pinhole.port, pinhole.protocol, pinhole.lease, bytes.fromhex(pinhole.nonce)
        )

    async def remove(self, pinhole: Pinhole) -> int:
        """Delete the pinhole (lifetime 0, same nonce); returns 0, or the seconds it stays
        open when the router will not delete it.

        miniupnpd 2.3.1 (nftables) deletes a PCP pinhole that was never renewed, but answers
        NOT_AUTHORIZED once the same nonce has renewed it (it logs "updating pinhole", and its
        DeletePCPMap, which compares the pinhole's description with "PCP MAP <nonce>", then
        refuses: seen in the lab, docs/miniupnpd-ipv6.md). The pinhole is then cut down to
        the shortest lifetime the router grants (120 s there), the best left to do.
        """
        nonce = bytes.fromhex(pinhole.nonce)
        try:
            await self.client.map(pinhole.protocol, pinhole.port, 0, nonce)
            return 0
        except PcpError as exc:
            if exc.code != NOT_AUTHORIZED:
                raise
        res = await self.client.map(
            pinhole.protocol, pinhole.port, SHORTEST, nonce,
            suggested_port=pinhole.port, suggested_ip=self.address,
        )  # fmt: skip
        log.warning(
            "the router would not delete pinhole %s; it closes in %d s",
            pinhole.public_address, res.lifetime,
        )  # fmt: skip
        return res.lifetime

    async def check(self, pinhole: Pinhole) -> bool:
        await self.client.announce(timeout=1.0)
        if self.client.rebooted:
            self.client.rebooted = False
            return False
        return True

    def close(self) -> None:
        self.udp.close()


async def open_pinholer(
    *,
    via: str = "auto",
    gateway_ip: str | None = None,
    gateway6: str | None = None,
    local6: str | None = None,
    timeout: float = 2.0,
    pcp_budget: float = 0.3,
) -> Pinholer:
    """The protocol the IPv6 router offers for pinholes: PCP if it answers within
    ``pcp_budget`` (``timeout`` when forced), else UPnP IGD2."""
    if via not in ("auto", *PINHOLE_METHODS):
        raise ValueError(f"pinholes are made with pcp or upnp, not {via!r}")
    gateway6, local6 = _where(gateway6, local6)  # no IPv6 here: say so once
    refused: list[str] = []
    if via in ("auto", "pcp"):
        try:
            return await PcpPinholer.open(
                gateway6=gateway6, local6=local6, timeout=timeout if via == "pcp" else pcp_budget
            )
        except NatkitError as exc:
            if via == "pcp":
                raise
            refused.append(f"pcp: {exc}")
    try:
        return await UPnPPinholer.discover(
            timeout=timeout, gateway_ip=gateway_ip, gateway6=gateway6, local6=local6
        )
    except NatkitError as exc:
        if via == "upnp":
            raise
        refused.append(f"upnp: {exc}")
    raise DiscoveryError(f"the IPv6 router {gateway6} offers no pinholes ({'; '.join(refused)})")
