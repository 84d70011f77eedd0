"""A captured exchange with what the tunnel knew of it, a visitor the relay refused, and a
tunnel's local service."""

from __future__ import annotations

import dataclasses

from natkit.inspect.exchange import Exchange

_RECORD_OVERHEAD = 512  # bytes counted per record beside its messages (its fields)


@dataclasses.dataclass
class Service:
    """Where a tunnel's visitors are sent: replays go there too."""

    host: str
    port: int


@dataclasses.dataclass
class Record:
    """One captured exchange with what the tunnel knew of it."""

    id: str
    tunnel: str
    visitor: str  # "ADDRESS:PORT" as the relay saw it, or "replay"
    exchange: Exchange
    wall_start: float  # time.time() of the request's first byte
    replay_of: str = ""  # the record this one replays
    note: str = ""  # why the capture of its connection stopped early, when it did

    @property
    def duration(self) -> float | None:
        """Seconds from the request's first byte to the response's last; None while open."""
        response = self.exchange.response
        if response is None or not response.complete:
            return None
        return max(0.0, response.ended - self.exchange.request.started)

    @property
    def size(self) -> int:
        response = self.exchange.response
        n = len(self.exchange.request.raw) + len(self.exchange.request.body)
        if response is not None:
            n += len(response.raw) + len(response.body)
        return n + _RECORD_OVERHEAD


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A visitor the relay kept out by the tunnel's access policy (docs/relay-access.md);
    ``more``: refusals the relay did not report one by one (it rate-limits the reports)."""

    tunnel: str
    visitor: str  # "ADDRESS:PORT" as the relay saw it
    reason: str  # denied, not-allowed, rate-limited, auth-missing, auth-wrong
    wall: float  # the relay's time.time()
    more: int = 0
