"""``natkit map add|list|delete``: one-shot port mappings on the LAN's router."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from natkit import state
from natkit.cli.common import emit_event, err, ip_address_option, out, using_state
from natkit.errors import DiscoveryError, NatkitError, StateError, UPnPError
from natkit.net.routes import default_gateway
from natkit.portmap.manager import probe
from natkit.portmap.mapping import PortMapping
from natkit.portmap.upnp import UPnPMapper

if TYPE_CHECKING:
    from rich.table import Table

PROTO = click.Choice(["tcp", "udp"], case_sensitive=False)


F = TypeVar("F", bound=Callable[..., Any])


def _common(default_via: str) -> Callable[[F], F]:
    def deco(f: F) -> F:
        f = click.option(
            "--via",
            type=click.Choice(["auto", "upnp", "natpmp", "pcp"]),
            default=default_via,
            show_default=True,
            help="Port-mapping protocol (auto: the best the router offers).",
        )(f)
        f = click.option("--gateway", metavar="IP", callback=ip_address_option,
                         help="Router address (default: the default gateway).")(f)  # fmt: skip
        f = click.option(
            "--timeout",
            type=float,
            default=2.0,
            show_default=True,
            help="Seconds to wait for the router.",
        )(f)
        return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)

    return deco


def _table(mappings: list[PortMapping], title: str) -> Table:
    from rich.table import Table  # only for people: --json never imports rich

    t = Table(title=title, title_justify="left")
    # Addresses and ports must stay whole on a narrow (or piped, 80-column) output: only the
    # free-text description may wrap.
    for col in ("protocol", "public address", "→ internal", "lease", "via"):
        t.add_column(col, no_wrap=True)
    t.add_column("description")
    for m in mappings:
        lease = "permanent" if m.lease == 0 else f"{m.lease} s"
        t.add_row(
            m.protocol,
            m.public_address,
            f"{m.internal_ip}:{m.internal_port}",
            lease,
            m.method,
            m.description,
        )
    return t


@click.group("map")
def map_group() -> None:
    """Create, list and delete port mappings on the router."""


@map_group.command("add")
@click.argument("internal_port", type=click.IntRange(1, 65535))
@click.option("--external-port", type=click.IntRange(1, 65535), help="Public port (default: same).")
@click.option("--protocol", type=PROTO, default="tcp", show_default=True)
@click.option(
    "--lease",
    type=click.IntRange(0, 604800),
    default=3600,
    show_default=True,
    help="Seconds the router keeps the mapping (0 = permanent; UPnP only; avoid).",
)
@click.option("--description", default="natkit", show_default=True)
@click.option("--ipv6", is_flag=True, help="Open an IPv6 pinhole to this host's global address.")
@_common("auto")
def map_add(
    internal_port: int,
    external_port: int | None,
    protocol: str,
    lease: int,
    description: str,
    ipv6: bool,
    via: str,
    gateway: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Map INTERNAL_PORT on this machine to a public port on the router, then exit.

    With --ipv6: open INTERNAL_PORT of this machine's global IPv6 address in the router's
    firewall instead (a pinhole: no translation, the address is this machine's own)."""
    if ipv6:
        if external_port is not None:
            raise click.UsageError("a pinhole keeps the port: --external-port is IPv4 only")
        from natkit.cli import map_v6

        map_v6.add(internal_port, protocol=protocol, lease=lease, via=via, gateway=gateway,
                   timeout=timeout, as_json=as_json)  # fmt: skip
        return

    state.writable_state_dir()  # before the router maps: a mapping must never go unrecorded

    async def run() -> PortMapping:
        result = await probe(via=via, gateway_ip=gateway, timeout=timeout)
        try:
            m = await result.chosen.add(
                internal_port,
                external_port=external_port,
                protocol=protocol,
                lease=lease,
                description=description,
            )
            if m.method != "upnp" or m.lease == 0:
                # NAT-PMP/PCP cannot list or delete by external port: natkit remembers. A
                # mapping it cannot record is removed again rather than left behind unknown.
                try:
                    using_state(state.record, m, result.gateway_ip)
                except StateError as exc:
                    with contextlib.suppress(NatkitError, OSError):
                        await result.chosen.remove(m)
                    raise StateError(f"{exc}; the mapping was removed again") from None
        finally:
            result.chosen.close()
        return m

    m = asyncio.run(run())
    if as_json:
        emit_event("mapped", **m.to_json())
        return
    out.print(_table([m], "mapping created"))
    if not m.publicly_reachable:
        err.print(f"[yellow]warning:[/] {m.reachability_note}")


@map_group.command("list")
@_common("auto")
def map_list(via: str, gateway: str | None, timeout: float, as_json: bool) -> None:
    """List port mappings: the router's own table (UPnP), and those natkit made with
    NAT-PMP/PCP from this host (those protocols cannot list a router's mappings)."""

    async def run() -> list[PortMapping]:
        result: list[PortMapping] = []
        if via in ("auto", "upnp"):
            try:
                upnp = await UPnPMapper.discover(timeout=timeout, gateway_ip=gateway)
                result += await upnp.list()
            except DiscoveryError:
                if via == "upnp":
                    raise
        if via != "upnp":
            gw = gateway or default_gateway()
            methods = ("natpmp", "pcp") if via == "auto" else (via,)
            result = with_recorded([m for method in methods for m in using_state(state.listed, gw, method)],
                                   result)  # fmt: skip
        return result

    mappings = asyncio.run(run())
    if as_json:
        for m in mappings:
            emit_event("mapping", **m.to_json())
        emit_event("listed", count=len(mappings))
        return
    if not mappings:
        out.print("no port mappings")
        return
    out.print(_table(mappings, f"{len(mappings)} mapping(s)"))


