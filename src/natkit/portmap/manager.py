"""One port-mapping manager over UPnP IGD, NAT-PMP and PCP.

``probe`` asks the gateway in all three protocols at once and picks the best that answers
within a short budget; ``KeptMapping`` then keeps one mapping alive: it renews at half the
lease, notices a router reboot (PCP/NAT-PMP epoch, a vanished UPnP entry, an IGD that
stopped answering), follows a gateway change, re-creates the mapping (the same external
port when it can), and removes it when closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from natkit.errors import DiscoveryError, NatkitError
from natkit.net.routes import default_gateway
from natkit.portmap.mapping import Mapper, Method, PortMapping
from natkit.portmap.pmp_client import GatewayUDP
from natkit.portmap.pmp_mappers import NatPmpMapper, PcpMapper
from natkit.portmap.upnp import UPnPMapper

log = logging.getLogger("natkit.portmap")

DEFAULT_ORDER: tuple[Method, ...] = ("pcp", "natpmp", "upnp")
METHODS: tuple[Method, ...] = ("upnp", "natpmp", "pcp")
# After the first protocol answers, how long a more preferred one still gets. NAT-PMP and
# PCP share one daemon, so a preferred sibling that has not answered by then will not.
GRACE = 0.03
# How long PCP/NAT-PMP get to answer before UPnP is asked too (see probe()).
UPNP_HEAD_START = 0.02


@dataclasses.dataclass
class ProbeResult:
    gateway_ip: str
    chosen: Mapper
    offered: dict[str, str]  # method -> external address it reported ("" if unknown)
    refused: dict[str, str]  # method -> why it is not usable
    elapsed: float


async def _probe_one(method: Method, gateway_ip: str, budget: float) -> tuple[Mapper, str]:
    if method == "upnp":
        upnp = await UPnPMapper.discover(timeout=budget, gateway_ip=gateway_ip)
        return upnp, upnp.gateway.external_ip
    udp = await GatewayUDP.open(gateway_ip)
    try:
        if method == "pcp":
            pcp_mapper = PcpMapper(udp)
            await pcp_mapper.client.announce(timeout=budget)
            return pcp_mapper, ""
        pmp = NatPmpMapper(udp)
        return pmp, await pmp.external_ip()
    except BaseException:
        udp.close()
        raise


async def probe(
    *,
    via: str = "auto",
    order: Sequence[Method] = DEFAULT_ORDER,
    budget: float = 0.3,
    gateway_ip: str | None = None,
    timeout: float = 2.0,
) -> ProbeResult:
    """Find which mapping protocols the gateway offers and choose one.

    ``via`` forces one protocol (then its full ``timeout`` applies); ``auto`` asks all in
    ``order`` of preference and chooses within ``budget`` seconds once any has answered
    (a router that answers nothing that fast still gets ``timeout``).
    """
    start = time.monotonic()
    gw = gateway_ip or default_gateway()
    methods: list[Method] = [m for m in order if m in METHODS]
    if via != "auto":
        if via not in METHODS:
            raise ValueError(f"--via must be auto, upnp, natpmp or pcp, not {via!r}")
        methods = [m for m in METHODS if m == via]
        budget = timeout
    # UPnP's M-SEARCHes make the router's daemon busy answering them; when PCP or NAT-PMP
    # are preferred and answer within a few milliseconds (as on a LAN), UPnP is not asked.
    pmp_first = via == "auto" and "upnp" in methods and methods.index("upnp") > 0
    pmp_failed = asyncio.Event()

    async def upnp_after_head_start() -> tuple[Mapper, str]:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(pmp_failed.wait(), UPNP_HEAD_START)
        return await _probe_one("upnp", gw, max(budget, timeout))

    tasks = {
        m: asyncio.create_task(
            upnp_after_head_start()
            if m == "upnp" and pmp_first
            else _probe_one(m, gw, max(budget, timeout))
        )
        for m in methods
    }
    by_task = {t: m for m, t in tasks.items()}
    won: dict[str, tuple[Mapper, str]] = {}
    refused: dict[str, str] = {}
    deadline = start + budget + 0.05
    first_success: float | None = None
    try:
        while True:
            pending = [t for t in tasks.values() if not t.done()]
            best = next((m for m in methods if m in won or tasks[m] in pending), None)
            if best is not None and best in won:
                break  # the most preferred protocol still in the running has answered
            if not pending:
                break
            # Nothing has answered within the budget: a slow router still gets the full
            # timeout rather than being declared absent.
            limit = deadline if won or time.monotonic() < deadline else start + max(timeout, budget)
            if first_success is not None:
                limit = min(limit, first_success + GRACE)
            wait = limit - time.monotonic()
            if wait <= 0:
                break
            done, _ = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                m = by_task[t]
                exc = t.exception()
                if exc is None:
                    won[m] = t.result()
                    first_success = first_success or time.monotonic()
                elif isinstance(exc, NatkitError):
                    refused[m] = str(exc)
                else:
                    raise exc
            others = [tasks[m] for m in methods if m != "upnp"]
            if all(t.done() for t in others) and not any(m in won for m in methods if m != "upnp"):
                pmp_failed.set()  # no head start needed: ask UPnP now
    finally:
        for m, t in tasks.items():
            if not t.done():
                t.cancel()
                waited = time.monotonic() - start
                why = f"not awaited: {next(iter(won))} answered first" if won else "no answer"
                refused.setdefault(m, f"{why} within {waited:.1f} s")
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    chosen = next((m for m in methods if m in won), None)
    for name, (mapper, _) in won.items():
        if name != chosen:
            mapper.close()
    if chosen is None:
        detail = "; ".join(f"{m}: {why}" for m, why in refused.items())
        raise DiscoveryError(f"the gateway {gw} offers no port mapping ({detail})")
    return ProbeResult(
        gw, won[chosen][0], {m: ip for m, (_, ip) in won.items()}, refused, time.monotonic() - start
    )


Listener = Callable[[str, PortMapping, dict[str, Any]], None]


class KeptMapping:
    """A mapping kept alive until :meth:`close`. Events: ready, renewed, lost, restored, closed."""

    def __init__(
        self,
        internal_port: int,
        *,
        protocol: str = "tcp",
        external_port: int | None = None,
        lease: int = 3600,
        description: str = "natkit",
        via: str = "auto",
        order: Sequence[Method] = DEFAULT_ORDER,
        gateway_ip: str | None = None,
        timeout: float = 2.0,
        check_interval: float = 2.0,
    ) -> None:
        self.internal_port = internal_port
        self.protocol = protocol
        self.external_port = external_port
        self.lease = lease
        self.description = description
        self.via = via
        self.order = order
        self.fixed_gateway = gateway_ip
        self.timeout = timeout
        self.check_interval = check_interval
        self.mapping: PortMapping | None = None
        self.mapper: Mapper | None = None
        self.probe_result: ProbeResult | None = None
        self.gateway_ip = ""
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._renew_at = 0.0
        self.closed = False

    def on_event(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _emit(self, event: str, **info: Any) -> None:
        assert self.mapping is not None
        for listener in list(self._listeners):
            try:
                listener(event, self.mapping, info)
            except Exception:  # a listener's bug must not kill the keeper
                log.exception("event listener failed")

    async def _establish(self, prefer_port: int | None) -> PortMapping:
        if self.mapper is not None:
            self.mapper.close()
        result = await probe(
            via=self.via, order=self.order, gateway_ip=self.fixed_gateway, timeout=self.timeout
        )
        self.probe_result, self.mapper, self.gateway_ip = result, result.chosen, result.gateway_ip
        m = await self.mapper.add(
            self.internal_port,
            external_port=prefer_port,
            protocol=self.protocol,
            lease=self.lease,
            description=self.description,
        )
        self._schedule_renewal(m)
        return m

    def _schedule_renewal(self, m: PortMapping) -> None:
        self._renew_at = time.monotonic() + (m.lease / 2 if m.lease else float("inf"))

    async def start(self) -> PortMapping:
        """Create the mapping and start keeping it; returns it (event: ready)."""
        self.mapping = await self._establish(self.external_port)
        self._emit("ready", probe=self.probe_result)
        self._task = asyncio.get_running_loop().create_task(self._keep())
        return self.mapping

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("keeping %s failed: %s", self.mapping, exc)

    async def _tick(self) -> None:
        assert self.mapping is not None and self.mapper is not None
        reason = ""
        if self.fixed_gateway is None:
            with contextlib.suppress(DiscoveryError):
                if default_gateway() != self.gateway_ip:
                    reason = "the default gateway changed"
        if not reason:
            try:
                if time.monotonic() >= self._renew_at:
                    fresh = await self.mapper.renew(self.mapping)
                    changed = fresh.public_address != self.mapping.public_address
                    self.mapping = fresh
                    self._schedule_renewal(fresh)
                    self._emit("renewed", changed=changed)
                    return
                if not await self.mapper.check(self.mapping):
                    reason = "the router lost the mapping (rebooted or purged it)"
            except NatkitError as exc:
                reason = f"the router stopped answering: {exc}"
        if reason:
            await self._restore(reason)

    async def _restore(self, reason: str) -> None:
        assert self.mapping is not None
        old = self.mapping
        self._emit("lost", reason=reason)
        delay = 0.5
        while True:
            try:
                self.mapping = await self._establish(old.external_port)
                break
            except NatkitError as exc:
                log.info("restoring the mapping failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 30.0)
        self._emit(
            "restored",
            previous=old.public_address,
            changed=self.mapping.public_address != old.public_address,
        )

    async def close(self) -> None:
        """Stop keeping the mapping and delete it from the router (event: closed)."""
        if self.closed:
            return
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.mapping is None or self.mapper is None:
            return
        try:
            await self.mapper.remove(self.mapping)
            self._emit("closed", removed=True)
        except NatkitError as exc:
            log.warning("could not remove %s: %s", self.mapping.public_address, exc)
            self._emit("closed", removed=False, error=str(exc))
            if self.mapping.lease == 0:
                raise
        finally:
            self.mapper.close()
