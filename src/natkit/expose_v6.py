"""The IPv6 side of ``natkit expose`` and ``natkit.expose`` (:mod:`natkit.expose_core`):
beside the IPv4 mapping, a kept pinhole for this host's global IPv6 address when it has one
(``public_address_v6``). Best effort: a host without global IPv6, or a router that offers no
pinholes, leaves the IPv4 side as it was."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from natkit.errors import DiscoveryError, NatkitError
from natkit.portmap.pinhole import MAX_LEASE
from natkit.portmap.pinhole_addr import global_ipv6, ipv6_gateway
from natkit.portmap.pinhole_keeper import KeptPinhole
from natkit.portmap.pinhole_mappers import Pinhole


class ExposeV6:
    def __init__(
        self, port: int, *, protocol: str, lease: int, gateway: str | None, check_interval: float
    ) -> None:
        self.port, self.protocol, self.lease = port, protocol, min(lease, MAX_LEASE)
        self.gateway, self.check_interval = gateway, check_interval
        self.keeper: KeptPinhole | None = None
        self.error = ""  # why there is no pinhole, when this host has global IPv6
        self.closed: dict[str, Any] = {}  # how closing it went

    async def start(self) -> None:
        try:
            _, iface = ipv6_gateway()
            global_ipv6(iface)
        except DiscoveryError:
            return  # no global IPv6 here: nothing to report
        keeper = KeptPinhole(
            self.port,
            protocol=self.protocol,
            lease=self.lease,
            gateway_ip=self.gateway,
            check_interval=max(self.check_interval, 1.0),
        )
        try:
            await keeper.start()
        except NatkitError as exc:
            self.error = str(exc)
            return
        self.keeper = keeper

    @property
    def pinhole(self) -> Pinhole | None:
        return self.keeper.pinhole if self.keeper is not None else None

    def fields(self, event: str) -> dict[str, Any]:
        """What the mapping's JSON ``ready`` and ``closed`` events add: the IPv6 address (or
        why there is none), and at the end whether the pinhole was removed."""
        if event not in ("ready", "closed"):
            return {}
        if self.pinhole is None:
            return {"ipv6_error": self.error} if self.error and event == "ready" else {}
        extra: dict[str, Any] = {"public_address_v6": self.pinhole.public_address}
        if event == "ready":
            extra["pinhole"] = self.pinhole.to_json()
        else:
            extra.update(self.closed)
        return extra

    async def close(self) -> None:
        if self.keeper is not None:
            self.keeper.on_event(self._on_closed)
            await self.keeper.close()

    def _on_closed(self, event: str, pinhole: Pinhole, info: dict[str, Any]) -> None:
        if event == "closed":
            self.closed = {"pinhole_removed": info["removed"]}
            if info.get("closes_in"):
                self.closed["pinhole_closes_in"] = info["closes_in"]

    def on_event(self, listener: Callable[[str, Pinhole, dict[str, Any]], None]) -> None:
        """Call ``listener(event, pinhole, info)`` when the pinhole is renewed, lost or
        restored (its opening and closing ride on the mapping's ready and closed events)."""

        def passed_on(event: str, pinhole: Pinhole, info: dict[str, Any]) -> None:
            if event in ("renewed", "lost", "restored"):
                listener(event, pinhole, info)

        if self.keeper is not None:
            self.keeper.on_event(passed_on)
