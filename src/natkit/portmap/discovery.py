"""Find the LAN's UPnP Internet Gateway Device, fast and without trusting what answers.

M-SEARCH goes both to the SSDP multicast group and, unicast, to the default gateway (some
routers answer only that; unicast answers also skip the MX delay). Replies are taken from
any source port (TP-Link ER605 answers from a random one, tailscale issue #7377) and from
any host on the LAN (pfSense/OPNsense with CARP answer from their own LAN address, not the
virtual gateway address; such an answer wins once the gateway's own has had its grace).
Each LOCATION on the LAN's subnet is fetched and parsed concurrently under its own size and
time caps, so one hostile or broken device cannot hide the real router. Every WAN
connection service is ranked (connected, public address, then newest version); a ranking
call the router refuses lowers a service's rank and never drops it.

Discovery returns as soon as the default gateway, connected with a public address, has
answered; when the default gateway itself answered and cannot be used, it ends a short
grace later with an error that says what the router answered, not at the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time

from natkit.errors import DiscoveryError, NatkitError, ProtocolError, UPnPError
from natkit.net import http
from natkit.net.routes import (
    default_gateway,
    is_public_ipv4,
    lan_network,
    local_address_for,
    read_routes_async,
)
from natkit.net.routes_model import Route
from natkit.portmap import soap, ssdp
from natkit.portmap.description import (
    MAX_DESCRIPTION_BYTES,
    DeviceDescription,
    Service,
    parse_description,
)
from natkit.portmap.igd import Gateway, IGDClient

# When to (re)send the searches, in seconds from the start: UDP may be lost.
SEND_SCHEDULE = (0.0, 0.25, 0.75)
MAX_PENDING_DATAGRAMS = 256
MAX_LOCATIONS = 32
# Another LAN device that claims to be a perfect IGD does not win at once: the default
# gateway's own answer gets this long to arrive (a LAN device could answer faster).
OTHER_DEVICE_GRACE = 0.3
# Per answering host, so that one device advertising many LOCATIONs cannot use up
# MAX_LOCATIONS and hide the router (whose own answers are always probed).
MAX_LOCATIONS_PER_HOST = 8


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue(
            MAX_PENDING_DATAGRAMS
        )

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # a flood is dropped, not buffered
            self.queue.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors (e.g. port unreachable for the unicast search) are expected


def _score(gw: Gateway, gateway_ip: str = "") -> tuple[int, int, int]:
    """Rank answers: the default gateway itself first, then connected, then public."""
    own = gateway_ip != "" and ssdp.parse_http_url(gw.location)[0] == gateway_ip
    return (1 if own else 0, *_service_score(gw))


PERFECT = (1, 2, 1)


def _service_score(gw: Gateway) -> tuple[int, int]:
    # A refused GetStatusInfo (unknown) ranks below "Connected" but above a known
    # "Disconnected"; an unknown or 0.0.0.0 address ranks as not public.
    connected = {True: 2, None: 1, False: 0}[gw.connected]
    return connected, 1 if is_public_ipv4(gw.external_ip) else 0


def _answered(exc: NatkitError) -> bool:
    """Did the router answer (refusing), rather than stay silent, talk nonsense or say
    that nothing is there (HTTP 404 and kin: a control URL that does not exist)?"""
    if isinstance(exc, soap.HTTPStatusError):
        return exc.status not in (404, 405, 410)
    return isinstance(exc, (UPnPError, soap.RouterRefusal))


async def _rank_service(
    svc: Service, location: str, desc: DeviceDescription, server: str, local_ip: str,
    timeout: float,
) -> Gateway:  # fmt: skip
    """Ask one WAN service for its status and address. A refused call lowers its rank
    (some routers answer GetStatusInfo with 401 yet map fine); only a service that
    answered neither call at all is dropped."""
    client = IGDClient(svc, local_ip=local_ip, timeout=timeout)
    status, ext_ip = await asyncio.gather(
        client.get_status_info(), client.get_external_ip(), return_exceptions=True
    )
    notes: list[str] = []
    silent: list[str] = []
    for result in (status, ext_ip):
        if isinstance(result, BaseException):
            if not isinstance(result, NatkitError):
                raise result
            (notes if _answered(result) else silent).append(str(result))
    if len(silent) == 2:
        raise ProtocolError("; ".join(silent))
    connected = (
        None
        if isinstance(status, BaseException)
        else status.connection_status.lower() == "connected"
    )
    return Gateway(
        location, desc, svc, local_ip, server,
        "" if isinstance(ext_ip, BaseException) else ext_ip,
        connected, tuple(notes + silent),
    )  # fmt: skip


async def probe_location(location: str, *, timeout: float = 2.0) -> Gateway:
    """The gateway behind one known description URL, without SSDP (its WAN services ranked
    as in discovery). Raises :class:`ProtocolError` when nothing there can be used."""
    host = ssdp.parse_http_url(location)[0]
    local_ip = local_address_for(host)
    return await _probe(location, "", local_ip, _target_lan(host, local_ip), timeout)


async def _probe(
    location: str, server: str, local_ip: str, lan: ipaddress.IPv4Network, timeout: float
) -> Gateway:
    host, port, path = ssdp.parse_http_url(location)
    resp = await http.request(
        host,
        port,
        "GET",
        path,
        [("Host", f"{host}:{port}"), ("Connection", "close"), ("User-Agent", ssdp.USER_AGENT)],
        max_body=MAX_DESCRIPTION_BYTES,
        timeout=timeout,
        local_addr=local_ip,
    )
    if resp.status != 200:
        raise ProtocolError(f"{location}: HTTP {resp.status}")
    desc = parse_description(resp.body, location)
    # A recovered document is named in every refusal: it may be why nothing usable was found.
    repaired = (
        f" ({desc.repaired}; its <service> parts were read one by one)" if desc.repaired else ""
    )
    services = [
        s for s in desc.wan_services() if _on_lan(ssdp.parse_http_url(s.control_url)[0], lan)
    ]
    if not services:
        raise ProtocolError(
            f"{location}: no WANIPConnection/WANPPPConnection service on the LAN{repaired}"
        )
    results = await asyncio.gather(
        *(_rank_service(s, location, desc, server, local_ip, timeout) for s in services),
        return_exceptions=True,
    )
    ranked: list[tuple[tuple[int, int], int, Gateway]] = []
    errors: list[str] = []
    for order, result in enumerate(results):
        if isinstance(result, BaseException):
            if not isinstance(result, NatkitError):
                raise result
            errors.append(str(result))
            continue
        ranked.append((_service_score(result), -order, result))  # wan_services() order breaks ties
    if not ranked:
        raise ProtocolError(f"{location}: no WAN service answered: {'; '.join(errors)}{repaired}")
    return max(ranked, key=lambda r: (r[0], r[1]))[2]


def _on_lan(host: str, lan: ipaddress.IPv4Network) -> bool:
    try:
        return ipaddress.ip_address(host) in lan
    except ValueError:
        return False  # host names are not followed: they could lead anywhere


def _search_plan(
    gw_ip: str, ssdp_target: tuple[str, int] | None
) -> list[tuple[str, tuple[str, int]]]:
    """(HOST header, destination) of each copy of one search.

    Normally one copy goes unicast to the default gateway (some routers answer only
    that; it also skips the MX delay) and one to the multicast group (some answer only
    that: Eero, per issue 13 and lab-facts). With an explicit ``ssdp_target`` both copies go
    there, unicast, byte for byte as they would have gone out; nothing is multicast.
    """
    group_host = f"{ssdp.SSDP_GROUP}:{ssdp.SSDP_PORT}"
    if ssdp_target is not None:
        host, port = ssdp_target
        return [(f"{host}:{port}", ssdp_target), (group_host, ssdp_target)]
    group = (group_host, (ssdp.SSDP_GROUP, ssdp.SSDP_PORT))
    if not gw_ip:  # no router known on the chosen interface's subnet: multicast only
        return [group]
    return [(f"{gw_ip}:{ssdp.SSDP_PORT}", (gw_ip, ssdp.SSDP_PORT)), group]


def _router_on(lan: ipaddress.IPv4Network, routes: list[Route]) -> str:
    """The gateway of the best route via ``lan`` (a default route first); "" if none."""
    via = [r for r in routes if r.gateway is not None and r.gateway in lan]
    if not via:
        return ""
    best = min(via, key=lambda r: (r.destination.prefixlen != 0, r.metric))
    return str(best.gateway)


def _target_lan(host: str, local_ip: str) -> ipaddress.IPv4Network:
    try:
        if ipaddress.IPv4Address(host).is_loopback:
            return ipaddress.IPv4Network("127.0.0.0/8")
    except ValueError:
        raise DiscoveryError(f"the SSDP target must be an IPv4 address, not {host!r}") from None
    return lan_network(local_ip)


async def discover_igd(
    *,
    timeout: float = 2.0,
    gateway_ip: str | None = None,
    fetch_timeout: float = 1.0,
    ssdp_target: tuple[str, int] | None = None,
    local_ip: str | None = None,
    answered: set[str] | None = None,
) -> Gateway:
    """Discover the best IGD on this machine's LAN (see the module docstring).

    ``ssdp_target`` (host, port) sends every M-SEARCH there only, unicast, and takes that
    host's network as the LAN (127.0.0.0/8 for loopback) and that host as the gateway
    (``gateway_ip`` is then ignored): for a known IGD, and for tests on loopback.
    ``local_ip`` searches from that address of this machine instead of the one facing the
    default gateway (the interface the miniupnpc binding's ``multicastif`` names): its subnet
    is the LAN, and the router the routing table names on it, if any, is searched unicast too.
    ``answered``, if given, receives the LOCATION of every device on the LAN that answered
    as an IGD before discovery ended (natkit.compat.miniupnpc counts devices with it).

    Raises :class:`DiscoveryError` naming every answer that was refused and why.
    """
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    if ssdp_target is not None:
        gw_ip = ssdp_target[0]
        local_ip = local_address_for(gw_ip)
        lan = _target_lan(gw_ip, local_ip)
    elif local_ip is not None:
        routes = await read_routes_async()
        lan = lan_network(local_ip, routes)
        gw_ip = gateway_ip or _router_on(lan, routes)
    else:
        routes = await read_routes_async()  # off the loop where it runs a command
        gw_ip = gateway_ip or default_gateway(routes)
        local_ip = local_address_for(gw_ip)
        lan = lan_network(local_ip, routes)
    plan = _search_plan(gw_ip, ssdp_target)

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if ssdp_target is None:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(local_ip))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
        sock.bind((local_ip, 0))
        sock.setblocking(False)
        transport, collector = await loop.create_datagram_endpoint(_Collector, sock=sock)
    except OSError as exc:
        sock.close()
        raise DiscoveryError(f"cannot open an SSDP socket on {local_ip}: {exc}") from None

    def send_round(round_no: int) -> None:
        # First the one root-device search every IGD answers (a version 2 device answers
        # a search for version 1, and InternetGatewayDevice:1 is the only one some answer:
        # Sagemcom FAST3890V3); later rounds widen the net. Each search costs the router
        # answers, and miniupnpd spaces its answers out: in the lab (2.3.1, dual stack) one
        # search, unicast and multicast, is answered in ~51 ms, the two device versions
        # (four datagrams) first after 73-86 ms.
        targets = [ssdp.IGD1_SEARCH_TARGET] if round_no == 0 else list(ssdp.IGD_SEARCH_TARGETS)
        if round_no == len(SEND_SCHEDULE) - 1:
            targets.append(ssdp.ALL_TARGET)
        for st in targets:
            for host, destination in plan:
                with contextlib.suppress(OSError):
                    transport.sendto(ssdp.build_msearch(st, host=host), destination)

    async def sender() -> None:
        for i, at in enumerate(SEND_SCHEDULE):
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            send_round(i)

    seen: set[str] = set()
    probed: dict[str, int] = {}  # answering host -> new acceptable LOCATIONs it gave
    probes_started = 0
    refused: list[str] = []
    gateway_refused: list[str] = []  # the default gateway's own device answered, unusably
    refused_at = 0.0
    probes: dict[asyncio.Task[Gateway], str] = {}  # -> the host that gave the LOCATION
    best: Gateway | None = None
    best_at = 0.0
    send_task = asyncio.create_task(sender())
    deadline = start + timeout
    getter: asyncio.Future[tuple[bytes, tuple[str, int]]] | None = None
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            if best is not None and not probes and now >= best_at + OTHER_DEVICE_GRACE:
                break  # a usable (if imperfect) gateway and nothing left to hear from
            router_done = best is None and gateway_refused and not probes
            if router_done and now >= refused_at + OTHER_DEVICE_GRACE:
                break  # the router itself answered and refused: no use waiting on
            if best is not None:
                limit = min(deadline, best_at + OTHER_DEVICE_GRACE)
            elif gateway_refused:
                limit = min(deadline, refused_at + OTHER_DEVICE_GRACE)
            else:
                limit = deadline
            getter = asyncio.ensure_future(collector.queue.get())
            done, _ = await asyncio.wait(
                {getter, *probes},
                timeout=max(0.0, limit - now),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if getter in done:
                data, addr = getter.result()
                location = _accept(data, addr, lan, seen, refused)
                if location is not None and answered is not None:
                    answered.add(location[0])
                if location is not None:
                    host_count = probed[addr[0]] = probed.get(addr[0], 0) + 1
                    if host_count == MAX_LOCATIONS_PER_HOST + 1:
                        refused.append(f"{addr[0]} gave over {MAX_LOCATIONS_PER_HOST} LOCATIONs")
                    if host_count > MAX_LOCATIONS_PER_HOST or (
                        addr[0] != gw_ip and probes_started >= MAX_LOCATIONS
                    ):
                        location = None
                if location is not None:
                    probes_started += 1
                    probe_timeout = min(fetch_timeout, max(0.05, deadline - time.monotonic()))
                    task = asyncio.create_task(
                        _probe(location[0], location[1], local_ip, lan, probe_timeout)
                    )
                    probes[task] = ssdp.parse_http_url(location[0])[0]
            else:
                getter.cancel()
            for task in [t for t in probes if t.done()]:
                host = probes.pop(task)
                failure = task.exception()
                if failure is not None:
                    if not isinstance(failure, NatkitError):
                        raise failure
                    refused.append(str(failure))
                    if host == gw_ip:
                        gateway_refused.append(str(failure))
                        refused_at = time.monotonic()
                    continue
                gw = task.result()
                if best is None or _score(gw, gw_ip) > _score(best, gw_ip):
                    best, best_at = gw, time.monotonic()
                if _score(best, gw_ip) == PERFECT:
                    return best  # the default gateway itself, connected, with a public address
    finally:
        if getter is not None and not getter.done():
            getter.cancel()
        send_task.cancel()
        for task in probes:
            task.cancel()
        await asyncio.gather(send_task, *probes, return_exceptions=True)
        transport.close()
    if best is not None:
        return best
    others = [r for r in refused if r not in gateway_refused]
    tail = f"; refused: {' | '.join(others[:6])}" if others else ""
    if gateway_refused:
        raise DiscoveryError(
            f"the router at {gw_ip} answered, but its UPnP service cannot be used: "
            f"{' | '.join(gateway_refused[:3])} — map the port with NAT-PMP/PCP (--via) "
            f"or forward it by hand in the router's settings{tail}"
        )
    raise DiscoveryError(
        f"no UPnP Internet Gateway Device answered on {lan} (gateway {gw_ip or 'unknown'}) within "
        f"{timeout:g} s — is UPnP enabled on the router?{tail}"
    )


def _accept(
    data: bytes,
    addr: tuple[str, int],
    lan: ipaddress.IPv4Network,
    seen: set[str],
    refused: list[str],
) -> tuple[str, str] | None:
    """Return (location, server) for a new, acceptable SSDP answer, else None."""
    try:
        resp = ssdp.parse_response(data)
    except ProtocolError as exc:
        refused.append(f"{addr[0]}: {exc}")
        return None
    if resp.location in seen:
        return None
    seen.add(resp.location)
    is_igd = (
        resp.st in ssdp.IGD_SEARCH_TARGETS
        or "InternetGatewayDevice" in resp.st
        or ("WANIPConnection" in resp.st or "WANPPPConnection" in resp.st)
    )
    if not is_igd and resp.st != "upnp:rootdevice":
        seen.discard(resp.location)  # another device kind; the same URL may still be an IGD
        return None
    try:
        host = ssdp.parse_http_url(resp.location)[0]
    except ProtocolError as exc:
        refused.append(str(exc))
        return None
    if not _on_lan(host, lan):
        refused.append(f"{addr[0]} gave LOCATION {resp.location}, which is not on the LAN {lan}")
        return None
    return resp.location, resp.server
