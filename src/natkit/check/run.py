"""Gather a :class:`CheckReport`: STUN behaviour discovery, the gateway's port-mapping
protocols and the relay's round trip, all at once, within one time budget."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import time
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from natkit.check.report import CheckReport, PortMapOffer
from natkit.errors import NatkitError
from natkit.net.routes import (
    default_gateway,
    is_public_ipv4,
    local_address_for,
    read_routes_async,
)
from natkit.portmap.pmp_mappers import NatPmpMapper, PcpMapper
from natkit.portmap.upnp import UPnPMapper
from natkit.stun import binding_udp, discover_behaviour, parse_server
from natkit.stun.address import family_of

T = TypeVar("T")

# Public STUN servers, used only when the user names none (``--stun`` or NATKIT_STUN).
# natkit's tests never reach them: the test suite's network guard fails any test that tries.
DEFAULT_STUN_SERVERS = ("stun.l.google.com:19302", "stun.cloudflare.com:3478")
STUN_ENV = "NATKIT_STUN"

# A router answers port-mapping requests in milliseconds; UPnP discovery needs its SSDP
# round (miniupnpd alone waits ~50 ms before it answers).
PORTMAP_TIMEOUT = 1.0
# RFC 8489's 500 ms initial RTO suits the Internet; a check has a 2 s budget.
STUN_RTO = 0.2
STUN_TIMEOUT = 0.8  # per phase (mapping, then filtering)
CHECK_TIMEOUT = 2.0  # any single probe


def stun_servers(named: Sequence[str]) -> list[str]:
    """The servers to ask: the user's, else NATKIT_STUN's, else the public defaults."""
    if named:
        return list(named)
    env = os.environ.get(STUN_ENV, "")
    from_env = [s.strip() for s in env.split(",") if s.strip()]
    return from_env or list(DEFAULT_STUN_SERVERS)


async def _bounded(aw: Awaitable[T], timeout: float) -> T | NatkitError:
    try:
        return await asyncio.wait_for(aw, timeout)
    except asyncio.TimeoutError:
        return NatkitError(f"no answer within {timeout:g} s")
    except NatkitError as exc:
        return exc
    except OSError as exc:
        return NatkitError(str(exc) or type(exc).__name__)


def _offer(ip: str | None) -> PortMapOffer:
    ip = ip or None
    return PortMapOffer(external_ip=ip, public=bool(ip) and is_public_ipv4(ip or ""))


async def _upnp(gateway: str | None) -> PortMapOffer:
    mapper = await UPnPMapper.discover(timeout=PORTMAP_TIMEOUT, gateway_ip=gateway)
    try:
        try:
            ip = await mapper.external_ip()
        except NatkitError:
            ip = ""  # it answers SSDP but reports no address (e.g. miniupnpd behind CGNAT)
        return _offer(ip)
    finally:
        mapper.close()


async def _natpmp(gateway: str | None) -> PortMapOffer:
    mapper = await NatPmpMapper.open(gateway, timeout=PORTMAP_TIMEOUT)
    try:
        return _offer(await mapper.external_ip())
    finally:
        mapper.close()


async def _pcp(gateway: str | None) -> PortMapOffer:
    """PCP has no "what is my address" request: map a UDP port for a moment and delete it
    at once; the answer carries the external address."""
    mapper = await PcpMapper.open(gateway, timeout=PORTMAP_TIMEOUT)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
            holder.bind((mapper.internal_ip, 0))  # a port nobody else uses
            port = holder.getsockname()[1]
            mapping = await mapper.add(port, protocol="udp", lease=120, description="natkit check")
            with contextlib.suppress(NatkitError, OSError):
                await mapper.remove(mapping)
        return _offer(mapping.external_ip)
    finally:
        mapper.close()


async def _relay_rtt(relay: str, token: str, **agent_options: Any) -> float:
    from natkit.relay.agent import Agent

    agent = Agent(relay, token, [], **agent_options)
    task = asyncio.ensure_future(agent.run())
    try:
        waiter = asyncio.ensure_future(agent.connected.wait())
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            waiter.cancel()
            task.result()  # raises the agent's (final) error
            raise NatkitError(f"relay {relay} closed the connection")
        samples = [await agent.ping() for _ in range(3)]
        return min(samples)
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await agent.close()


def _global_ipv6() -> list[str]:
    """Global unicast IPv6 addresses of this host, as configured: from /proc where there
    is one (Linux), else from the interfaces' addresses (macOS, Windows)."""
    out: list[str] = []
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 4 and fields[3] == "00":  # scope: global
                    raw = fields[0]
                    ip = ":".join(raw[i : i + 4] for i in range(0, 32, 4))
                    out.append(str(ipaddress.IPv6Address(ip)))
    except OSError:
        return _global_ipv6_of_interfaces()
    return out


