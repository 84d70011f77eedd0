"""``natkit.expose(8080, relay=..., token=...)``: the Python twin of ``natkit expose``

The same options and the same events (as :mod:`natkit.events` objects). With a relay in
auto mode the router is asked for a mapping first and the relay proves it from outside
(it dials the public address: :func:`prove_reachable`); a mapping that is not proven
gives way to a relay tunnel (event :class:`~natkit.events.Fallback`). Without a relay it
is a kept router mapping; with ``via="relay"``, ``http`` or ``tls`` a relay tunnel.
(Not ``natkit/expose.py``: a submodule of that name would hide ``natkit.expose``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING

from natkit.api import EventListener, Opening, SyncHandle, _LoopThread, check_port, relay_settings
from natkit.errors import NatkitError, NotPubliclyReachableError, RelayError
from natkit.events import Closed, Event, Fallback, from_mapping
from natkit.relay.access import AccessPolicy, build_policy
from natkit.relay.api import open_tunnel, typed_relay_listener

if TYPE_CHECKING:
    from natkit.portmap.manager import KeptMapping
    from natkit.portmap.mapping import PortMapping
    from natkit.relay.agent import Agent, TunnelSpec

VIAS = ("auto", "upnp", "natpmp", "pcp", "relay")
# How long the relay gets to connect to a fresh mapping from outside (as the CLI).
DIAL_TIMEOUT = 15.0


async def prove_reachable(
    agent: Agent, task: asyncio.Task[None], host: str, port: int, timeout: float = DIAL_TIMEOUT
) -> tuple[bool, str]:
    """Have the relay connect to ``host:port`` from outside: (reached, why not). A final
    error of the agent (bad token, untrusted relay) is raised."""
    dial = asyncio.ensure_future(agent.dial(host, port, timeout=timeout))
    done, _ = await asyncio.wait({dial, task}, return_when=asyncio.FIRST_COMPLETED)
    if dial not in done:
        dial.cancel()
        task.result()  # the agent ended: raise its final error
        return False, "relay unavailable"
    try:
        return dial.result()
    except (NatkitError, asyncio.TimeoutError) as exc:  # no relay connection in time
        return False, str(exc) or f"the relay did not answer within {timeout:g} s"


class Exposure:
    """A service made public (async): by a kept router mapping or a relay tunnel.

    ``public_address`` and ``method`` (upnp, natpmp, pcp or relay) stay current;
    ``on_event`` gets :mod:`natkit.events` objects; ``close()`` removes the mapping or
    closes the tunnel.
    """

    def __init__(self, on_event: EventListener | None) -> None:
        self._listeners: list[EventListener] = [on_event] if on_event else []
        self.keeper: KeptMapping | None = None
        self.agent: Agent | None = None
        self._task: asyncio.Task[None] | None = None
        self._spec: TunnelSpec | None = None
        self.verified = False  # the relay reached the mapping from outside
        self.closed = False

    @property
    def mapping(self) -> PortMapping | None:
        """The router mapping (None when the relay carries the service)."""
        return self.keeper.mapping if self.keeper is not None else None

    @property
    def method(self) -> str:
        return self.mapping.method if self.mapping is not None else "relay"

    @property
    def public_address(self) -> str:
        if self.mapping is not None:
            return self.mapping.public_address
        return self._spec.public if self._spec is not None else ""

    def on_event(self, callback: EventListener) -> None:
        """Call ``callback(event)`` for each later :mod:`natkit.events` object."""
        self._listeners.append(callback)

    def _emit(self, event: Event) -> None:
        for listener in list(self._listeners):
            listener(event)

    def _use_mapping(self, keeper: KeptMapping, *, verified: bool) -> None:
        self.keeper, self.verified = keeper, verified

        def typed(name: str, mapping: PortMapping, info: dict[str, object]) -> None:
            event = from_mapping(name, mapping, {**info, "verified": verified})
            if event is not None:
                self._emit(event)

        keeper.on_event(typed)
        assert keeper.mapping is not None
        typed("ready", keeper.mapping, {})

    async def _use_relay(
        self, agent: Agent, task: asyncio.Task[None], spec: TunnelSpec, timeout: float
    ) -> None:
        self.agent, self._task, self._spec = agent, task, spec
        agent.on_event(typed_relay_listener(self._emit, spec))
        await open_tunnel(agent, task, spec, timeout)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.keeper is not None:
            await self.keeper.close()  # its own Closed event: whether the router removed it
        if self.agent is not None and self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            await self.agent.close()
            self._emit(Closed(public_address=self.public_address, method="relay"))

    async def __aenter__(self) -> Exposure:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Exposure {self.public_address or '(not public)'} via {self.method}>"


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
    timeout: float = 30.0,
    on_event: EventListener | None = None,
) -> Opening[Exposure]:
    """Make local ``port`` public and keep it so until closed (``natkit expose PORT``).

    ``relay``/``token`` default to ``$NATKIT_RELAY``/``$NATKIT_TOKEN``; without a relay
    only a router mapping is tried. ``on_event`` gets every event from Ready (or Fallback)
    on. ``async with natkit.expose_async(8080) as e:`` or ``e = await ...``.
    """
    opts = _Options(port, protocol=protocol, via=via, external_port=external_port, lease=lease,
                    gateway=gateway, check_interval=check_interval, relay=relay, token=token,
                    http=http, tls=tls, hostname=hostname, local_host=local_host,
                    plaintext_data=plaintext_data, fingerprint=fingerprint, takeover=takeover,
                    timeout=timeout)  # fmt: skip
    opts.access = build_policy(allow=allow, deny=deny, basic_auth=basic_auth,
                               rate_limit=rate_limit, kind=opts.kind)  # fmt: skip
    if opts.access is not None:  # enforced by the relay: a router's mapping would bypass it
        if not opts.relay:
            raise ValueError("allow/deny/basic_auth/rate_limit are enforced by a relay: give relay")
        if opts.via not in ("auto", "relay") or opts.protocol != "tcp":
            raise ValueError("access control needs via='relay' and protocol='tcp'")
        opts.via = "relay"
    return Opening(_expose(opts, Exposure(on_event)))


class _Options:
    """expose's arguments, checked as the CLI checks its options."""

    def __init__(self, port: int, *, protocol: str, via: str, external_port: int | None,
                 lease: int, gateway: str | None, check_interval: float, relay: str | None,
                 token: str | None, http: bool, tls: bool, hostname: str, local_host: str,
                 plaintext_data: bool, fingerprint: str | None, takeover: bool,
                 timeout: float) -> None:  # fmt: skip
        self.port = check_port(port)
        self.external_port = None if external_port is None else check_port(external_port)
        self.protocol = protocol.lower()
        if self.protocol not in ("tcp", "udp"):
            raise ValueError(f"protocol must be tcp or udp, not {protocol!r}")
        if via not in VIAS:
            raise ValueError(f"via must be one of {', '.join(VIAS)}, not {via!r}")
        if http and tls:
            raise ValueError("choose one of http and tls")
        self.via, self.lease, self.gateway = via, lease, gateway
        self.check_interval, self.timeout = check_interval, timeout
        self.kind = "http" if http else "tls" if tls else "tcp"
        self.hostname, self.local_host, self.takeover = hostname, local_host, takeover
        self.plaintext_data, self.fingerprint = plaintext_data, fingerprint
        self.access: AccessPolicy | None = None  # set by expose_async
        relay = relay or os.environ.get("NATKIT_RELAY") or None
        if relay or via == "relay" or self.kind != "tcp":
            relay, token = relay_settings(relay, token)  # names what is missing
        self.relay, self.token = relay, token
        if relay and self.protocol == "udp" and via == "relay":
            raise ValueError("relay tunnels carry TCP; UDP needs a router mapping")

    def keeper(self) -> KeptMapping:
        from natkit.portmap.manager import KeptMapping  # only when a router mapping is tried

        return KeptMapping(self.port, protocol=self.protocol, external_port=self.external_port,
                           lease=self.lease, via="auto" if self.via == "relay" else self.via,
                           gateway_ip=self.gateway, check_interval=self.check_interval)  # fmt: skip

    def agent(self) -> tuple[Agent, asyncio.Task[None]]:
        from natkit.relay.agent import Agent

        assert self.relay and self.token
        try:
            agent = Agent(self.relay, self.token, [], plaintext_data=self.plaintext_data,
                          fingerprint=self.fingerprint)  # fmt: skip
        except ValueError as exc:  # not HOST:PORT
            raise RelayError(f"relay {self.relay!r}: {exc}") from None
        return agent, asyncio.get_running_loop().create_task(agent.run())

    def spec(self) -> TunnelSpec:
        from natkit.relay.agent import TunnelSpec

        return TunnelSpec(self.port, kind=self.kind, name=self.hostname,
                          local_host=self.local_host, port=self.external_port or 0,
                          exact=bool(self.external_port) and self.via == "relay",
                          takeover=self.takeover, access=self.access)  # fmt: skip


