"""The event loop natkit runs on, chosen by what a loop can do rather than by platform.

natkit's data paths (the agent's data connections, the sealed bridge) are driven by socket
readiness callbacks (``loop.add_reader``/``add_writer``). Windows' default loop (the
proactor) has none: there natkit runs on ``asyncio.SelectorEventLoop`` instead. That loop
has no ``add_signal_handler`` and its ``select()`` is not woken by Ctrl-C, so a socket
registered as the signal wake-up fd wakes it (the proactor does the same for itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from natkit.errors import NatkitError

T = TypeVar("T")


def watches_sockets(loop: asyncio.AbstractEventLoop) -> bool:
    """True if ``loop`` can call back when a socket is readable (``add_reader``)."""
    a, b = socket.socketpair()
    try:
        try:
            loop.add_reader(a.fileno(), lambda: None)
        except NotImplementedError:
            return False
        loop.remove_reader(a.fileno())
        return True
    finally:
        a.close()
        b.close()


def require_socket_watching(what: str) -> None:
    """Raise :class:`NatkitError` (saying what to do) if the running loop cannot watch sockets."""
    if not watches_sockets(asyncio.get_running_loop()):
        raise NatkitError(
            f"{what} needs an event loop that watches sockets (add_reader), and this one "
            "does not (Windows' ProactorEventLoop?): run it on asyncio.SelectorEventLoop, "
            "e.g. with natkit.net.loops.run(main())"
        )


def new_event_loop() -> asyncio.AbstractEventLoop:
    """asyncio's default loop, or a selector loop where the default cannot watch sockets."""
    loop = asyncio.new_event_loop()
    if watches_sockets(loop):
        return loop
    loop.close()
    return asyncio.SelectorEventLoop()


def _handles_signals(loop: asyncio.AbstractEventLoop) -> bool:
    """True if ``loop`` implements ``add_signal_handler`` (asked of its class: trying it
    would replace the process's SIGINT handler)."""
    implementation = type(loop).add_signal_handler
    return implementation is not asyncio.AbstractEventLoop.add_signal_handler


@contextlib.contextmanager
def _woken_by_signals(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """Make a signal (Ctrl-C) wake ``loop`` from ``select()``: Python's signal handler then
    runs, and asyncio's Runner cancels the main task."""
    if _handles_signals(loop):
        yield
        return
    rsock, wsock = socket.socketpair()
    rsock.setblocking(False)
    wsock.setblocking(False)

    def drain() -> None:
        with contextlib.suppress(OSError):
            rsock.recv(4096)

    loop.add_reader(rsock.fileno(), drain)
    try:
        previous = signal.set_wakeup_fd(wsock.fileno())
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.set_wakeup_fd(previous)
        loop.remove_reader(rsock.fileno())
        rsock.close()
        wsock.close()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on a loop that can watch sockets and is woken by Ctrl-C."""
    runner_type = getattr(asyncio, "Runner", None)  # Python 3.11 and later
    if runner_type is None:
        return _run_without_runner(main)
    with (
        runner_type(loop_factory=new_event_loop) as runner,
        _woken_by_signals(runner.get_loop()),
    ):
        result: T = runner.run(main)
    return result


def _run_without_runner(main: Coroutine[Any, Any, T]) -> T:
    """Python 3.10: what ``asyncio.run`` does, on our loop. Ctrl-C raises
    KeyboardInterrupt in the loop; the tasks left are then cancelled and their cleanup
    (``finally``: mappings removed, tunnels closed) runs before the loop closes."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        with _woken_by_signals(loop):
            return loop.run_until_complete(main)
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
