"""``natkit.expose(8080, relay=..., token=...)``: the Python twin of ``natkit expose``

The same options and the same events (as :mod:`natkit.events` objects), on the same engine
(:mod:`natkit.expose_core`). With a relay in auto mode the router is asked for a mapping
while the relay tunnel opens, and the relay proves the mapping from outside (it dials the
public address); a mapping not proven within a short head start leaves the relay to serve
first, and takes over when proven (event :class:`~natkit.events.Switched`); one that is not
proven gives way to the relay (:class:`~natkit.events.Fallback`). Without a relay it is a
kept router mapping; with ``via="relay"``, ``http`` or ``tls`` a relay tunnel.
(Not ``natkit/expose.py``: a submodule of that name would hide ``natkit.expose``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from natkit.api import EventListener, Opening, SyncHandle, _LoopThread, check_port, relay_settings
from natkit.errors import NotPubliclyReachableError
from natkit.events import (
    Closed,
    Event,
    Fallback,
    LocalReachable,
    LocalUnreachable,
    PinholeLost,
    PinholeRenewed,
    PinholeRestored,
    Ready,
    Switched,
    from_mapping,
)
from natkit.expose_core import CoreEvent, ExposeCore, Settings
from natkit.net.local_service import is_this_machine
from natkit.relay.access import build_policy
from natkit.relay.api import RelayTimeoutError
from natkit.state import state_dir

if TYPE_CHECKING:
    from natkit.portmap.mapping import PortMapping

log = logging.getLogger(__name__)
VIAS = ("auto", "upnp", "natpmp", "pcp", "relay")


class Exposure:
    """A service made public (async): by a kept router mapping or a relay tunnel.

    ``public_address``, ``public_address_v6`` (the IPv6 pinhole beside a mapping) and
    ``method`` (upnp, natpmp, pcp or relay) stay current: in auto mode a mapping proven after
    the relay went ahead takes over (event :class:`~natkit.events.Switched`). ``on_event``
    gets :mod:`natkit.events` objects; ``close()`` removes the mapping or closes the tunnel.
    """

    def __init__(self, settings: Settings, on_event: EventListener | None) -> None:
        self._listeners: list[EventListener] = [on_event] if on_event else []
        self._core = ExposeCore(settings, self._typed)
        self._stop = asyncio.Event()
        self._run: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def mapping(self) -> PortMapping | None:
        """The router mapping (None when the relay carries the service)."""
        return self._core.mapping

    @property
    def method(self) -> str:
        return self._core.method

    @property
    def public_address(self) -> str:
        return self._core.public_address

    @property
    def public_address_v6(self) -> str:
        """``[ADDR]:PORT`` of the IPv6 pinhole beside the mapping ("" when there is none)."""
        return self._core.public_address_v6

    @property
    def verified(self) -> bool:
        """The relay reached the mapping from outside (auto mode)."""
        return self._core.verified and self._core.mapping is not None

    def on_event(self, callback: EventListener) -> None:
        """Call ``callback(event)`` for each later :mod:`natkit.events` object."""
        self._listeners.append(callback)

    def _emit(self, event: Event) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a listener's bug must not stop the service
                log.exception("natkit.expose event listener failed")

    def _typed(self, ev: CoreEvent) -> None:
        event = typed_event(ev, self._core)
        if event is not None:
            self._emit(event)

    async def _start(self, timeout: float | None) -> Exposure:
        """Run the engine until the port is public (or it fails: raised)."""
        self._run = asyncio.get_running_loop().create_task(self._core.run(self._stop))
        self._run.add_done_callback(_seen)
        ready = asyncio.ensure_future(self._core.ready.wait())
        try:
            done, _ = await asyncio.wait({self._run, ready}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            if self._run in done:
                self._run.result()  # its error (a relay's, a router's)
            if ready not in done:
                raise RelayTimeoutError(
                    f"relay {self._core.s.relay} did not open the tunnel within {timeout:g} s"
                )
        except NotPubliclyReachableError as exc:
            await self._abort(ready)
            # The CLI warns and stays; a program asked for a public service and has no
            # screen to warn on: no relay to fall back on, so it is an error.
            raise NotPubliclyReachableError(
                f"{exc}; give relay= and token= (or set NATKIT_RELAY and NATKIT_TOKEN) to use "
                "a relay instead"
            ) from None
        except BaseException:
            await self._abort(ready)
            raise
        return self

    async def _abort(self, ready: asyncio.Future[Any]) -> None:
        ready.cancel()
        self.closed = True
        if self._run is not None:
            self._run.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._run

    async def close(self) -> None:
        """Remove the mapping (and pinhole) or close the tunnel. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        if self._run is not None:
            try:
                await self._run
            except Exception as exc:  # it had ended already (taken over…): said by Lost
                log.debug("natkit.expose had ended: %r", exc)

    async def __aenter__(self) -> Exposure:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Exposure {self.public_address or '(not public)'} via {self.method}>"


