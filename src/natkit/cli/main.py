"""Entry point: ``natkit map|expose|check|relay|lab …``."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from natkit import __version__
from natkit.cli.common import emit_json, error_event, fail_with, json_requested
from natkit.errors import EXIT_BUG, EXIT_INTERRUPTED, EXIT_USAGE, NatkitError

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


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="natkit")
@click.option("-v", "--verbose", is_flag=True, help="Log what natkit does to stderr.")
def cli(verbose: bool) -> None:
    """Make a service behind NAT reachable from the Internet."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


log = logging.getLogger("natkit")


def main() -> None:
    """Run a command; whatever ends it, the user gets one message and an exit code
    (docs/cli.md), never a traceback: with ``--json`` also an ``error`` line on stdout."""
    as_json = json_requested(sys.argv[1:])
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        fail_with(KeyboardInterrupt("aborted"), EXIT_INTERRUPTED, as_json=as_json)
    except click.ClickException as exc:
        if as_json:
            emit_json(error_event(exc, exc.exit_code) | {"message": exc.format_message()})
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except NatkitError as exc:
        fail_with(exc, exc.exit_code, as_json=as_json)
    except ValueError as exc:  # an argument our own parsers refused
        fail_with(exc, EXIT_USAGE, as_json=as_json)
    except KeyboardInterrupt:
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as exc:  # a bug: say so in one line; the traceback only with -v
        log.debug("unexpected failure", exc_info=True)
        bug = RuntimeError(
            f"natkit failed unexpectedly ({type(exc).__name__}: {exc}); this is a bug — "
            "run again with -v for the details and report them"
        )
        fail_with(bug, EXIT_BUG, as_json=as_json)


if __name__ == "__main__":
    main()
