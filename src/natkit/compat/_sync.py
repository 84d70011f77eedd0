"""Run natkit's async clients from blocking code, as the C bindings people replace do.

Each call gets a private event loop of its own, run in the calling thread: that thread's
network namespace (a lab node) and signal handling (Ctrl-C) apply, and nothing outlives
the call. A thread whose own event loop is running (blocking code called from a
coroutine) cannot run a second one, so there the call runs on a helper thread started
from the caller's thread, which therefore shares its namespace.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from natkit.net.loops import new_event_loop

T = TypeVar("T")


def run_sync(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the coroutine ``make()`` to completion and return its result (or raise)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_here(make)
    result: list[T] = []
    error: list[BaseException] = []

    def work() -> None:
        try:
            result.append(_run_here(make))
        except BaseException as exc:  # handed to the caller's thread as it is
            error.append(exc)

    helper = threading.Thread(target=work, name="natkit-compat-call", daemon=True)
    helper.start()
    helper.join()
    if error:
        raise error[0]
    return result[0]


def _run_here(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    loop = new_event_loop()
    try:
        return loop.run_until_complete(make())
    finally:
        # After Ctrl-C the work is still pending: cancel it and let its cleanup run.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
