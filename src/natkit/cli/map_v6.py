"""``natkit map add PORT --ipv6``: an IPv6 pinhole instead of an IPv4 port mapping.

A host with a global IPv6 address is reached at that address; the router only has to let
the traffic in. The pinhole stays open for its lease (``natkit expose`` keeps one open and
removes it on exit).
"""

from __future__ import annotations

import asyncio
import contextlib

import click
from rich.table import Table

from natkit.cli.common import emit_event, err, out, using_state
from natkit.errors import NatkitError, StateError
from natkit.portmap import pinhole_state
from natkit.portmap.pinhole import MAX_LEASE
from natkit.portmap.pinhole_mappers import Pinhole, open_pinholer


def add(
    port: int, *, protocol: str, lease: int, via: str, gateway: str | None, timeout: float,
    as_json: bool,
) -> None:  # fmt: skip
    if via == "natpmp":
        raise click.UsageError("NAT-PMP has no IPv6: use --via pcp, upnp or auto with --ipv6")
    if lease == 0 or lease > MAX_LEASE:
        err.print(f"[yellow]note:[/] a pinhole's lease is at most {MAX_LEASE} s; asking that")
        lease = MAX_LEASE

    # --gateway names the IPv6 router when it is an IPv6 address (else the IPv4 one, where
    # UPnP is discovered; the IPv6 router is then the IPv6 default route's).
    gateway6 = gateway if gateway and ":" in gateway else None
    gateway4 = None if gateway6 else gateway

    async def run() -> Pinhole:
        pinholer = await open_pinholer(
            via=via, gateway_ip=gateway4, gateway6=gateway6, timeout=timeout
        )
        try:
            pinhole = await pinholer.add(port, protocol, lease)
            try:  # for 'natkit map delete PORT --ipv6'; never left behind unrecorded
                using_state(pinhole_state.record, pinhole)
            except StateError as exc:
                with contextlib.suppress(NatkitError, OSError):
                    await pinholer.remove(pinhole)
                raise StateError(f"{exc}; the pinhole was closed again") from None
            return pinhole
        finally:
            pinholer.close()

    pinhole = asyncio.run(run())
    if as_json:
        emit_event("mapped", ipv6=True, **pinhole.to_json())
        return
    t = Table(title="IPv6 pinhole opened", title_justify="left")
    for col in ("protocol", "reachable at", "lease", "via", "router"):
        t.add_column(col, no_wrap=True)
    t.add_row(pinhole.protocol, pinhole.public_address, f"{pinhole.lease} s", pinhole.method,
              pinhole.gateway)  # fmt: skip
    out.print(t)


def delete(port: int, *, protocol: str, timeout: float, as_json: bool) -> None:
    """Remove the pinhole 'natkit map add PORT --ipv6' opened (natkit's record says how)."""
    pinhole = using_state(pinhole_state.take, port, protocol)
    if pinhole is None:
        raise NatkitError(
            f"natkit has no record of an open IPv6 pinhole for port {port}/{protocol.lower()} "
            "(made elsewhere, or its lease ran out)"
        )

    async def run() -> int:
        pinholer = await open_pinholer(
            via=pinhole.method, gateway6=pinhole.gateway, local6=pinhole.address, timeout=timeout
        )
        try:
            return await pinholer.remove(pinhole)
        finally:
            pinholer.close()

    closes_in = asyncio.run(run())
    if as_json:
        # closed false: the router refused to delete it; it closes when its lease ends.
        emit_event("deleted", ipv6=True, existed=True, closed=closes_in == 0, closes_in=closes_in,
                   **pinhole.to_json())  # fmt: skip
    elif closes_in:
        out.print(f"the router would not delete pinhole {pinhole.public_address} "
                  f"({pinhole.method}); it closes in {closes_in} s")  # fmt: skip
    else:
        out.print(f"deleted pinhole {pinhole.public_address} ({pinhole.method})")
