"""``natkit expose PORT``: make a local port public and keep it so until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import click
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from natkit.cli.common import emit_event, emit_json, err, fail_with, out, run_loop
from natkit.cli.expose_local import (
    is_this_machine,
    local_problem,
    nothing_bound,
    resolve_local_host,
)
from natkit.errors import EXIT_INTERRUPTED, NatkitError
from natkit.net.fdlimit import raise_fd_limit
from natkit.relay.agent import Agent, TunnelSpec
from natkit.relay.pump import small_tls_buffers
from natkit.state import state_dir, writable_state_dir

if TYPE_CHECKING:
    from natkit.portmap.manager import KeptMapping
    from natkit.portmap.mapping import PortMapping

# How long the router's mapping may take to be proven before an open relay tunnel is
# announced: PCP and NAT-PMP answer within milliseconds, the relay's dial-back proof as fast;
# only UPnP's discovery waits its full 2 s on a router without it.
# (NATKIT_EXPOSE_HEAD_START: the tests' way to have the relay go first, and the mapping take
# over.)
HEAD_START = float(os.environ.get("NATKIT_EXPOSE_HEAD_START", "0.15"))


class _Status:
    """The one status block of human mode: redrawn in place on every event."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.state = "mapping…"
        self.mapping: PortMapping | None = None
        self.history: list[str] = []
        self.renewals = 0
        self.v6_address = ""  # the IPv6 pinhole's address, when there is one

    def render(self) -> Table:
        t = Table.grid(padding=(0, 2))
        t.add_column(style="bold")
        t.add_column()
        m = self.mapping
        t.add_row("state", self.state)
        if m is not None:
            t.add_row(
                "public address",
                f"[b green]{m.public_address}[/] ({m.protocol})"
                if m.publicly_reachable
                else f"[b yellow]{m.public_address}[/] ({m.protocol})",
            )
            t.add_row("reachability", m.reachability_note)
            if self.v6_address:
                t.add_row("IPv6 address", f"[b green]{self.v6_address}[/] (pinhole)")
            t.add_row("forwards to", f"{m.internal_ip}:{m.internal_port}")
            t.add_row(
                "via", f"{m.method}, lease {m.lease or 'permanent'} s, renewed {self.renewals}×"
            )
        for line in self.history[-3:]:
            t.add_row("", f"[dim]{line}[/]")
        t.add_row("", "[dim]Ctrl-C to stop and remove the mapping[/]")
        return t


def _event_json(event: str, m: PortMapping, info: dict[str, Any]) -> dict[str, Any]:
    obj: dict[str, Any] = {"event": event, **m.to_json()}
    for key, value in info.items():
        if key == "probe":
            # The protocols that answered before natkit chose; "offered" is its first name
            # (kept: fields are only ever added).
            obj["answered"] = obj["offered"] = sorted(value.offered)
            obj["probe_ms"] = round(value.elapsed * 1000, 1)
        else:
            obj[key] = value
    return obj


@click.command("expose")
@click.argument("port", type=click.IntRange(1, 65535))
@click.option("--protocol", type=click.Choice(["tcp", "udp"], case_sensitive=False), default="tcp",
              show_default=True)  # fmt: skip
@click.option("--via", type=click.Choice(["auto", "upnp", "natpmp", "pcp", "relay"]), default="auto",
              show_default=True,
              help="auto: the router's best mapping protocol, proven reachable, else the relay.")  # fmt: skip
@click.option(
    "--external-port", type=click.IntRange(1, 65535), help="Public port wanted (default: same)."
)
@click.option("--lease", type=click.IntRange(10, 604800), default=3600, show_default=True,
              help="Lease asked of the router; renewed at half of it.")  # fmt: skip
@click.option("--gateway", metavar="IP", help="Router address (default: the default gateway).")
@click.option("--check-interval", type=float, default=2.0, show_default=True,
              help="Seconds between checks that the router still has the mapping.")  # fmt: skip
