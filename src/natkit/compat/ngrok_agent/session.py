"""The agent's session with the relay and its tunnels, opened and closed on demand.

One natkit :class:`~natkit.relay.agent.Agent` (one control connection, as ngrok keeps one
session) carries every tunnel; a tunnel the relay refuses fails alone. An http tunnel with
inspection on is captured on the agent's data path (:mod:`.capture`, the inspector's
store) so that its requests can be listed and replayed, each with its visitor's address.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from typing import Any

from natkit import __version__
from natkit.compat.ngrok_agent.capture import TunnelCapture, new_store
from natkit.compat.ngrok_agent.config import Settings
from natkit.compat.ngrok_agent.logs import LogWriter
from natkit.compat.ngrok_agent.shapes import BadTunnel, TunnelRequest, public_url
from natkit.errors import RelayError
from natkit.inspect.records import Service
from natkit.inspect.store import CaptureStore
from natkit.relay.agent import Agent, TunnelSpec

OPEN_TIMEOUT = 15.0


class TunnelExists(BadTunnel):
    """A tunnel of that name is open already."""


@dataclasses.dataclass
class Running:
    request: TunnelRequest
    spec: TunnelSpec
    capture: TunnelCapture | None
    started: float = dataclasses.field(default_factory=time.time)

    @property
    def url(self) -> str:
        """The public URL as it is now (a relay that restarted may have given another)."""
        return public_url(self.request.proto, self.spec.public)

    def metrics(self) -> dict[str, Any]:
        """What is counted (only while captured): visitors and requests."""
        return self.capture.metrics() if self.capture is not None else {}


class Session:
    def __init__(
        self, settings: Settings, log: LogWriter, store: CaptureStore | None = None
    ) -> None:
        if not settings.relay:
            raise RelayError(
                "no relay: set agent.connect_url (or server_addr) in the ngrok configuration "
                "to the natkit relay's HOST:PORT, or set NATKIT_RELAY"
            )
        if not settings.token:
            raise RelayError(
                "no relay token: set agent.authtoken in the ngrok configuration (ngrok config "
                "add-authtoken TOKEN), pass --authtoken, or set NATKIT_TOKEN"
            )
        self.settings, self.log = settings, log
        self.store = store if store is not None else new_store()
        try:
            self.agent = Agent(settings.relay, settings.token, [],
                               fingerprint=settings.fingerprint, cafile=settings.cafile,
                               keep_session_on_refusal=True)  # fmt: skip
        except ValueError as exc:
            raise RelayError(f"relay {settings.relay!r}: {exc}") from None
        self.tunnels: dict[str, Running] = {}
        self.started = time.time()
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self.agent.on_event(self._agent_event)

    def _agent_event(self, name: str, info: dict[str, Any]) -> None:
        if name == "reconnecting":
            self.log("warn", "session closed, starting reconnect loop", obj="tunnels.session",
                     err=info.get("reason", ""))  # fmt: skip
        elif name == "restored":
            self.log("info", "tunnel restored", obj="tunnels", id=info.get("tunnel", ""),
                     url=info.get("public", ""), changed=info.get("changed", False))  # fmt: skip
        elif name == "lost":
            self.log("warn", "tunnel lost", obj="tunnels", id=info.get("tunnel", ""),
                     err=info.get("reason", ""))  # fmt: skip

    async def start(self, timeout: float = 20.0) -> None:
        """Connect to the relay; a refused token, an untrusted or unreachable relay raise."""
        failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def first_failure(name: str, info: dict[str, Any]) -> None:
            if name == "reconnecting" and not failed.done():
                failed.set_result(str(info.get("reason", "")))

        self.agent.on_event(first_failure)
        self._task = asyncio.get_running_loop().create_task(self.agent.run())
        connected = asyncio.ensure_future(self.agent.connected.wait())
        try:
            waits: set[asyncio.Future[Any]] = {self._task, connected, failed}
            done, _ = await asyncio.wait(waits, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            if self._task in done:
                self._task.result()  # a final error: bad token, untrusted relay
            if failed in done:
                raise RelayError(f"cannot reach relay {self.settings.relay}: {failed.result()}")
            if connected not in done:
                raise RelayError(f"relay {self.settings.relay} did not answer within {timeout:g} s")
        except BaseException:
            connected.cancel()
            await self.close()
            raise
        finally:
            self.agent.listeners.remove(first_failure)

    @property
    def ended(self) -> asyncio.Task[None] | None:
        return self._task

    async def open(self, req: TunnelRequest) -> Running:
        async with self._lock:  # two posts of one name: the second is told it exists
            if req.name in self.tunnels:
                raise TunnelExists(f"a tunnel named {req.name!r} is open already")
            host = req.upstream_host
            if host == "localhost":
                # One address, no lookup per visitor: "localhost" may come back as ::1 first,
                # where a service listening on 127.0.0.1 only would refuse.
                host = "127.0.0.1"
            spec = TunnelSpec(req.upstream_port, kind=req.proto, name=req.hostname, port=req.port,
                              exact=bool(req.port), local_host=host, access=req.access,
                              id=f"t{next(self._ids)}")  # fmt: skip
            capture = TunnelCapture(self.store, req.name, self.log) if req.inspect else None
            self.agent.open(spec)
            if capture is not None:
                self.agent.capture(spec.id, capture.tap_for)
            try:
                await self.agent.wait_open(spec.id, OPEN_TIMEOUT)
            except BaseException as exc:
                self.agent.close_tunnel(spec.id)
                self.agent.capture(spec.id, None)
                if isinstance(exc, asyncio.TimeoutError):
                    raise RelayError(
                        f"relay {self.settings.relay} did not open the tunnel within "
                        f"{OPEN_TIMEOUT:g} s"
                    ) from None
                raise
            if capture is not None:
                self.store.services[req.name] = Service(host, req.upstream_port)  # replays
            running = Running(req, spec, capture)
            self.tunnels[req.name] = running
        self.log("info", "started tunnel", obj="tunnels", name=req.name, addr=req.upstream_url,
                 url=running.url)  # fmt: skip
        return running

    async def close_tunnel(self, name: str) -> bool:
        running = self.tunnels.pop(name, None)
        if running is None:
            return False
        self.agent.close_tunnel(running.spec.id)
        self.agent.capture(running.spec.id, None)
        self.store.services.pop(name, None)  # its records stay, as ngrok's do
        self.log("info", "stopped tunnel", obj="tunnels", name=name, url=running.url)
        return True

    def status(self) -> dict[str, Any]:
        return {
            "status": "online" if self.agent.connected.is_set() else "reconnecting",
            "agent_version": f"natkit-ngrok {__version__}",
            "session": {
                "relay": self.settings.relay,
                "connected": self.agent.connected.is_set(),
                "connections": self.agent.connections,
                "started": self.started,
                "tunnels": len(self.tunnels),
            },
            "uri": "/api/status",
        }

    async def close(self) -> None:
        self.store.stop_replays()
        for name in list(self.tunnels):
            await self.close_tunnel(name)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.agent.close()
