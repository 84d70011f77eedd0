"""The PyPI ``miniupnpc`` binding's ``UPnP`` class, in pure Python over natkit's UPnP client.

Code written for the binding runs with only its import changed::

    from natkit.compat import miniupnpc
    u = miniupnpc.UPnP()
    u.discoverdelay = 200
    u.discover()
    u.selectigd()
    u.addportmapping(8080, "TCP", u.lanaddr, 8080, "my service", "")

Same methods, argument forms, return values and exception type (``Exception``: this
module's :class:`MiniupnpcError` is a subclass whose message starts with what the binding
says, then says what happened and what to do). Discovery is natkit's: it ends as soon as
the default gateway's IGD has answered, instead of waiting ``discoverdelay`` for more.
What differs, and why: docs/compat-miniupnpc.md.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from natkit.compat import _binding_args as args
from natkit.compat._sync import run_sync
from natkit.errors import NatkitError, UPnPError
from natkit.portmap.description import Service
from natkit.portmap.discovery import discover_igd, probe_location
from natkit.portmap.igd import Gateway, IGDClient
from natkit.portmap.ssdp import parse_http_url

__all__ = ["IGDControlURL", "MiniupnpcError", "UPnP"]

MIN_DISCOVERY_TIMEOUT = 2.0  # seconds: discoverdelay is the binding's wait per search
COUNTER_TIMEOUT = 2.0
_CIF = "WANCommonInterfaceConfig"
# miniupnpd in secure mode (its default) refuses a mapping to any address but the asking
# host's with 718 ConflictInMappingEntry: seen with miniupnpd 2.3.1 in natkit's lab
# (tests/lab/test_compat_miniupnpc.py), where the binding gets the same answer.
OTHER_HOST_NOTE = (
    "; a router in secure mode (miniupnpd's default) refuses mappings to any host but "
    "the one asking"
)


class MiniupnpcError(NatkitError):
    """What the binding raises as a bare ``Exception``. ``binding_message`` is the binding's
    own text (e.g. "ConflictInMappingEntry"), ``code`` the router's UPnP error code if any."""

    def __init__(
        self, binding_message: str, detail: str, code: int | None = None, *, prefix: bool = True
    ) -> None:
        self.binding_message = binding_message
        self.code = code
        super().__init__(f"{binding_message}: {detail}" if prefix else detail)