@click.option(
    "--relay", metavar="HOST:PORT", help="A natkit relay to fall back on (or use: --via relay)."
)
@click.option("--token", envvar="NATKIT_TOKEN", help="The relay token (or $NATKIT_TOKEN).")
@click.option("--http", "http_mode", is_flag=True, help="Relay HTTP by Host: http://NAME.DOMAIN.")
@click.option(
    "--tls", "tls_mode", is_flag=True, help="Relay HTTPS by SNI, TLS passed through untouched."
)
@click.option("--hostname", default="", help="NAME for --http/--tls (default: a random one).")
@click.option("--inspect", "inspect_addr", metavar="ADDR",
              help="--http: serve the inspector (requests, replay) here "
                   "[default: 127.0.0.1:4040, or the next free port].")  # fmt: skip
@click.option("--no-inspect", is_flag=True, help="--http: no inspector, no capture.")
@click.option("--inspect-idle", type=click.FloatRange(0), default=600.0, show_default=True,
              metavar="SECONDS",
              help="--http: capture pauses after this long with nobody using the inspector "
                   "(0: never); the next look resumes it.")  # fmt: skip
@click.option(
    "--local-host", default="127.0.0.1", show_default=True, help="Where the service listens."
)
@click.option("--plaintext-data", is_flag=True,
              help="Relay data connections unencrypted (for services that encrypt end to end).")  # fmt: skip
@click.option(
    "--fingerprint",
    help="The relay's certificate fingerprint (sha256:...), else pinned on first use.",
)
@click.option("--takeover", is_flag=True,
              help="Take the relay port or host name over from another live agent of this token.")  # fmt: skip
@click.option("--no-ipv6", is_flag=True,
              help="No IPv6 pinhole (one is opened when this host has a global IPv6 address).")  # fmt: skip
@click.option(
    "--json", "as_json", is_flag=True, help="JSON lines, each with an event (docs/cli.md)."
)
def expose(**kw: Any) -> None:
    """Make local PORT reachable from the Internet and keep it so until stopped."""
    opts = ExposeOptions(**kw)
    opts.protocol = opts.protocol.lower()
    if opts.via == "relay" and not opts.relay:
        raise click.UsageError("--via relay needs --relay HOST:PORT")
    if (opts.http_mode or opts.tls_mode) and not opts.relay:
        raise click.UsageError("--http/--tls need --relay HOST:PORT")
    if opts.http_mode and opts.tls_mode:
        raise click.UsageError("choose one of --http and --tls")
    if (opts.inspect_addr or opts.no_inspect) and not opts.http_mode:
        raise click.UsageError("--inspect/--no-inspect are for --http tunnels")
    if opts.inspect_addr and opts.no_inspect:
        raise click.UsageError("choose one of --inspect and --no-inspect")
    if opts.inspect_addr:
        from natkit.cli.expose_inspect import parse_inspect_addr

        try:
            parse_inspect_addr(opts.inspect_addr)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--inspect") from None
    if opts.relay and not opts.token:
        raise click.UsageError("--relay needs --token (or $NATKIT_TOKEN)")
    if opts.relay and opts.protocol == "udp" and opts.via == "relay":
        raise click.UsageError("relay tunnels carry TCP; UDP needs a router mapping")
    opts.local_ip = resolve_local_host(opts.local_host)
    maps = opts.via != "relay" and (opts.kind == "tcp" or not opts.relay)
    if maps and not is_this_machine(opts.local_ip):
        # A router's mapping forwards to the machine that asked for it, never to another.
        why = (f"{opts.local_host} is not this machine, and a router's mapping forwards only "
               "to the machine that makes it")  # fmt: skip
        if not (opts.relay and opts.via == "auto"):
            raise click.BadParameter(
                f"{why}: run natkit expose on {opts.local_host}, or use --via relay",
                param_hint="--local-host",
            )
        opts.no_mapping = f"{why}: the relay is used"
    run_loop(_main(opts))


@dataclasses.dataclass
class ExposeOptions:
    port: int
    protocol: str
    via: str
    external_port: int | None
    lease: int
    gateway: str | None
    check_interval: float
    relay: str | None
    token: str | None
    http_mode: bool
    tls_mode: bool
    hostname: str
    inspect_addr: str | None
    no_inspect: bool
    inspect_idle: float
    local_host: str
    plaintext_data: bool
    fingerprint: str | None
    takeover: bool
    no_ipv6: bool
    as_json: bool
    local_ip: str = ""  # --local-host as an address
    inspector_url: str = ""  # --http: where the inspector serves
    local_down: bool = False  # nothing answered on the local port at start
    no_mapping: str = ""  # why a router's mapping cannot serve (--local-host elsewhere)
    ready: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # public once

    @property
    def kind(self) -> str:
        return "http" if self.http_mode else "tls" if self.tls_mode else "tcp"


