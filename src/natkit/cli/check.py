"""``natkit check``: what network this host is on, and what will work on it."""

from __future__ import annotations

import asyncio
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from natkit.check.report import METHOD_NAMES, METHODS, CheckReport
from natkit.cli.common import emit_event, ip_address_option, out


def _yes_no(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


def _text(value: Any) -> str:
    return "unknown" if value is None else str(value)


def render(report: CheckReport, console: Console) -> None:
    table = Table(title="natkit check", show_header=False, title_justify="left")
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("local IPv4", _text(report.local_ipv4))
    if report.local_ipv6:
        table.add_row("local IPv6", ", ".join(report.local_ipv6))
    table.add_row("default gateway", _text(report.gateway))
    table.add_row("UDP", "works" if report.udp else "[red]no STUN answer[/red]")
    table.add_row("public IPv4", _text(report.public_ipv4))
    if report.public_ipv6:
        table.add_row("public IPv6", report.public_ipv6)
    table.add_row("behind NAT", _yes_no(report.behind_nat))
    table.add_row("mapping", _text(report.mapping))
    table.add_row("filtering", _text(report.filtering))
    table.add_row("port preserving", _yes_no(report.port_preserving))
    table.add_row("hairpinning", _yes_no(report.hairpinning))
    for method in METHODS:
        offer = report.port_mapping.get(method)
        # Each protocol is asked on its own, for up to a second: silence is all natkit saw.
        if offer is None:
            text = "no answer"
        elif offer.external_ip is None:
            text = "answered, no external address"
        else:
            text = f"{offer.external_ip} ({'public' if offer.public else 'not public'})"
        table.add_row(METHOD_NAMES[method], text)
    table.add_row("double NAT", _yes_no(report.double_nat))
    if report.relay is not None:
        rtt = report.relay_rtt_ms
        table.add_row(
            "relay",
            f"{report.relay}: {rtt:.1f} ms"
            if rtt is not None
            else f"{report.relay}: [red]{report.relay_error}[/red]",
        )
    verdict = report.verdict()
    table.add_row("inbound TCP", f"[green]{verdict['inbound_tcp']}[/green]")
    table.add_row("direct UDP", f"[green]{verdict['direct_udp']}[/green]")
    table.add_row("took", f"{report.elapsed_ms:.0f} ms")
    console.print(table)
    for note in report.notes:
        console.print(f"[dim]note: {note}[/dim]")


@click.command()
@click.option(
    "--stun",
    "stun",
    multiple=True,
    metavar="HOST:PORT",
    help="A STUN server (repeatable). Default: $NATKIT_STUN, else public servers.",
)
@click.option("--relay", metavar="HOST:PORT", help="A natkit relay to measure the round trip to.")
@click.option("--token", envvar="NATKIT_TOKEN", help="The relay's token (or $NATKIT_TOKEN).")
@click.option("--fingerprint", help="The relay's certificate fingerprint (sha256:...).")
@click.option("--gateway", metavar="IP", callback=ip_address_option,
              help="The router to ask (default: the default route's).")  # fmt: skip
@click.option("--no-portmap", is_flag=True, help="Do not ask the router for port mapping.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the report as one JSON line (event report)."
)
def check(
    stun: tuple[str, ...],
    relay: str | None,
    token: str | None,
    fingerprint: str | None,
    gateway: str | None,
    no_portmap: bool,
    as_json: bool,
) -> None:
    """Report this host's network: public address, NAT behaviour (RFC 5780), the router's
    port mapping, double NAT, the relay; then what will work."""
    from natkit.check.run import run_check  # STUN, port mapping, relay: only when run
    from natkit.stun import parse_server

    if relay is not None and not token:
        raise click.UsageError("--relay needs --token (or $NATKIT_TOKEN)")
    for server in stun:
        try:
            parse_server(server)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--stun") from None

    options: dict[str, Any] = {"fingerprint": fingerprint} if fingerprint else {}
    report = asyncio.run(
        run_check(
            stun,
            relay=relay,
            token=token,
            relay_options=options,
            gateway=gateway,
            portmap=not no_portmap,
        )
    )
    if as_json:
        emit_event("report", **report.to_json())
    else:
        render(report, out)