async def _expose(opts: _Options, exposure: Exposure) -> Exposure:
    if not opts.relay or (opts.protocol == "udp" and opts.via != "relay"):
        keeper = opts.keeper()
        mapping = await keeper.start()
        if not mapping.publicly_reachable:
            # The CLI warns and stays; a program asked for a public service and has no
            # screen to warn on: no relay to fall back on, so it is an error.
            await keeper.close()
            raise NotPubliclyReachableError(
                f"{mapping.reachability_note}; give relay= and token= (or set NATKIT_RELAY "
                "and NATKIT_TOKEN) to use a relay instead"
            )
        exposure._use_mapping(keeper, verified=False)
        return exposure
    agent, task = opts.agent()
    if opts.via != "relay" and opts.kind == "tcp":
        try:
            reason = await _try_mapping(opts, exposure, agent, task)
        except BaseException:
            await _stop(agent, task)
            raise
        if not reason:
            await _stop(agent, task)  # the mapping is proven: the relay is not needed
            return exposure
        exposure._emit(Fallback(public_address="", method="relay", reason=reason))
    spec = opts.spec()
    agent.open(spec)
    await exposure._use_relay(agent, task, spec, opts.timeout)
    return exposure


async def _try_mapping(
    opts: _Options, exposure: Exposure, agent: Agent, task: asyncio.Task[None]
) -> str:
    """Map and have the relay prove it: '' when it is in use, else why not."""
    keeper = opts.keeper()
    try:
        mapping = await keeper.start()
    except NatkitError as exc:
        return f"port mapping failed: {exc}"
    try:
        if not mapping.publicly_reachable:
            reason = mapping.reachability_note
        else:
            ok, error = await prove_reachable(
                agent, task, mapping.external_ip, mapping.external_port
            )
            if ok:
                exposure._use_mapping(keeper, verified=True)
                return ""
            reason = f"the relay could not reach {mapping.public_address} from outside: {error}"
    except BaseException:
        await keeper.close()  # a final relay error (bad token…): leave no mapping behind
        raise
    await keeper.close()
    return reason


async def _stop(agent: Agent, task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    await agent.close()


class Exposed(SyncHandle[Exposure]):
    """A service made public, for blocking code (a background thread keeps it so)."""

    @property
    def public_address(self) -> str:
        return self._handle.public_address

    @property
    def method(self) -> str:
        return self._handle.method

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
    timeout: float = 30.0,
    on_event: EventListener | None = None,
) -> Exposed:
    """Blocking :func:`expose_async`: ``with natkit.expose(8080, relay=..., token=...) as e:``."""
    opening = expose_async(port, protocol=protocol, via=via, external_port=external_port,
                           lease=lease, gateway=gateway, check_interval=check_interval,
                           relay=relay, token=token, http=http, tls=tls, hostname=hostname,
                           local_host=local_host, plaintext_data=plaintext_data,
                           fingerprint=fingerprint, takeover=takeover, allow=allow, deny=deny,
                           basic_auth=basic_auth, rate_limit=rate_limit, timeout=timeout,
                           on_event=on_event)  # fmt: skip
    runner = _LoopThread()
    try:
        handle = runner.run(opening)
    except BaseException:
        runner.stop()
        raise
    return Exposed(runner, handle)
