"""Who holds which public port and host name on the relay, and for how long (sans-I/O).

A *claim* is held by a tenant (token) and one agent instance, live (a tunnel is open) or
*reserved* (the tunnel's agent went away; the name waits ``grace`` seconds for it). The
rules, checked in one place:

* another tenant's claim, live or reserved, is never given away;
* a live claim of the same tenant goes to the same agent instance coming back, or to
  another instance only when it asks to take it over; a reserved one to any instance of
  the tenant (a restarted agent is a new process);
* host names nest: ``x.shop.example`` is refused while another tenant holds
  ``shop.example`` (and the other way round), as cookies and the like are scoped to a
  parent name; host names a tokens file reserves for a tenant (and the names under them)
  are that tenant's alone;
* reservations count against a tenant's quota; at its quota a tenant's oldest reservation
  gives way to its new claim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from natkit.errors import NatkitError

T = TypeVar("T")


class NameRefused(NatkitError):
    """A port or host name that cannot be had; the message says why and what to do."""


@dataclasses.dataclass(frozen=True, slots=True)
class Holder:
    tenant: str  # the token's label
    instance: str  # the agent process


@dataclasses.dataclass(slots=True)
class Claim(Generic[T]):
    holder: Holder
    tunnel: T | None  # None while reserved
    until: float = 0.0  # when a reservation ends


def host_key(host: str) -> str:
    return f"host:{host}"


def port_key(port: int) -> str:
    return f"tcp:{port}"


def _kind(key: str) -> str:
    return key.split(":", 1)[0]


def _related(a: str, b: str) -> bool:
    """One host name is the other or under it."""
    return a == b or a.endswith("." + b) or b.endswith("." + a)


class TunnelNames(Generic[T]):
    def __init__(
        self,
        clock: Callable[[], float],
        grace: float,
        reserved_hosts: dict[str, str] | None = None,  # host -> tenant
    ) -> None:
        self.clock, self.grace = clock, grace
        self.reserved_hosts = dict(reserved_hosts or {})
        self._claims: dict[str, Claim[T]] = {}

    # -- reading -------------------------------------------------------------------------------
    def get(self, key: str) -> Claim[T] | None:
        claim = self._claims.get(key)
        if claim is not None and claim.tunnel is None and claim.until <= self.clock():
            del self._claims[key]
            return None
        return claim

    def tunnel(self, key: str) -> T | None:
        claim = self.get(key)
        return None if claim is None else claim.tunnel

    def count(self, tenant: str, kind: str) -> int:
        """Ports (``tcp``) or host names (``host``) a tenant holds, live or reserved."""
        return sum(1 for k, c in self._items() if c.holder.tenant == tenant and _kind(k) == kind)

    def live(self) -> int:
        return sum(1 for _, c in self._items() if c.tunnel is not None)

    def reserved_for(self, tenant: str, kind: str) -> list[str]:
        return [
            k for k, c in self._items()
            if c.tunnel is None and c.holder.tenant == tenant and _kind(k) == kind
        ]  # fmt: skip

    def _items(self) -> Iterator[tuple[str, Claim[T]]]:
        now = self.clock()
        for key, claim in list(self._claims.items()):
            if claim.tunnel is None and claim.until <= now:
                del self._claims[key]
            else:
                yield key, claim

    # -- the rules -------------------------------------------------------------------------------
    def problem(self, key: str, holder: Holder, *, takeover: bool = False) -> str:
        """Why ``holder`` cannot claim ``key`` ('' when it can)."""
        what = _describe(key)
        claim = self.get(key)
        if claim is not None and claim.holder.tenant != holder.tenant:
            return f"{what} is held by another tunnel (another token's)"
        if (
            claim is not None
            and claim.tunnel is not None
            and claim.holder != holder
            and not takeover
        ):
            return (
                f"{what} is held by another live agent of this token; stop it, ask for "
                "another name, or take it over explicitly (--takeover)"
            )
        if _kind(key) == "host":
            host = key.split(":", 1)[1]
            for reserved, tenant in self.reserved_hosts.items():
                if tenant != holder.tenant and _related(host, reserved):
                    return f"{what} is reserved on this relay for another token"
            for other, c in self._items():
                if _kind(other) != "host" or c.holder.tenant == holder.tenant:
                    continue
                other_host = other.split(":", 1)[1]
                if other_host != host and _related(host, other_host):
                    return (
                        f"{what} nests with {other_host}, which another token holds "
                        "(a name under another tenant's name would share its cookies)"
                    )
        return ""

    def claim(self, key: str, holder: Holder, tunnel: T, *, takeover: bool = False) -> T | None:
        """Give ``key`` to ``tunnel``; returns the live tunnel it displaced (the same agent
        come back, or one taken over), which the caller closes. NameRefused if not allowed."""
        why = self.problem(key, holder, takeover=takeover)
        if why:
            raise NameRefused(why)
        old = self.get(key)
        self._claims[key] = Claim(holder, tunnel)
        return None if old is None else old.tunnel

    def release(self, key: str, tunnel: T, *, keep: bool) -> None:
        """``tunnel`` lets ``key`` go: reserved for its tenant for the grace period when
        ``keep`` (its agent went away and may come back), else freed."""
        claim = self._claims.get(key)
        if claim is None or claim.tunnel is not tunnel:
            return
        if keep and self.grace > 0:
            claim.tunnel, claim.until = None, self.clock() + self.grace
        else:
            del self._claims[key]

    def evict_oldest_reservation(self, tenant: str, kind: str) -> bool:
        """Free the tenant's reservation that ends first (to make room under its quota)."""
        mine = [(c.until, k) for k, c in self._items()
                if c.tunnel is None and c.holder.tenant == tenant and _kind(k) == kind]  # fmt: skip
        if not mine:
            return False
        del self._claims[min(mine)[1]]
        return True

    def expire(self) -> None:
        for _ in self._items():
            pass


def _describe(key: str) -> str:
    kind, _, rest = key.partition(":")
    return f"port {rest}" if kind == "tcp" else f"host name {rest}"