def _global_ipv6_of_interfaces() -> list[str]:
    # ifaddr (getifaddrs, GetAdaptersAddresses) comes with aioice, natkit's ICE library.
    import ifaddr

    out: list[str] = []
    with contextlib.suppress(OSError):
        for adapter in ifaddr.get_adapters():
            for entry in adapter.ips:
                if isinstance(entry.ip, tuple):  # IPv6: (address, flowinfo, scope id)
                    addr = ipaddress.IPv6Address(entry.ip[0].split("%", 1)[0])
                    if not (addr.is_link_local or addr.is_loopback or addr.is_multicast
                            or addr.is_site_local or addr.is_unspecified):  # fmt: skip
                        out.append(str(addr))
    return out


async def run_check(
    stun: Sequence[str] = (),
    *,
    relay: str | None = None,
    token: str | None = None,
    relay_options: dict[str, Any] | None = None,
    gateway: str | None = None,
    portmap: bool = True,
) -> CheckReport:
    """Everything at once. Network failures are reported, not raised; bad arguments raise."""
    started = time.monotonic()
    servers = stun_servers(stun)
    # A malformed name fails here, before any traffic.
    v6 = [s for s in servers if ":" in parse_server(s)[0]]
    v4 = [s for s in servers if s not in v6]
    report = CheckReport(stun_servers=servers, relay=relay, local_ipv6=_global_ipv6())
    with contextlib.suppress(NatkitError, OSError):
        report.gateway = gateway or default_gateway(await read_routes_async())
    if relay is not None and not token:
        raise ValueError("--relay needs --token")

    jobs: dict[str, Awaitable[Any]] = {}
    if v4:
        jobs["stun"] = discover_behaviour(v4, rto=STUN_RTO, timeout=STUN_TIMEOUT)
    if v6:
        jobs["stun6"] = binding_udp(v6, rto=STUN_RTO, timeout=STUN_TIMEOUT)
    if portmap and report.gateway is not None:
        jobs["upnp"] = _upnp(report.gateway)
        jobs["natpmp"] = _natpmp(report.gateway)
        jobs["pcp"] = _pcp(report.gateway)
    if relay is not None and token:
        jobs["relay"] = _relay_rtt(relay, token, **(relay_options or {}))
    outcomes = await asyncio.gather(*(_bounded(j, CHECK_TIMEOUT) for j in jobs.values()))
    results = dict(zip(jobs, outcomes, strict=True))

    behaviour = results.get("stun")
    if behaviour is not None and not isinstance(behaviour, NatkitError):
        report.udp = behaviour.mapped is not None
        if behaviour.local is not None:
            report.local_ipv4 = parse_server(behaviour.local)[0]
        if behaviour.mapped is not None:
            report.public_ipv4 = parse_server(behaviour.mapped)[0]
        report.behind_nat = behaviour.behind_nat
        report.mapping = behaviour.mapping
        report.filtering = behaviour.filtering
        report.port_preserving = behaviour.port_preserving
        report.hairpinning = behaviour.hairpinning
        report.notes += list(behaviour.notes)
    elif isinstance(behaviour, NatkitError):
        report.notes.append(f"STUN: {behaviour}")
    six = results.get("stun6")
    if isinstance(six, NatkitError):
        report.notes.append(f"STUN over IPv6: {six}")
    elif six:
        for answer in six:
            if not isinstance(answer, NatkitError) and answer.response.mapped is not None:
                report.public_ipv6 = answer.response.mapped[0]
                report.udp = True
                break
    if report.local_ipv4 is None and report.gateway:
        with contextlib.suppress(OSError):
            report.local_ipv4 = local_address_for(report.gateway)
    for method in ("upnp", "natpmp", "pcp"):
        outcome = results.get(method)
        if isinstance(outcome, PortMapOffer):
            report.port_mapping[method] = outcome
        elif isinstance(outcome, NatkitError):
            report.notes.append(f"{method}: {outcome}")
    rtt = results.get("relay")
    if isinstance(rtt, float):
        report.relay_rtt_ms = rtt * 1000
    elif isinstance(rtt, NatkitError):
        report.relay_error = str(rtt)
    if report.local_ipv4 is not None and family_of(report.local_ipv4) and report.public_ipv4:
        report.behind_nat = report.local_ipv4 != report.public_ipv4
    report.elapsed_ms = (time.monotonic() - started) * 1000
    return report
