"""``natkit expose PORT``: make a local port public and keep it so until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from typing import TYPE_CHECKING, Any

import click

from natkit.cli.common import emit_event, emit_json, err, fail_with, out, run_loop
from natkit.cli.expose_local import is_this_machine, resolve_local_host
from natkit.errors import EXIT_INTERRUPTED
from natkit.expose_core import CoreEvent, ExposeCore, Settings
from natkit.net.fdlimit import raise_fd_limit
from natkit.relay.pump import small_tls_buffers
from natkit.state import state_dir, writable_state_dir

if TYPE_CHECKING:
    from rich.live import Live
    from rich.table import Table

    from natkit.inspect.server import Inspector
    from natkit.portmap.mapping import PortMapping
    from natkit.relay.access import AccessPolicy
    from natkit.relay.agent import Agent, TunnelSpec


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
        from rich.table import Table  # only for humans: a --json run never loads rich

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
@click.option("--allow", multiple=True, metavar="CIDR",
              help="Only visitors from this network (repeatable; IPv4 or IPv6). Enforced by the relay.")  # fmt: skip
@click.option("--deny", multiple=True, metavar="CIDR",
              help="Never visitors from this network (repeatable; wins over --allow).")  # fmt: skip
@click.option("--basic-auth", multiple=True, metavar="USER:PASS",
              help="--http: visitors must log in (HTTP basic auth, checked by the relay; repeatable).")  # fmt: skip
@click.option("--rate-limit", metavar="N/s",
              help="At most N new connections per visitor address (N/s, N/min, N/h).")  # fmt: skip
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
    _access_policy(opts)
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
        opts.no_mapping = opts.no_mapping or f"{why}: the relay is used"
    run_loop(_main(opts))


def _access_policy(opts: ExposeOptions) -> None:
    """--allow/--deny/--basic-auth/--rate-limit: a policy the relay enforces, so the relay
    alone serves (a router's mapping or pinhole would let everyone in)."""
    from natkit.relay.access import build_policy

    try:
        opts.access = build_policy(allow=opts.allow, deny=opts.deny, basic_auth=opts.basic_auth,
                                   rate_limit=opts.rate_limit, kind=opts.kind)  # fmt: skip
    except ValueError as exc:
        raise click.UsageError(f"access control: {exc}") from None
    if opts.access is None:
        return
    if not opts.relay:
        raise click.UsageError("--allow/--deny/--basic-auth/--rate-limit are enforced by a "
                               "relay: give --relay HOST:PORT")  # fmt: skip
    if opts.protocol == "udp" or opts.via in ("upnp", "natpmp", "pcp"):
        raise click.UsageError("access control is enforced by the relay: use --via relay "
                               "(a router's mapping lets every visitor in)")  # fmt: skip
    if opts.via == "auto" and opts.kind == "tcp":
        opts.no_mapping = "the relay enforces the access policy (a router's mapping would not)"


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
    allow: tuple[str, ...]
    deny: tuple[str, ...]
    basic_auth: tuple[str, ...]
    rate_limit: str | None
    no_ipv6: bool
    as_json: bool
    access: AccessPolicy | None = None  # from --allow/--deny/--basic-auth/--rate-limit
    local_ip: str = ""  # --local-host as an address
    inspector_url: str = ""  # --http: where the inspector serves
    no_mapping: str = ""  # why a router's mapping cannot serve (--local-host elsewhere)

    @property
    def kind(self) -> str:
        return "http" if self.http_mode else "tls" if self.tls_mode else "tcp"

    def settings(self) -> Settings:
        return Settings(
            self.port, protocol=self.protocol, via=self.via, external_port=self.external_port,
            lease=self.lease, gateway=self.gateway, check_interval=self.check_interval,
            relay=self.relay, token=self.token, kind=self.kind, hostname=self.hostname,
            local_host=self.local_host, local_ip=self.local_ip,
            plaintext_data=self.plaintext_data, fingerprint=self.fingerprint,
            takeover=self.takeover, ipv6=not self.no_ipv6, no_mapping=self.no_mapping,
            access=self.access,
            remember_ports=state_dir() / "relay_ports.json",
        )  # fmt: skip


async def _main(opts: ExposeOptions) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Windows' loops have no signal handlers: there Ctrl-C cancels this task (asyncio's
        # runner, woken by natkit.net.loops), and the same cleanup runs on the way out.
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    writable_state_dir()  # pins and ports are saved there: say so before the relay is used
    if opts.relay:
        small_tls_buffers()  # this process is natkit's own agent (see pump.small_tls_buffers)
        raise_fd_limit()
    view = _View(opts)
    inspecting = opts.kind == "http" and not opts.no_inspect
    core = view.core = ExposeCore(opts.settings(), view.on_event,
                                  prepare_relay=view.start_inspector if inspecting else None)  # fmt: skip
    work = loop.create_task(core.run(stop))
    stopper = asyncio.ensure_future(stop.wait())
    try:
        try:
            await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not work.done() and not core.ready.is_set():
            # Stopped before anything was public: end at once (whatever was made is undone
            # by the work's own cleanup), no fallback, exit 130.
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            fail_with(KeyboardInterrupt("interrupted before the port was public"),
                      EXIT_INTERRUPTED, as_json=opts.as_json)  # fmt: skip
        await work
    finally:
        await view.close()


class _View:
    """Renders the engine's events: JSON lines (docs/cli.md), or the status block and a line
    per event for humans."""

    def __init__(self, opts: ExposeOptions) -> None:
        self.opts = opts
        self.core: ExposeCore | None = None
        self.status = _Status(opts.port)
        self.live: Live | None = None
        self.relay_shown = False  # the relay's ready was rendered
        self.inspector: Inspector | None = None  # --http: requests and replay (docs/inspector.md)
        self.inspected = ""  # the id of the tunnel it watches
        # Not a terminal (a pipe, a log file): rich's Live would show nothing until the end,
        # so print the block once mapped and a line per event instead.
        self.plain = not opts.as_json and not out.is_terminal

    def say(self, obj: dict[str, Any], text: str) -> None:
        if self.opts.as_json:
            emit_json(obj)
        else:
            out.print(text, markup=False, soft_wrap=True)

    def on_event(self, ev: CoreEvent) -> None:
        if ev.source == "mapping":
            assert ev.mapping is not None
            self.mapping_event(ev.name, ev.mapping, ev.info)
        elif ev.source == "relay":
            self.relay_event(ev.name, ev.info)
        elif ev.source == "pinhole":
            assert ev.pinhole is not None
            self.say({"event": f"pinhole_{ev.name}", **ev.pinhole.to_json(), **ev.info},
                     f"IPv6 pinhole {ev.name}")  # fmt: skip
        else:
            self.core_event(ev.name, ev.info)

    def core_event(self, name: str, info: dict[str, Any]) -> None:
        if name == "local_unreachable":
            where, problem = info["local_address"], info["reason"]
            if self.opts.as_json:
                emit_event("local_unreachable", local_address=where, reason=problem)
            else:
                err.print(f"[yellow]warning:[/] nothing answers on {where} ({problem}): start "
                          "the service there (or fix --local-host); visitors are refused until "
                          "it listens", soft_wrap=True)  # fmt: skip
        elif name == "local_reachable":
            self.say({"event": name, "local_address": info["local_address"]},
                     f"{info['local_address']} answers now: trying the router's mapping again")  # fmt: skip
        elif name == "fallback":
            reason = info["reason"]
            how = ("using the relay" if info.get("unusable") else
                   "staying on the relay" if self.relay_shown else "falling back to the relay")  # fmt: skip
            self.say({"event": "fallback", "reason": reason}, f"{how}: {reason}")
        elif name == "switched":
            self.say({"event": "switched", "from": info["from"],
                      "previous_address": info["previous_address"]},
                     f"the router's mapping is proven: switching from the relay ({info['previous_address']})")  # fmt: skip

    def relay_event(self, event: str, info: dict[str, Any]) -> None:
        opts = self.opts
        scheme = {"tcp": "tcp", "http": "http", "tls": "https"}[opts.kind]
        base = {"method": "relay", "protocol": scheme, "relay": opts.relay,
                "internal_port": opts.port, "internal_host": opts.local_host}  # fmt: skip
        public = self.core.spec.public if self.core and self.core.spec else ""
        if self.inspector is not None and event in ("ready", "restored"):
            from natkit.cli.expose_inspect import tunnel_opened

            tunnel_opened(self.inspector, info["public"])
        if event == "ready":
            self.relay_shown = True
            mapping = info.get("mapping", "")
            if opts.as_json:
                extra = {"mapping": mapping} if mapping else {}
                if "access" in info:
                    extra["access"] = info["access"]
                emit_event("ready", **base, public_address=info["public"], **extra)
                if self.inspector is not None:  # (after ready: a first line of ready stays so)
                    emit_event("inspector", url=self.inspector.url, tunnel=self.inspected,
                               idle=opts.inspect_idle or None)  # fmt: skip
            else:
                out.print(_relay_block(opts, info["public"], mapping))
        elif event == "reconnecting":
            self.say({"event": "lost", **base, "public_address": public, "reason": info["reason"],
                      "retry_in": info["delay"]},
                     f"relay connection lost ({info['reason']}); retrying in {info['delay']} s")  # fmt: skip
        elif event == "restored":
            self.say({"event": "restored", **base, "public_address": info["public"],
                      "changed": info["changed"]},
                     f"relay connection restored: {info['public']}")  # fmt: skip
        elif event == "lost":  # taken over by another agent of the token
            final = bool(info.get("final"))
            self.say({"event": "lost", **base, "public_address": info["public"],
                      "reason": info["reason"], "final": final},
                     f"tunnel lost: {info['reason']}" + ("" if final else f"; asking again in {info.get('retry_in', 0):g} s"))  # fmt: skip
        elif event == "interference":
            self.say({"event": "interference", **base, "message": info["message"]},
                     f"warning: {info['message']}")  # fmt: skip
        elif event == "refused":  # the relay kept a visitor out (already rate-limited there)
            if self.inspector is not None:
                from natkit.inspect.records import Refusal

                tunnel = next(iter(self.inspector.tunnels), "")  # the name its records carry
                self.inspector.store.refused(Refusal(tunnel, str(info["visitor"]),
                                                     str(info["reason"]), float(info["at"]),
                                                     int(info["more"])))  # fmt: skip
            more = f" (and {info['more']} more)" if info["more"] else ""
            self.say({"event": "refused", **base, "public_address": public,
                      "visitor": info["visitor"], "reason": info["reason"],
                      "time": info["at"], "more": info["more"]},
                     f"refused visitor {info['visitor']}: {info['reason']}{more}")  # fmt: skip
        elif event == "pinned":
            err.print(f"pinned relay {info['relay']} certificate {info['fingerprint']}",
                      soft_wrap=True)  # fmt: skip
        elif event == "closed":
            if info["opened"]:  # a tunnel that never opened is not "closed": the error says why
                self.say({"event": "closed", **base, "public_address": info["public"]},
                         "tunnel closed")  # fmt: skip
            elif not opts.as_json:
                err.print("stopped: the relay tunnel never opened")

    def mapping_event(self, event: str, m: PortMapping, info: dict[str, Any]) -> None:
        assert self.core is not None
        v6 = self.core.v6
        if self.opts.as_json:
            emit_json({**_event_json(event, m, info), **(v6.fields(event) if v6 else {})})
            return
        status = self.status
        status.mapping = m
        stamp = time.strftime("%H:%M:%S")
        if event == "ready":
            status.state = (
                "[green]public[/]" if m.publicly_reachable else "[yellow]mapped, not public[/]"
            )
            status.history.append(f"{stamp} mapped via {m.method}")
            status.v6_address = self.core.public_address_v6
            self.show_mapping(m)
            return
        if event == "renewed":
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
        if self.live is not None:
            self.live.update(status.render())
        elif self.plain:
            if event in ("lost", "restored"):
                line = status.history[-1]
            elif event == "renewed":
                line = f"{stamp} renewed {m.public_address}"
            else:
                line = status.state
            out.print(line, markup=False, soft_wrap=True)

    def show_mapping(self, m: PortMapping) -> None:
        """The status block once mapped: printed once (not a terminal), else kept live."""
        if self.plain:
            out.print(self.status.render())
            return
        from rich.live import Live

        self.live = Live(self.status.render(), auto_refresh=False, transient=False)
        self.live.start()
        self.live.update(self.status.render(), refresh=True)
        if not m.publicly_reachable:
            err.print(f"[yellow]warning:[/] {m.reachability_note}")
        v6 = self.core.v6 if self.core is not None else None
        if v6 is not None and v6.error:
            err.print(f"[yellow]no IPv6 pinhole:[/] {v6.error}")

    async def start_inspector(self, agent: Agent, spec: TunnelSpec) -> None:
        """--http: the inspector, serving and tapping the tunnel before it opens."""
        from natkit.cli.expose_inspect import start_inspector

        opts = self.opts
        self.inspector = await start_inspector(agent, spec, opts.inspect_addr, opts.inspect_idle)
        opts.inspector_url, self.inspected = self.inspector.url, spec.id

    async def close(self) -> None:
        self.finish()
        if self.inspector is not None:
            await self.inspector.close()

    def finish(self) -> None:
        if self.live is not None:
            self.live.update(self.status.render(), refresh=True)
            self.live.stop()
            self.live = None


def _relay_block(opts: ExposeOptions, public: str, mapping: str) -> Table:
    """The relay's status block (printed once: later events are lines under it)."""
    from rich.markup import escape
    from rich.table import Table

    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("state", "[green]public[/] via the relay")
    t.add_row("public address", f"[b green]{escape(public)}[/]")
    t.add_row("forwards to", escape(f"{opts.local_host}:{opts.port}"))
    t.add_row("via", escape(f"relay {opts.relay}"))
    if opts.inspector_url:
        t.add_row("inspector", escape(opts.inspector_url))
    if opts.access is not None:
        t.add_row("access", escape(opts.access.describe()))
    if mapping == "probing":
        t.add_row("", "[dim]still trying the router: a mapping proven from outside takes over[/]")
    elif mapping == "waiting_for_service":
        t.add_row("", "[dim]the router's mapping is tried again once the service listens[/]")
    t.add_row("", "[dim]Ctrl-C to stop[/]")
    return t
