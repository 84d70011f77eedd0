"""UPnP IGD2 WANIPv6FirewallControl:1 (IPv6 pinholes), sans-I/O, and an asyncio client.

A host with a global IPv6 address needs no NAT mapping, only a hole in the router's inbound
firewall. Requests are built with soap.py's encoder and replies decoded with its parser
(size-bounded, defusedxml); the out-arguments are then checked here, as everything the
router says is untrusted. Values follow the service's specification (UPnP-gw-
WANIPv6FirewallControl-v1): LeaseTime 1..86400 s, UniqueID 0..65535, protocol by number.

miniupnpd (secure_mode=yes, its default and the lab's) refuses AddPinhole with 606 unless
InternalClient is the address the request comes from, so the SOAP connection is made over
IPv6 *from* the address being opened (docs/miniupnpd-ipv6.md).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Sequence

from natkit.errors import ProtocolError
from natkit.net import http
from natkit.portmap import soap

SERVICE_TYPE = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"
PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17}
MAX_LEASE = 86400  # the service's LeaseTime range is 1..86400 s
MAX_UNIQUE_ID = 0xFFFF
_DIGITS = re.compile(r"[0-9]{1,5}")  # ASCII only: str.isdigit() accepts other scripts' digits

Args = tuple[tuple[str, str | int], ...]


@dataclasses.dataclass(frozen=True)
class Request:
    """One control action on the firewall service, ready to encode for any control URL."""

    action: str
    args: Args = ()

    def encode(self, *, host: str, port: int, path: str) -> tuple[list[tuple[str, str]], bytes]:
        return soap.build_request(
            SERVICE_TYPE, self.action, list(self.args), host=host, port=port, path=path
        )


@dataclasses.dataclass(frozen=True)
class FirewallStatus:
    enabled: bool
    inbound_pinhole_allowed: bool


def _ipv6(address: str, what: str) -> str:
    try:
        addr = ipaddress.IPv6Address(address)
    except ValueError:
        raise ValueError(f"{what} must be an IPv6 address, not {address!r}") from None
    if addr.ipv4_mapped or addr.scope_id:
        raise ValueError(f"{what} must be a global IPv6 address, not {address!r}")
    return str(addr)


def _protocol(protocol: str) -> int:
    number = PROTOCOL_NUMBERS.get(protocol.lower())
    if number is None:
        raise ValueError(f"protocol must be tcp or udp, not {protocol!r}")
    return number


def _lease(lease: int) -> int:
    if not 1 <= lease <= MAX_LEASE:
        raise ValueError(f"a pinhole's lease is 1..{MAX_LEASE} s, not {lease}")
    return lease


def _unique_id(unique_id: int) -> int:
    if not 0 <= unique_id <= MAX_UNIQUE_ID:
        raise ValueError(f"a pinhole's UniqueID is 0..{MAX_UNIQUE_ID}, not {unique_id}")
    return unique_id


def get_firewall_status() -> Request:
    return Request("GetFirewallStatus")


def add_pinhole(
    internal_client: str,
    internal_port: int,
    protocol: str,
    lease: int,
    *,
    remote_host: str = "",
    remote_port: int = 0,
) -> Request:
    """Open ``internal_client``:``internal_port`` to ``remote_host``:``remote_port`` (empty
    and 0: anyone, from any port)."""
    if not 0 < internal_port < 65536 or not 0 <= remote_port < 65536:
        raise ValueError("ports must be 1-65535 (0 allowed for the remote port: any)")
    remote = _ipv6(remote_host, "the remote host") if remote_host else ""
    return Request(
        "AddPinhole",
        (
            ("RemoteHost", remote),
            ("RemotePort", remote_port),
            ("InternalClient", _ipv6(internal_client, "the internal client")),
            ("InternalPort", internal_port),
            ("Protocol", _protocol(protocol)),
            ("LeaseTime", _lease(lease)),
        ),
    )


def update_pinhole(unique_id: int, lease: int) -> Request:
    return Request(
        "UpdatePinhole", (("UniqueID", _unique_id(unique_id)), ("NewLeaseTime", _lease(lease)))
    )


def delete_pinhole(unique_id: int) -> Request:
    return Request("DeletePinhole", (("UniqueID", _unique_id(unique_id)),))


def check_pinhole_working(unique_id: int) -> Request:
    return Request("CheckPinholeWorking", (("UniqueID", _unique_id(unique_id)),))


def _out(status: int, body: bytes, action: str, names: Sequence[str]) -> list[str]:
    values = soap.parse_response(status, body, action)
    missing = [n for n in names if n not in values]
    if missing:
        raise ProtocolError(f"router's answer to {action} lacks {', '.join(missing)}")
    return [values[n].strip() for n in names]


def _bool(text: str, action: str, name: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise ProtocolError(f"{action}: router sent {name}={text[:40]!r}, not a boolean")


def parse_firewall_status(status: int, body: bytes) -> FirewallStatus:
    action = "GetFirewallStatus"
    enabled, allowed = _out(status, body, action, ("FirewallEnabled", "InboundPinholeAllowed"))
    return FirewallStatus(
        _bool(enabled, action, "FirewallEnabled"), _bool(allowed, action, "InboundPinholeAllowed")
    )


def parse_add_pinhole(status: int, body: bytes) -> int:
    """The pinhole's UniqueID, by which it is renewed and deleted."""
    (text,) = _out(status, body, "AddPinhole", ("UniqueID",))
    if not _DIGITS.fullmatch(text) or int(text) > MAX_UNIQUE_ID:
        raise ProtocolError(f"AddPinhole: router sent UniqueID={text[:40]!r}, not 0..65535")
    return int(text)


def parse_check_pinhole_working(status: int, body: bytes) -> bool:
    action = "CheckPinholeWorking"
    (text,) = _out(status, body, action, ("IsWorking",))
    return _bool(text, action, "IsWorking")


def parse_empty(status: int, body: bytes, action: str) -> None:
    """UpdatePinhole and DeletePinhole answer with no out-arguments; a fault raises."""
    soap.parse_response(status, body, action)


class PinholeClient:
    """The firewall service at ``http://[host]:port/path``, asked from ``local_ip`` (the
    address that will be opened: see the module's note on secure mode)."""

    def __init__(
        self, host: str, port: int, path: str, *, local_ip: str, timeout: float = 2.0
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self.local_ip = local_ip
        self.timeout = timeout

    async def _send(self, request: Request) -> tuple[int, bytes]:
        headers, body = request.encode(host=self.host, port=self.port, path=self.path)
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
        return resp.status, resp.body

    async def firewall_status(self) -> FirewallStatus:
        return parse_firewall_status(*await self._send(get_firewall_status()))

    async def add(self, internal_port: int, protocol: str, lease: int) -> int:
        request = add_pinhole(self.local_ip, internal_port, protocol, lease)
        return parse_add_pinhole(*await self._send(request))

    async def update(self, unique_id: int, lease: int) -> None:
        parse_empty(*await self._send(update_pinhole(unique_id, lease)), "UpdatePinhole")

    async def delete(self, unique_id: int) -> None:
        parse_empty(*await self._send(delete_pinhole(unique_id)), "DeletePinhole")

    async def is_working(self, unique_id: int) -> bool:
        return parse_check_pinhole_working(*await self._send(check_pinhole_working(unique_id)))
