"""``natkit lab``: build and drive the network-namespace NAT testbed."""

from __future__ import annotations

import os
from typing import Any

import click
from rich.table import Table

from natkit.cli.common import emit_json, fail, out
from natkit.lab import Lab, LabConfig, check_host, parse_portmap
from natkit.lab.config import ALL_NODES, NAT_BEHAVIOURS, parse_nat

NAME = click.option(
    "--name", default="natkit", show_default=True, help="Lab name (several may coexist)."
)


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
@click.option("--replace", is_flag=True, help="Replace a lab of the same name if one exists.")
@click.option("--json", "as_json", is_flag=True)
def lab_up(
    name: str,
    portmap: str,
    nat: str,
    upstream_nat: bool,
    coturn: bool,
    replace: bool,
    as_json: bool,
) -> None:
    """Build the lab: lan and dev behind rtr (NAT + miniupnpd), wan (the Internet, coturn)."""
    try:
        chosen = parse_portmap(portmap)
    except ValueError as exc:
        fail(str(exc), 2)
    cfg = LabConfig(
        name=name,
        portmap=chosen,
        nat=parse_nat(nat),
        coturn=coturn,
        upstream_nat=upstream_nat,
    )
    the_lab = Lab.create(cfg, replace=replace)
    status = the_lab.status()
    if as_json:
        emit_json(status)
    else:
        _print_status(status)


@lab.command("down")
@NAME
def lab_down(name: str) -> None:
    """Remove the lab and everything running in it (idempotent)."""
    check_host()
    Lab(LabConfig(name=name)).down()
    out.print(f"lab {name!r} is down")


@lab.command("status")
@NAME
@click.option("--json", "as_json", is_flag=True)
def lab_status(name: str, as_json: bool) -> None:
    """Show the lab's nodes, addresses and router."""
    status = Lab.open(name).status()
    if as_json:
        emit_json(status)
    else:
        _print_status(status)


@lab.command(
    "exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@NAME
@click.argument("node", type=click.Choice(ALL_NODES))
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
@click.argument("node", type=click.Choice(["rtr"]))
@click.option(
    "--move-upnp-port", is_flag=True, help="Also move the IGD's SOAP port, as some routers do."
)
def lab_reboot(name: str, node: str, move_upnp_port: bool) -> None:
    """Reboot the router: the daemon restarts and every mapping and NAT state is lost."""
    Lab.open(name).reboot_router(move_upnp_port=move_upnp_port)
    out.print(f"router of lab {name!r} rebooted")


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
    router = status["router"]
    daemon = f"running, pid {router['miniupnpd_pid']}" if router["miniupnpd_running"] else "off"
    out.print(f"router: LAN {router['lan_ip']}  WAN {router['wan_ip']}  miniupnpd {daemon}")
    if router.get("upnp_description"):
        out.print(f"UPnP IGD: {router['upnp_description']}")
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
