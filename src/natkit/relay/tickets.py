"""Tickets for data connections, bound to their tunnel and its data mode (sans-I/O).

The relay hands an agent tickets over the authenticated control connection; the agent
opens one data connection per ticket. A *sealed* connection names its ticket only by its
handle (:func:`natkit.relay.control.ticket_handle`) and proves it holds the ticket by
encrypting under keys derived from it; a *plaintext* one (only for tunnels whose agent
asked for plaintext and a relay that allows it) sends the ticket itself. A ticket is
taken once, in the mode it was issued for: a sealed tunnel's ticket, or its handle, shown
on a plaintext connection is refused and reported as interference (someone on the path
lifted it), and the ticket is revoked. A ticket (or handle) shown again after it was
taken is reported the same way for a while (``ttl``): a replay is interference too.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from natkit.errors import NatkitError
from natkit.relay.control import ticket_handle

Owner = TypeVar("Owner", bound=Hashable)


class TicketRefused(NatkitError, Generic[Owner]):
    """A ticket that cannot be taken. ``owner`` is set when the ticket was real but shown
    the wrong way (interference worth telling its agent about)."""

    def __init__(self, message: str, owner: Owner | None = None) -> None:
        super().__init__(message)
        self.owner = owner


@dataclasses.dataclass(slots=True)
class _Ticket(Generic[Owner]):
    ticket: str
    handle: str
    owner: Owner
    sealed: bool
    issued: float


class TicketBook(Generic[Owner]):
    def __init__(self, clock: Callable[[], float], ttl: float = 10.0) -> None:
        self.clock, self.ttl = clock, ttl
        self._by_ticket: dict[str, _Ticket[Owner]] = {}
        self._by_handle: dict[str, _Ticket[Owner]] = {}
        self._by_owner: dict[Owner, set[str]] = {}
        self._used: dict[str, tuple[Owner, float]] = {}  # taken tickets and handles -> owner

    def __len__(self) -> int:
        return len(self._by_ticket)

    def issue(self, owner: Owner, n: int, *, sealed: bool) -> list[str]:
        now = self.clock()
        new = [secrets.token_urlsafe(18) for _ in range(n)]  # 144 bits each
        mine = self._by_owner.setdefault(owner, set())
        for ticket in new:
            entry = _Ticket(ticket, ticket_handle(ticket), owner, sealed, now)
            self._by_ticket[ticket] = entry
            if sealed:
                self._by_handle[entry.handle] = entry
            mine.add(ticket)
        return new

    def outstanding(self, owner: Owner) -> int:
        return len(self._by_owner.get(owner, ()))

    def take_plain(self, ticket: str) -> Owner:
        """The tunnel a plaintext data connection's ticket was issued for."""
        entry = self._by_ticket.get(ticket) or self._by_handle.get(ticket)
        if entry is None:
            raise self._unknown(ticket)
        self._remove(entry)
        if entry.sealed:
            raise TicketRefused(
                "a ticket of a sealed tunnel shown on a plaintext data connection", entry.owner
            )
        return entry.owner

    def take_sealed(self, handle: str) -> tuple[str, Owner]:
        """The ticket behind a sealed opening's handle, and its tunnel."""
        entry = self._by_handle.get(handle)
        if entry is None:
            raise self._unknown(handle)
        self._remove(entry)
        return entry.ticket, entry.owner

    def _unknown(self, shown: str) -> TicketRefused[Owner]:
        used = self._used.get(shown)
        if used is not None:
            return TicketRefused("a used ticket shown again", used[0])
        return TicketRefused("an unknown or used ticket")

    def drop(self, owner: Owner) -> None:
        for ticket in self._by_owner.pop(owner, set()):
            entry = self._by_ticket.pop(ticket)
            self._by_handle.pop(entry.handle, None)

    def expire(self) -> set[Owner]:
        """Forget tickets older than the TTL (their connection failed on the way: out of
        descriptors, a network hiccup), so they stop counting against a tunnel's pool;
        returns the tunnels that lost some."""
        cutoff = self.clock() - self.ttl
        for key in [k for k, (_, at) in self._used.items() if at <= cutoff]:
            del self._used[key]
        old = [e for e in self._by_ticket.values() if e.issued <= cutoff]
        for entry in old:
            self._remove(entry, used=False)  # late, not replayed: no alarm if it comes
        return {e.owner for e in old}

    def _remove(self, entry: _Ticket[Owner], *, used: bool = True) -> None:
        if used:
            self._used[entry.ticket] = self._used[entry.handle] = (entry.owner, self.clock())
        self._by_ticket.pop(entry.ticket, None)
        self._by_handle.pop(entry.handle, None)
        mine = self._by_owner.get(entry.owner)
        if mine is not None:
            mine.discard(entry.ticket)
            if not mine:
                del self._by_owner[entry.owner]
