"""Relay tunnels from Python, in the spirit of pyngrok.

>>> import natkit
>>> tunnel = natkit.connect(8080, relay="relay.example.com:7835", token="...")
>>> tunnel.public_url           # 'relay.example.com:20000' (tcp) or 'http://app.example.com'
>>> natkit.get_tunnels()        # every open tunnel of this process
>>> tunnel.close()              # or natkit.disconnect(tunnel.public_url), or a with block
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, overload

from natkit.api import (
    EventListener,
    Opening,
    SyncHandle,
    _LoopThread,
    check_port,
    relay_settings,
    takes_event_object,
)
from natkit.errors import RelayError
from natkit.events import Closed, from_relay
from natkit.relay.access import build_policy
from natkit.relay.agent import Agent, TunnelSpec

log = logging.getLogger(__name__)
_open: list[Tunnel] = []
RelayListener = Callable[[str, dict[str, Any]], None]
# pyngrok's ``proto`` values and natkit's tunnel kind for each (None: natkit has none).
PYNGROK_PROTOS: dict[str, str | None] = {
    "tcp": "tcp",
    "http": "http",
    "tls": "tls",
    "labeled": None,
}


class RelayTimeoutError(RelayError, TimeoutError):
    """The relay did not open the tunnel in time (also a TimeoutError, as before)."""


def tunnel_target(
    port: int | str | None, addr: int | str | None, local_host: str
) -> tuple[str, int]:
    """Where the service listens: natkit's ``port`` or pyngrok's ``addr`` (``8080``,
    ``"8080"``, ``"host:8080"``)."""
    if port is not None and addr is not None:
        raise TypeError("give the port or pyngrok's addr, not both")
    target = port if port is not None else addr
    if target is None:
        raise TypeError("connect() needs the local port, e.g. natkit.connect(8080)")
    if isinstance(target, str):
        host, sep, number = target.rpartition(":")
        if not number.isdigit():
            raise ValueError(f"addr {target!r} is not PORT or HOST:PORT")
        return (host.strip("[]") if sep and host else local_host), check_port(int(number), "addr")
    return local_host, check_port(target)


def tunnel_kind(proto: str | None, kind: str) -> str:
    if proto is None:
        return kind
    if proto not in PYNGROK_PROTOS:
        raise ValueError(f"proto must be tcp, http or tls, not {proto!r}")
    mapped = PYNGROK_PROTOS[proto]
    if mapped is None:
        raise ValueError(
            f"natkit has no equivalent of pyngrok's proto {proto!r}: use tcp, http or tls"
        )
    return mapped


class RelayTunnel:
    """A live tunnel (async). The agent reconnects by itself; ``public_url`` stays current.
    ``close()`` ends it, and tells every listener (:class:`~natkit.events.Closed`)."""

    def __init__(
        self,
        agent: Agent,
        task: asyncio.Task[None],
        spec: TunnelSpec,
        listeners: list[Callable[..., object]] | None = None,
    ) -> None:
        self.agent, self._task, self.spec = agent, task, spec
        self._listeners: list[Callable[..., object]] = list(listeners or [])  # for Closed
        self.closed = False

    @property
    def public_url(self) -> str:
        return self.spec.public

    @property
    def kind(self) -> str:
        return self.spec.kind

    @overload
    def on_event(self, callback: EventListener) -> None: ...
    @overload
    def on_event(self, callback: Callable[[str, dict[str, Any]], object]) -> None: ...
    def on_event(self, callback: Callable[..., object]) -> None:
        """``callback(event)`` with :mod:`natkit.events` objects (Lost, Restored,
        Interference, Pinned, Closed); a callback of two arguments gets the older
        ``(name, info)``."""
        self.agent.on_event(typed_relay_listener(callback, self.spec))
        self._listeners.append(callback)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        await self.agent.close()
        # A RelayTunnel exists only once its tunnel opened (a failed connect raises and
        # says nothing more): so it is always "closed" here.
        public = self.spec.public
        for callback in self._listeners:
            try:
                if takes_event_object(callback):
                    callback(Closed(public, "relay"))
                else:
                    callback("closed", {"tunnel": self.spec.id, "public": public})
            except Exception:  # a listener's bug must not stop the others
                log.exception("tunnel event listener failed")

    async def __aenter__(self) -> RelayTunnel:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<RelayTunnel {self.kind} {self.public_url} -> {self.spec.local_host}:{self.spec.local_port}>"


def typed_relay_listener(callback: Callable[..., object], spec: TunnelSpec) -> RelayListener:
    if not takes_event_object(callback):

        def legacy(name: str, info: dict[str, Any]) -> None:
            callback(name, info)

        return legacy

    def typed(name: str, info: dict[str, Any]) -> None:
        event = from_relay(name, info, spec.public)
        if event is not None:
            callback(event)

    return typed


async def open_tunnel(agent: Agent, task: asyncio.Task[None], spec: TunnelSpec,
                      timeout: float) -> None:  # fmt: skip
    """Wait until the running ``agent`` has opened ``spec``. A final error, or a first
    connection that fails (refused, unresolvable, no TLS), raises a RelayError at once:
    the agent would retry silently forever."""
    failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def first_failure(name: str, info: dict[str, Any]) -> None:
        if name == "reconnecting" and not spec.public and not failed.done():
            failed.set_result(str(info.get("reason", "")))

    agent.on_event(first_failure)
    waiter = asyncio.ensure_future(agent.wait_open(spec.id))
    try:
        waits: set[asyncio.Future[Any]] = {task, waiter, failed}
        done, _ = await asyncio.wait(waits, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if task in done:  # a final error: bad token, refused name, untrusted relay
            task.result()
        if failed in done:
            raise RelayError(f"cannot reach relay {agent.relay}: {failed.result()}")
        if waiter not in done:
            raise RelayTimeoutError(
                f"relay {agent.relay} did not open the tunnel within {timeout:g} s"
            )
        waiter.result()
    except BaseException:
        waiter.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await agent.close()
        raise
    finally:
        with contextlib.suppress(ValueError):
            agent.listeners.remove(first_failure)


def connect_async(
    port: int | str | None = None,
    proto: str | None = None,
    *,
    addr: int | str | None = None,
    relay: str | None = None,
    token: str | None = None,
    kind: str = "tcp",
    hostname: str = "",
    local_host: str = "127.0.0.1",
    plaintext_data: bool = False,
    fingerprint: str | None = None,
    cafile: Path | None = None,
    known_relays: Path | None = None,
    takeover: bool = False,
    allow: Sequence[str] = (),
    deny: Sequence[str] = (),
    basic_auth: str | Sequence[str] | None = None,
    rate_limit: str | None = None,
    timeout: float = 30.0,
    on_event: EventListener | None = None,
) -> Opening[RelayTunnel]:
    """Open a tunnel from the relay to ``local_host:port``; returns once it is public.

    ``kind`` is ``tcp`` (a port on the relay), ``http`` (routed by Host to
    ``hostname.DOMAIN``) or ``tls`` (routed by SNI, passed through untouched). Each call is
    its own agent with its own address; a host name another live agent of the token holds
    is refused unless ``takeover``. ``relay``/``token`` default to ``$NATKIT_RELAY`` and
    ``$NATKIT_TOKEN``. pyngrok's shapes work too: ``connect(8080, "http")``,
    ``connect(addr="8080", proto="tcp")``. Raises RelayError (RelayAuthError,
    RelayTrustError, TunnelRefusedError) when the relay cannot be used.

    Access control, enforced by the relay before a byte reaches this agent: ``allow`` /
    ``deny`` (CIDRs, IPv4 or IPv6; a deny wins, an allow list admits only its networks),
    ``basic_auth`` (``"user:pass"`` or several; http tunnels) and ``rate_limit`` (new
    connections per visitor address, ``"10/s"``, ``"600/min"``). ValueError when one is
    malformed. See docs/relay-access.md.
    """
    host, number = tunnel_target(port, addr, local_host)
    tunnel_type = tunnel_kind(proto, kind)
    access = build_policy(allow=allow, deny=deny, basic_auth=basic_auth, rate_limit=rate_limit,
                          kind=tunnel_type)  # fmt: skip
    spec = TunnelSpec(number, kind=tunnel_type, name=hostname, local_host=host,
                      takeover=takeover, access=access)  # fmt: skip
    relay, token = relay_settings(relay, token)
    return Opening(_connect(spec, relay, token, plaintext_data=plaintext_data,
                            fingerprint=fingerprint, cafile=cafile, known_relays=known_relays,
                            timeout=timeout, on_event=on_event))  # fmt: skip


async def _connect(
    spec: TunnelSpec,
    relay: str,
    token: str,
    *,
    plaintext_data: bool,
    fingerprint: str | None,
    cafile: Path | None,
    known_relays: Path | None,
    timeout: float,
    on_event: EventListener | None,
) -> RelayTunnel:
    try:
        agent = Agent(relay, token, [spec], plaintext_data=plaintext_data, fingerprint=fingerprint,
                      cafile=cafile, known_relays=known_relays)  # fmt: skip
    except ValueError as exc:  # not HOST:PORT
        raise RelayError(f"relay {relay!r}: {exc}") from None
    if on_event is not None:
        agent.on_event(typed_relay_listener(on_event, spec))
    task = asyncio.get_running_loop().create_task(agent.run())
    await open_tunnel(agent, task, spec, timeout)
    return RelayTunnel(agent, task, spec, [on_event] if on_event is not None else [])


class Tunnel(SyncHandle[RelayTunnel]):
    """A live tunnel for blocking code (a background thread runs the agent)."""

    @property
    def public_url(self) -> str:
        return self._handle.public_url

    @property
    def kind(self) -> str:
        return self._handle.kind

    @overload
    def on_event(self, callback: EventListener) -> None: ...
    @overload
    def on_event(self, callback: Callable[[str, dict[str, Any]], object]) -> None: ...
    def on_event(self, callback: Callable[..., object]) -> None:
        """Called (from natkit's background thread) with each :mod:`natkit.events` object."""
        self._handle.on_event(callback)

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            _open.remove(self)
        super().close()


def connect(
    port: int | str | None = None,
    proto: str | None = None,
    *,
    addr: int | str | None = None,
    relay: str | None = None,
    token: str | None = None,
    kind: str = "tcp",
    hostname: str = "",
    local_host: str = "127.0.0.1",
    plaintext_data: bool = False,
    fingerprint: str | None = None,
    cafile: Path | None = None,
    known_relays: Path | None = None,
    takeover: bool = False,
    allow: Sequence[str] = (),
    deny: Sequence[str] = (),
    basic_auth: str | Sequence[str] | None = None,
    rate_limit: str | None = None,
    timeout: float = 30.0,
    on_event: EventListener | None = None,
) -> Tunnel:
    """Blocking :func:`connect_async`: ``natkit.connect(8080, relay=..., token=...)``."""
    opening = connect_async(port, proto, addr=addr, relay=relay, token=token, kind=kind,
                            hostname=hostname, local_host=local_host,
                            plaintext_data=plaintext_data, fingerprint=fingerprint,
                            cafile=cafile, known_relays=known_relays, takeover=takeover,
                            allow=allow, deny=deny, basic_auth=basic_auth,
                            rate_limit=rate_limit, timeout=timeout, on_event=on_event)  # fmt: skip
    runner = _LoopThread()
    try:
        inner = runner.run(opening)
    except BaseException:
        runner.stop()
        raise
    tunnel = Tunnel(runner, inner)
    _open.append(tunnel)
    return tunnel


def get_tunnels() -> list[Tunnel]:
    """The tunnels this process has open (made with :func:`connect`)."""
    return list(_open)


def disconnect(public_url: str) -> None:
    """Close the tunnel with this public URL."""
    for tunnel in list(_open):
        if tunnel.public_url == public_url:
            tunnel.close()
