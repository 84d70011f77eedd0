"""The one-call API: ``natkit.open_port(8080)`` (blocking) and ``open_port_async`` (asyncio).

Both give a handle whose mapping is leased, renewed at half the lease while the handle is
open, and deleted when it is closed (or when the ``with`` block ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

from natkit.portmap.mapping import PortMapping
from natkit.portmap.upnp import UPnPMapper

log = logging.getLogger("natkit")
T = TypeVar("T")


class OpenPort:
    """A live port mapping (async). Use ``async with await open_port_async(...)`` or ``close()``."""

    def __init__(self, mapper: UPnPMapper, mapping: PortMapping) -> None:
        self._mapper = mapper
        self.mapping = mapping
        self._renewer: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[PortMapping], None]] = []
        self.closed = False

    @property
    def public_address(self) -> str:
        return self.mapping.public_address

    @property
    def publicly_reachable(self) -> bool:
        return self.mapping.publicly_reachable

    def on_change(self, callback: Callable[[PortMapping], None]) -> None:
        """Call ``callback(mapping)`` whenever the public address changes."""
        self._listeners.append(callback)

    def _start(self) -> None:
        if self.mapping.lease > 0:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.mapping.lease / 2))
            try:
                fresh = await self._mapper.renew(self.mapping)
            except Exception as exc:  # keep trying; the lease still has half its time left
                log.warning("renewing %s failed: %s", self.mapping.public_address, exc)
                continue
            changed = fresh.public_address != self.mapping.public_address
            self.mapping = fresh
            if changed:
                for cb in self._listeners:
                    cb(fresh)

    async def close(self) -> None:
        """Delete the mapping from the router. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        m = self.mapping
        try:
            await self._mapper.delete(m.external_port, m.protocol)
        except Exception as exc:
            log.warning("could not delete mapping %s/%s: %s", m.public_address, m.protocol, exc)
            if m.lease == 0:
                raise  # a permanent mapping must not be left behind silently

    async def __aenter__(self) -> OpenPort:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        m = self.mapping
        return f"<OpenPort {m.protocol} {m.public_address} -> {m.internal_ip}:{m.internal_port} via {m.method}>"


async def open_port_async(
    internal_port: int,
    *,
    protocol: str = "tcp",
    external_port: int | None = None,
    lease: int = 3600,
    description: str = "natkit",
    timeout: float = 2.0,
    gateway_ip: str | None = None,
) -> OpenPort:
    """Discover the router, map ``internal_port`` and return the live :class:`OpenPort`."""
    mapper = await UPnPMapper.discover(timeout=timeout, gateway_ip=gateway_ip)
    mapping = await mapper.add(
        internal_port, external_port=external_port, protocol=protocol, lease=lease,
        description=description,
    )  # fmt: skip
    handle = OpenPort(mapper, mapping)
    handle._start()
    return handle


class _LoopThread:
    """An event loop in a daemon thread, so blocking callers get renewal for free.

    A new thread shares the network namespace of the thread that starts it, so this also
    works from a thread that entered a lab namespace.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="natkit-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class Port:
    """A live port mapping for blocking code; a context manager that removes it on exit."""

    def __init__(self, runner: _LoopThread, handle: OpenPort) -> None:
        self._runner = runner
        self._handle = handle

    @property
    def mapping(self) -> PortMapping:
        return self._handle.mapping

    @property
    def public_address(self) -> str:
        return self._handle.public_address

    @property
    def publicly_reachable(self) -> bool:
        return self._handle.publicly_reachable

    def on_change(self, callback: Callable[[PortMapping], None]) -> None:
        self._handle.on_change(callback)

    def close(self) -> None:
        if self._handle.closed:
            return
        try:
            self._runner.run(self._handle.close())
        finally:
            self._runner.stop()

    def __enter__(self) -> Port:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self._handle).replace("OpenPort", "Port", 1)


def open_port(
    internal_port: int,
    *,
    protocol: str = "tcp",
    external_port: int | None = None,
    lease: int = 3600,
    description: str = "natkit",
    timeout: float = 2.0,
    gateway_ip: str | None = None,
) -> Port:
    """Map ``internal_port`` on the router; blocking. ``with natkit.open_port(8080) as p: ...``"""
    runner = _LoopThread()
    try:
        handle = runner.run(open_port_async(
            internal_port, protocol=protocol, external_port=external_port, lease=lease,
            description=description, timeout=timeout, gateway_ip=gateway_ip,
        ))  # fmt: skip
    except BaseException:
        runner.stop()
        raise
    return Port(runner, handle)
