"""An asyncio client for one UPnP Internet Gateway Device's WAN connection service."""

from __future__ import annotations

import dataclasses
import ipaddress

from natkit.errors import ProtocolError, UPnPError
from natkit.net import http
from natkit.portmap import soap
from natkit.portmap.description import DeviceDescription, Service
from natkit.portmap.ssdp import parse_http_url

IGD2_WANIP = "urn:schemas-upnp-org:service:WANIPConnection:2"


@dataclasses.dataclass(frozen=True)
class PortMappingEntry:
    """One row of the router's port-mapping table."""

    remote_host: str
    external_port: int
    protocol: str  # "TCP" | "UDP"
    internal_port: int
    internal_client: str
    enabled: bool
    description: str
    lease: int  # seconds left; 0 = permanent


@dataclasses.dataclass(frozen=True)
class StatusInfo:
    connection_status: str
    last_error: str
    uptime: int


@dataclasses.dataclass(frozen=True)
class Gateway:
    """A discovered IGD: where it is, what it offers, and which of our addresses faces it."""

    location: str
    description: DeviceDescription
    service: Service
    local_ip: str
    server: str = ""
    external_ip: str = ""
    connected: bool = True


def _int(values: dict[str, str], key: str, action: str, default: int | None = None) -> int:
    text = values.get(key, "").strip()
    if not text and default is not None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ProtocolError(f"{action}: router sent {key}={text!r}, not a number") from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise ProtocolError(f"{action}: router sent {key}={value}, out of range")
    return value


def _port(values: dict[str, str], key: str, action: str) -> int:
    port = _int(values, key, action)
    if not 0 < port < 65536:
        raise ProtocolError(f"{action}: router sent {key}={port}, not a port")
    return port


def _protocol(protocol: str) -> str:
    proto = protocol.upper()
    if proto not in ("TCP", "UDP"):
        raise ValueError(f"protocol must be tcp or udp, not {protocol!r}")
    return proto