class IGDControlURL(str):
    """What ``selectigd()`` returns: the control URL string, as the binding returns, that
    also answers the gateway's methods and attributes (``gateway.addportmapping(...,
    gateway.lanaddr, ...)``, as some tutorials write)."""

    _upnp: UPnP

    def __new__(cls, url: str, upnp: UPnP) -> IGDControlURL:
        self = super().__new__(cls, url)
        self._upnp = upnp
        return self

    def __getattr__(self, name: str) -> Any:
        if name in GATEWAY_NAMES:
            return getattr(self._upnp, name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __reduce__(self) -> tuple[type[str], tuple[str]]:
        return str, (str(self),)  # pickled and copied as the plain URL string


class UPnP:
    """``miniupnpc.UPnP(multicastif=None, minissdpdsocket=None, discoverdelay=0,
    localport=0)``. ``ssdp_target=(host, port)`` (natkit's own) sends the SSDP searches to
    that address only, unicast: for a known IGD, or a test IGD on loopback."""

    def __init__(
        self,
        multicastif: str | None = None,
        minissdpdsocket: str | None = None,
        discoverdelay: int = 0,
        localport: int = 0,
        *,
        ssdp_target: tuple[str, int] | None = None,
    ) -> None:
        self.multicastif = multicastif
        self.minissdpdsocket = minissdpdsocket
        self.discoverdelay = discoverdelay
        self.localport = localport
        if self.localport > 1 and not 1024 <= self.localport <= 65534:
            raise MiniupnpcError(
                "Invalid localport value",
                f"{self.localport}: use 0 (any port), 1 (1900) or a port from 1024 to 65534",
            )
        self._ssdp_target = ssdp_target
        self._found: Gateway | None = None  # what discover() found, for selectigd()
        self._why_none = "discover() has not been called"
        self._gateway: Gateway | None = None  # what selectigd() chose
        self._lanaddr = self._wanaddr = ""

    # ---- the binding's attributes ------------------------------------------------------

    @property
    def lanaddr(self) -> str:
        """This machine's address on the LAN, facing the selected IGD ("" before)."""
        return self._lanaddr

    @property
    def wanaddr(self) -> str:
        """The selected IGD's external address, as far as selectigd() learnt it."""
        return self._wanaddr

    @property
    def discoverdelay(self) -> int:
        """Milliseconds the binding waits for SSDP answers; here, discovery's time limit
        (at least 2 s: natkit ends discovery as soon as the gateway answers)."""
        return self._discoverdelay

    @discoverdelay.setter
    def discoverdelay(self, value: int) -> None:
        self._discoverdelay = args.integer(value, "discoverdelay", 0, 2**32 - 1)

    @property
    def localport(self) -> int:
        """The binding's SSDP source port choice; natkit always uses an ephemeral port."""
        return self._localport

    @localport.setter
    def localport(self, value: int) -> None:
        self._localport = args.integer(value, "localport", 0, 2**32 - 1)

    @property
    def multicastif(self) -> str | None:
        """The interface to search on, by IPv4 address or name (None or "": the one that
        faces the default gateway)."""
        return self._multicastif

    @multicastif.setter
    def multicastif(self, value: str | None) -> None:
        self._multicastif = args.text(value, 1, none_ok=True)

    @property
    def minissdpdsocket(self) -> str | None:
        """The binding asks a local MiniSSDPd first; natkit asks the network directly."""
        return self._minissdpdsocket

    @minissdpdsocket.setter
    def minissdpdsocket(self, value: str | None) -> None:
        self._minissdpdsocket = args.text(value, 2, none_ok=True)

    # ---- discovery ---------------------------------------------------------------------

    def discover(self, /) -> int:
        """Search the LAN for IGDs; return how many devices answered."""
        devices: set[str] = set()
        timeout = max(MIN_DISCOVERY_TIMEOUT, self._discoverdelay / 1000)
        target = self._ssdp_target
        local_ip = None
        if self._multicastif:
            try:
                local_ip = args.interface_address(self._multicastif)
            except ValueError as exc:
                raise MiniupnpcError(args.SOCKET_ERROR, str(exc)) from None

        async def search() -> Gateway:
            return await discover_igd(
                timeout=timeout, ssdp_target=target, local_ip=local_ip, answered=devices
            )

        self._found = None
        try:
            self._found = run_sync(search)
        except NatkitError as exc:
            self._why_none = str(exc)
            if not devices:
                # The binding raises too, saying "Success" (its error code was never set).
                raise MiniupnpcError(args.SUCCESS, str(exc), prefix=False) from None
        return max(len(devices), 1 if self._found is not None else 0)

    def selectigd(self, rootDescUrl: str | None = None, /) -> IGDControlURL:
        """Choose the IGD to talk to (the one discover() found, or the one whose
        description is at ``rootDescUrl``); return its control URL."""
        url = args.text(rootDescUrl, 1, none_ok=True)
        if url is None:
            gateway = self._found
            if gateway is None:
                raise MiniupnpcError(args.NO_DEVICE, self._why_none)
        else:
            gateway = self._probe(url)
        self._gateway = gateway
        self._lanaddr, self._wanaddr = gateway.local_ip, gateway.external_ip
        return IGDControlURL(gateway.service.control_url, self)

    def _probe(self, url: str) -> Gateway:
        try:
            host = parse_http_url(url)[0]
            ipaddress.IPv4Address(host)
        except (NatkitError, ValueError):
            raise MiniupnpcError(
                args.NO_DEVICE, f"{url!r} is not an http:// URL with an IPv4 address"
            ) from None
        try:
            return run_sync(lambda: probe_location(url))
        except NatkitError as exc:
            raise MiniupnpcError(args.NO_DEVICE, f"no usable IGD at {url}: {exc}") from None

    # ---- the WAN connection service -----------------------------------------------------

    def externalipaddress(self, /) -> str:
        values = self._call("GetExternalIPAddress", [], "asking for the external address")
        if "NewExternalIPAddress" not in values:
            raise self._missing("GetExternalIPAddress", "NewExternalIPAddress")
        return values["NewExternalIPAddress"]

    def statusinfo(self, /) -> tuple[str, int, str]:
        """(connection status, uptime in seconds, last connection error)."""
        values = self._call("GetStatusInfo", [], "asking for the connection status")
        if "NewConnectionStatus" not in values or "NewUptime" not in values:
            raise self._missing("GetStatusInfo", "NewConnectionStatus and NewUptime")
        uptime = args.leading_int(values["NewUptime"]) % 2**32
        return values["NewConnectionStatus"], uptime, values.get("NewLastConnectionError", "")

    def connectiontype(self, /) -> str:
        values = self._call("GetConnectionTypeInfo", [], "asking for the connection type")
        if "NewConnectionType" not in values:
            raise self._missing("GetConnectionTypeInfo", "NewConnectionType")
        return values["NewConnectionType"]

    def addportmapping(
        self, eport: int, proto: str, host: str, iport: int, desc: str | None,
        remoteHost: str | None, leaseDuration: int = 0, /,
    ) -> bool:  # fmt: skip
        """AddPortMapping; True, or MiniupnpcError with the router's refusal."""
        mapping = args.mapping_args(eport, proto, host, iport, desc, remoteHost)
        lease = args.integer(leaseDuration, "leaseDuration", 0, 2**32 - 1)
        what = f"mapping external port {eport}/{mapping[2][1]} to {host}:{iport}"
        if host != self._lanaddr:
            what += f"{OTHER_HOST_NOTE} ({self._lanaddr or 'unknown'})"
        self._call("AddPortMapping", [*mapping, ("NewLeaseDuration", lease)], what)
        return True

    def addanyportmapping(
        self, eport: int, proto: str, host: str, iport: int, desc: str | None,
        remoteHost: str | None, /,
    ) -> int:  # fmt: skip
        """AddAnyPortMapping (IGD2): the router may pick another external port; return it.
        The lease is permanent (0), as the binding asks."""
        mapping = args.mapping_args(eport, proto, host, iport, desc, remoteHost)
        what = f"mapping an external port near {eport}/{mapping[2][1]} to {host}:{iport}"
        if host != self._lanaddr:
            what += f"{OTHER_HOST_NOTE} ({self._lanaddr or 'unknown'})"
        values = self._call("AddAnyPortMapping", [*mapping, ("NewLeaseDuration", 0)], what)
        if "NewReservedPort" not in values:
            raise self._missing("AddAnyPortMapping", "NewReservedPort")
        return args.leading_int(values["NewReservedPort"])

    def deleteportmapping(self, eport: int, proto: str, remoteHost: str | None = "", /) -> bool:
        key = args.key_args(eport, proto, remoteHost)
        self._call("DeletePortMapping", key, f"deleting the mapping of {eport}/{key[2][1]}")
        return True

    def deleteportmappingrange(self, start: int, end: int, proto: str, manage: int, /) -> bool:
        """DeletePortMappingRange (IGD2) of external ports ``start``..``end``."""
        call_args: list[tuple[str, str | int]] = [
            ("NewStartPort", args.port(start, "start port")),
            ("NewEndPort", args.port(end, "end port")),
            ("NewProtocol", args.protocol(proto, 3)),
            ("NewManage", args.integer(manage, "manage", 0, 255)),
        ]
        self._call("DeletePortMappingRange", call_args, f"deleting ports {start}-{end}")
        return True

    def getportmappingnumberofentries(self, /) -> int:
        values = self._call(
            "GetPortMappingNumberOfEntries", [], "asking for the number of mappings"
        )
        if "NewPortMappingNumberOfEntries" not in values:
            raise self._missing("GetPortMappingNumberOfEntries", "NewPortMappingNumberOfEntries")
        return args.leading_int(values["NewPortMappingNumberOfEntries"]) % 2**32

    def getspecificportmapping(
        self, eport: int, proto: str, remoteHost: str | None = "", /
    ) -> tuple[str, int, str, bool, int] | None:
        """(internal client, internal port, description, enabled, lease) or None when the
        router has no such mapping (or says nothing usable), as the binding answers."""
        key = args.key_args(eport, proto, remoteHost)
        values = self._quiet_call("GetSpecificPortMappingEntry", key)
        if values is None or not values.get("NewInternalClient"):
            return None
        return (
            values["NewInternalClient"],
            args.leading_int(values.get("NewInternalPort", "")) % 65536,
            values.get("NewPortMappingDescription", ""),
            args.leading_int(values.get("NewEnabled", "")) != 0,
            args.leading_int(values.get("NewLeaseDuration", "")),
        )

    def getgenericportmapping(
        self, index: int, /
    ) -> tuple[int, str, tuple[str, int], str, str, str, int] | None:
        """(external port, protocol, (internal client, internal port), description,
        enabled as the router wrote it, remote host, lease) of the ``index``-th mapping;
        None past the end of the table."""
        i = args.integer(index, "index", -(2**31), 2**31 - 1)
        values = self._quiet_call("GetGenericPortMappingEntry", [("NewPortMappingIndex", i)])
        if values is None or not ("NewExternalPort" in values or "NewInternalClient" in values):
            return None
        return (
            args.leading_int(values.get("NewExternalPort", "")) % 65536,
            values.get("NewProtocol", ""),
            (
                values.get("NewInternalClient", ""),
                args.leading_int(values.get("NewInternalPort", "")),
            ),
            values.get("NewPortMappingDescription", ""),
            values.get("NewEnabled", ""),
            values.get("NewRemoteHost", ""),
            args.leading_int(values.get("NewLeaseDuration", "")) % 2**32,
        )

    # ---- WANCommonInterfaceConfig counters ---------------------------------------------

    def totalbytesent(self, /) -> int:
        return self._counter("GetTotalBytesSent", "NewTotalBytesSent")

    def totalbytereceived(self, /) -> int:
        return self._counter("GetTotalBytesReceived", "NewTotalBytesReceived")

    def totalpacketsent(self, /) -> int:
        return self._counter("GetTotalPacketsSent", "NewTotalPacketsSent")

    def totalpacketreceived(self, /) -> int:
        return self._counter("GetTotalPacketsReceived", "NewTotalPacketsReceived")

    def _counter(self, action: str, name: str) -> int:
        """The binding's counters never raise: an unreachable router or a missing
        WANCommonInterfaceConfig service answers 2**32-3, a refusal 0 (modulo 2**32)."""
        service = self._cif_service()
        if service is None:
            return args.COUNTER_UNREACHABLE
        client = IGDClient(service, local_ip=self._lanaddr or None, timeout=COUNTER_TIMEOUT)
        try:
            values = run_sync(lambda: client.call(action))
        except UPnPError:
            return 0
        except NatkitError:
            return args.COUNTER_UNREACHABLE
        return args.leading_int(values.get(name, "")) % 2**32

    def _cif_service(self) -> Service | None:
        gateway = self._gateway
        if gateway is None:
            return None
        wan_host = parse_http_url(gateway.service.control_url)[0]
        for service in gateway.description.services:
            # Only on the WAN service's own host: a description must not send us elsewhere.
            if _CIF in service.service_type and _host(service.control_url) == wan_host:
                return service
        return None

    # ---- plumbing -----------------------------------------------------------------------

    def _client(self, action: str) -> IGDClient:
        gateway = self._gateway
        if gateway is None:
            raise MiniupnpcError(
                args.HTTP_ERROR, f"no IGD selected for {action}: call discover() and selectigd()"
            )
        return IGDClient.for_gateway(gateway)

    def _call(
        self, action: str, call_args: list[tuple[str, str | int]], what: str
    ) -> dict[str, str]:
        client = self._client(action)
        try:
            return run_sync(lambda: client.call(action, call_args))
        except UPnPError as exc:
            name = args.upnp_error_name(exc.code)
            raise MiniupnpcError(name, f"{exc} ({what})", exc.code) from None
        except NatkitError as exc:
            raise MiniupnpcError(args.HTTP_ERROR, f"{exc} ({what})") from None

    def _quiet_call(self, action: str, call_args: list[tuple[str, str | int]]) -> dict[str, str] | None:  # fmt: skip
        """For the binding's lookups, which answer None instead of raising."""
        if self._gateway is None:
            return None
        client = self._client(action)
        try:
            return run_sync(lambda: client.call(action, call_args))
        except NatkitError:
            return None

    def _missing(self, action: str, names: str) -> MiniupnpcError:
        """An answer without the value asked for: the binding says "Unknown Error" for its
        status queries and "Invalid response" for the others."""
        router = self._gateway.router if self._gateway is not None else "the router"
        queries = ("GetStatusInfo", "GetConnectionTypeInfo", "GetExternalIPAddress")
        said = args.UNKNOWN_ERROR if action in queries else args.INVALID_RESPONSE
        return MiniupnpcError(said, f"{router} answered {action} without {names}")


# What selectigd()'s result answers for the gateway: the UPnP object's public surface.
GATEWAY_NAMES = frozenset(name for name in vars(UPnP) if not name.startswith("_"))


def _host(url: str) -> str:
    try:
        return parse_http_url(url)[0]
    except NatkitError:
        return ""
