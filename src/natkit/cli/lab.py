"""``natkit lab``: build and drive the network-namespace NAT testbed."""

from __future__ import annotations

import os
from typing import Any

import click
from rich.table import Table

from natkit.cli.common import emit_event, out
from natkit.lab import Lab, LabConfig, check_host, parse_portmap
from natkit.lab.config import EVERY_NODE, NAT_BEHAVIOURS, ROUTERS, RouterNode, parse_nat

NAME = click.option(
    "--name", default="natkit", show_default=True, help="Lab name (several may coexist)."
)
JSON = click.option("--json", "as_json", is_flag=True, help="JSON lines (docs/cli.md).")


@click.group()
def lab() -> None:
    """A real NAT testbed: namespaces, nftables NAT, miniupnpd, coturn (Linux, root)."""


@lab.command("up")
@NAME
@click.option(
    "--portmap",
    default="upnp,natpmp,pcp",
    show_default=True,
    help="What the router offers: a comma list of upnp, natpmp, pcp; or none.",
)
@click.option(
    "--nat",
    type=click.Choice(NAT_BEHAVIOURS),
    default="eim",
    show_default=True,
    help="eim: port-keeping masquerade; random: address-and-port-dependent mapping; "
    "full-cone: eim plus endpoint-independent filtering (inbound UDP reaches lan).",
)
@click.option(
    "--upstream-nat",
    is_flag=True,
    help="Double NAT: a carrier NAT (node isp) between the router and the Internet.",
)
@click.option(
    "--coturn/--no-coturn",
    default=True,
    show_default=True,
    help="Run coturn (STUN with RFC 5780, TURN) on the Internet host wan.",
)
@click.option(
    "--second-lan",
    is_flag=True,
    help="A peer host lan2 (192.168.78.10) behind a second router rtr2 (100.200.0.4) on the "
    "same Internet segment, for peer-to-peer tests.",
)
@click.option(
    "--nat2",
    type=click.Choice(NAT_BEHAVIOURS),
    default=None,
    help="rtr2's behaviour, as --nat (default eim; needs --second-lan).",
)
@click.option(
    "--portmap2",
    default=None,
    help="What rtr2 offers, as --portmap (default all; needs --second-lan).",
)
@click.option("--replace", is_flag=True, help="Replace a lab of the same name if one exists.")
@JSON
def lab_up(
    name: str,
    portmap: str,
    nat: str,
    upstream_nat: bool,
    coturn: bool,
    second_lan: bool,
    nat2: str | None,
    portmap2: str | None,
    replace: bool,
    as_json: bool,
) -> None:
    """Build the lab: lan and dev behind rtr (NAT + miniupnpd), wan (the Internet, coturn);
    with --second-lan also lan2 behind rtr2."""
    if not second_lan and (nat2 is not None or portmap2 is not None):
        raise click.UsageError("--nat2 and --portmap2 set up the second router: add --second-lan")
    try:
        chosen = parse_portmap(portmap)
        chosen2 = parse_portmap("all" if portmap2 is None else portmap2)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    cfg = LabConfig(
        name=name,
        portmap=chosen,
        nat=parse_nat(nat),
        coturn=coturn,
        upstream_nat=upstream_nat,
        second_lan=second_lan,
        nat2=parse_nat(nat2 or "eim"),
        portmap2=chosen2,
    )
    the_lab = Lab.create(cfg, replace=replace)
    status = the_lab.status()
    if as_json:
        emit_event("up", **status)
    else:
        _print_status(status)


@lab.command("down")
@NAME
@JSON
def lab_down(name: str, as_json: bool) -> None:
    """Remove the lab and everything running in it (idempotent)."""
    check_host()
    Lab(LabConfig(name=name)).down()
    if as_json:
        emit_event("down", name=name)
    else:
        out.print(f"lab {name!r} is down")


@lab.command("status")
@NAME
@JSON
def lab_status(name: str, as_json: bool) -> None:
    """Show the lab's nodes, addresses and router."""
    status = Lab.open(name).status()
    if as_json:
        emit_event("status", **status)
    else:
        _print_status(status)