class IGDClient:
    """SOAP actions on one WAN*Connection service. Each call is one bounded HTTP request."""

    def __init__(self, service: Service, *, local_ip: str | None = None, timeout: float = 2.0):
        self.service = service
        self.local_ip = local_ip
        self.timeout = timeout
        self.host, self.port, self.path = parse_http_url(service.control_url)

    @classmethod
    def for_gateway(cls, gw: Gateway, *, timeout: float = 2.0) -> IGDClient:
        return cls(gw.service, local_ip=gw.local_ip, timeout=timeout)

    @property
    def is_igd2(self) -> bool:
        return self.service.service_type == IGD2_WANIP

    async def call(
        self, action: str, args: list[tuple[str, str | int]] | None = None
    ) -> dict[str, str]:
        st = self.service.service_type
        headers, body = soap.build_request(
            st, action, args or [], host=self.host, port=self.port, path=self.path
        )
        resp = await http.request(
            self.host,
            self.port,
            "POST",
            self.path,
            headers,
            body,
            max_body=soap.MAX_RESPONSE_BYTES,
            timeout=self.timeout,
            local_addr=self.local_ip,
        )
        return soap.parse_response(resp.status, resp.body, action)

    async def get_external_ip(self) -> str:
        values = await self.call("GetExternalIPAddress")
        ip = values.get("NewExternalIPAddress", "").strip()
        if ip:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ProtocolError(f"router sent external address {ip!r}, not an IP") from None
        return ip

    async def get_status_info(self) -> StatusInfo:
        v = await self.call("GetStatusInfo")
        return StatusInfo(
            connection_status=v.get("NewConnectionStatus", "").strip(),
            last_error=v.get("NewLastConnectionError", "").strip(),
            uptime=_int(v, "NewUptime", "GetStatusInfo", default=0),
        )

    async def get_connection_type_info(self) -> tuple[str, str]:
        v = await self.call("GetConnectionTypeInfo")
        return v.get("NewConnectionType", "").strip(), v.get(
            "NewPossibleConnectionTypes", ""
        ).strip()

    @staticmethod
    def _mapping_args(
        external_port: int, protocol: str, internal_port: int, internal_client: str,
        description: str, lease: int, remote_host: str,
    ) -> list[tuple[str, str | int]]:  # fmt: skip
        return [
            ("NewRemoteHost", remote_host),
            ("NewExternalPort", external_port),
            ("NewProtocol", _protocol(protocol)),
            ("NewInternalPort", internal_port),
            ("NewInternalClient", internal_client),
            ("NewEnabled", 1),
            ("NewPortMappingDescription", description),
            ("NewLeaseDuration", lease),
        ]

    async def add_port_mapping(
        self,
        external_port: int,
        protocol: str,
        internal_port: int,
        internal_client: str,
        *,
        description: str = "natkit",
        lease: int = 3600,
        remote_host: str = "",
    ) -> None:
        args = self._mapping_args(external_port, protocol, internal_port, internal_client,
                                  description, lease, remote_host)  # fmt: skip
        await self.call("AddPortMapping", args)

    async def add_any_port_mapping(
        self,
        external_port: int,
        protocol: str,
        internal_port: int,
        internal_client: str,
        *,
        description: str = "natkit",
        lease: int = 3600,
        remote_host: str = "",
    ) -> int:
        """IGD2 only: the router picks a free external port near ``external_port``; returns it."""
        args = self._mapping_args(external_port, protocol, internal_port, internal_client,
                                  description, lease, remote_host)  # fmt: skip
        v = await self.call("AddAnyPortMapping", args)
        return _port(v, "NewReservedPort", "AddAnyPortMapping")

    async def delete_port_mapping(
        self, external_port: int, protocol: str, remote_host: str = ""
    ) -> None:
        await self.call(
            "DeletePortMapping",
            [
                ("NewRemoteHost", remote_host),
                ("NewExternalPort", external_port),
                ("NewProtocol", _protocol(protocol)),
            ],
        )

    async def get_specific_port_mapping_entry(
        self, external_port: int, protocol: str, remote_host: str = ""
    ) -> PortMappingEntry:
        action = "GetSpecificPortMappingEntry"
        v = await self.call(
            action,
            [
                ("NewRemoteHost", remote_host),
                ("NewExternalPort", external_port),
                ("NewProtocol", _protocol(protocol)),
            ],
        )
        return PortMappingEntry(
            remote_host=remote_host,
            external_port=external_port,
            protocol=_protocol(protocol),
            internal_port=_port(v, "NewInternalPort", action),
            internal_client=v.get("NewInternalClient", "").strip(),
            enabled=v.get("NewEnabled", "1").strip() not in ("0", "false"),
            description=v.get("NewPortMappingDescription", ""),
            lease=_int(v, "NewLeaseDuration", action, default=0),
        )

    async def get_generic_port_mapping_entry(self, index: int) -> PortMappingEntry:
        action = "GetGenericPortMappingEntry"
        v = await self.call(action, [("NewPortMappingIndex", index)])
        proto = v.get("NewProtocol", "").strip().upper()
        if proto not in ("TCP", "UDP"):
            raise ProtocolError(f"{action}: router sent protocol {proto!r}")
        return PortMappingEntry(
            remote_host=v.get("NewRemoteHost", "").strip(),
            external_port=_port(v, "NewExternalPort", action),
            protocol=proto,
            internal_port=_port(v, "NewInternalPort", action),
            internal_client=v.get("NewInternalClient", "").strip(),
            enabled=v.get("NewEnabled", "1").strip() not in ("0", "false"),
            description=v.get("NewPortMappingDescription", ""),
            lease=_int(v, "NewLeaseDuration", action, default=0),
        )

    async def list_port_mappings(self, limit: int = 1024) -> list[PortMappingEntry]:
        """Walk GetGenericPortMappingEntry until the router says the index is past the end."""
        entries: list[PortMappingEntry] = []
        for index in range(limit):
            try:
                entries.append(await self.get_generic_port_mapping_entry(index))
            except UPnPError as exc:
                if exc.code in (713, 714, 402, 501):  # SpecifiedArrayIndexInvalid and kin
                    break
                raise
        return entries
