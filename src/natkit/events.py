"""Typed events of the Python API: what ``natkit expose --json`` prints, as objects.

A listener gets one of these (``match event: case natkit.events.Lost(reason=r): ...``).
``event.name`` is the ``event`` field of the CLI's JSON line, and ``to_json()`` that line's
natkit-specific fields. Events of a router mapping carry the :class:`PortMapping`;
events of a relay tunnel carry ``method == "relay"`` and no mapping.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from natkit.portmap.mapping import PortMapping
    from natkit.portmap.pinhole_mappers import Pinhole


@dataclasses.dataclass(frozen=True)
class Event:
    """Base of every event: where the service is public, and how."""

    name: ClassVar[str] = "event"
    public_address: str
    method: str  # upnp | natpmp | pcp | relay
    mapping: PortMapping | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"event": self.name}
        if self.mapping is not None:
            obj.update(self.mapping.to_json())
        for field in dataclasses.fields(self):
            if field.name != "mapping":
                obj[field.name] = getattr(self, field.name)
        return obj


@dataclasses.dataclass(frozen=True)
class Ready(Event):
    """Public. ``verified``: the relay reached the mapping from outside (auto mode).
    ``public_address_v6``: the IPv6 pinhole beside a mapping, when there is one. Via the
    relay in auto mode, ``mapping_state`` says whether the router's mapping may still take
    over: ``probing`` (still being tried) or ``waiting_for_service`` (tried again once the
    local service listens); the CLI's ``"mapping"`` field."""

    name: ClassVar[str] = "ready"
    verified: bool = False
    public_address_v6: str = ""
    mapping_state: str = ""


@dataclasses.dataclass(frozen=True)
class Renewed(Event):
    """The router renewed the lease; ``changed``: the public address moved."""

    name: ClassVar[str] = "renewed"
    changed: bool = False


@dataclasses.dataclass(frozen=True)
class Lost(Event):
    """The mapping or the relay connection is gone; natkit is restoring it unless ``final``."""

    name: ClassVar[str] = "lost"
    reason: str = ""
    final: bool = False
    retry_in: float | None = None


@dataclasses.dataclass(frozen=True)
class Restored(Event):
    """Back after a loss; ``previous`` public address, ``changed`` if it moved."""

    name: ClassVar[str] = "restored"
    previous: str = ""
    changed: bool = False


@dataclasses.dataclass(frozen=True)
class Fallback(Event):
    """Auto mode gave up on a router mapping (``reason``) and uses the relay instead."""

    name: ClassVar[str] = "fallback"
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Switched(Event):
    """Auto mode: a mapping proven after the relay went ahead takes over (the tunnel's
    Closed, then the mapping's Ready follow). ``previous_address``: the relay's."""

    name: ClassVar[str] = "switched"
    previous_address: str = ""
    previous_method: str = "relay"

    def to_json(self) -> dict[str, Any]:
        # The CLI's line: ``from`` (a keyword in Python, hence previous_method here).
        return {"event": self.name, "from": self.previous_method,
                "previous_address": self.previous_address}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LocalUnreachable(Event):
    """Nothing answers on the local port (visitors are refused until the service listens).
    ``public_address``/``method``: empty, nothing is public yet when it is said at start."""

    name: ClassVar[str] = "local_unreachable"
    local_address: str = ""
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class LocalReachable(Event):
    """The local service that was down listens now (auto mode then tries the mapping again)."""

    name: ClassVar[str] = "local_reachable"
    local_address: str = ""


@dataclasses.dataclass(frozen=True)
class PinholeEvent(Event):
    """The IPv6 pinhole beside a mapping (``public_address``: its ``[ADDR]:PORT``, ``method``:
    upnp or pcp); one of :class:`PinholeRenewed`, :class:`PinholeLost` (``reason``; natkit
    restores it) and :class:`PinholeRestored`."""

    name: ClassVar[str] = "pinhole"
    reason: str = ""
    pinhole: Pinhole | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:  # the CLI's pinhole_* line
        obj: dict[str, Any] = {"event": self.name}
        obj.update(self.pinhole.to_json() if self.pinhole is not None else {})
        return {**obj, **({"reason": self.reason} if self.reason else {})}


