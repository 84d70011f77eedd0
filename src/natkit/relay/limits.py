"""Bounds on what unauthenticated peers may cost the relay, per source address (sans-I/O).

Anyone can open connections to the relay's listen port; until one has authenticated (a
control connection's Auth, a data connection's ticket) it costs a descriptor, a buffer
and, for TLS, a handshake. So each source address (an IPv6 one by its /64, what one user
usually has) may hold only so many unauthenticated connections at once, the relay as a
whole only so many, and an address whose logins keep failing is refused for a while. A
failing address is logged once per burst, not once per attempt. An address with agents
logged in gets more room (``vouched``): their data connections open in bursts (a pool, a
burst of visitors), and each is unauthenticated until its ticket checks out.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import Counter
from collections.abc import Callable


def address_key(ip: str) -> str:
    """The unit limits count by: an IPv4 address, or an IPv6 /64."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
    return str(addr)


@dataclasses.dataclass(slots=True)
class _Failures:
    count: int = 0
    first: float = 0.0
    blocked_until: float = 0.0


class AddressLimits:
    def __init__(
        self,
        clock: Callable[[], float],
        *,
        per_address: int = 64,
        total: int = 4096,
        failures: int = 10,
        window: float = 60.0,
        block: float = 60.0,
        per_agent: int = 512,
    ) -> None:
        self.clock = clock
        self.per_address, self.total = per_address, total
        self.failures, self.window, self.block = failures, window, block
        self.per_agent = per_agent
        self.pending: Counter[str] = Counter()  # unauthenticated connections per address
        self.agents: Counter[str] = Counter()  # logged-in agents per address
        # Kept as counts, not summed on each connection (a flood makes the sums long):
        self.unauthenticated = 0  # all pending connections
        self._vouched = 0  # pending connections from addresses with agents logged in
        self.peak = 0  # the most unauthenticated connections at once since reset_peak()
        self._failed: dict[str, _Failures] = {}

    @property
    def strangers(self) -> int:
        """Unauthenticated connections from addresses with no agent logged in."""
        return self.unauthenticated - self._vouched

    def admit(self, ip: str) -> str:
        """Take a new unauthenticated connection from ``ip``: '' if admitted (then call
        :meth:`done` once it authenticates or ends), else why not."""
        key = address_key(ip)
        if self.blocked(key):
            return "too many failed logins"
        vouched = bool(self.agents[key])
        allowed = self.per_address + (self.per_agent if vouched else 0)
        if self.pending[key] >= allowed:
            return f"over {allowed} unauthenticated connections from one address"
        # The shared bound is for strangers: an address with agents logged in draws on its
        # own allowance, so a flood from elsewhere cannot starve its data connections.
        if not vouched and self.strangers >= self.total:
            return f"over {self.total} unauthenticated connections in all"
        self.pending[key] += 1
        self.unauthenticated += 1
        self._vouched += vouched
        self.peak = max(self.peak, self.unauthenticated)
        return ""

    def done(self, ip: str) -> None:
        key = address_key(ip)
        if _decrement(self.pending, key):
            self.unauthenticated -= 1
            self._vouched -= bool(self.agents[key])

    def reset_peak(self) -> None:
        self.peak = self.unauthenticated

    def vouch(self, ip: str) -> None:
        """An agent from ``ip`` logged in (until :meth:`unvouch`)."""
        key = address_key(ip)
        if not self.agents[key]:
            self._vouched += self.pending[key]
        self.agents[key] += 1

    def unvouch(self, ip: str) -> None:
        key = address_key(ip)
        if _decrement(self.agents, key) and not self.agents[key]:
            self._vouched -= self.pending[key]

    def blocked(self, ip: str) -> bool:
        f = self._failed.get(address_key(ip))
        return f is not None and f.blocked_until > self.clock()

    def login_failed(self, ip: str) -> str:
        """Count a failed login; returns a line worth logging ('' when this failure is part
        of a burst already logged)."""
        key, now = address_key(ip), self.clock()
        f = self._failed.get(key)
        if f is None or (now - f.first > self.window and f.blocked_until <= now):
            f = self._failed[key] = _Failures(first=now)
        elif 0 < f.blocked_until <= now:  # a block ended: count afresh from here
            f.count, f.first, f.blocked_until = 0, now, 0.0
        f.count += 1
        if f.count == 1:
            return f"agent {ip} failed authentication"
        if f.count >= self.failures and f.blocked_until <= now:
            f.blocked_until = now + self.block
            return (
                f"{f.count} failed logins from {key} within {self.window:g} s: refusing its "
                f"connections for {self.block:g} s"
            )
        return ""

    def expire(self) -> None:
        now = self.clock()
        for key in [k for k, f in self._failed.items()
                    if now - f.first > self.window and f.blocked_until <= now]:  # fmt: skip
            del self._failed[key]


def _decrement(counter: Counter[str], key: str) -> bool:
    """One less of ``key`` (gone at zero); False when there was none."""
    n = counter[key]
    if n <= 0:
        return False
    if n == 1:
        del counter[key]
    else:
        counter[key] = n - 1
    return True
