"""A fake UPnP Internet Gateway Device on loopback, for rootless tests.

It answers SSDP M-SEARCH on a loopback UDP port, serves a router model's description and
answers SOAP control requests over real HTTP with a real mapping table (add, add-any,
delete, get specific/generic entry, external address, status). Each router model is a
description in ``fixtures/`` (see its README for where the structure comes from) plus the
quirks that router is known for; every quirk can also be switched on by itself.

natkit reaches it with ``discover_igd(ssdp_target=fake.ssdp_target)``: all traffic stays on
127.0.0.0/8, so the test suite's network guard stays quiet. Tailscale tests its portmapper
the same way (a fake IGD on localhost).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import socket
import time
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element
from xml.sax.saxutils import escape

import defusedxml.ElementTree
import h11

FIXTURES = Path(__file__).parent / "fixtures"
SSDP_GROUP_HOST = "239.255.255.250:1900"
PUBLIC_IP = "100.200.0.1"  # outside every reserved block (as the lab's router WAN address)
MAX_REQUEST = 64 * 1024


@dataclasses.dataclass
class Quirks:
    """Router behaviours seen in the field; each one off by default."""

    # Eero: answers only searches addressed to the multicast group (HOST header).
    multicast_only: bool = False
    # Sagemcom FAST3890V3: answers only a search for exactly this ST.
    only_st: str | None = None
    # TP-Link ER605: SSDP answers come from another (random) port than the one searched.
    answer_from_other_port: bool = False
    # pfSense/OPNsense CARP: the searched address is the virtual gateway; the answer, its
    # LOCATION and the HTTP server are on the router's own LAN address (this one).
    lan_address: str | None = None
    # TP-Link ER605: AddPortMapping of an external port below 1024 gets a bare HTTP 500.
    low_ports_refused: bool = False
    # Routers that refuse a lower-case protocol name (402 Invalid Args).
    upper_case_protocol_only: bool = False
    # Routers that report protocols in lower case in their entries.
    lower_case_protocol_in_entries: bool = False
    # 725 OnlyPermanentLeasesSupported for any lease but 0.
    only_permanent_leases: bool = False
    # 402 Invalid Args for leases above this many seconds.
    max_lease: int | None = None
    # DD-WRT: a timed lease is accepted and gone at once.
    timed_leases_vanish: bool = False
    # A re-add (renewal) of an existing entry stores this internal port instead of the asked one.
    renewal_rewrites_internal_port: int | None = None
    # The description is served with one broken tag (a mismatched close tag).
    broken_description: bool = False
    # action -> UPnP error code answered (a SOAP fault), e.g. {"GetStatusInfo": 401}.
    faults: dict[str, int] = dataclasses.field(default_factory=dict)
    # action -> HTTP status answered with no body, e.g. {"GetStatusInfo": 401}.
    http_errors: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class WanState:
    """What one WAN service reports."""

    status: str = "Connected"
    external_ip: str = PUBLIC_IP


@dataclasses.dataclass(frozen=True)
class RouterModel:
    fixture: str
    description_path: str
    server: str
    quirks: Quirks = dataclasses.field(default_factory=Quirks)
    # control path -> state; services not named here are Connected with PUBLIC_IP
    wan: dict[str, WanState] = dataclasses.field(default_factory=dict)


MODELS: dict[str, RouterModel] = {
    "livebox": RouterModel("livebox.xml", "/gatedesc.xml", "Linux/3.x UPnP/1.0 Sagemcom/1.0"),
    "huawei_hg531": RouterModel("huawei_hg531.xml", "/upnpdev.xml", "Linux/2.6 UPnP/1.0 HG531/1.0"),
    # igddesc.xml offers WANIPConnection:1 and WANPPPConnection:1; on a DSL line the PPP
    # one is the connected one and the IP one reports 0.0.0.0.
    "fritzbox": RouterModel(
        "fritzbox.xml",
        "/igddesc.xml",
        "FRITZ!Box 7590 UPnP/1.0 AVM FRITZ!Box 7590 154.07.57",
        wan={"/igdupnp/control/WANIPConn1": WanState("Disconnected", "0.0.0.0")},
    ),
    "tplink_er605": RouterModel(
        "tplink_er605.xml",
        "/igd1677027382214178.xml",
        "TP-Link SMB ER605, UPnP/1.0",
        Quirks(answer_from_other_port=True, low_ports_refused=True),
    ),
    "eero": RouterModel("eero.xml", "/rootDesc.xml", "eero UPnP/1.1", Quirks(multicast_only=True)),
    "sagemcom_fast3890": RouterModel(
        "sagemcom_fast3890.xml",
        "/desc.xml",
        "Sagemcom UPnP/1.0",
        Quirks(only_st="urn:schemas-upnp-org:device:InternetGatewayDevice:1"),
    ),
    "pfsense": RouterModel(
        "pfsense.xml",
        "/rootDesc.xml",
        "FreeBSD/14.0 UPnP/1.1 MiniUPnPd/2.3.3",
        Quirks(lan_address="127.0.0.2"),
    ),
}


# WANCommonInterfaceConfig's counters: action -> its out-argument.
COUNTERS = {
    "GetTotalBytesSent": "NewTotalBytesSent",
    "GetTotalBytesReceived": "NewTotalBytesReceived",
    "GetTotalPacketsSent": "NewTotalPacketsSent",
    "GetTotalPacketsReceived": "NewTotalPacketsReceived",
}


@dataclasses.dataclass
class Entry:
    client: str
    internal_port: int
    description: str
    lease: int
    added: float
    enabled: bool = True

    def expired(self, now: float) -> bool:
        return self.lease > 0 and now >= self.added + self.lease


@dataclasses.dataclass
class Call:
    action: str
    args: dict[str, str]
    headers: dict[str, str]


class UPnPFault(Exception):
    def __init__(self, code: int, description: str) -> None:
        self.code, self.description = code, description
        super().__init__(f"{code} {description}")


class FakeIGD:
    """``async with FakeIGD("fritzbox") as igd:`` then discover with ``igd.ssdp_target``."""

    def __init__(
        self, model: str | RouterModel = "pfsense", *, quirks: Quirks | None = None
    ) -> None:
        self.model = MODELS[model] if isinstance(model, str) else model
        # A deep copy: a test that sets a fault must not leave it in the shared model.
        self.quirks = quirks if quirks is not None else copy.deepcopy(self.model.quirks)
        self.gateway_address = "127.0.0.1"  # what natkit searches (the "default gateway")
        self.lan_address = self.quirks.lan_address or self.gateway_address
        self.table: dict[tuple[int, str], Entry] = {}
        self.calls: list[Call] = []
        self.searches: list[tuple[str, str]] = []  # (HOST header, ST) of each M-SEARCH heard
        self.answers = 0
        self.http_port = 0
        self.ssdp_port = 0
        self.wan = dict(self.model.wan)
        # What the counters answer (a 64-bit router's may pass 2**32: the binding wraps them).
        self.counters = {"GetTotalBytesSent": 5_000_000_123, "GetTotalBytesReceived": 7654321,
                         "GetTotalPacketsSent": 4321, "GetTotalPacketsReceived": 5432}  # fmt: skip
        self._server: asyncio.Server | None = None
        self._ssdp: asyncio.DatagramTransport | None = None
        self._answer_sock: socket.socket | None = None
        self.services = self._service_types()

    # ---- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> FakeIGD:
        loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._http, self.lan_address, 0)
        self.http_port = self._server.sockets[0].getsockname()[1]
        self._ssdp, _ = await loop.create_datagram_endpoint(
            lambda: _SsdpProtocol(self), local_addr=(self.gateway_address, 0)
        )
        self.ssdp_port = self._ssdp.get_extra_info("sockname")[1]
        if self.quirks.answer_from_other_port or self.lan_address != self.gateway_address:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((self.lan_address, 0))
            sock.setblocking(False)
            self._answer_sock = sock
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._ssdp is not None:
            self._ssdp.close()
        if self._answer_sock is not None:
            self._answer_sock.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def ssdp_target(self) -> tuple[str, int]:
        return (self.gateway_address, self.ssdp_port)

    @property
    def answer_port(self) -> int:
        """The UDP port SSDP answers come from."""
        sock = self._answer_sock
        return sock.getsockname()[1] if sock is not None else self.ssdp_port

    @property
    def base(self) -> str:
        return f"http://{self.lan_address}:{self.http_port}"

    @property
    def location(self) -> str:
        return self.base + self.model.description_path

    def actions(self) -> list[str]:
        return [c.action for c in self.calls]

    def entry(self, port: int, protocol: str = "TCP") -> Entry | None:
        self._expire()
        return self.table.get((port, protocol.upper()))

    # ---- the description -------------------------------------------------------------

    def description(self) -> bytes:
        text = (FIXTURES / self.model.fixture).read_text().replace("@BASE@", self.base)
        if self.quirks.broken_description:
            text = text.replace("</friendlyName>", "</friendlyname>", 1)
        return text.encode()

    def _service_types(self) -> dict[str, str]:
        """control path -> service type, read from the fixture (a sound document)."""
        raw = (FIXTURES / self.model.fixture).read_bytes()
        root = defusedxml.ElementTree.fromstring(raw)
        out: dict[str, str] = {}
        for service in root.iter():
            if _local(service) != "service":
                continue
            fields = {_local(child): (child.text or "").strip() for child in service}
            out[fields.get("controlURL", "")] = fields.get("serviceType", "")
        return out

    # ---- SSDP ------------------------------------------------------------------------

    def on_search(self, data: bytes, addr: tuple[str, int]) -> None:
        lines = data.decode("latin-1").split("\r\n")
        if not lines[0].startswith("M-SEARCH"):
            return
        headers = {k.strip().upper(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
        host, st = headers.get("HOST", ""), headers.get("ST", "")
        self.searches.append((host, st))
        q = self.quirks
        if q.multicast_only and host != SSDP_GROUP_HOST:
            return
        if q.only_st is not None and st != q.only_st:
            return
        answer_st = self._answer_st(st)
        if answer_st is None:
            return
        reply = (
            "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nEXT:\r\n"
            f"LOCATION: {self.location}\r\nSERVER: {self.model.server}\r\n"
            f"ST: {answer_st}\r\nUSN: uuid:fake::{answer_st}\r\n\r\n"
        ).encode()
        self.answers += 1
        if self._answer_sock is not None:
            with contextlib.suppress(OSError):
                self._answer_sock.sendto(reply, addr)
        elif self._ssdp is not None:
            self._ssdp.sendto(reply, addr)

    def _answer_st(self, st: str) -> str | None:
        device_types = {"urn:schemas-upnp-org:device:InternetGatewayDevice:1"}
        if b"InternetGatewayDevice:2" in (FIXTURES / self.model.fixture).read_bytes():
            device_types.add("urn:schemas-upnp-org:device:InternetGatewayDevice:2")
        if st in ("upnp:rootdevice", *device_types, *self.services.values()):
            return st
        if st == "ssdp:all":
            return "upnp:rootdevice"
        return None

    # ---- HTTP ------------------------------------------------------------------------

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536), 5)
                    if not data or len(body) > MAX_REQUEST:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            assert request is not None
            status, payload = self._respond(request, body)
            headers = [("Content-Type", 'text/xml; charset="utf-8"'), ("Connection", "close"),
                       ("Server", self.model.server), ("Content-Length", str(len(payload)))]  # fmt: skip
            out = conn.send(h11.Response(status_code=status, headers=headers))
            out += conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
            writer.write(out)
            await writer.drain()
        except (h11.ProtocolError, OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    def _respond(self, request: h11.Request, body: bytes) -> tuple[int, bytes]:
        path = request.target.decode()
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        if request.method == b"GET" and path == self.model.description_path:
            return 200, self.description()
        if request.method != b"POST" or path not in self.services:
            return 404, b""
        service_type = self.services[path]
        soap_action = headers.get("soapaction", "").strip('"')
        wanted_type, _, action = soap_action.rpartition("#")
        args = _soap_args(body)
        self.calls.append(Call(action, args, headers))
        if wanted_type != service_type:  # real routers check the SOAPAction's service type
            return _fault(service_type, 401, "Invalid Action")
        if action in self.quirks.http_errors:
            return self.quirks.http_errors[action], b""
        if action in self.quirks.faults:
            return _fault(service_type, self.quirks.faults[action], "Refused")
        try:
            out = self._act(path, action, args, headers)
        except UPnPFault as fault:
            return _fault(service_type, fault.code, fault.description)
        except _BareError as err:
            return err.status, b""
        inner = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in out.items())
        return 200, (
            '<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"'
            ' s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
            f'<u:{action}Response xmlns:u="{service_type}">{inner}</u:{action}Response>'
            "</s:Body></s:Envelope>\r\n"
        ).encode()

    # ---- SOAP actions ------------------------------------------------------------------

    def _act(self, path: str, action: str, args: dict[str, str], headers: dict[str, str]) -> dict[str, str]:  # fmt: skip
        wan = self.wan.get(path, WanState())
        if action == "GetStatusInfo":
            return {"NewConnectionStatus": wan.status, "NewLastConnectionError": "ERROR_NONE",
                    "NewUptime": "1234"}  # fmt: skip
        if action == "GetExternalIPAddress":
            return {"NewExternalIPAddress": wan.external_ip}
        if action == "AddPortMapping":
            self._add(args, headers, any_port=False)
            return {}
        if action == "AddAnyPortMapping" and self.services[path].endswith(":2"):
            return {"NewReservedPort": str(self._add(args, headers, any_port=True))}
        if action == "DeletePortMapping":
            key = self._key(args)
            if self.entry(*key) is None:
                raise UPnPFault(714, "NoSuchEntryInArray")
            del self.table[key]
            return {}
        if action == "GetSpecificPortMappingEntry":
            e = self.entry(*self._key(args))
            if e is None:
                raise UPnPFault(714, "NoSuchEntryInArray")
            return self._entry_args(e)
        if action == "GetGenericPortMappingEntry":
            self._expire()
            items = sorted(self.table.items())
            index = _int(args, "NewPortMappingIndex")
            if not 0 <= index < len(items):
                raise UPnPFault(713, "SpecifiedArrayIndexInvalid")
            (port, proto), e = items[index]
            shown = proto.lower() if self.quirks.lower_case_protocol_in_entries else proto
            return {"NewRemoteHost": "", "NewExternalPort": str(port), "NewProtocol": shown,
                    **self._entry_args(e)}  # fmt: skip
        if action == "GetConnectionTypeInfo":
            return {"NewConnectionType": "IP_Routed", "NewPossibleConnectionTypes": "IP_Routed"}
        if action == "GetPortMappingNumberOfEntries":
            self._expire()
            return {"NewPortMappingNumberOfEntries": str(len(self.table))}
        if action == "DeletePortMappingRange":
            return self._delete_range(args)
        if action in COUNTERS and "WANCommonInterfaceConfig" in self.services[path]:
            return {COUNTERS[action]: str(self.counters[action])}
        raise UPnPFault(401, "Invalid Action")

    def _delete_range(self, args: dict[str, str]) -> dict[str, str]:
        """IGD2 DeletePortMappingRange: 730 PortMappingNotFound when nothing is in range."""
        start, end = _int(args, "NewStartPort"), _int(args, "NewEndPort")
        proto = args.get("NewProtocol", "").upper()
        if start > end:
            raise UPnPFault(733, "InconsistentParameters")
        self._expire()
        doomed = [k for k in self.table if k[1] == proto and start <= k[0] <= end]
        if not doomed:
            raise UPnPFault(730, "PortMappingNotFound")
        for key in doomed:
            del self.table[key]
        return {}

    def _key(self, args: dict[str, str]) -> tuple[int, str]:
        proto = args.get("NewProtocol", "")
        if self.quirks.upper_case_protocol_only and proto != proto.upper():
            raise UPnPFault(402, "Invalid Args")
        if proto.upper() not in ("TCP", "UDP"):
            raise UPnPFault(402, "Invalid Args")
        return _int(args, "NewExternalPort"), proto.upper()

    def _add(self, args: dict[str, str], headers: dict[str, str], *, any_port: bool) -> int:
        q = self.quirks
        port, proto = self._key(args)
        lease = _int(args, "NewLeaseDuration")
        client, internal_port = args.get("NewInternalClient", ""), _int(args, "NewInternalPort")
        if q.only_permanent_leases and lease != 0:
            raise UPnPFault(725, "OnlyPermanentLeasesSupported")
        if q.max_lease is not None and lease > q.max_lease:
            raise UPnPFault(402, "Invalid Args")
        if q.low_ports_refused and port < 1024:
            raise _BareError(500)
        existing = self.entry(port, proto)
        if existing is not None and existing.client != client:
            if not any_port:
                raise UPnPFault(718, "ConflictInMappingEntry")
            port = next(p for p in range(max(port, 1024), 65536) if self.entry(p, proto) is None)
            existing = None
        if existing is not None and q.renewal_rewrites_internal_port is not None:
            internal_port = q.renewal_rewrites_internal_port
        if q.timed_leases_vanish and lease != 0:
            self.table.pop((port, proto), None)
            return port  # accepted, and gone
        self.table[(port, proto)] = Entry(
            client, internal_port, args.get("NewPortMappingDescription", ""), lease,
            time.monotonic(),
        )  # fmt: skip
        return port

    def _entry_args(self, e: Entry) -> dict[str, str]:
        left = max(0, int(e.added + e.lease - time.monotonic())) if e.lease else 0
        return {"NewInternalPort": str(e.internal_port), "NewInternalClient": e.client,
                "NewEnabled": "1" if e.enabled else "0",
                "NewPortMappingDescription": e.description, "NewLeaseDuration": str(left)}  # fmt: skip

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, e in self.table.items() if e.expired(now)]:
            del self.table[key]


class _BareError(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class _SsdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, igd: FakeIGD) -> None:
        self.igd = igd

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.igd.on_search(data, (addr[0], addr[1]))


def _local(element: Element) -> str:
    return element.tag.rpartition("}")[2] if isinstance(element.tag, str) else ""


def _soap_args(body: bytes) -> dict[str, str]:
    try:
        root = defusedxml.ElementTree.fromstring(body)
    except Exception:
        return {}
    for element in root.iter():
        if _local(element) == "Body":
            for action in element:
                return {_local(arg): (arg.text or "") for arg in action}
    return {}


def _int(args: dict[str, str], key: str) -> int:
    try:
        return int(args.get(key, ""))
    except ValueError:
        raise UPnPFault(402, "Invalid Args") from None


def _fault(service_type: str, code: int, description: str) -> tuple[int, bytes]:
    return 500, (
        '<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"'
        ' s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><s:Fault>'
        "<faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
        '<UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
        f"<errorCode>{code}</errorCode><errorDescription>{escape(description)}</errorDescription>"
        "</UPnPError></detail></s:Fault></s:Body></s:Envelope>\r\n"
    ).encode()