def _seen(run: asyncio.Task[None]) -> None:
    """Retrieve how the engine ended, even if nobody closes the exposure (else asyncio logs
    "Task exception was never retrieved"); a final error was told by its events already."""
    if not run.cancelled() and (exc := run.exception()) is not None:
        log.debug("natkit.expose ended: %r", exc)


def typed_event(ev: CoreEvent, core: ExposeCore) -> Event | None:
    """The :mod:`natkit.events` object for an event of the engine (None: not one of them)."""
    from natkit.events import from_relay

    info = ev.info
    if ev.source == "mapping":
        assert ev.mapping is not None
        if ev.name == "ready":
            m = ev.mapping
            return Ready(m.public_address, m.method, m, verified=bool(info.get("verified")),
                         public_address_v6=core.public_address_v6)  # fmt: skip
        return from_mapping(ev.name, ev.mapping, info)
    if ev.source == "relay":
        public = core.spec.public if core.spec is not None else ""
        if ev.name == "closed":  # only for a tunnel that opened
            return Closed(str(info["public"]), "relay") if info["opened"] else None
        if ev.name == "ready":
            return Ready(str(info["public"]), "relay", mapping_state=str(info.get("mapping", "")))
        return from_relay(ev.name, info, public)
    if ev.source == "core":
        if ev.name == "fallback":
            return Fallback(core.public_address, "relay", reason=str(info["reason"]))
        if ev.name == "switched":
            new = ev.mapping
            return Switched(new.public_address if new else "", new.method if new else "", new,
                            previous_address=str(info["previous_address"]),
                            previous_method=str(info["from"]))  # fmt: skip
        if ev.name == "local_unreachable":
            return LocalUnreachable(core.public_address, core.method,
                                    local_address=str(info["local_address"]),
                                    reason=str(info["reason"]))  # fmt: skip
        if ev.name == "local_reachable":
            return LocalReachable(core.public_address, core.method,
                                  local_address=str(info["local_address"]))  # fmt: skip
    if ev.source == "pinhole" and ev.pinhole is not None:
        kind = {"renewed": PinholeRenewed, "lost": PinholeLost, "restored": PinholeRestored}
        if (cls := kind.get(ev.name)) is not None:
            p = ev.pinhole
            return cls(p.public_address, p.method, reason=str(info.get("reason", "")), pinhole=p)
    return None


def expose_async(
    port: int,
    *,
    protocol: str = "tcp",
    via: str = "auto",
    external_port: int | None = None,
    lease: int = 3600,
    gateway: str | None = None,
    check_interval: float = 2.0,
    relay: str | None = None,
    token: str | None = None,
    http: bool = False,
    tls: bool = False,
    hostname: str = "",
    local_host: str = "127.0.0.1",
    plaintext_data: bool = False,
    fingerprint: str | None = None,
    takeover: bool = False,
    allow: Sequence[str] = (),
    deny: Sequence[str] = (),
    basic_auth: str | Sequence[str] | None = None,
    rate_limit: str | None = None,
    ipv6: bool = True,
    timeout: float = 30.0,
    on_event: EventListener | None = None,
) -> Opening[Exposure]:
    """Make local ``port`` public and keep it so until closed (``natkit expose PORT``).

    ``relay``/``token`` default to ``$NATKIT_RELAY``/``$NATKIT_TOKEN``; without a relay
    only a router mapping is tried. With a relay in auto mode the router is asked while the
    relay tunnel opens: a mapping the relay proves from outside is used; otherwise the
    relay serves (ready within a blink on a router with no mapping protocol) and a mapping
    proven later takes over (Switched), also once a local service that was down listens.
    ``allow``/``deny`` (CIDRs), ``basic_auth`` ("USER:PASS", http), ``rate_limit`` ("10/s"):
    who may reach the tunnel, enforced by the relay (so the relay alone serves; see
    docs/relay-access.md). ``ipv6``: an IPv6 pinhole beside the mapping (``public_address_v6``) when this host has
    global IPv6. ``timeout``: how long the relay may take to open the tunnel. ``on_event``
    gets every :mod:`natkit.events` object. ``async with natkit.expose_async(8080) as e:``,
    ``e = await ...``, or ``asyncio.run(natkit.expose_async(...))``.
    """
    settings = _settings(port, protocol=protocol, via=via, external_port=external_port,
                         lease=lease, gateway=gateway, check_interval=check_interval,
                         relay=relay, token=token, http=http, tls=tls, hostname=hostname,
                         local_host=local_host, plaintext_data=plaintext_data,
                         fingerprint=fingerprint, takeover=takeover, ipv6=ipv6)  # fmt: skip
    access = build_policy(allow=allow, deny=deny, basic_auth=basic_auth, rate_limit=rate_limit,
                          kind=settings.kind)  # fmt: skip
    if access is not None:  # enforced by the relay: a router's mapping would bypass it
        if not settings.relay:
            raise ValueError("allow/deny/basic_auth/rate_limit are enforced by a relay: give relay")
        if settings.via not in ("auto", "relay") or settings.protocol != "tcp":
            raise ValueError("access control needs via='relay' and protocol='tcp'")
        settings.via, settings.access, settings.ipv6 = "relay", access, False
    uses_relay = settings.relay is not None
    return Opening(_expose(settings, on_event, timeout if uses_relay else None))


