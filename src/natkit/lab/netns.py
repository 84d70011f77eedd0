"""Entering Linux network namespaces from Python.

``setns(2)`` moves only the calling *thread* into a namespace, so natkit runs lab work in
a dedicated thread: every socket that thread creates lives in the lab, and the rest of
the process (pytest, the CLI) stays in the host's namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from natkit.errors import LabError

T = TypeVar("T")

NETNS_DIR = "/run/netns"
_CLONE_NEWNET = 0x40000000

_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise LabError(f"setns failed: {os.strerror(err)} (are you root?)")


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def current_netns_inode() -> int:
    """Inode of the calling thread's network namespace (identifies it)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Move the calling thread into netns ``name`` for the ``with`` block, then back."""
    try:
        target = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LabError(f"network namespace {name!r} does not exist (is the lab up?)") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def call_in(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn()`` in a fresh thread inside netns ``name``; return its result or raise."""
    result: list[T] = []
    error: list[BaseException] = []

    def worker() -> None:
        try:
            with entered(name):
                result.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=worker, name=f"netns:{name}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def run_in(name: str, coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run an asyncio coroutine (made by ``coro_fn``) on a new loop inside netns ``name``."""
    import asyncio

    async def main() -> T:
        return await coro_fn()

    return call_in(name, lambda: asyncio.run(main()))
