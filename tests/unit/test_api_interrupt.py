"""Ctrl-C during a blocking call (``natkit.open_port``, ``connect``, ``expose``): the work
running in natkit's loop thread is cancelled and its cleanup runs before the
KeyboardInterrupt reaches the caller (a mapping made meanwhile is removed, not left on
the router). No network."""

from __future__ import annotations

import asyncio
import signal
import threading

import pytest

from natkit.api import _LoopThread


def test_ctrl_c_cancels_the_work_and_waits_for_its_cleanup() -> None:
    started, cleaned = threading.Event(), threading.Event()

    async def work() -> None:
        # Let the caller reach its wait first (an interrupt before it is covered too, but
        # this test is about the wait).
        await asyncio.sleep(0.1)
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.05)  # cleanup that itself awaits (a router request)
            cleaned.set()

    def press_ctrl_c() -> None:
        started.wait(10)
        main = threading.main_thread().ident
        assert main is not None
        signal.pthread_kill(main, signal.SIGINT)  # to the blocked main thread, as a Ctrl-C is

    runner = _LoopThread()
    presser = threading.Thread(target=press_ctrl_c)
    presser.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.run(work())
        assert cleaned.is_set(), "the caller went on before the work had cleaned up"
    finally:
        presser.join()
        runner.stop()
