"""The one-call API: ``natkit.open_port(8080)`` (blocking) and ``open_port_async`` (asyncio).

Both give a handle whose mapping is leased, kept alive while the handle is open (renewed
at half the lease, restored after a router reboot) and deleted when it is closed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from natkit.net.loops import new_event_loop
from natkit.portmap.manager import KeptMapping
from natkit.portmap.mapping import PortMapping

T = TypeVar("T")


class OpenPort:
    """A live port mapping (async): ``async with await open_port_async(8080) as port: ...``.

    ``mapping`` (and ``public_address``) stay current: the mapping is renewed, and restored
    after a router reboot or a gateway change. ``on_change`` tells you when it moves.
    """

    def __init__(self, keeper: KeptMapping) -> None:
        self._keeper = keeper
        self._change_listeners: list[Callable[[PortMapping], None]] = []
        keeper.on_event(self._on_event)

    @property
    def mapping(self) -> PortMapping:
        assert self._keeper.mapping is not None
        return self._keeper.mapping

    @property
    def method(self) -> str:
        return self.mapping.method

    @property
    def public_address(self) -> str:
        return self.mapping.public_address

    @property
    def publicly_reachable(self) -> bool:
        return self.mapping.publicly_reachable

    @property
    def closed(self) -> bool:
        return self._keeper.closed

    def on_change(self, callback: Callable[[PortMapping], None]) -> None:
        """Call ``callback(mapping)`` whenever the public address changes."""
        self._change_listeners.append(callback)

    def on_event(self, callback: Callable[[str, PortMapping, dict[str, Any]], None]) -> None:
        """Call ``callback(event, mapping, info)`` for renewed, lost, restored and closed."""
        self._keeper.on_event(callback)

    def _on_event(self, event: str, mapping: PortMapping, info: dict[str, Any]) -> None:
        if info.get("changed"):
            for cb in self._change_listeners:
                cb(mapping)

    async def close(self) -> None:
        """Delete the mapping from the router. Safe to call twice."""
        await self._keeper.close()

    async def __aenter__(self) -> OpenPort:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        m = self._keeper.mapping
        if m is None:
            return "<OpenPort (not mapped)>"
        return f"<OpenPort {m.protocol} {m.public_address} -> {m.internal_ip}:{m.internal_port} via {m.method}>"


async def open_port_async(
    internal_port: int,
    *,
    protocol: str = "tcp",
    external_port: int | None = None,
    lease: int = 3600,
    description: str = "natkit",
    via: str = "auto",
    timeout: float = 2.0,
    gateway_ip: str | None = None,
    check_interval: float = 2.0,
) -> OpenPort:
    """Map ``internal_port`` on the router (UPnP, NAT-PMP or PCP: the best it offers) and
    keep the mapping alive until the returned :class:`OpenPort` is closed."""
    keeper = KeptMapping(
        internal_port,
        protocol=protocol,
        external_port=external_port,
        lease=lease,
        description=description,
        via=via,
        gateway_ip=gateway_ip,
        timeout=timeout,
        check_interval=check_interval,
    )
    await keeper.start()
    return OpenPort(keeper)


class _LoopThread:
    """An event loop in a daemon thread, so blocking callers get renewal for free.

    A new thread shares the network namespace of the thread that starts it, so this also
    works from a thread that entered a lab namespace.
    """

    def __init__(self) -> None:
        self.loop = new_event_loop()  # one that can watch sockets (not Windows' proactor)
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="natkit-loop", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class _Closable(Protocol):
    @property
    def closed(self) -> bool: ...

    async def close(self) -> None: ...


H = TypeVar("H", bound=_Closable)


class SyncHandle(Generic[H]):
    """A blocking face for an async handle whose event loop runs in a background thread."""

    def __init__(self, runner: _LoopThread, handle: H) -> None:
        self._runner = runner
        self._handle = handle

    def close(self) -> None:
        if self._handle.closed:
            return
        try:
            self._runner.run(self._handle.close())
        finally:
            self._runner.stop()

    def __enter__(self: S) -> S:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        inner = repr(self._handle)
        return inner.replace(type(self._handle).__name__, type(self).__name__, 1)


S = TypeVar("S", bound=SyncHandle[Any])


class Port(SyncHandle[OpenPort]):
    """A live port mapping for blocking code; a context manager that removes it on exit."""

    @property
    def mapping(self) -> PortMapping:
        return self._handle.mapping

    @property
    def public_address(self) -> str:
        return self._handle.public_address

    @property
    def publicly_reachable(self) -> bool:
        return self._handle.publicly_reachable

    @property
    def method(self) -> str:
        return self._handle.method

    def on_change(self, callback: Callable[[PortMapping], None]) -> None:
        """Called (from natkit's background thread) when the public address changes."""
        self._handle.on_change(callback)


def open_port(
    internal_port: int,
    *,
    protocol: str = "tcp",
    external_port: int | None = None,
    lease: int = 3600,
    description: str = "natkit",
    via: str = "auto",
    timeout: float = 2.0,
    gateway_ip: str | None = None,
) -> Port:
    """Map ``internal_port`` on the router; blocking. ``with natkit.open_port(8080) as p: ...``

    The mapping is kept alive (renewed, restored after a router reboot) by a background
    thread until the port is closed.
    """
    runner = _LoopThread()
    try:
        handle = runner.run(
            open_port_async(
                internal_port,
                protocol=protocol,
                external_port=external_port,
                lease=lease,
                description=description,
                via=via,
                timeout=timeout,
                gateway_ip=gateway_ip,
            )
        )
    except BaseException:
        runner.stop()
        raise
    return Port(runner, handle)
