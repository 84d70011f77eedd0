"""Shared CLI plumbing: one console for humans on stdout, errors on stderr, JSON output."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

from rich.console import Console

from natkit.net import loops

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


T = TypeVar("T")


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