async def _expose(
    settings: Settings, on_event: EventListener | None, timeout: float | None
) -> Exposure:
    return await Exposure(settings, on_event)._start(timeout)


def _settings(port: int, *, protocol: str, via: str, external_port: int | None, lease: int,
              gateway: str | None, check_interval: float, relay: str | None, token: str | None,
              http: bool, tls: bool, hostname: str, local_host: str, plaintext_data: bool,
              fingerprint: str | None, takeover: bool, ipv6: bool) -> Settings:  # fmt: skip
    """expose's arguments, checked as the CLI checks its options."""
    port = check_port(port)
    if external_port is not None:
        check_port(external_port, "external_port")
    protocol = protocol.lower()
    if protocol not in ("tcp", "udp"):
        raise ValueError(f"protocol must be tcp or udp, not {protocol!r}")
    if via not in VIAS:
        raise ValueError(f"via must be one of {', '.join(VIAS)}, not {via!r}")
    if http and tls:
        raise ValueError("choose one of http and tls")
    kind = "http" if http else "tls" if tls else "tcp"
    relay = relay or os.environ.get("NATKIT_RELAY") or None
    if relay or via == "relay" or kind != "tcp":
        relay, token = relay_settings(relay, token)  # names what is missing
    if relay and protocol == "udp" and via == "relay":
        raise ValueError("relay tunnels carry TCP; UDP needs a router mapping")
    no_mapping = ""
    maps = via != "relay" and (kind == "tcp" or not relay)
    if maps and not is_this_machine(local_host):
        # A router's mapping forwards to the machine that asked for it, never to another.
        why = (f"{local_host} is not this machine, and a router's mapping forwards only to "
               "the machine that makes it")  # fmt: skip
        if not (relay and via == "auto"):
            raise ValueError(f"local_host: {why}: expose on {local_host}, or use via='relay'")
        no_mapping = f"{why}: the relay is used"
    return Settings(
        port, protocol=protocol, via=via, external_port=external_port, lease=lease,
        gateway=gateway, check_interval=check_interval, relay=relay, token=token, kind=kind,
        hostname=hostname, local_host=local_host, plaintext_data=plaintext_data,
        fingerprint=fingerprint, takeover=takeover, ipv6=ipv6, no_mapping=no_mapping,
        remember_ports=state_dir() / "relay_ports.json" if relay else None,
        require_public=not relay, fail_fast=True,
    )  # fmt: skip


class Exposed(SyncHandle[Exposure]):
    """A service made public, for blocking code (a background thread keeps it so)."""

    @property
    def public_address(self) -> str:
        return self._handle.public_address

    @property
    def method(self) -> str:
        return self._handle.method

    @property
    def public_address_v6(self) -> str:
        return self._handle.public_address_v6

    @property
    def mapping(self) -> PortMapping | None:
        return self._handle.mapping

    @property
    def verified(self) -> bool:
        return self._handle.verified

    def on_event(self, callback: EventListener) -> None:
        """Called (from natkit's background thread) with each :mod:`natkit.events` object."""
        self._handle.on_event(callback)


def expose(
    port: int,
    *,
    protocol: str = "tcp",
    via: str = "auto",
    external_port: int | None = None,
    lease: int = 3600,
    gateway: str | None = None,
    check_interval: float = 2.0,
    relay: str | None = None,
    token: str | None = None,
    http: bool = False,
    tls: bool = False,
    hostname: str = "",
    local_host: str = "127.0.0.1",
    plaintext_data: bool = False,
    fingerprint: str | None = None,
    takeover: bool = False,
    allow: Sequence[str] = (),
    deny: Sequence[str] = (),
    basic_auth: str | Sequence[str] | None = None,
    rate_limit: str | None = None,
    ipv6: bool = True,
    timeout: float = 30.0,
    on_event: EventListener | None = None,
) -> Exposed:
    """Blocking :func:`expose_async`: ``with natkit.expose(8080, relay=..., token=...) as e:``."""
    opening = expose_async(port, protocol=protocol, via=via, external_port=external_port,
                           lease=lease, gateway=gateway, check_interval=check_interval,
                           relay=relay, token=token, http=http, tls=tls, hostname=hostname,
                           local_host=local_host, plaintext_data=plaintext_data,
                           fingerprint=fingerprint, takeover=takeover, allow=allow, deny=deny,
                           basic_auth=basic_auth, rate_limit=rate_limit, ipv6=ipv6,
                           timeout=timeout, on_event=on_event)  # fmt: skip
    runner = _LoopThread()
    try:
        handle = runner.run(opening)
    except BaseException:
        runner.stop()
        raise
    return Exposed(runner, handle)
