"""``natkit expose PORT``: make a local port public and keep it so until stopped."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import click
from rich.live import Live
from rich.table import Table

from natkit.cli.common import emit_json, err, out
from natkit.portmap.manager import KeptMapping
from natkit.portmap.mapping import PortMapping


class _Status:
    """The one status block of human mode: redrawn in place on every event."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.state = "mapping…"
        self.mapping: PortMapping | None = None
        self.history: list[str] = []
        self.renewals = 0

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
            obj["offered"] = sorted(value.offered)
            obj["probe_ms"] = round(value.elapsed * 1000, 1)
        else:
            obj[key] = value
    return obj


@click.command("expose")
@click.argument("port", type=click.IntRange(1, 65535))
@click.option(
    "--protocol",
    type=click.Choice(["tcp", "udp"], case_sensitive=False),
    default="tcp",
    show_default=True,
)
@click.option(
    "--via",
    type=click.Choice(["auto", "upnp", "natpmp", "pcp"]),
    default="auto",
    show_default=True,
    help="Port-mapping protocol (auto: the best the router offers).",
)
@click.option(
    "--external-port", type=click.IntRange(1, 65535), help="Public port wanted (default: same)."
)
@click.option(
    "--lease",
    type=click.IntRange(10, 604800),
    default=3600,
    show_default=True,
    help="Lease asked of the router; renewed at half of it.",
)
@click.option("--gateway", metavar="IP", help="Router address (default: the default gateway).")
@click.option(
    "--check-interval",
    type=float,
    default=2.0,
    show_default=True,
    help="Seconds between checks that the router still has the mapping.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="JSON lines: ready, renewed, lost, restored, closed."
)
def expose(
    port: int,
    protocol: str,
    via: str,
    external_port: int | None,
    lease: int,
    gateway: str | None,
    check_interval: float,
    as_json: bool,
) -> None:
    """Make local PORT reachable from the Internet and keep it so until stopped."""
    asyncio.run(
        _expose(port, protocol.lower(), via, external_port, lease, gateway, check_interval, as_json)
    )


async def _expose(
    port: int,
    protocol: str,
    via: str,
    external_port: int | None,
    lease: int,
    gateway: str | None,
    check_interval: float,
    as_json: bool,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    keeper = KeptMapping(
        port,
        protocol=protocol,
        external_port=external_port,
        lease=lease,
        via=via,
        gateway_ip=gateway,
        check_interval=check_interval,
    )
    status = _Status(port)
    live: Live | None = None
    # Not a terminal (a pipe, a log file): rich's Live would show nothing until the end, so
    # print the block once mapped and a line per event instead.
    plain = not as_json and not out.is_terminal

    def on_event(event: str, m: PortMapping, info: dict[str, Any]) -> None:
        if as_json:
            emit_json(_event_json(event, m, info))
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

    keeper.on_event(on_event)
    try:
        mapping = await keeper.start()
        if plain:
            out.print(status.render())
        elif not as_json:
            live = Live(status.render(), auto_refresh=False, transient=False)
            live.start()
            live.update(status.render(), refresh=True)
            if not mapping.publicly_reachable:
                err.print(f"[yellow]warning:[/] {mapping.reachability_note}")
        await stop.wait()
    finally:
        await keeper.close()
        if live is not None:
            live.update(status.render(), refresh=True)
            live.stop()
