"""The captured exchanges of HTTP tunnels: a ring buffer capped in bytes.

The interface other parts use (the inspector's API, the pyngrok-compatible agent):

- ``list(limit=None, tunnel=None)``: the records, newest first;
- ``get(id)``: one record (KeyError when it is gone);
- ``clear()``: forget every record;
- ``await replay(id, changes=None, tunnel=None)``: send the request again to its
  tunnel's local service (or ``tunnel``'s), changed by ``changes`` (a
  :class:`~natkit.inspect.replay.Changes`); the replay is captured too and returned;
- ``replay_later(id, tunnel=None)``: ngrok's replay (``POST /api/requests/http``): checked
  now, sent in the background (``stop_replays()`` cancels those still going);
- ``subscribe()``: a :class:`Subscription` whose ``await get()`` gives ``(kind, record)``
  as records are added (``"request"``: the request is whole, the response still to come),
  completed (``"response"``) and when the store is cleared (``"clear"``, None);
- ``look()``: someone used the API (call it on every request an API serves).

All of it runs on the agent's event loop (not thread-safe). Records are added by
:class:`~natkit.inspect.tap.ConnectionTap` (one per visitor connection) and by replays. The oldest go when the records' bytes exceed ``max_bytes``.

Capture is watched, not free: copying and parsing every exchange costs a Python agent
about as much CPU as relaying it. So capture pauses when nobody has looked for ``idle``
seconds (no open subscription, no ``look()``), and resumes at the next look: a tunnel
nobody inspects pays nothing (no tap at all on its connections). ``paused`` keeps when.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import time
import weakref
from typing import Protocol

from natkit.inspect.exchange import MAX_BODY
from natkit.inspect.records import Record, Refusal, Service
from natkit.inspect.replay import Changes, replay, request_bytes

log = logging.getLogger("natkit.inspect")

MAX_BYTES = 32 * 1024 * 1024  # default cap of the whole buffer
IDLE = 600.0  # default: capture pauses after this long with nobody looking
MAX_REFUSALS = 500  # refused visitors kept (the newest)
SUBSCRIBER_BACKLOG = 1000
# What a subscriber gets with each event's kind: the record (request, response), the refusal
# (refused), or nothing (clear).
Event = Record | Refusal | None  # events a slow subscriber may have waiting before it is dropped


class _Stoppable(Protocol):
    def stop(self, why: str) -> None: ...


class Subscription:
    """Events of a :class:`CaptureStore` as they happen; ``close()`` when done. A
    subscriber that falls :data:`SUBSCRIBER_BACKLOG` events behind is closed (``get``
    raises ``EOFError``): it can list the store afresh."""

    def __init__(self, store: CaptureStore) -> None:
        self._store = store
        self._queue: collections.deque[tuple[str, Event]] = collections.deque()
        self._wake = asyncio.Event()
        self.closed = False
        store.look()  # an open subscription keeps capture on

    def _put(self, kind: str, record: Event) -> None:
        if self.closed:
            return
        if len(self._queue) >= SUBSCRIBER_BACKLOG:
            self.close()
            return
        self._queue.append((kind, record))
        self._wake.set()

    async def get(self) -> tuple[str, Event]:
        while not self._queue:
            if self.closed:
                raise EOFError("the subscription is closed")
            self._wake.clear()
            await self._wake.wait()
        return self._queue.popleft()

    def close(self) -> None:
        if not self.closed:
            self._store.look()  # the idle time counts from here
        self.closed = True
        self._store._subscribers.discard(self)
        self._wake.set()


class CaptureStore:
    """Captured exchanges, oldest dropped beyond ``max_bytes``; bodies are kept up to
    ``max_body`` bytes each (a connection with a larger one is no longer followed)."""

    def __init__(
        self, max_bytes: int = MAX_BYTES, max_body: int = MAX_BODY, idle: float | None = IDLE
    ) -> None:
        self.max_bytes, self.max_body = max_bytes, max_body
        self.idle = idle  # None: capture never pauses
        self._last_look = time.monotonic()  # a fresh store captures for ``idle`` seconds
        self.paused: list[list[float | None]] = []  # [from, to] wall times; to None: now
        self._taps: weakref.WeakSet[_Stoppable] = weakref.WeakSet()  # live connection taps
        self._records: collections.OrderedDict[str, Record] = collections.OrderedDict()
        self._sizes: dict[str, int] = {}
        self.bytes = 0
        self.dropped = 0  # records dropped to stay under max_bytes
        self.services: dict[str, Service] = {}  # tunnel name -> its local service
        self._subscribers: set[Subscription] = set()
        self.refusals: collections.deque[Refusal] = collections.deque(maxlen=MAX_REFUSALS)
        # ids sort by time and do not repeat across runs (ngrok's are hex strings too)
        self._prefix = f"{int(time.time()) & 0xFFFFFFFF:08x}{os.urandom(2).hex()}"
        self._seq = itertools.count(1)
        self._replays: set[asyncio.Task[Record]] = set()  # replay_later's, still going

    # -- the interface ------------------------------------------------------------------
    def list(self, limit: int | None = None, tunnel: str | None = None) -> list[Record]:
        """Records, newest first (at most ``limit``; only ``tunnel``'s when given)."""
        out: list[Record] = []
        for record in reversed(self._records.values()):
            if tunnel is not None and record.tunnel != tunnel:
                continue
            if limit is not None and len(out) >= limit:
                break
            out.append(record)
        return out

    def get(self, record_id: str) -> Record:
        return self._records[record_id]

    def clear(self) -> None:
        self._records.clear()
        self._sizes.clear()
        self.bytes = 0
        self._publish("clear", None)

    async def replay(
        self, record_id: str, changes: Changes | None = None, tunnel: str | None = None
    ) -> Record:
        """Send record ``record_id``'s request to its tunnel's service (or ``tunnel``'s)
        again, changed by ``changes``; the new exchange is captured and returned. Raises
        KeyError (no such record), LookupError (the tunnel has no service now), OSError,
        ReplayError (BadChangesError: the request cannot be made as asked)."""
        return await replay(self, self.get(record_id), changes, tunnel)

    def replay_later(self, record_id: str, tunnel: str | None = None) -> asyncio.Task[Record]:
        """ngrok's replay: what can be checked now is (KeyError: no such record;
        LookupError: the tunnel has no service now; BadChangesError: the request was cut at
        the cap), the rest goes on in the background: ngrok's clients wait a few seconds at
        most for the answer (pyngrok 4 s), a service may take longer. A failure is logged."""
        record = self.get(record_id)
        name = tunnel or record.tunnel
        if name not in self.services:
            raise LookupError(f"tunnel {name!r} has no local service now")
        request_bytes(record.exchange.request, None)
        task = asyncio.get_running_loop().create_task(self.replay(record_id, None, name))
        self._replays.add(task)
        task.add_done_callback(self._replayed)
        return task

    def _replayed(self, task: asyncio.Task[Record]) -> None:
        self._replays.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("a replay failed: %s", exc)

    def stop_replays(self) -> None:
        """Cancel the background replays still going (the agent stops)."""
        for task in list(self._replays):
            task.cancel()

    def subscribe(self) -> Subscription:
        sub = Subscription(self)
        self._subscribers.add(sub)
        return sub

    def look(self) -> None:
        """Someone looked (an API request): capture goes on (again) for ``idle`` seconds."""
        self._last_look = time.monotonic()
        if self.paused and self.paused[-1][1] is None:
            self.paused[-1][1] = time.time()

    @property
    def capturing(self) -> bool:
        return not self.paused or self.paused[-1][1] is not None

    def check_idle(self) -> bool:
        """Pause capture when nobody has looked for ``idle`` seconds (call it now and then);
        True when capturing. Pausing stops the taps of connections already open."""
        if not self.capturing:
            return False
        if self.idle is None or self._subscribers:
            return True
        if time.monotonic() - self._last_look < self.idle:
            return True
        self.paused.append([time.time(), None])
        for tap in list(self._taps):
            tap.stop("capture paused: nobody was looking")
        self._taps.clear()
        return False

    # -- for the taps ---------------------------------------------------------------------
    def tapped(self, tap: _Stoppable) -> None:
        """A connection's tap exists (stopped when capture pauses)."""
        self._taps.add(tap)

    def new_id(self) -> str:
        return f"{self._prefix}{next(self._seq):08x}"

    def add(self, record: Record) -> None:
        """A new record (its request is whole)."""
        self._records[record.id] = record
        self._account(record)
        if record.id in self._records:
            self._publish("request", record)

    def completed(self, record: Record) -> None:
        """``record``'s response is whole (or given up): counted again, and told."""
        if record.id not in self._records:
            return  # dropped (or cleared) meanwhile
        self._account(record)
        if record.id in self._records:
            self._publish("response", record)

    def _account(self, record: Record) -> None:
        size = record.size
        self.bytes += size - self._sizes.get(record.id, 0)
        self._sizes[record.id] = size
        while self.bytes > self.max_bytes and self._records:
            old_id, _ = self._records.popitem(last=False)
            self.bytes -= self._sizes.pop(old_id)
            self.dropped += 1

    def refused(self, refusal: Refusal) -> None:
        """The relay kept a visitor out (event ``refused``; the newest MAX_REFUSALS kept)."""
        self.refusals.append(refusal)
        self._publish("refused", refusal)

    def _publish(self, kind: str, record: Event) -> None:
        for sub in list(self._subscribers):
            sub._put(kind, record)


__all__ = ["MAX_BYTES", "CaptureStore", "Record", "Refusal", "Service", "Subscription"]
