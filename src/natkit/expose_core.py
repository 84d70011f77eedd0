"""The one engine behind ``natkit expose`` (the CLI renders its events) and ``natkit.expose``
(the Python API types them): the router's mapping, proven from outside by the relay, else a
relay tunnel, kept until stopped.

Auto mode with a relay asks the router (PCP, NAT-PMP and UPnP at once) while the relay tunnel
opens. A mapping proven within ``head_start`` is used and the tunnel dropped; otherwise the
tunnel is announced (relay ``ready``, the mapping still ``probing``) and a mapping proven later
takes over (``switched``). A mapping that could not be proven because the local service was
down is tried again once the service listens (the port is watched every
``local_watch_interval`` seconds, by a bind: the service never sees a probe).

No CLI here (no click, no rich): every event goes to one listener as a :class:`CoreEvent`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from natkit.errors import NatkitError, NotPubliclyReachableError, RelayError
from natkit.net.local_service import local_problem, nothing_bound
from natkit.relay.agent import Agent, TunnelSpec

if TYPE_CHECKING:
    from natkit.expose_v6 import ExposeV6
    from natkit.portmap.manager import KeptMapping
    from natkit.portmap.mapping import PortMapping
    from natkit.portmap.pinhole_mappers import Pinhole
    from natkit.relay.access import AccessPolicy

# How long the router's mapping may take to be proven before an open relay tunnel is
# announced: PCP and NAT-PMP answer within milliseconds, the relay's dial-back proof as fast;
# only UPnP's discovery waits its full 2 s on a router without it.
# (NATKIT_EXPOSE_HEAD_START: the tests' way to have the relay go first, and the mapping take
# over.)
HEAD_START = float(os.environ.get("NATKIT_EXPOSE_HEAD_START", "0.15"))
# How often a local service that is down is looked for while the relay serves in its place.
LOCAL_WATCH_INTERVAL = 2.0
# How long the relay gets to connect to a fresh mapping from outside.
DIAL_TIMEOUT = 15.0

Source = Literal["core", "mapping", "pinhole", "relay"]


@dataclasses.dataclass(frozen=True)
class CoreEvent:
    """One event of the engine. ``source``: ``mapping`` (KeptMapping's ready, renewed, lost,
    restored, closed, with ``mapping``), ``pinhole`` (the IPv6 pinhole's renewed, lost,
    restored, with ``pinhole``), ``relay`` (the agent's ready, reconnecting, restored, lost,
    interference, pinned, and closed) or ``core`` (local_unreachable, local_reachable,
    fallback, switched)."""

    source: Source
    name: str
    info: dict[str, Any]
    mapping: PortMapping | None = None
    pinhole: Pinhole | None = None


CoreListener = Callable[[CoreEvent], None]


@dataclasses.dataclass
class Settings:
    """What both twins ask for (the CLI's options, the library's arguments), checked."""

    port: int
    protocol: str = "tcp"
    via: str = "auto"  # auto | upnp | natpmp | pcp | relay
    external_port: int | None = None
    lease: int = 3600
    gateway: str | None = None
    check_interval: float = 2.0
    relay: str | None = None
    token: str | None = None
    kind: str = "tcp"  # tcp | http | tls (the relay's)
    hostname: str = ""
    local_host: str = "127.0.0.1"
    local_ip: str = ""  # local_host as an address ("": local_host itself)
    plaintext_data: bool = False
    fingerprint: str | None = None
    takeover: bool = False
    ipv6: bool = True  # a pinhole beside the mapping when this host has global IPv6
    no_mapping: str = ""  # why a router's mapping cannot serve (the service is elsewhere)
    access: AccessPolicy | None = None  # who may reach the tunnel, enforced by the relay
    remember_ports: Path | None = None  # the relay port of each service, across runs
    require_public: bool = False  # a mapping that is not public is an error (no relay)
    fail_fast: bool = False  # the relay's first failed connection is an error
    head_start: float = HEAD_START
    local_watch_interval: float = LOCAL_WATCH_INTERVAL
    pmp_port: int | None = None  # the NAT-PMP/PCP port (tests' fake gateways)
    ssdp_target: tuple[str, int] | None = None  # where M-SEARCH goes (tests' fake IGDs)

    @property
    def local_address(self) -> str:
        return self.local_ip or self.local_host


@dataclasses.dataclass
class _Verdict:
    """How an attempt at the mapping went: ``reason`` is "" when it is proven."""

    keeper: KeptMapping | None
    reason: str
    service_down: bool = False


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


async def _both(mapped: Awaitable[PortMapping], pinhole: Awaitable[None]) -> PortMapping:
    """Both at once; a failure is raised only once both are over, so that the caller's
    cleanup also sees a pinhole made meanwhile."""
    m, p = await asyncio.gather(mapped, pinhole, return_exceptions=True)
    for result in (m, p):
        if isinstance(result, BaseException):
            raise result
    assert not isinstance(m, BaseException)
    return m


async def stop_agent(agent: Agent, task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    await agent.close()


class ExposeCore:
    """Makes ``settings.port`` public until ``stop`` is set (:meth:`run`); ``ready`` is set
    once it is. ``mapping``/``method``/``public_address`` say how it is public now."""

    def __init__(
        self,
        settings: Settings,
        listener: CoreListener,
        *,
        prepare_relay: Callable[[Agent, TunnelSpec], Awaitable[None]] | None = None,
    ) -> None:
        """``prepare_relay``: called with the agent and its tunnel before the agent runs (the
        CLI's inspector starts there, so that no visitor goes uncaptured)."""
        self.s = settings
        self._listener = listener
        self._prepare_relay = prepare_relay
        self.ready = asyncio.Event()
        self.keeper: KeptMapping | None = None  # the mapping that serves
        self.v6: ExposeV6 | None = None  # its IPv6 side
        self.spec: TunnelSpec | None = None  # the relay tunnel that serves
        self.verified = False  # the relay reached the mapping from outside
        self.local_down = False  # nothing answers on the local port
        self._relay_live = False  # the tunnel is announced: its events are passed on
        self._mapping_state = ""  # while the relay serves: probing | waiting_for_service

    @property
    def mapping(self) -> PortMapping | None:
        return self.keeper.mapping if self.keeper is not None else None

    @property
    def method(self) -> str:
        m = self.mapping
        return m.method if m is not None else "relay" if self.spec is not None else ""

    @property
    def public_address(self) -> str:
        m = self.mapping
        if m is not None:
            return m.public_address
        return self.spec.public if self.spec is not None else ""

    @property
    def public_address_v6(self) -> str:
        pinhole = self.v6.pinhole if self.v6 is not None else None
        return pinhole.public_address if pinhole is not None else ""

    def _emit(self, source: Source, name: str, info: dict[str, Any] | None = None, *,
              mapping: PortMapping | None = None, pinhole: Pinhole | None = None) -> None:  # fmt: skip
        self._listener(CoreEvent(source, name, info or {}, mapping, pinhole))

    # ---- the modes ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Public until ``stop``; what was made is undone on the way out (cancelled too)."""
        s = self.s
        await self._check_local()
        if not s.relay or (s.protocol == "udp" and s.via != "relay"):
            await self._serve_mapping(stop, None)
        elif s.via == "relay" or s.kind != "tcp":
            await self._serve_relay(stop, *(await self._start_agent()))
        elif s.no_mapping:
            self._emit("core", "fallback", {"reason": s.no_mapping, "unusable": True})
            await self._serve_relay(stop, *(await self._start_agent()))
        else:
            await self._auto(stop)

    async def _check_local(self) -> None:
        s = self.s
        if s.protocol != "tcp":
            return
        if not s.relay:  # the mapping forwards to the LAN address
            if nothing_bound(s.port):
                self._local_down(f"port {s.port}", "nothing listens on it")
        elif problem := await local_problem(s.local_address, s.port):  # the relay: local_host
            self._local_down(f"{s.local_host}:{s.port}", problem)

    def _local_down(self, where: str, problem: str) -> None:
        self.local_down = True
        self._emit("core", "local_unreachable", {"local_address": where, "reason": problem})

    async def _auto(self, stop: asyncio.Event) -> None:
        """Both at once (see the module's docstring)."""
        loop = asyncio.get_running_loop()
        agent, task, spec = await self._start_agent()
        trying = loop.create_task(self._try_mapping(self._keeper(), agent, task))
        opened = asyncio.ensure_future(agent.wait_open(spec.id))
        relay_stop = asyncio.Event()
        relay_run: asyncio.Task[None] | None = None  # it ends the agent when it ends
        agent_ended = interrupted = False
        self._mapping_state = "probing"
        try:
            deadline = loop.time() + self.s.head_start
            while not trying.done():
                left = deadline - loop.time()
                if opened.done() and left <= 0:
                    break
                await asyncio.wait({trying, task, opened}, return_when=asyncio.FIRST_COMPLETED,
                                   timeout=left if left > 0 else None)  # fmt: skip
                if task.done():
                    task.result()  # a final relay error (bad token, unresolvable name…)
            if trying.done() and not trying.result().reason:  # proven within the head start
                opened.cancel()
                await stop_agent(agent, task)
                agent_ended = True
                await self._serve_mapping(stop, trying.result().keeper, verified=True)
                return
            relay_run = loop.create_task(self._serve_relay(relay_stop, agent, task, spec))
            stopper = asyncio.ensure_future(stop.wait())
            try:
                while True:
                    if trying.done():
                        verdict = trying.result()
                        if not verdict.reason:  # proven after the relay went ahead
                            await self._switch(stop, verdict, relay_stop, relay_run, spec)
                            return
                        self._emit("core", "fallback", {"reason": verdict.reason})
                        if not verdict.service_down:
                            self._mapping_state = ""
                            break
                        self._mapping_state = "waiting_for_service"
                        trying = loop.create_task(self._watch_then_try(agent, task))
                    await asyncio.wait({trying, relay_run, stopper},
                                       return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                    if stopper.done() or relay_run.done():
                        break
                await asyncio.wait({relay_run, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
            relay_stop.set()
            await relay_run
        except asyncio.CancelledError:
            interrupted = True
            raise
        finally:
            opened.cancel()
            for job in (trying, relay_run):
                if job is not None and not job.done():
                    if interrupted or job is relay_run:
                        job.cancel()  # Ctrl-C: at once (a mapping request in flight may stay)
                    # else the relay ended: the mapping attempt sees the agent ended, and
                    # removes a mapping it made (cancelled mid-request, it could not)
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await job
            if relay_run is None and not agent_ended:  # the relay never served: end the agent
                await stop_agent(agent, task)
            if trying.done() and not trying.cancelled() and trying.exception() is None:
                unused = trying.result().keeper  # proven as the run ended: not to be kept
                if unused is not None and unused is not self.keeper:
                    await unused.close()

    async def _switch(self, stop: asyncio.Event, verdict: _Verdict, relay_stop: asyncio.Event,
                      relay_run: asyncio.Task[None], spec: TunnelSpec) -> None:  # fmt: skip
        """The mapping takes over from the relay: ``switched``, the tunnel's ``closed``,
        then the mapping's ``ready``."""
        assert verdict.keeper is not None
        self._emit("core", "switched", {"from": "relay", "previous_address": spec.public},
                   mapping=verdict.keeper.mapping)  # fmt: skip
        relay_stop.set()
        try:
            await relay_run
        except BaseException:
            await verdict.keeper.close()
            raise
        self.spec = None
        await self._serve_mapping(stop, verdict.keeper, verified=True)

    # ---- the router's mapping ---------------------------------------------------------------

    def _keeper(self) -> KeptMapping:
        from natkit.portmap.manager import KeptMapping  # only when a router mapping is tried

        s = self.s
        return KeptMapping(
            s.port, protocol=s.protocol, external_port=s.external_port, lease=s.lease,
            via="auto" if s.via == "relay" else s.via, gateway_ip=s.gateway,
            check_interval=s.check_interval, pmp_port=s.pmp_port, ssdp_target=s.ssdp_target,
        )  # fmt: skip

    async def _try_mapping(self, keeper: KeptMapping, agent: Agent,
                           task: asyncio.Task[None]) -> _Verdict:  # fmt: skip
        """Make the mapping and have the relay prove it from outside; a mapping that is not
        proven is removed again."""
        s = self.s
        try:
            mapping = await keeper.start()
        except NatkitError as exc:
            return _Verdict(None, f"port mapping failed: {exc}")
        down = False
        try:
            reason = mapping.reachability_note if not mapping.publicly_reachable else ""
            if not reason and s.protocol == "tcp":
                # The router forwards to this host's LAN address: if nothing answers there,
                # the service is to blame, not the mapping.
                problem = await local_problem(mapping.internal_ip, s.port)
                down = bool(problem) and (self.local_down or nothing_bound(s.port))
                if down:
                    self.local_down = True
                    reason = (f"the service on port {s.port} is down ({problem}), so the "
                              "mapping could not be proven from outside: the relay serves "
                              "meanwhile, and the mapping is tried again once the service "
                              "listens")  # fmt: skip
                elif problem:
                    reason = (f"nothing answers on {mapping.internal_ip}:{s.port}, where the "
                              f"router's mapping forwards ({problem}): the service listens on "
                              f"{s.local_host} only")  # fmt: skip
            if not reason:
                ok, error = await prove_reachable(
                    agent, task, mapping.external_ip, mapping.external_port
                )
                if not ok:
                    reason = (f"the relay could not reach {mapping.public_address} from "
                              f"outside: {error}")  # fmt: skip
        except BaseException:
            await keeper.close()  # cancelled, or a final relay error: leave no mapping
            raise
        if reason:
            await keeper.close()
        return _Verdict(keeper, reason, down)

    async def _watch_then_try(self, agent: Agent, task: asyncio.Task[None]) -> _Verdict:
        """Wait for the local service (a bind on this machine, every
        ``local_watch_interval``), then try the mapping again."""
        s = self.s
        while await local_problem(s.local_address, s.port):
            done, _ = await asyncio.wait({task}, timeout=s.local_watch_interval)
            if done:
                task.result()  # a final relay error
                return _Verdict(None, "the relay connection ended")
        self.local_down = False
        self._emit("core", "local_reachable", {"local_address": f"{s.local_host}:{s.port}"})
        return await self._try_mapping(self._keeper(), agent, task)

    async def _serve_mapping(
        self, stop: asyncio.Event, keeper: KeptMapping | None, *, verified: bool = False
    ) -> None:
        """Keep the mapping (made now, unless ``keeper`` made it) and its IPv6 pinhole until
        ``stop``; both are removed on the way out."""
        from natkit.expose_v6 import ExposeV6  # only when a router mapping is used

        s = self.s
        started = keeper is not None
        keeper = keeper or self._keeper()
        v6 = ExposeV6(s.port, protocol=s.protocol, lease=s.lease, gateway=s.gateway,
                      check_interval=s.check_interval)  # fmt: skip
        try:
            pinhole_made = v6.start() if s.ipv6 else asyncio.sleep(0)
            if started:
                await pinhole_made
                assert keeper.mapping is not None
                mapping = keeper.mapping
                info = {"probe": keeper.probe_result, "verified": verified,
                        "loss_check": keeper.loss_check}  # fmt: skip
            else:
                mapping = await _both(keeper.start(), pinhole_made)
                info = {"probe": keeper.probe_result, "loss_check": keeper.loss_check}
            if s.require_public and not mapping.publicly_reachable:
                raise NotPubliclyReachableError(mapping.reachability_note)
            self.keeper, self.v6, self.verified = keeper, v6, verified
            keeper.on_event(lambda name, m, i: self._emit("mapping", name, i, mapping=m))
            self._emit("mapping", "ready", info, mapping=mapping)
            self.ready.set()
            v6.on_event(lambda name, p, i: self._emit("pinhole", name, i, pinhole=p))
            await stop.wait()
        finally:
            await v6.close()
            await keeper.close()

    # ---- the relay ------------------------------------------------------------------------

    async def _start_agent(self) -> tuple[Agent, asyncio.Task[None], TunnelSpec]:
        s = self.s
        assert s.relay and s.token
        spec = TunnelSpec(s.port, kind=s.kind, name=s.hostname, local_host=s.local_host,
                          port=s.external_port or 0,
                          exact=bool(s.external_port) and s.via == "relay",
                          takeover=s.takeover, access=s.access)  # fmt: skip
        try:
            agent = Agent(s.relay, s.token, [spec], plaintext_data=s.plaintext_data,
                          fingerprint=s.fingerprint, remember_ports=s.remember_ports)  # fmt: skip
        except ValueError as exc:  # not HOST:PORT
            raise RelayError(f"relay {s.relay!r}: {exc}") from None
        agent.on_event(self._relay_event)
        if self._prepare_relay is not None:
            try:
                await self._prepare_relay(agent, spec)
            except BaseException:
                await agent.close()
                raise
        return agent, asyncio.get_running_loop().create_task(self._run_agent(agent)), spec

    async def _run_agent(self, agent: Agent) -> None:
        """The agent's run; with ``fail_fast``, a first connection that fails (refused,
        unreachable, no TLS) before the port is public is a RelayError (the agent itself
        would retry silently for ever)."""
        if not self.s.fail_fast:
            await agent.run()
            return
        failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def first_failure(name: str, info: dict[str, Any]) -> None:
            if name == "reconnecting" and not self.ready.is_set() and not failed.done():
                failed.set_result(str(info.get("reason", "")))

        agent.on_event(first_failure)
        run: asyncio.Future[Any] = asyncio.ensure_future(agent.run())
        try:
            await asyncio.wait({run, failed}, return_when=asyncio.FIRST_COMPLETED)
            if run.done():
                run.result()
            raise RelayError(f"cannot reach relay {agent.relay}: {failed.result()}")
        finally:
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await run

    def _relay_event(self, name: str, info: dict[str, Any]) -> None:
        if name == "pinned":
            self._emit("relay", name, info)
        elif not self._relay_live:
            return  # the tunnel is not announced yet (the router may still win)
        elif name == "ready":
            self._relay_ready(str(info["public"]))
        else:
            self._emit("relay", name, info)

    def _relay_ready(self, public: str) -> None:
        info: dict[str, Any] = {"public": public}
        if self._mapping_state:
            info["mapping"] = self._mapping_state
        if self.s.access is not None:
            info["access"] = self.s.access.describe()  # no secrets: the rules, in words
        self._emit("relay", "ready", info)
        self.ready.set()

    async def _serve_relay(self, stop: asyncio.Event, agent: Agent, task: asyncio.Task[None],
                           spec: TunnelSpec) -> None:  # fmt: skip
        """Serve through the relay until ``stop``; the tunnel's ``closed`` at the end (with
        ``opened``: false for a tunnel that never opened)."""
        self.spec, self._relay_live = spec, True
        if spec.public and agent.connected.is_set():  # it opened while the router was probed
            self._relay_ready(spec.public)
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({stopper, task}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()  # final errors (bad token, refused name, untrusted relay)
        finally:
            stopper.cancel()
            self._relay_live = False
            await stop_agent(agent, task)
            self._emit("relay", "closed", {"public": spec.public, "opened": bool(spec.public)})