@lab.command(
    "exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@NAME
@click.argument("node", type=click.Choice(EVERY_NODE))
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def lab_exec(name: str, node: str, command: tuple[str, ...]) -> None:
    """Run COMMAND on NODE: natkit lab exec lan -- curl http://100.200.0.2/"""
    # allow_interspersed_args=False hands a "--" separator through to us: drop it.
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise click.UsageError("give a COMMAND to run on the node (after --)")
    argv = Lab.open(name).command(node, list(command))
    os.execvp(argv[0], argv)


@lab.command("reboot")
@NAME
@click.argument("node", type=click.Choice(ROUTERS))
@click.option(
    "--move-upnp-port", is_flag=True, help="Also move the IGD's SOAP port, as some routers do."
)
def lab_reboot(name: str, node: str, move_upnp_port: bool) -> None:
    """Reboot a router (rtr or rtr2): its daemon restarts, every mapping and NAT state is lost."""
    Lab.open(name).reboot_router(move_upnp_port=move_upnp_port, router=_router(node))
    out.print(f"router {node} of lab {name!r} rebooted")


@lab.command("flush-nat")
@NAME
@click.argument("node", type=click.Choice(ROUTERS))
def lab_flush_nat(name: str, node: str) -> None:
    """Forget a router's NAT and connection state (conntrack -F), as when a path dies."""
    Lab.open(name).flush_nat(_router(node))
    out.print(f"NAT state of {node} in lab {name!r} flushed")


def _router(node: str) -> RouterNode:
    # click.Choice(ROUTERS) has checked it already; this narrows the type.
    return "rtr2" if node == "rtr2" else "rtr"


@lab.command("demo")
@click.option("--name", default="natkit-demo", show_default=True, help="Lab name.")
@click.option("--keep", is_flag=True, help="Leave the lab up afterwards.")
def lab_demo(name: str, keep: bool) -> None:
    """Build a lab, map a LAN web server through the router with natkit, fetch it from wan."""
    from natkit.lab.demo import run_demo

    raise SystemExit(run_demo(name, keep=keep))


def _print_status(status: dict[str, Any]) -> None:
    portmap = ",".join(status["portmap"]) or "none"
    double = "  upstream-nat" if status.get("upstream_nat") else ""
    double += "  second-lan" if status.get("second_lan") else ""
    t = Table(
        title=f"lab {status['name']!r}  nat={status['nat']}  portmap={portmap}{double}",
        title_justify="left",
    )
    t.add_column("node")
    t.add_column("netns")
    t.add_column("addresses")
    for node, info in status["nodes"].items():
        t.add_row(node, info["netns"], ", ".join(info["addresses"]))
    out.print(t)
    _print_router("router", status["router"])
    router2 = status.get("router2")
    if router2:
        portmap2 = ",".join(router2["portmap"]) or "none"
        out.print(f"router2 (rtr2, for lan2): nat={router2['nat']}  portmap={portmap2}")
        _print_router("router2", router2)
    v6 = status.get("ipv6")
    if v6:
        out.print(f"IPv6: LAN {v6['lan_prefix']} (router {v6['router_lan_ip']}), routed without "
                  f"NAT to WAN {v6['router_wan_ip']}; inbound dropped unless a pinhole opens it")  # fmt: skip
    isp = status.get("isp")
    if isp:
        out.print(f"isp (carrier NAT): {isp['cpe_ip']} → public {isp['wan_ip']}")
    turn = status.get("coturn") or {}
    if turn.get("enabled"):
        state = f"running, pid {turn['pid']}" if turn["running"] else "not running"
        creds = turn["turn"]
        out.print(
            f"coturn {state}: STUN {turn['stun_primary']} (alternate {turn['stun_alternate']}), "
            f"TURN user {creds['user']} password {creds['password']} realm {creds['realm']}"
        )
    else:
        out.print("coturn off")


def _print_router(title: str, router: dict[str, Any]) -> None:
    daemon = f"running, pid {router['miniupnpd_pid']}" if router["miniupnpd_running"] else "off"
    out.print(f"{title}: LAN {router['lan_ip']}  WAN {router['wan_ip']}  miniupnpd {daemon}")
    if router.get("upnp_description"):
        out.print(f"UPnP IGD: {router['upnp_description']}")
