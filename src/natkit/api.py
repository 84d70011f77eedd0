"""The one-call API: ``natkit.open_port(8080)`` (blocking) and ``open_port_async`` (asyncio).

Both give a handle whose mapping is leased, kept alive while the handle is open (renewed
at half the lease, restored after a router reboot) and deleted when it is closed.
``async with natkit.open_port_async(8080) as port`` works, and so does ``async with await``.
"""

from __future__ import annotations

import asyncio
import collections.abc
import concurrent.futures
import inspect
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar, overload

from natkit.errors import RelayError
from natkit.events import Event, from_mapping
from natkit.net.loops import new_event_loop
from natkit.portmap.manager import KeptMapping
from natkit.portmap.mapping import PortMapping

T = TypeVar("T")
EventListener = Callable[[Event], object]
MappingListener = Callable[[str, PortMapping, dict[str, Any]], object]


def check_port(value: object, what: str = "port") -> int:
    """``value`` as a port number, else a TypeError/ValueError that says what was wrong."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{what} must be an int from 1 to 65535, not {type(value).__name__} {value!r}"
            + (
                f" (write {int(value)} without quotes)"
                if isinstance(value, str) and value.isdigit()
                else ""
            )
        )
    if not 1 <= value <= 65535:
        raise ValueError(f"{what} must be from 1 to 65535, not {value}")
    return value


def relay_settings(
    relay: str | None, token: str | None, purpose: str = "a relay tunnel needs"
) -> tuple[str, str]:
    """``relay`` and ``token``, else ``$NATKIT_RELAY`` and ``$NATKIT_TOKEN``; a RelayError
    naming what is missing (and its variable) when neither is there."""
    relay = relay or os.environ.get("NATKIT_RELAY") or ""
    token = token or os.environ.get("NATKIT_TOKEN") or ""
    missing = [what for what, value in (("relay='HOST:PORT' or $NATKIT_RELAY", relay),
                                        ("token=... or $NATKIT_TOKEN", token)) if not value]  # fmt: skip
    if missing:
        raise RelayError(f"{purpose} {' and '.join(missing)}")
    return relay, token


def takes_event_object(callback: Callable[..., object]) -> bool:
    """Does ``callback`` take one typed :class:`Event` (new style), or the older
    ``(name, ..., info)`` arguments? Decided by how many positional arguments it takes."""
    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: assume the new style
        return True
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in params if p.kind in positional and p.default is p.empty) <= 1


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

    @overload
    def on_event(self, callback: EventListener) -> None: ...
    @overload
    def on_event(self, callback: MappingListener) -> None: ...
    def on_event(self, callback: Callable[..., object]) -> None:
        """Call ``callback(event)`` with a :mod:`natkit.events` object (Renewed, Lost,
        Restored, Closed). A callback of three arguments gets the older
        ``(name, mapping, info)`` form."""
        if not takes_event_object(callback):

            def legacy(name: str, mapping: PortMapping, info: dict[str, Any]) -> None:
                callback(name, mapping, info)

            self._keeper.on_event(legacy)
            return

        def typed(name: str, mapping: PortMapping, info: dict[str, Any]) -> None:
            event = from_mapping(name, mapping, info)
            if event is not None:
                callback(event)

        self._keeper.on_event(typed)

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


class _Closable(Protocol):
    @property
    def closed(self) -> bool: ...

    async def close(self) -> None: ...


H = TypeVar("H", bound=_Closable)


class Opening(collections.abc.Coroutine[Any, Any, H], Generic[H]):
    """What the ``*_async`` openers return: a coroutine object for the handle. ``await`` it,
    hand it to ``asyncio.run()`` (or ``create_task``), or enter it directly:
    ``async with natkit.open_port_async(8080) as port`` (closed on exit).

    ``send``/``throw``/``close`` drive the wrapped coroutine, so asyncio treats it as the
    coroutine it stands for. (``asyncio.run(natkit.open_port_async(8080))`` returns the
    handle once the loop has ended: nothing keeps it then, and the mapping lasts until its
    lease runs out.)
    """

    def __init__(self, coro: Coroutine[Any, Any, H]) -> None:
        self._coro = coro
        self._handle: H | None = None

    def __await__(self) -> Generator[Any, None, H]:
        return self._coro.__await__()

    def send(self, value: Any) -> Any:
        return self._coro.send(value)

    def throw(
        self, typ: Any, val: Any = None, tb: TracebackType | None = None, /
    ) -> Any:  # ``typ`` an exception (or, the older form, its class with a value)
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    async def __aenter__(self) -> H:
        self._handle = await self._coro
        return self._handle

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._handle is not None:
            await self._handle.close()

    def __repr__(self) -> str:
        return f"<Opening {getattr(self._coro, '__qualname__', self._coro)!s}>"


def open_port_async(
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
    on_event: EventListener | None = None,
) -> Opening[OpenPort]:
    """Map ``internal_port`` on the router (UPnP, NAT-PMP or PCP: the best it offers) and
    keep the mapping alive until the returned :class:`OpenPort` is closed. ``on_event``
    gets every :mod:`natkit.events` object from Ready on."""
    check_port(internal_port, "internal_port")
    if external_port is not None:
        check_port(external_port, "external_port")
    return Opening(_open_port(internal_port, protocol=protocol, external_port=external_port,
                              lease=lease, description=description, via=via, timeout=timeout,
                              gateway_ip=gateway_ip, check_interval=check_interval,
                              on_event=on_event))  # fmt: skip


async def _open_port(
    internal_port: int,
    *,
    protocol: str,
    external_port: int | None,
    lease: int,
    description: str,
    via: str,
    timeout: float,
    gateway_ip: str | None,
    check_interval: float,
    on_event: EventListener | None,
) -> OpenPort:
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
    handle = OpenPort(keeper)
    if on_event is not None:
        handle.on_event(on_event)  # before start(): Ready is the first event it gets
    await keeper.start()
    return handle


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

    # How long an interrupted call gets to clean up (remove a mapping it made, close an
    # agent) before the caller's Ctrl-C goes on.
    CLEANUP_WAIT = 5.0

    def run(self, work: Awaitable[T]) -> T:
        over = threading.Event()

        async def wait() -> T:
            try:
                return await work
            finally:
                over.set()

        future: concurrent.futures.Future[T] | None = None
        try:
            future = asyncio.run_coroutine_threadsafe(wait(), self.loop)
            return future.result()
        except BaseException:
            # Ctrl-C (or any exception) in the caller's thread: cancel the work and let its
            # own cleanup run in the loop, rather than stopping the loop under it.
            if future is not None:
                future.cancel()
                over.wait(self.CLEANUP_WAIT)
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


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

    @overload
    def on_event(self, callback: EventListener) -> None: ...
    @overload
    def on_event(self, callback: MappingListener) -> None: ...
    def on_event(self, callback: Callable[..., object]) -> None:
        """Called (from natkit's background thread) with each :mod:`natkit.events` object."""
        self._handle.on_event(callback)


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
    check_interval: float = 2.0,
    on_event: EventListener | None = None,
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
                check_interval=check_interval,
                on_event=on_event,
            )
        )
    except BaseException:
        runner.stop()
        raise
    return Port(runner, handle)
