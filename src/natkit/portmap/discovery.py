"""Find the LAN's UPnP Internet Gateway Device, fast and without trusting what answers.

M-SEARCH goes both to the SSDP multicast group and, unicast, to the default gateway (some
routers answer only that; unicast answers also skip the MX delay). Replies are taken from
any source port. Each LOCATION on the LAN's subnet is fetched and parsed concurrently under
its own size and time caps, so one hostile or broken device cannot hide the real router.
Discovery returns as soon as a connected gateway with a public address has answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time

from natkit.errors import DiscoveryError, NatkitError, ProtocolError
from natkit.net import http
from natkit.net.routes import (
    default_gateway,
    is_public_ipv4,
    lan_network,
    local_address_for,
    read_routes,
)
from natkit.portmap import ssdp
from natkit.portmap.description import MAX_DESCRIPTION_BYTES, Service, parse_description
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


def _score(gw: Gateway, gateway_ip: str = "") -> int:
    """Rank answers: the default gateway itself first, then connected, then public."""
    own = gateway_ip != "" and ssdp.parse_http_url(gw.location)[0] == gateway_ip
    return (
        (4 if own else 0)
        + (2 if gw.connected else 0)
        + (1 if is_public_ipv4(gw.external_ip) else 0)
    )


async def _rank_service(svc: Service, local_ip: str, timeout: float) -> tuple[str, bool]:
    client = IGDClient(svc, local_ip=local_ip, timeout=timeout)
    status, ext_ip = await asyncio.gather(client.get_status_info(), client.get_external_ip())
    return ext_ip, status.connection_status.lower() == "connected"


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
    services = [
        s for s in desc.wan_services() if _on_lan(ssdp.parse_http_url(s.control_url)[0], lan)
    ]
    if not services:
        raise ProtocolError(f"{location}: no WANIPConnection/WANPPPConnection service on the LAN")
    results = await asyncio.gather(
        *(_rank_service(s, local_ip, timeout) for s in services), return_exceptions=True
    )
    best: Gateway | None = None
    errors: list[str] = []
    for svc, result in zip(services, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, NatkitError):
                raise result
            errors.append(str(result))
            continue
        ext_ip, connected = result
        gw = Gateway(location, desc, svc, local_ip, server, ext_ip, connected)
        if best is None or _score(gw) > _score(best):
            best = gw
    if best is None:
        raise ProtocolError(f"{location}: no WAN service answered: {'; '.join(errors)}")
    return best


def _on_lan(host: str, lan: ipaddress.IPv4Network) -> bool:
    try:
        return ipaddress.ip_address(host) in lan
    except ValueError:
        return False  # host names are not followed: they could lead anywhere


async def discover_igd(
    *, timeout: float = 2.0, gateway_ip: str | None = None, fetch_timeout: float = 1.0
) -> Gateway:
    """Discover the best IGD on this machine's LAN (see the module docstring).

    Raises :class:`DiscoveryError` naming every answer that was refused and why.
    """
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    routes = read_routes()
    gw_ip = gateway_ip or default_gateway(routes)
    local_ip = local_address_for(gw_ip)
    lan = lan_network(local_ip, routes)

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(local_ip))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
        sock.bind((local_ip, 0))
        sock.setblocking(False)
        transport, collector = await loop.create_datagram_endpoint(_Collector, sock=sock)
    except OSError as exc:
        sock.close()
        raise DiscoveryError(f"cannot open an SSDP socket on {local_ip}: {exc}") from None

    def send_round(round_no: int) -> None:
        # First the two root-device searches every IGD answers; later rounds widen the net
        # (each search costs the router an answer, and a busy router answers slower).
        targets = (
            list(ssdp.IGD_SEARCH_TARGETS[:2]) if round_no == 0 else list(ssdp.IGD_SEARCH_TARGETS)
        )
        if round_no == len(SEND_SCHEDULE) - 1:
            targets.append(ssdp.ALL_TARGET)
        for st in targets:
            with contextlib.suppress(OSError):
                transport.sendto(
                    ssdp.build_msearch(st, host=f"{gw_ip}:{ssdp.SSDP_PORT}"),
                    (gw_ip, ssdp.SSDP_PORT),
                )
                transport.sendto(ssdp.build_msearch(st, mx=1), (ssdp.SSDP_GROUP, ssdp.SSDP_PORT))

    async def sender() -> None:
        for i, at in enumerate(SEND_SCHEDULE):
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            send_round(i)

    seen: set[str] = set()
    probed: dict[str, int] = {}  # answering host -> new acceptable LOCATIONs it gave
    probes_started = 0
    refused: list[str] = []
    probes: set[asyncio.Task[Gateway]] = set()
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
            limit = deadline if best is None else min(deadline, best_at + OTHER_DEVICE_GRACE)
            getter = asyncio.ensure_future(collector.queue.get())
            done, _ = await asyncio.wait(
                {getter, *probes},
                timeout=max(0.0, limit - now),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if getter in done:
                data, addr = getter.result()
                location = _accept(data, addr, lan, seen, refused)
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
                    probes.add(
                        asyncio.create_task(
                            _probe(location[0], location[1], local_ip, lan, probe_timeout)
                        )
                    )
            else:
                getter.cancel()
            for task in [t for t in probes if t.done()]:
                probes.discard(task)
                failure = task.exception()
                if failure is not None:
                    if not isinstance(failure, NatkitError):
                        raise failure
                    refused.append(str(failure))
                    continue
                gw = task.result()
                if best is None or _score(gw, gw_ip) > _score(best, gw_ip):
                    best, best_at = gw, time.monotonic()
                if _score(best, gw_ip) == 7:
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
    detail = f"; refused: {' | '.join(refused[:6])}" if refused else ""
    raise DiscoveryError(
        f"no UPnP Internet Gateway Device answered on {lan} (gateway {gw_ip}) within "
        f"{timeout:g} s — is UPnP enabled on the router?{detail}"
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