async def _main(opts: ExposeOptions) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Windows' loops have no signal handlers: there Ctrl-C cancels this task (asyncio's
        # runner, woken by natkit.net.loops), and the same cleanup runs on the way out.
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    writable_state_dir()  # pins and ports are saved there: say so before the relay is used
    if opts.protocol == "tcp" and not opts.relay:  # the mapping forwards to the LAN address
        if nothing_bound(opts.port):
            opts.local_down = True
            _warn_local(opts, f"port {opts.port}", "nothing listens on it")
    elif opts.protocol == "tcp":  # the relay forwards to --local-host
        problem = await local_problem(opts.local_ip, opts.port)
        if problem:
            opts.local_down = True
            _warn_local(opts, f"{opts.local_host}:{opts.port}", problem)
    work = loop.create_task(_run(opts, stop))
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if not work.done() and not opts.ready.is_set():
        # Stopped before anything was public: end at once (whatever was made is undone by
        # the work's own cleanup), no fallback, exit 130.
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        fail_with(KeyboardInterrupt("interrupted before the port was public"), EXIT_INTERRUPTED,
                  as_json=opts.as_json)  # fmt: skip
    await work


def _warn_local(opts: ExposeOptions, where: str, problem: str) -> None:
    text = (f"nothing answers on {where} ({problem}): start the service there (or fix "
            "--local-host); visitors are refused until it listens")  # fmt: skip
    if opts.as_json:
        emit_event("local_unreachable", local_address=where, reason=problem)
    else:
        err.print(f"[yellow]warning:[/] {text}", soft_wrap=True)


async def _run(opts: ExposeOptions, stop: asyncio.Event) -> None:
    if not opts.relay or (opts.protocol == "udp" and opts.via != "relay"):
        await _run_mapping(opts, stop, None)
    elif opts.via == "relay" or opts.kind != "tcp":
        await _run_relay(opts, stop, None, None)
    elif opts.no_mapping:
        _say(opts, {"event": "fallback", "reason": opts.no_mapping},
             f"using the relay: {opts.no_mapping}")  # fmt: skip
        await _run_relay(opts, stop, None, None)
    else:
        await _auto(opts, stop)


