"""The ``natkit`` click group; each command's module is imported only when it runs."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from natkit import __version__

# Each command's module is imported only when that command runs (or for --help): a relay
# or an agent process then holds neither the lab, nor rich tables, nor the ICE stack.
COMMANDS = {
    "map": "natkit.cli.map:map_group",
    "expose": "natkit.cli.expose:expose",
    "lab": "natkit.cli.lab:lab",
    "relay": "natkit.cli.relay:relay",
    "check": "natkit.cli.check:check",
    "p2p": "natkit.cli.p2p:p2p",
}
# Each command's one-line help, for ``natkit --help`` without importing every command
# (~110 ms; tests/unit/test_cli_help.py checks these against the commands' own help).
SHORT_HELP = {
    "map": "Create, list and delete port mappings on the router.",
    "expose": "Make local PORT reachable from the Internet and keep it so until stopped.",
    "lab": "A real NAT testbed: namespaces, nftables NAT, miniupnpd, coturn (Linux, root).",
    "relay": "Relay tunnels: a self-hosted ngrok.",
    "check": "Report this host's network: public address, NAT behaviour (RFC 5780), the "
    "router's port mapping, double NAT, the relay; then what will work.",
    "p2p": "Peer to peer: two hosts behind NAT, connected directly when possible.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        command: click.Command = getattr(importlib.import_module(module), attr)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        limit = formatter.width - 6 - max(map(len, SHORT_HELP))
        # Shortened as click shortens a command's own help.
        rows = [(name, click.Command(name, help=text).get_short_help_str(limit))
                for name, text in SHORT_HELP.items()]  # fmt: skip
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="natkit")
@click.option("-v", "--verbose", is_flag=True, help="Log what natkit does to stderr.")
def cli(verbose: bool) -> None:
    """Make a service behind NAT reachable from the Internet."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