@dataclasses.dataclass(frozen=True)
class PinholeRenewed(PinholeEvent):
    name: ClassVar[str] = "pinhole_renewed"


@dataclasses.dataclass(frozen=True)
class PinholeLost(PinholeEvent):
    name: ClassVar[str] = "pinhole_lost"


@dataclasses.dataclass(frozen=True)
class PinholeRestored(PinholeEvent):
    name: ClassVar[str] = "pinhole_restored"


@dataclasses.dataclass(frozen=True)
class Interference(Event):
    """The relay warns that something between it and the visitors interferes."""

    name: ClassVar[str] = "interference"
    message: str = ""


@dataclasses.dataclass(frozen=True)
class Pinned(Event):
    """The relay's certificate was pinned on first use (trust on first use)."""

    name: ClassVar[str] = "pinned"
    fingerprint: str = ""


@dataclasses.dataclass(frozen=True)
class Closed(Event):
    """Stopped; ``removed``: the router mapping was deleted (``error`` says why not)."""

    name: ClassVar[str] = "closed"
    removed: bool = False
    error: str = ""


@dataclasses.dataclass(frozen=True)
class Refused(Event):
    """The relay kept a visitor out by the tunnel's access policy (``reason``: denied,
    not-allowed, rate-limited, auth-missing, auth-wrong; ``time``: the relay's Unix time;
    ``more``: refusals the relay did not report one by one since the last event)."""

    name: ClassVar[str] = "refused"
    visitor: str = ""
    reason: str = ""
    time: float = 0.0
    more: int = 0


def from_mapping(event: str, mapping: PortMapping, info: dict[str, Any]) -> Event | None:
    """The typed form of a :class:`~natkit.portmap.manager.KeptMapping` event."""
    at, method = mapping.public_address, mapping.method
    if event == "ready":
        return Ready(at, method, mapping, verified=bool(info.get("verified")))
    if event == "renewed":
        return Renewed(at, method, mapping, changed=bool(info.get("changed")))
    if event == "lost":
        return Lost(at, method, mapping, reason=str(info.get("reason", "")))
    if event == "restored":
        previous, changed = str(info.get("previous", "")), bool(info.get("changed"))
        return Restored(at, method, mapping, previous=previous, changed=changed)
    if event == "closed":
        removed, error = bool(info.get("removed")), str(info.get("error", ""))
        return Closed(at, method, mapping, removed=removed, error=error)
    return None


def from_relay(event: str, info: dict[str, Any], public: str) -> Event | None:
    """The typed form of a relay :class:`~natkit.relay.agent.Agent` event (``public``: the
    tunnel's address when the event does not name it)."""
    at = str(info.get("public") or public)
    reason = str(info.get("reason", ""))
    if event == "ready":
        return Ready(at, "relay")
    if event in ("reconnecting", "lost"):  # reconnecting: the CLI's "lost" with retry_in
        retry = info.get("delay" if event == "reconnecting" else "retry_in")
        retry_in = None if retry is None else float(retry)
        return Lost(at, "relay", reason=reason, final=bool(info.get("final")), retry_in=retry_in)
    if event == "restored":
        return Restored(at, "relay", previous=public, changed=bool(info.get("changed")))
    if event == "interference":
        return Interference(at, "relay", message=str(info.get("message", "")))
    if event == "pinned":
        return Pinned(at, "relay", fingerprint=str(info.get("fingerprint", "")))
    if event == "refused":
        return Refused(at, "relay", visitor=str(info.get("visitor", "")), reason=reason,
                       time=float(info.get("at", 0.0)), more=int(info.get("more", 0)))  # fmt: skip
    return None


__all__ = [
    "Closed",
    "Event",
    "Fallback",
    "Interference",
    "LocalReachable",
    "LocalUnreachable",
    "Lost",
    "PinholeEvent",
    "PinholeLost",
    "PinholeRenewed",
    "PinholeRestored",
    "Pinned",
    "Ready",
    "Refused",
    "Renewed",
    "Restored",
    "Switched",
]