async def _auto(opts: ExposeOptions, stop: asyncio.Event) -> None:
    """The router's mapping if the relay proves it from outside, else the relay tunnel —
    both tried at once. The mapping gets HEAD_START to be proven; after that an open relay
    tunnel is announced (``ready`` with ``"mapping": "probing"``) and a mapping proven
    later takes over (``switched``, then the mapping's ``ready``); a mapping that fails is
    reported as ``fallback`` (its reason) whenever it fails."""
    loop = asyncio.get_running_loop()
    spec = _spec(opts)
    agent = _agent(opts, [spec])
    task = loop.create_task(agent.run())
    keeper = _keeper(opts)
    trying = loop.create_task(_try_mapping(opts, keeper, agent, task))
    opened = asyncio.ensure_future(agent.wait_open(spec.id))
    relay_stop = asyncio.Event()
    relay_run: asyncio.Task[None] | None = None  # it ends the agent when it ends
    agent_ended = interrupted = False
    try:
        deadline = loop.time() + HEAD_START
        while not trying.done():
            left = deadline - loop.time()
            if opened.done() and left <= 0:
                break
            await asyncio.wait({trying, task, opened}, return_when=asyncio.FIRST_COMPLETED,
                               timeout=left if left > 0 else None)  # fmt: skip
            if task.done():
                task.result()  # a final relay error (bad token, unresolvable name…)
        if trying.done() and not trying.result():
            opened.cancel()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await agent.close()
            agent_ended = True
            await _run_mapping(opts, stop, keeper, verified=True)
            return
        if trying.done():
            _say(opts, {"event": "fallback", "reason": trying.result()},
                 f"falling back to the relay: {trying.result()}")  # fmt: skip
        relay_run = loop.create_task(
            _run_relay(opts, relay_stop, agent, task, spec, probing=not trying.done())
        )
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({trying, relay_run, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if trying.done() and not stop.is_set() and not relay_run.done():
            reason = trying.result()
            if not reason:  # proven after the relay went ahead: the mapping takes over
                _say(opts, {"event": "switched", "from": "relay", "previous_address": spec.public},
                     f"the router's mapping is proven: switching from the relay ({spec.public})")  # fmt: skip
                relay_stop.set()
                await relay_run
                stopper.cancel()
                await _run_mapping(opts, stop, keeper, verified=True)
                return
            _say(opts, {"event": "fallback", "reason": reason},
                 f"staying on the relay: {reason}")  # fmt: skip
            await asyncio.wait({relay_run, stopper}, return_when=asyncio.FIRST_COMPLETED)
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
                # else a final relay error: the mapping attempt sees the agent ended, and
                # removes a mapping it made (cancelled mid-request, it could not)
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await job
        if relay_run is None and not agent_ended:  # the relay never served: end the agent
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await agent.close()
        await keeper.close()  # a no-op when closed already (or when the mapping took over)


async def _try_mapping(
    opts: ExposeOptions, keeper: KeptMapping, agent: Agent, task: asyncio.Task[None]
) -> str:
    """Make the mapping and have the relay prove it from outside: "" when it works, else
    why not (the mapping is then removed)."""
    try:
        mapping = await keeper.start()
    except NatkitError as exc:
        return f"port mapping failed: {exc}"
    try:
        reason = mapping.reachability_note if not mapping.publicly_reachable else ""
        if not reason and opts.protocol == "tcp":
            # The router forwards to this host's LAN address: if nothing answers there,
            # the service is to blame, not the mapping.
            where = f"{mapping.internal_ip}:{opts.port}"
            problem = await local_problem(mapping.internal_ip, opts.port)
            if problem and opts.local_down:
                reason = (f"the service on port {opts.port} is down ({problem}), so the mapping "
                          "could not be proven from outside")  # fmt: skip
            elif problem:
                reason = (f"nothing answers on {where}, where the router's mapping forwards "
                          f"({problem}): the service listens on {opts.local_host} only")  # fmt: skip
        if not reason:
            ok, error = await _dial(agent, task, mapping.external_ip, mapping.external_port)
            if not ok:
                reason = f"the relay could not reach {mapping.public_address} from outside: {error}"
    except BaseException:
        await keeper.close()  # cancelled, or a final relay error: leave no mapping
        raise
    if reason:
        await keeper.close()
    return reason


async def _dial(agent: Agent, task: asyncio.Task[None], host: str, port: int) -> tuple[bool, str]:
    dial = asyncio.ensure_future(agent.dial(host, port, timeout=15.0))
    done, _ = await asyncio.wait({dial, task}, return_when=asyncio.FIRST_COMPLETED)
    if dial not in done:
        dial.cancel()
        task.result()  # the agent hit a final error (bad token…): raise it
        return False, "relay unavailable"
    return dial.result()


def _say(opts: ExposeOptions, obj: dict[str, Any], text: str) -> None:
    if opts.as_json:
        emit_json(obj)
    else:
        out.print(text, markup=False, soft_wrap=True)


def _keeper(opts: ExposeOptions) -> KeptMapping:
    from natkit.portmap.manager import KeptMapping  # only when router mapping is tried

    return KeptMapping(
        opts.port, protocol=opts.protocol, external_port=opts.external_port, lease=opts.lease,
        via="auto" if opts.via == "relay" else opts.via, gateway_ip=opts.gateway,
        check_interval=opts.check_interval,
    )  # fmt: skip


def _agent(opts: ExposeOptions, specs: list[TunnelSpec]) -> Agent:
    assert opts.relay and opts.token
    agent = Agent(opts.relay, opts.token, specs, plaintext_data=opts.plaintext_data,
                  fingerprint=opts.fingerprint, remember_ports=state_dir() / "relay_ports.json")  # fmt: skip

    def pinned(event: str, info: dict[str, Any]) -> None:
        if event == "pinned":
            err.print(f"pinned relay {info['relay']} certificate {info['fingerprint']}",
                      soft_wrap=True)  # fmt: skip

    agent.on_event(pinned)
    return agent


def _spec(opts: ExposeOptions) -> TunnelSpec:
    return TunnelSpec(opts.port, kind=opts.kind, name=opts.hostname, local_host=opts.local_host,
                      port=opts.external_port or 0,
                      exact=bool(opts.external_port) and opts.via == "relay",
                      takeover=opts.takeover)  # fmt: skip


async def _run_relay(
    opts: ExposeOptions,
    stop: asyncio.Event,
    agent: Agent | None,
    task: asyncio.Task[None] | None,
    spec: TunnelSpec | None = None,
    *,
    probing: bool = False,
) -> None:
    """Serve through the relay until ``stop``. ``probing``: the router's mapping is still
    being tried (said in ``ready``); it may take over, and then this ends without closing
    anything but the tunnel."""
    small_tls_buffers()  # this process is natkit's own agent (see pump.small_tls_buffers)
    raise_fd_limit()
    if agent is None or task is None or spec is None:
        spec = _spec(opts)
        agent = _agent(opts, [spec])
        task = asyncio.get_running_loop().create_task(agent.run())
    scheme = {"tcp": "tcp", "http": "http", "tls": "https"}[opts.kind]
    base = {"method": "relay", "protocol": scheme, "relay": opts.relay,
            "internal_port": opts.port, "internal_host": opts.local_host}  # fmt: skip
    inspector = None
    if opts.kind == "http" and not opts.no_inspect:
        from natkit.cli.expose_inspect import start_inspector, tunnel_opened

        try:
            inspector = await start_inspector(agent, spec, opts.inspect_addr, opts.inspect_idle)
        except BaseException:
            task.cancel()
            raise
        opts.inspector_url = inspector.url

    def on_event(event: str, info: dict[str, Any]) -> None:
        if inspector is not None and event in ("ready", "restored"):
            tunnel_opened(inspector, info["public"])
        if event == "ready":
            opts.ready.set()
            extra = {"mapping": "probing"} if probing else {}
            if opts.as_json:
                emit_event("ready", **base, public_address=info["public"], **extra)
                if inspector is not None:  # (after ready: a first line of ready stays so)
                    emit_event("inspector", url=inspector.url, tunnel=spec.id,
                               idle=opts.inspect_idle or None)  # fmt: skip
            else:
                out.print(_relay_block(opts, info["public"], probing))
        elif event == "reconnecting":
            _say(opts, {"event": "lost", **base, "public_address": spec.public, "reason": info["reason"],
                        "retry_in": info["delay"]},
                 f"relay connection lost ({info['reason']}); retrying in {info['delay']} s")  # fmt: skip
        elif event == "restored":
            _say(opts, {"event": "restored", **base, "public_address": info["public"],
                        "changed": info["changed"]},
                 f"relay connection restored: {info['public']}")  # fmt: skip
        elif event == "lost":  # taken over by another agent of the token
            final = bool(info.get("final"))
            _say(opts, {"event": "lost", **base, "public_address": info["public"],
                        "reason": info["reason"], "final": final},
                 f"tunnel lost: {info['reason']}" + ("" if final else f"; asking again in {info.get('retry_in', 0):g} s"))  # fmt: skip
        elif event == "interference":
            _say(opts, {"event": "interference", **base, "message": info["message"]},
                 f"warning: {info['message']}")  # fmt: skip

    agent.on_event(on_event)
    if spec.public and agent.connected.is_set():  # it opened while the router was probed
        on_event("ready", {"public": spec.public})
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({stopper, task}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # final errors (bad token, refused name, untrusted relay) surface here
    finally:
        stopper.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await agent.close()
        if inspector is not None:
            await inspector.close()
        if spec.public:  # a tunnel that never opened is not "closed": the error line says why
            _say(opts, {"event": "closed", **base, "public_address": spec.public},
                 "tunnel closed")  # fmt: skip
        elif not opts.as_json:
            err.print("stopped: the relay tunnel never opened")


def _relay_block(opts: ExposeOptions, public: str, probing: bool) -> Table:
    """The relay's status block (printed once: later events are lines under it)."""
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("state", "[green]public[/] via the relay")
    t.add_row("public address", f"[b green]{escape(public)}[/]")
    t.add_row("forwards to", escape(f"{opts.local_host}:{opts.port}"))
    t.add_row("via", escape(f"relay {opts.relay}"))
    if opts.inspector_url:
        t.add_row("inspector", escape(opts.inspector_url))
    if probing:
        t.add_row("", "[dim]still trying the router: a mapping proven from outside takes over[/]")
    t.add_row("", "[dim]Ctrl-C to stop[/]")
    return t


async def _both(mapped: Awaitable[PortMapping], pinhole: Awaitable[None]) -> PortMapping:
    """Both at once; a failure is raised only once both are over, so that the caller's
    cleanup also sees a pinhole made meanwhile."""
    m, p = await asyncio.gather(mapped, pinhole, return_exceptions=True)
    for result in (m, p):
        if isinstance(result, BaseException):
            raise result
    assert not isinstance(m, BaseException)
    return m


async def _run_mapping(
    opts: ExposeOptions, stop: asyncio.Event, keeper: KeptMapping | None, *, verified: bool = False
) -> None:
    started = keeper is not None
    keeper = keeper or _keeper(opts)
    as_json = opts.as_json
    status = _Status(opts.port)
    live: Live | None = None
    # Not a terminal (a pipe, a log file): rich's Live would show nothing until the end, so
    # print the block once mapped and a line per event instead.
    plain = not as_json and not out.is_terminal

    from natkit.cli.expose_v6 import ExposeV6  # only when router mapping is tried

    v6 = ExposeV6(opts.port, protocol=opts.protocol, lease=opts.lease, gateway=opts.gateway,
                  check_interval=opts.check_interval)  # fmt: skip

    def on_event(event: str, m: PortMapping, info: dict[str, Any]) -> None:
        if as_json:
            emit_json({**_event_json(event, m, info), **v6.fields(event)})
            return
        status.mapping = m
        stamp = time.strftime("%H:%M:%S")
        if event == "ready":
            status.state = (
                "[green]public[/]" if m.publicly_reachable else "[yellow]mapped, not public[/]"
            )
            status.history.append(f"{stamp} mapped via {m.method}")
        elif event == "renewed":
            status.renewals += 1
        elif event == "lost":
            status.state = "[red]lost — restoring…[/]"
            status.history.append(f"{stamp} lost: {info.get('reason')}")
        elif event == "restored":
            status.state = (
                "[green]public[/]" if m.publicly_reachable else "[yellow]mapped, not public[/]"
            )
            status.history.append(f"{stamp} restored via {m.method} at {m.public_address}")
        elif event == "closed":
            status.state = "closed, mapping removed" if info.get("removed") else "closed"
        if live is not None:
            live.update(status.render())
        elif plain and event != "ready":  # ready: the whole block is printed after start
            if event in ("lost", "restored"):
                line = status.history[-1]
            elif event == "renewed":
                line = f"{stamp} renewed {m.public_address}"
            else:
                line = status.state
            out.print(line, markup=False, soft_wrap=True)

    try:
        # The IPv6 pinhole is made beside the mapping; "ready" then reports both.
        pinhole_made = v6.start() if not opts.no_ipv6 else asyncio.sleep(0)
        if started:
            assert keeper.mapping is not None
            await pinhole_made
            mapping = keeper.mapping
            ready_info = {"probe": keeper.probe_result, "verified": verified,
                          "loss_check": keeper.loss_check}  # fmt: skip
        else:
            mapping = await _both(keeper.start(), pinhole_made)
            ready_info = {"probe": keeper.probe_result, "loss_check": keeper.loss_check}
        status.v6_address = v6.pinhole.public_address if v6.pinhole else ""
        keeper.on_event(on_event)
        on_event("ready", mapping, ready_info)
        opts.ready.set()
        v6.on_event(lambda event, line: _say(opts, line, f"IPv6 pinhole {event}"))
        if plain:
            out.print(status.render())
        elif not as_json:
            live = Live(status.render(), auto_refresh=False, transient=False)
            live.start()
            live.update(status.render(), refresh=True)
            if not mapping.publicly_reachable:
                err.print(f"[yellow]warning:[/] {mapping.reachability_note}")
            if v6.error:
                err.print(f"[yellow]no IPv6 pinhole:[/] {v6.error}")
        await stop.wait()
    finally:
        await v6.close()
        await keeper.close()
        if live is not None:
            live.update(status.render(), refresh=True)
            live.stop()
