"""Entry point: ``natkit map|expose|check|relay|lab|p2p …``.

This module imports nothing heavy at load time: ``natkit --version`` is answered before
click, rich or asyncio are imported (a whole process in ~25 ms instead of ~80 ms); every
other command line goes to the click group in :mod:`natkit.cli.app`.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import NoReturn

VERSION_FLAGS = (["--version"], ["-V"])


def main() -> None:
    """Run a command; whatever ends it, the user gets one message and an exit code
    (docs/cli.md), never a traceback: with ``--json`` also an ``error`` line on stdout."""
    if sys.argv[1:] in VERSION_FLAGS:
        from natkit import __version__

        sys.stdout.write(f"natkit, version {__version__}\n")  # click's own wording
        return
    _run()


def entry() -> NoReturn:
    """The ``natkit`` console script: :func:`main`, then a quick exit.

    By the time a command returns it has undone what it made (mappings, tunnels, the lab's
    processes) and its output is written; what the interpreter still does on the way out —
    tearing down several hundred modules — takes 10–20 ms of every command (a fifth of
    ``natkit map add``). So flush, close the logs and leave at once, unless a thread still
    runs (then the interpreter's own exit waits for it, as it should)."""
    try:
        main()
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # sys.exit("message"): the interpreter prints it and exits 1
            print(exc.code, file=sys.stderr)
            code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a reader that went away (natkit … | head): as the interpreter does
        code = code or 1
    if "logging" in sys.modules:
        import logging

        logging.shutdown()
    if threading.active_count() > 1:
        sys.exit(code)
    os._exit(code)


def _run() -> None:
    import logging

    import click

    from natkit.cli.app import cli
    from natkit.cli.common import emit_json, error_event, fail_with, json_requested
    from natkit.errors import EXIT_BUG, EXIT_INTERRUPTED, EXIT_USAGE, NatkitError

    as_json = json_requested(sys.argv[1:])
    try:
        cli.main(prog_name="natkit", standalone_mode=False)
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
        logging.getLogger("natkit").debug("unexpected failure", exc_info=True)
        bug = RuntimeError(
            f"natkit failed unexpectedly ({type(exc).__name__}: {exc}); this is a bug — "
            "run again with -v for the details and report them"
        )
        fail_with(bug, EXIT_BUG, as_json=as_json)


if __name__ == "__main__":
    main()
