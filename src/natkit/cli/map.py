"""``natkit map add|list|delete``: one-shot port mappings on the LAN's router."""

from __future__ import annotations

import asyncio

import click
from rich.table import Table

from natkit.cli.common import emit_json, err, out
from natkit.portmap.mapping import PortMapping
from natkit.portmap.upnp import UPnPMapper

VIA = click.Choice(["auto", "upnp"])
PROTO = click.Choice(["tcp", "udp"], case_sensitive=False)


def _common(f: click.decorators.FC) -> click.decorators.FC:
    f = click.option("--via", type=VIA, default="auto", show_default=True,
                     help="Port-mapping protocol to use.")(f)  # fmt: skip
    f = click.option("--gateway", metavar="IP", help="Router address (default: the default gateway).")(f)
    f = click.option("--timeout", type=float, default=2.0, show_default=True,
                     help="Seconds to wait for the router.")(f)  # fmt: skip
    f = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)
    return f


def _table(mappings: list[PortMapping], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("protocol", "public address", "→ internal", "lease", "via", "description"):
        t.add_column(col)
    for m in mappings:
        lease = "permanent" if m.lease == 0 else f"{m.lease} s"
        t.add_row(m.protocol, m.public_address, f"{m.internal_ip}:{m.internal_port}", lease, m.method,
                  m.description)  # fmt: skip
    return t


async def _mapper(gateway: str | None, timeout: float) -> UPnPMapper:
    return await UPnPMapper.discover(timeout=timeout, gateway_ip=gateway)


@click.group("map")
def map_group() -> None:
    """Create, list and delete port mappings on the router."""


@map_group.command("add")
@click.argument("internal_port", type=click.IntRange(1, 65535))
@click.option("--external-port", type=click.IntRange(1, 65535), help="Public port (default: same).")
@click.option("--protocol", type=PROTO, default="tcp", show_default=True)
@click.option("--lease", type=click.IntRange(0, 604800), default=3600, show_default=True,
              help="Seconds the router keeps the mapping (0 = permanent; avoid).")  # fmt: skip
@click.option("--description", default="natkit", show_default=True)
@_common
def map_add(
    internal_port: int, external_port: int | None, protocol: str, lease: int, description: str,
    via: str, gateway: str | None, timeout: float, as_json: bool,
) -> None:  # fmt: skip
    """Map INTERNAL_PORT on this machine to a public port on the router, then exit."""

    async def run() -> PortMapping:
        mapper = await _mapper(gateway, timeout)
        return await mapper.add(internal_port, external_port=external_port, protocol=protocol,
                                lease=lease, description=description)  # fmt: skip

    m = asyncio.run(run())
    if as_json:
        emit_json(m.to_json())
        return
    out.print(_table([m], "mapping created"))
    if not m.publicly_reachable:
        err.print(f"[yellow]warning:[/] {m.reachability_note}")


@map_group.command("list")
@_common
def map_list(via: str, gateway: str | None, timeout: float, as_json: bool) -> None:
    """List the router's port mappings."""

    async def run() -> list[PortMapping]:
        return await (await _mapper(gateway, timeout)).list()

    mappings = asyncio.run(run())
    if as_json:
        emit_json([m.to_json() for m in mappings])
        return
    if not mappings:
        out.print("the router has no port mappings")
        return
    out.print(_table(mappings, f"{len(mappings)} mapping(s) on the router"))


@map_group.command("delete")
@click.argument("external_port", type=click.IntRange(1, 65535))
@click.option("--protocol", type=PROTO, default="tcp", show_default=True)
@_common
def map_delete(
    external_port: int, protocol: str, via: str, gateway: str | None, timeout: float, as_json: bool
) -> None:
    """Delete the mapping of EXTERNAL_PORT from the router."""

    async def run() -> None:
        await (await _mapper(gateway, timeout)).delete(external_port, protocol)

    asyncio.run(run())
    if as_json:
        emit_json({"deleted": True, "method": "upnp", "external_port": external_port,
                   "protocol": protocol.lower()})  # fmt: skip
    else:
        out.print(f"deleted {protocol.lower()} mapping of external port {external_port}")
