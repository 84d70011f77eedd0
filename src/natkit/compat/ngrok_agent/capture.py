"""Captured requests of natkit-ngrok's http tunnels: the HTTP inspector's capture
(:mod:`natkit.inspect`) on the agent's data path, no proxy in between.

Each http tunnel with ``inspect`` on (ngrok's default) gets the agent's tap
(``Agent.capture``) feeding one :class:`~natkit.inspect.store.CaptureStore` shared by the
session's tunnels; the local API serves it in ngrok's shapes
(:mod:`natkit.inspect.views`). A :class:`TunnelCapture` stands between one tunnel's taps
and the store to count what ngrok's tunnel ``metrics`` count and to log each answered
request, as ngrok's agent does.
"""

from __future__ import annotations

from collections.abc import Callable

from natkit.inspect.records import Record
from natkit.inspect.store import CaptureStore
from natkit.inspect.tap import ConnectionTap, tap_factory

Log = Callable[..., None]


def new_store() -> CaptureStore:
    """The session's store. It never pauses (idle None): ngrok captures whether or not
    anyone looks, and pyngrok code reads the captured requests after the fact (a webhook
    test visits, then calls ``get_requests``), so a pause would lose exactly those."""
    return CaptureStore(idle=None)


class TunnelCapture:
    """The store as one tunnel's taps see it (the taps' ``Sink``), counting the tunnel's
    visitors (``conns``) and requests (``http``), and logging each answered request."""

    def __init__(self, store: CaptureStore, tunnel: str, log: Log) -> None:
        self.store, self.tunnel, self.log = store, tunnel, log
        self.max_body = store.max_body
        self.connections = 0
        self.requests = 0
        self._make = tap_factory(self, tunnel)

    def tap_for(self, visitor: str) -> ConnectionTap | None:
        """What the agent calls for each visitor connection (``Agent.capture``)."""
        self.connections += 1
        return self._make(visitor)

    def metrics(self) -> dict[str, dict[str, int]]:
        return {"conns": {"count": self.connections}, "http": {"count": self.requests}}

    # -- the taps' Sink ---------------------------------------------------------------------
    def new_id(self) -> str:
        return self.store.new_id()

    def check_idle(self) -> bool:
        return self.store.check_idle()

    def tapped(self, tap: ConnectionTap) -> None:
        self.store.tapped(tap)

    def add(self, record: Record) -> None:
        self.requests += 1
        self.store.add(record)

    def completed(self, record: Record) -> None:
        self.store.completed(record)
        response = record.exchange.response
        if response is not None and response.complete:
            method, target, _ = record.exchange.request.start
            _, status, reason = response.start
            self.log("info", "join connections", obj="join", name=self.tunnel,
                     r=record.visitor, method=method, path=target,
                     status=f"{status} {reason}".strip())  # fmt: skip


__all__ = ["TunnelCapture", "new_store"]
