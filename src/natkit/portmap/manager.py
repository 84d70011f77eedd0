"""One port-mapping manager over UPnP IGD, NAT-PMP and PCP.

``probe`` asks the gateway in all three protocols at once and picks the best that answers
within a short budget; ``KeptMapping`` then keeps one mapping alive: it renews at half the
lease, notices a router reboot (PCP/NAT-PMP epoch, a vanished UPnP entry, an IGD that
stopped answering), notices a silent loss (the router lost its mappings while its epoch ran
on: see REFRESH_INTERVAL), follows a gateway change, re-creates the mapping (the same
external port when it can), and removes it when closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from natkit.errors import DiscoveryError, NatkitError
from natkit.net.routes import GatewayWatch, default_gateway, read_routes_async
from natkit.portmap import pcp
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
# A router can lose every mapping while its NAT-PMP/PCP epoch runs on (miniupnpd restarted
# with system_uptime=yes, OpenWrt's default; a firewall reload that flushes its chains), so
# the epoch check never fires. Every REFRESH_INTERVAL a PCP/NAT-PMP mapping is looked for
# (LossCheck) and restored when gone. 30 s: noticed within 30 s and restored within a second
# on a LAN, inside the 60 s issue 13 asks for even when the first attempt meets a router
# still restarting (2 s timeout, then retries from 0.5 s); one small UDP request and its
# answer every 30 s is nothing to a router (miniupnpd answers within a millisecond).
REFRESH_INTERVAL = 30.0


@dataclasses.dataclass
class ProbeResult:
    gateway_ip: str
    chosen: Mapper
    offered: dict[str, str]  # method -> external address it reported ("" if unknown)
    refused: dict[str, str]  # method -> why it is not usable
    elapsed: float


async def discover_upnp(
    gateway_ip: str, timeout: float, ssdp_target: tuple[str, int] | None = None
) -> UPnPMapper:
    if ssdp_target is None:  # passed only when set: tests point discovery at loopback
        return await UPnPMapper.discover(timeout=timeout, gateway_ip=gateway_ip)
    extra: dict[str, Any] = {"ssdp_target": ssdp_target}
    return await UPnPMapper.discover(timeout=timeout, gateway_ip=gateway_ip, **extra)


async def _probe_one(
    method: Method,
    gateway_ip: str,
    budget: float,
    pmp_port: int | None = None,
    ssdp_target: tuple[str, int] | None = None,
) -> tuple[Mapper, str]:
    if method == "upnp":
        upnp = await discover_upnp(gateway_ip, budget, ssdp_target)
        return upnp, upnp.gateway.external_ip
    udp = await GatewayUDP.open(gateway_ip, port=pmp_port or pcp.SERVER_PORT)
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
    pmp_port: int | None = None,
    ssdp_target: tuple[str, int] | None = None,
) -> ProbeResult:
    """Find which mapping protocols the gateway offers and choose one.

    ``via`` forces one protocol (then its full ``timeout`` applies); ``auto`` asks all in
    ``order`` of preference and chooses within ``budget`` seconds once any has answered
    (a router that answers nothing that fast still gets ``timeout``). ``pmp_port`` and
    ``ssdp_target`` point NAT-PMP/PCP and SSDP elsewhere (tests: a fake gateway on loopback).
    """
    start = time.monotonic()
    gw = gateway_ip or default_gateway(await read_routes_async())
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
        return await _probe_one("upnp", gw, max(budget, timeout), ssdp_target=ssdp_target)

    tasks = {
        m: asyncio.create_task(
            upnp_after_head_start()
            if m == "upnp" and pmp_first
            else _probe_one(m, gw, max(budget, timeout), pmp_port, ssdp_target)
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
# How a kept mapping's silent loss is seen (reported in the ready event as ``loss_check``):
#   upnp-table  the router's UPnP table is read (GetSpecificPortMappingEntry)
#   pcp-nonce   a PCP delete under another nonce is refused while the mapping exists
#   refresh     nothing can tell: the mapping is re-made every REFRESH_INTERVAL (the request
#               is idempotent), so a loss is repaired within it, but never seen or reported
#   pending     not yet known (NAT-PMP, or PCP without nonce checks, until the first check
#               has looked for a UPnP table)
LossCheck = Literal["upnp-table", "pcp-nonce", "refresh", "pending"]
SILENT_LOSS = (
    "the router lost the mapping while its epoch ran on (its daemon restarted or its "
    "firewall was reloaded); seen by {how}"
)


class KeptMapping:
    """A mapping kept alive until :meth:`close`. Events: ready, renewed, lost, restored, closed.

    Every ``check_interval`` the router is asked something cheap (PCP/NAT-PMP epoch, the UPnP
    entry); every ``refresh_interval`` a PCP/NAT-PMP mapping is looked for (``loss_check``).
    """

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
        refresh_interval: float = REFRESH_INTERVAL,
        pmp_port: int | None = None,
        ssdp_target: tuple[str, int] | None = None,
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
        self.refresh_interval = refresh_interval
        self.pmp_port = pmp_port
        self.ssdp_target = ssdp_target
        self.mapping: PortMapping | None = None
        self.mapper: Mapper | None = None
        self.probe_result: ProbeResult | None = None
        self.gateway_ip = ""
        self.loss_check: LossCheck = "pending"
        self._table: UPnPMapper | None = None  # the UPnP table of a PCP/NAT-PMP router
        self._pcp_nonce = pcp.new_nonce()
        # Asked every check: on macOS/Windows a command, so read at most every 10 s and
        # off the event loop (routes.GatewayWatch).
        self.gateway_watch = GatewayWatch()
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._renew_at = 0.0
        self._refresh_at = 0.0
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
            via=self.via,
            order=self.order,
            gateway_ip=self.fixed_gateway,
            timeout=self.timeout,
            pmp_port=self.pmp_port,
            ssdp_target=self.ssdp_target,
        )
        if result.gateway_ip != self.gateway_ip:
            self._drop_table()
        self.probe_result, self.mapper, self.gateway_ip = result, result.chosen, result.gateway_ip
        args: dict[str, Any] = {
            "external_port": prefer_port,
            "protocol": self.protocol,
            "lease": self.lease,
            "description": self.description,
        }
        if isinstance(self.mapper, PcpMapper):
            # One nonce for the keeper's whole life (RFC 6887 11.1): a server that checks
            # nonces refuses a re-creation under a new one while the old mapping lives on
            # (after the router merely stopped answering for a while).
            m = await self.mapper.add(self.internal_port, nonce=self._pcp_nonce, **args)
        else:
            m = await self.mapper.add(self.internal_port, **args)
        m = await self._choose_loss_check(m)
        self._schedule_renewal(m)
        # Not yet known how a loss shows: learn it at the next check, not a refresh later.
        wait = self.refresh_interval if self.loss_check != "pending" else 0.0
        self._refresh_at = time.monotonic() + wait
        return m

    async def _choose_loss_check(self, m: PortMapping) -> PortMapping:
        """Just made, ``m`` surely exists: the moment to learn how its loss can be seen."""
        self.loss_check = "pending"
        if m.method == "upnp":
            self.loss_check = "upnp-table"  # check() reads it every check_interval
        elif isinstance(self.mapper, PcpMapper):
            if await self.mapper.held(m):
                self.loss_check = "pcp-nonce"
            else:  # the router ignores nonces: the probe may have deleted it
                log.info("the PCP server does not check nonces; re-making %s", m.public_address)
                m = await self.mapper.renew(m)
        elif self._table is not None and await self._table_shows(m, quiet=True):
            self.loss_check = "upnp-table"
        return m

    def _schedule_renewal(self, m: PortMapping) -> None:
        self._renew_at = time.monotonic() + (m.lease / 2 if m.lease else float("inf"))

    async def start(self) -> PortMapping:
        """Create the mapping and start keeping it; returns it (event: ready)."""
        self.mapping = await self._establish(self.external_port)
        self._emit("ready", probe=self.probe_result, loss_check=self.loss_check)
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
            gateway = await self.gateway_watch.current()
            if gateway is not None and gateway != self.gateway_ip:
                reason = "the default gateway changed"
        if not reason:
            try:
                if time.monotonic() >= self._renew_at:
                    # A renewal would re-make a lost mapping unseen: look first where we can.
                    reason = await self._look_before_renewal()
                    if not reason:
                        self._renewed(await self.mapper.renew(self.mapping))
                        return
                elif not await self.mapper.check(self.mapping):
                    reason = "the router lost the mapping (rebooted or purged it)"
                elif time.monotonic() >= self._refresh_at:
                    self._refresh_at = time.monotonic() + self.refresh_interval
                    reason = await self._look_for_silent_loss()
            except NatkitError as exc:
                reason = f"the router stopped answering: {exc}"
        if reason:
            await self._restore(reason)

    async def _look_before_renewal(self) -> str:
        assert self.mapping is not None
        if self.mapping.method == "upnp" or self.loss_check not in ("pcp-nonce", "upnp-table"):
            return ""
        self._refresh_at = time.monotonic() + self.refresh_interval
        return await self._look_for_silent_loss()

    def _renewed(self, fresh: PortMapping) -> None:
        assert self.mapping is not None
        changed = fresh.public_address != self.mapping.public_address
        self.mapping = fresh
        self._schedule_renewal(fresh)
        self._emit("renewed", changed=changed)

    async def _look_for_silent_loss(self) -> str:
        """'' if the mapping is there (or was re-made unseen); else why it is gone."""
        assert self.mapping is not None and self.mapper is not None
        m = self.mapping
        if self.loss_check == "pcp-nonce" and isinstance(self.mapper, PcpMapper):
            held = await self.mapper.held(m)
            return "" if held else SILENT_LOSS.format(how="a PCP request it would refuse")
        if self.loss_check == "upnp-table" and m.method != "upnp":
            try:
                held = await self._table_shows(m)
            except NatkitError as exc:  # the IGD, not the mapping protocol, failed: refresh
                log.info("reading the UPnP table failed (%s); refreshing instead", exc)
            else:
                return "" if held else SILENT_LOSS.format(how="the router's UPnP table")
        if m.method == "upnp":
            return ""  # check() read the table already
        # Nothing can tell: the mapping request is idempotent, so re-make it (RFC 6886 3.3,
        # RFC 6887 11.2.1: same nonce); a lost mapping is back without ever being seen.
        fresh = await self.mapper.renew(m)
        if fresh.public_address != m.public_address:
            self._renewed(fresh)
        else:
            self.mapping = fresh
        if self.loss_check == "pending":
            self.loss_check = "refresh"
            if await self._find_table() and await self._table_shows(fresh, quiet=True):
                self.loss_check = "upnp-table"
            log.info("silent losses of %s: %s", fresh.public_address, self.loss_check)
        return ""

    async def _find_table(self) -> bool:
        """The gateway's UPnP IGD, if it has one (asked once per gateway, read-only)."""
        if self._table is not None:
            return True
        if "upnp" not in self.order and self.ssdp_target is None:
            return False
        try:
            self._table = await discover_upnp(self.gateway_ip, self.timeout, self.ssdp_target)
        except NatkitError as exc:
            log.info("no UPnP table to look mappings up in: %s", exc)
            return False
        return True

    async def _table_shows(self, m: PortMapping, *, quiet: bool = False) -> bool:
        """Does the UPnP table list ``m``? ``quiet``: False when it cannot be read either."""
        assert self._table is not None
        try:
            return await self._table.check(m)
        except NatkitError:
            if quiet:
                return False
            raise

    def _drop_table(self) -> None:
        if self._table is not None:
            self._table.close()
            self._table = None

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
        self._drop_table()
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
