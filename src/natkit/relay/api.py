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
from pathlib import Path
from types import TracebackType
from typing import Any

from natkit.api import SyncHandle, _LoopThread
from natkit.relay.agent import Agent, TunnelSpec

_open: list[Tunnel] = []


class RelayTunnel:
    """A live tunnel (async). The agent reconnects by itself; ``public_url`` stays current."""

    def __init__(self, agent: Agent, task: asyncio.Task[None], spec: TunnelSpec) -> None:
        self.agent, self._task, self.spec = agent, task, spec
        self.closed = False

    @property
    def public_url(self) -> str:
        return self.spec.public

    @property
    def kind(self) -> str:
        return self.spec.kind

    def on_event(self, callback: Any) -> None:
        """``callback(event, info)`` for ready, reconnecting, restored, pinned."""
        self.agent.on_event(callback)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        await self.agent.close()

    async def __aenter__(self) -> RelayTunnel:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<RelayTunnel {self.kind} {self.public_url} -> {self.spec.local_host}:{self.spec.local_port}>"


async def connect_async(
    port: int,
    *,
    relay: str,
    token: str,
    kind: str = "tcp",
    hostname: str = "",
    local_host: str = "127.0.0.1",
    plaintext_data: bool = False,
    fingerprint: str | None = None,
    cafile: Path | None = None,
    known_relays: Path | None = None,
    takeover: bool = False,
    timeout: float = 30.0,
) -> RelayTunnel:
    """Open a tunnel from the relay to ``local_host:port``; returns once it is public.

    ``kind`` is ``tcp`` (a port on the relay), ``http`` (routed by Host to
    ``hostname.DOMAIN``) or ``tls`` (routed by SNI, passed through untouched). Each call is
    its own agent with its own address; a host name another live agent of the token holds
    is refused unless ``takeover``.
    """
    spec = TunnelSpec(port, kind=kind, name=hostname, local_host=local_host, takeover=takeover)
    agent = Agent(relay, token, [spec], plaintext_data=plaintext_data, fingerprint=fingerprint,
                  cafile=cafile, known_relays=known_relays)  # fmt: skip
    task = asyncio.get_running_loop().create_task(agent.run())
    waiter = asyncio.ensure_future(agent.wait_open(spec.id))
    done, _ = await asyncio.wait(
        {task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
    )
    if task in done:  # a final error: bad token, refused name, untrusted relay
        waiter.cancel()
        await agent.close()
        task.result()
    if waiter not in done:
        waiter.cancel()
        task.cancel()
        await agent.close()
        raise TimeoutError(f"relay {relay} did not open the tunnel within {timeout:g} s")
    waiter.result()
    return RelayTunnel(agent, task, spec)


class Tunnel(SyncHandle[RelayTunnel]):
    """A live tunnel for blocking code (a background thread runs the agent)."""

    @property
    def public_url(self) -> str:
        return self._handle.public_url

    @property
    def kind(self) -> str:
        return self._handle.kind

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            _open.remove(self)
        super().close()


def connect(port: int, **kw: Any) -> Tunnel:
    """Blocking :func:`connect_async`: ``natkit.connect(8080, relay=..., token=...)``."""
    runner = _LoopThread()
    try:
        inner = runner.run(connect_async(port, **kw))
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
