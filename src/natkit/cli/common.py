"""Shared CLI plumbing: one console for humans on stdout, errors on stderr, JSON output."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

from natkit.net import loops

if TYPE_CHECKING:
    from rich.console import Console


class _LazyConsole:
    """rich's Console, made on first use: a ``--json`` run that prints nothing for humans
    never imports rich (~20 ms of a ``natkit map add`` start)."""

    def __init__(self, *, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            console = Console(stderr=self._stderr, highlight=False)
            # Piped or captured output (not a terminal) is read by programs and copied by
            # people: a long token (a fingerprint, a URL) must stay on one line, not be cut
            # at the console's width. Tables are still laid out to the width.
            console.soft_wrap = not console.is_terminal
            self._console = console
        return getattr(self._console, name)


out = cast("Console", _LazyConsole(stderr=False))
err = cast("Console", _LazyConsole(stderr=True))


def ip_address_option(ctx: Any, param: Any, value: str | None) -> str | None:
    """A click callback: ``value`` must be an IP address (a router is not looked up by name:
    a typo would otherwise become a DNS query, then a confusing network error)."""
    import ipaddress

    import click

    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an IP address") from None


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def emit_event(event: str, **fields: Any) -> None:
    """One line of the ``--json`` convention (docs/cli.md): an object whose ``event`` says
    what it is; results and errors included."""
    emit_json({"event": event, **fields})


def json_requested(argv: list[str]) -> bool:
    """Did this command line ask for JSON? (``--json`` among its options, before a ``--``
    that hands the rest to another program, as ``natkit lab exec`` does)."""
    own = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in own


def error_event(exc: BaseException, exit_code: int) -> dict[str, Any]:
    """The ``error`` line for ``exc``: its natkit type, its message and the exit code."""
    return {"event": "error", "error": type(exc).__name__, "message": str(exc),
            "exit_code": exit_code}  # fmt: skip


T = TypeVar("T")


def using_state(action: Callable[..., T], *args: Any) -> T:
    """Read or write natkit's records (:mod:`natkit.state`): a directory that cannot be used
    is a StateError that names it and says what to do, not an OSError."""
    from natkit.errors import StateError
    from natkit.state import state_dir

    try:
        return action(*args)
    except OSError as exc:
        raise StateError(
            f"cannot use natkit's state directory {state_dir()}: {exc.strerror or exc} "
            "(set NATKIT_STATE_DIR to a writable directory)"
        ) from None


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run a long-lived command (the relay, the agent) on uvloop where it is installed: its
    event loop is written in C, and about half of what the relay and the agent spend on a
    new visitor is event-loop Python (registering sockets, dispatching callbacks).
    ``NATKIT_EVENT_LOOP=asyncio`` keeps asyncio's own loop, as does a system without uvloop
    (Windows): one that can watch sockets (see :mod:`natkit.net.loops`)."""
    if os.environ.get("NATKIT_EVENT_LOOP", "").lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return loops.run(main)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True, markup=True)
    raise SystemExit(code)


def fail_with(exc: BaseException, code: int, *, as_json: bool) -> NoReturn:
    """End the command on ``exc``: an ``error`` JSON line on stdout under ``--json``
    (and the message on stderr for a human watching), else the message on stderr."""
    if as_json:
        emit_json(error_event(exc, code))
    fail(str(exc) or type(exc).__name__, code)
