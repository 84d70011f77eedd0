"""``natkit.list_mappings()`` / ``natkit.delete_mapping(port)``: ``natkit map list|delete``
from Python (blocking, with ``*_async`` twins of the same parameters).

UPnP routers list their own table; NAT-PMP and PCP cannot list or delete by external port,
so the mappings natkit made with them on this host are taken from natkit's records.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from natkit import state
from natkit.api import _LoopThread, check_port
from natkit.errors import DiscoveryError, NatkitError
from natkit.net.routes import default_gateway, read_routes_async
from natkit.portmap.manager import probe
from natkit.portmap.mapping import PortMapping, normalize_protocol
from natkit.portmap.upnp import UPnPMapper

T = TypeVar("T")
VIAS = ("auto", "upnp", "natpmp", "pcp")


def _check_via(via: str) -> None:
    if via not in VIAS:
        raise ValueError(f"via must be one of {', '.join(VIAS)}, not {via!r}")


async def list_mappings_async(
    *, via: str = "auto", gateway: str | None = None, timeout: float = 2.0
) -> list[PortMapping]:
    """The router's UPnP table, and the NAT-PMP/PCP mappings natkit made from this host."""
    _check_via(via)
    result: list[PortMapping] = []
    if via in ("auto", "upnp"):
        try:
            upnp = await UPnPMapper.discover(timeout=timeout, gateway_ip=gateway)
        except DiscoveryError:
            if via == "upnp":
                raise
        else:
            try:
                result += await upnp.list()
            finally:
                upnp.close()
    if via != "upnp":
        gw = gateway or default_gateway(await read_routes_async())
        shown = {(m.external_port, m.protocol) for m in result}  # one table behind all protocols
        for method in ("natpmp", "pcp") if via == "auto" else (via,):
            result += [
                m for m in state.listed(gw, method) if (m.external_port, m.protocol) not in shown
            ]
    return result


async def delete_mapping_async(
    external_port: int,
    protocol: str = "tcp",
    *,
    via: str = "auto",
    gateway: str | None = None,
    timeout: float = 2.0,
) -> str:
    """Delete the mapping of ``external_port`` from the router; returns the method used.
    NAT-PMP/PCP mappings are found in natkit's records (made by natkit on this host)."""
    check_port(external_port, "external_port")
    _check_via(via)
    proto = normalize_protocol(protocol)
    gw = gateway or default_gateway(await read_routes_async())
    for method in ("natpmp", "pcp") if via == "auto" else () if via == "upnp" else (via,):
        rec = state.find(gw, method, external_port, proto)
        if rec is None:
            continue
        result = await probe(via=method, gateway_ip=gw, timeout=timeout)
        try:
            await result.chosen.remove(rec)
        finally:
            result.chosen.close()
        state.forget(gw, method, external_port, proto)
        return method
    if via not in ("auto", "upnp"):
        raise NatkitError(
            f"natkit has no record of a {via} mapping of external port {external_port}/{proto} "
            f"on {gw}; {via} cannot delete by external port"
        )
    upnp = await UPnPMapper.discover(timeout=timeout, gateway_ip=gw)
    try:
        await upnp.delete(external_port, proto)
    finally:
        upnp.close()
    state.forget(gw, "upnp", external_port, proto)
    return "upnp"


def list_mappings(
    *, via: str = "auto", gateway: str | None = None, timeout: float = 2.0
) -> list[PortMapping]:
    """Blocking :func:`list_mappings_async`."""
    return _run(list_mappings_async(via=via, gateway=gateway, timeout=timeout))


def delete_mapping(
    external_port: int,
    protocol: str = "tcp",
    *,
    via: str = "auto",
    gateway: str | None = None,
    timeout: float = 2.0,
) -> str:
    """Blocking :func:`delete_mapping_async`."""
    return _run(delete_mapping_async(external_port, protocol, via=via, gateway=gateway,
                                     timeout=timeout))  # fmt: skip


def _run(work: Coroutine[Any, Any, T]) -> T:
    runner = _LoopThread()  # a loop that can watch sockets, as everywhere in natkit
    try:
        return runner.run(work)
    finally:
        runner.stop()
