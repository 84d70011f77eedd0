"""An asyncio client for one UPnP Internet Gateway Device's WAN connection service."""

from __future__ import annotations

import dataclasses
import ipaddress

from natkit.errors import ProtocolError, UPnPError
from natkit.net import http
from natkit.portmap import soap
from natkit.portmap.description import DeviceDescription, Service, wan_service_type
from natkit.portmap.ssdp import parse_http_url

MAX_NAME_IN_MESSAGES = 60


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
    external_ip: str = ""  # "" when unknown (not asked, refused, or 0.0.0.0)
    connected: bool | None = True  # None: the router did not say (GetStatusInfo refused)
    # What the router answered to a ranking call it refused (GetStatusInfo/GetExternalIPAddress).
    notes: tuple[str, ...] = ()

    @property
    def router(self) -> str:
        """How messages name this router: its address and, if it gave one, its name."""
        return router_label(parse_http_url(self.service.control_url)[0], self.description)


def router_label(host: str, description: DeviceDescription | None) -> str:
    """E.g. "the router at 192.168.1.1 (FRITZ!Box 7590)"."""
    name = ""
    if description is not None:
        name = description.friendly_name or description.model_name
    name = name[:MAX_NAME_IN_MESSAGES]
    return f"the router at {host} ({name})" if name else f"the router at {host}"


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

    def __init__(
        self,
        service: Service,
        *,
        local_ip: str | None = None,
        timeout: float = 2.0,
        router: str = "",
    ):
        self.service = service
        self.local_ip = local_ip
        self.timeout = timeout
        # When set ("the router at … (name)"), a refusal's message starts with it.
        self.router = router
        self.host, self.port, self.path = parse_http_url(service.control_url)

    @classmethod
    def for_gateway(cls, gw: Gateway, *, timeout: float = 2.0) -> IGDClient:
        return cls(gw.service, local_ip=gw.local_ip, timeout=timeout, router=gw.router)

    @property
    def is_igd2(self) -> bool:
        """Version 2 of a WAN service: it may offer AddAnyPortMapping (tried, never relied on)."""
        parsed = wan_service_type(self.service.service_type)
        return parsed is not None and parsed.version >= 2

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
        try:
            return soap.parse_response(resp.status, resp.body, action)
        except UPnPError as exc:
            if self.router:  # "the router at … (name) refused AddPortMapping: UPnP error …"
                exc.args = (f"{self.router} refused {exc}",)
            raise
        except soap.HTTPStatusError as exc:
            if self.router:
                raise soap.HTTPStatusError(exc.status, action, self.router) from None
            raise

    async def get_external_ip(self) -> str:
        """The router's external address; "" when it has none to tell."""
        values = await self.call("GetExternalIPAddress")
        ip = values.get("NewExternalIPAddress", "").strip()
        if ip:
            try:
                parsed = ipaddress.ip_address(ip)
            except ValueError:
                raise ProtocolError(f"router sent external address {ip!r}, not an IP") from None
            if parsed.is_unspecified:
                # 0.0.0.0: routers say this while the WAN link is down or for the WAN
                # service not in use (e.g. the idle WANIPConnection beside a PPP one).
                return ""
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