def with_recorded(recorded: list[PortMapping], table: list[PortMapping]) -> list[PortMapping]:
    """The router's UPnP table merged with natkit's records of its NAT-PMP/PCP mappings.

    miniupnpd (and most routers) keep one table behind all three protocols, so the UPnP
    listing also shows mappings made with PCP or NAT-PMP, as if UPnP had made them: natkit's
    record says which protocol did (and that is the one ``map delete`` must use). The
    table's row is kept (its lease is the time left); a record the table does not show is
    listed as recorded (a router without UPnP, or one that lost it)."""
    made_by = {_same(m): m.method for m in recorded}
    merged = [dataclasses.replace(m, method=made_by.get(_same(m), m.method)) for m in table]
    shown = {(m.external_port, m.protocol) for m in table}
    return merged + [m for m in recorded if (m.external_port, m.protocol) not in shown]


def _same(m: PortMapping) -> tuple[int, str, str, int]:
    return (m.external_port, m.protocol, m.internal_ip, m.internal_port)


@map_group.command("delete")
@click.argument("external_port", type=click.IntRange(1, 65535))
@click.option("--protocol", type=PROTO, default="tcp", show_default=True)
@click.option(
    "--internal-port",
    type=click.IntRange(1, 65535),
    help="NAT-PMP deletes by internal port: give it if natkit did not make the mapping.",
)
@click.option("--ipv6", is_flag=True, help="Close the IPv6 pinhole 'map add --ipv6' opened.")
@_common("auto")
def map_delete(
    external_port: int,
    protocol: str,
    internal_port: int | None,
    ipv6: bool,
    via: str,
    gateway: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Delete the mapping of EXTERNAL_PORT from the router (with --ipv6: the pinhole of
    this machine's PORT)."""
    if ipv6:
        from natkit.cli import map_v6

        map_v6.delete(external_port, protocol=protocol, timeout=timeout, as_json=as_json)
        return
    proto = protocol.lower()

    async def run() -> tuple[str, bool | None]:
        """Delete it; say with which protocol, and whether it existed (None: cannot tell)."""
        gw = gateway or default_gateway()
        # Which protocol made it? natkit's own records say for NAT-PMP/PCP mappings.
        methods = ["natpmp", "pcp"] if via == "auto" else [via] if via != "upnp" else []
        for method in methods:
            rec = using_state(state.find, gw, method, external_port, proto)
            existed: bool | None = True
            if rec is None and method == "natpmp" and internal_port is not None and via == "natpmp":
                # RFC 6886 3.4: a delete is answered with success whether or not a mapping
                # existed: natkit cannot know, and says so.
                rec = PortMapping("natpmp", "udp" if proto == "udp" else "tcp", "", internal_port,
                                  "", external_port, 0)  # fmt: skip
                existed = None
            if rec is None:
                continue
            result = await probe(via=method, gateway_ip=gw, timeout=timeout)
            try:
                await result.chosen.remove(rec)
            finally:
                result.chosen.close()
            using_state(state.forget, gw, method, external_port, proto)
            return method, existed
        where = f"external port {external_port}/{proto} on {gw}"
        if via not in ("auto", "upnp"):
            raise NatkitError(
                f"no {via} mapping of {where} that natkit knows of (it keeps a record of those it "
                f"makes, and {via} cannot look one up or delete by external port)"
                + (": if another program made it, give --internal-port" if via == "natpmp" else "")
            )
        try:
            upnp = await UPnPMapper.discover(timeout=timeout, gateway_ip=gateway)
        except DiscoveryError as exc:
            if via == "upnp":
                raise
            raise DiscoveryError(f"no NAT-PMP or PCP mapping of {where} that natkit knows of, "
                                 f"and no UPnP to look it up: {exc}") from None  # fmt: skip
        try:
            if await upnp.get(external_port, proto) is None:
                raise NatkitError(f"no mapping of {where}: the router's UPnP table has none "
                                  "(see natkit map list)")  # fmt: skip
            await upnp.delete(external_port, proto)
        except UPnPError as exc:
            if exc.code != 714:  # NoSuchEntryInArray: gone between the look-up and the delete
                raise
        finally:
            upnp.close()
        using_state(state.forget, gw, "upnp", external_port, proto)
        return "upnp", True

    method, existed = asyncio.run(run())
    if as_json:
        emit_event("deleted", method=method, external_port=external_port, protocol=proto,
                   existed=existed)  # fmt: skip
    elif existed is None:
        out.print(f"asked the router to delete the {proto} mapping of internal port "
                  f"{internal_port} ({method}); NAT-PMP answers the same whether one existed or "
                  "not, so natkit cannot tell")  # fmt: skip
    else:
        out.print(f"deleted {proto} mapping of external port {external_port} ({method})")
