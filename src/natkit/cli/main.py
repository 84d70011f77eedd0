"""Entry point: ``natkit map|expose|check|relay|lab …``."""

from __future__ import annotations

import logging
import sys

import click

from natkit import __version__
from natkit.cli.check import check
from natkit.cli.common import fail
from natkit.cli.expose import expose
from natkit.cli.lab import lab
from natkit.cli.map import map_group
from natkit.cli.p2p import p2p
from natkit.cli.relay import relay
from natkit.errors import NatkitError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="natkit")
@click.option("-v", "--verbose", is_flag=True, help="Log what natkit does to stderr.")
def cli(verbose: bool) -> None:
    """Make a service behind NAT reachable from the Internet."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


cli.add_command(map_group)
cli.add_command(expose)
cli.add_command(lab)
cli.add_command(relay)
cli.add_command(check)
cli.add_command(p2p)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        fail("aborted", 130)
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except NatkitError as exc:
        fail(str(exc))
    except ValueError as exc:  # an argument our own parsers refused
        fail(str(exc), 2)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
