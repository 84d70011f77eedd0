"""A kept IPv6 pinhole: opened through whichever protocol the router offers for pinholes
(pinhole_mappers.py), renewed at half its lease, re-opened when the router loses it, deleted
when closed — as KeptMapping does for IPv4 mappings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from natkit.errors import NatkitError
from natkit.portmap.pinhole_mappers import Pinhole, Pinholer, open_pinholer

log = logging.getLogger("natkit.portmap")

Listener = Callable[[str, Pinhole, dict[str, Any]], None]


class KeptPinhole:
    """A pinhole kept open until :meth:`close`. Events: ready, renewed, lost, restored, closed."""

    def __init__(
        self,
        port: int,
        *,
        protocol: str = "tcp",
        lease: int = 3600,
        via: str = "auto",
        gateway_ip: str | None = None,
        gateway6: str | None = None,
        local6: str | None = None,
        timeout: float = 2.0,
        check_interval: float = 30.0,
    ) -> None:
        self.port, self.protocol, self.lease = port, protocol, lease
        self.via, self.timeout, self.check_interval = via, timeout, check_interval
        self.gateway_ip, self.gateway6, self.local6 = gateway_ip, gateway6, local6
        self.pinhole: Pinhole | None = None
        self.pinholer: Pinholer | None = None
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._renew_at = 0.0
        self.closed = False

    def on_event(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _emit(self, event: str, **info: Any) -> None:
        assert self.pinhole is not None
        for listener in list(self._listeners):
            try:
                listener(event, self.pinhole, info)
            except Exception:  # a listener's bug must not kill the keeper
                log.exception("event listener failed")

    async def _establish(self) -> Pinhole:
        if self.pinholer is not None:
            self.pinholer.close()
        self.pinholer = await open_pinholer(
            via=self.via,
            gateway_ip=self.gateway_ip,
            gateway6=self.gateway6,
            local6=self.local6,
            timeout=self.timeout,
        )
        pinhole = await self.pinholer.add(self.port, self.protocol, self.lease)
        self._renew_at = time.monotonic() + pinhole.lease / 2
        return pinhole

    async def start(self) -> Pinhole:
        self.pinhole = await self._establish()
        self._emit("ready")
        self._task = asyncio.get_running_loop().create_task(self._keep())
        return self.pinhole

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(
                min(self.check_interval, max(self._renew_at - time.monotonic(), 0.1))
            )
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("keeping pinhole %s failed: %s", self.pinhole, exc)

    async def _tick(self) -> None:
        assert self.pinhole is not None and self.pinholer is not None
        try:
            if time.monotonic() >= self._renew_at:
                self.pinhole = await self.pinholer.renew(self.pinhole)
                self._renew_at = time.monotonic() + self.pinhole.lease / 2
                self._emit("renewed")
                return
            if await self.pinholer.check(self.pinhole):
                return
            reason = "the router lost the pinhole (rebooted or purged it)"
        except NatkitError as exc:
            reason = f"the router stopped answering: {exc}"
        await self._restore(reason)

    async def _restore(self, reason: str) -> None:
        self._emit("lost", reason=reason)
        delay = 0.5
        while True:
            try:
                self.pinhole = await self._establish()
                break
            except NatkitError as exc:
                log.info("re-opening the pinhole failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 30.0)
        self._emit("restored")

    async def close(self) -> None:
        """Stop keeping the pinhole and delete it from the router (event: closed)."""
        if self.closed:
            return
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.pinhole is None or self.pinholer is None:
            return
        try:
            open_for = await self.pinholer.remove(self.pinhole)
            self._emit("closed", removed=open_for == 0, closes_in=open_for)
        except NatkitError as exc:
            log.warning("could not remove pinhole %s: %s", self.pinhole.public_address, exc)
            self._emit("closed", removed=False, error=str(exc))
        finally:
            self.pinholer.close()
