"""``natkit.api.Opening``, what every ``*_async`` opener returns, is a real coroutine object:
``asyncio.run(opening)``, ``await opening``, ``async with opening`` and ``create_task`` all
work, and ``send``/``throw``/``close`` drive the coroutine it wraps. No network: the wrapped
coroutine makes a stand-in handle (the real openers are lab and loopback-relay tests)."""

from __future__ import annotations

import asyncio
import collections.abc
import gc
import warnings

import pytest

from natkit.api import Opening


class Handle:
    def __init__(self) -> None:
        self.closed = False

    async def close(self) -> None:
        self.closed = True

    async def __aenter__(self) -> Handle:  # as every real handle (OpenPort, RelayTunnel…)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _make(log: list[str]) -> Handle:
    log.append("started")
    await asyncio.sleep(0)  # suspends once, as a real opener does
    log.append("made")
    return Handle()


def test_it_is_a_coroutine_asyncio_run_accepts() -> None:
    log: list[str] = []
    opening = Opening(_make(log))
    assert isinstance(opening, collections.abc.Coroutine) and asyncio.iscoroutine(opening)
    handle = asyncio.run(opening)  # before: "a coroutine was expected, got <Opening …>"
    assert isinstance(handle, Handle) and not handle.closed and log == ["started", "made"]


async def test_await_async_with_and_a_task() -> None:
    log: list[str] = []
    awaited = await Opening(_make(log))
    assert isinstance(awaited, Handle) and not awaited.closed
    async with Opening(_make(log)) as entered:
        assert not entered.closed
    assert entered.closed  # closed on leaving the block
    async with await Opening(_make(log)) as both:  # the older form still works
        assert not both.closed
    tasked = await asyncio.create_task(Opening(_make(log)))
    assert isinstance(tasked, Handle) and log.count("made") == 4


def test_send_throw_and_close_drive_the_wrapped_coroutine() -> None:
    log: list[str] = []
    opening = Opening(_make(log))
    opening.send(None)  # runs to its first suspension
    assert log == ["started"]
    with pytest.raises(KeyError):
        opening.throw(KeyError("raised inside the opener"))
    assert log == ["started"]  # it never went on to make the handle

    closed = Opening(_make(log))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine … was never awaited"
        closed.close()
        del closed
        gc.collect()
    with pytest.raises(StopIteration) as done:
        second = Opening(_make(log))
        second.send(None)
        second.send(None)
    assert isinstance(done.value.value, Handle)
