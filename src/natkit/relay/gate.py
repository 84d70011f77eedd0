"""The relay's enforcement of a tunnel's access policy, sans-I/O: given a visitor's
address (and, for basic auth, its HTTP request head) say whether it may in, and if not
why. Called once per visitor connection at accept (or once its Host is read), never per
byte; a tunnel without a policy has no gate at all.

Checks run cheapest first and stop at the first refusal: the address rules, then the
visitor address's rate (so a flood of password guesses is slowed too), then basic auth.
"""

from __future__ import annotations

import base64
import binascii
import collections
import ipaddress
from collections.abc import Callable

from natkit.relay.access import AccessPolicy, parse_cidr

# Why a visitor was refused: the label of the relay's metric and of the agent's event.
DENIED = "denied"  # its address is in a deny network
NOT_ALLOWED = "not-allowed"  # an allow list exists and its address is in none
RATE_LIMITED = "rate-limited"
AUTH_MISSING = "auth-missing"  # no basic credentials in the request
AUTH_WRONG = "auth-wrong"  # credentials that match none, or malformed ones
REASONS = (DENIED, NOT_ALLOWED, RATE_LIMITED, AUTH_MISSING, AUTH_WRONG)

MAX_TRACKED = 4096  # visitor addresses whose rate is remembered, per tunnel
IPV6_RATE_PREFIX = 64  # one host commonly holds a whole /64: its rate is counted as one

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def visitor_ip(host: str) -> Address | None:
    """The visitor's address as the policy sees it: an IPv4-mapped IPv6 address (a
    dual-stack listener's view of an IPv4 visitor) is its IPv4 address. None: not an IP."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id:
            ip = ipaddress.IPv6Address(ip.compressed.split("%", 1)[0])
    return ip


class TokenBuckets:
    """A token bucket per visitor address (IPv6: per /64): ``count`` connections at once,
    refilled at ``count`` per ``per`` seconds. At most ``limit`` addresses are remembered;
    the least recently seen is forgotten first (it gets a full bucket if it comes back)."""

    def __init__(
        self, count: int, per: float, clock: Callable[[], float], limit: int = MAX_TRACKED
    ) -> None:
        self.capacity, self.rate, self.clock, self.limit = float(count), count / per, clock, limit
        self.buckets: collections.OrderedDict[object, tuple[float, float]] = (
            collections.OrderedDict()
        )

    def take(self, ip: Address) -> bool:
        key: object = ip
        if isinstance(ip, ipaddress.IPv6Address):
            key = ipaddress.IPv6Network((ip, IPV6_RATE_PREFIX), strict=False)
        now = self.clock()
        tokens, then = self.buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + max(0.0, now - then) * self.rate)
        ok = tokens >= 1.0
        self.buckets[key] = (tokens - 1.0 if ok else tokens, now)
        if len(self.buckets) > self.limit:
            self.buckets.popitem(last=False)
        return ok


class Gate:
    """One tunnel's policy, compiled for checking."""

    def __init__(self, policy: AccessPolicy, clock: Callable[[], float]) -> None:
        self.policy = policy
        self.allow = [parse_cidr(c) for c in policy.allow]
        self.deny = [parse_cidr(c) for c in policy.deny]
        self.credentials = policy.credentials
        self.rate = (
            None if policy.rate is None else TokenBuckets(policy.rate.count, policy.rate.per, clock)
        )

    @property
    def needs_head(self) -> bool:
        """Whether :meth:`check` needs the visitor's HTTP request head (basic auth)."""
        return bool(self.credentials)

    def check(self, host: str, head: bytes | None = None) -> str:
        """'' when the visitor at ``host`` may in, else one of :data:`REASONS`.
        ``head``: its HTTP request head, needed when :attr:`needs_head`."""
        ip = visitor_ip(host)
        if ip is None:  # not an IP (a Unix socket?): no address rule can admit it
            return NOT_ALLOWED if self.allow else DENIED if self.deny else ""
        if any(ip in net for net in self.deny):
            return DENIED
        if self.allow and not any(ip in net for net in self.allow):
            return NOT_ALLOWED
        if self.rate is not None and not self.rate.take(ip):
            return RATE_LIMITED
        if self.credentials:
            return self.check_auth(head or b"")
        return ""

    def check_auth(self, head: bytes) -> str:
        presented = basic_credentials(head)
        if presented is None:
            return AUTH_MISSING
        if not presented:
            return AUTH_WRONG
        # Every credential is tried (no early exit): the time does not tell which matched.
        matched = False
        for cred in self.credentials:
            matched |= cred.matches(presented)
        return "" if matched else AUTH_WRONG


def basic_credentials(head: bytes) -> bytes | None:
    """The ``user:password`` bytes of the request head's ``Authorization: Basic``
    header; None when it has no basic credentials; b"" when they are malformed (several
    Authorization headers, bad base64, no colon)."""
    end = head.find(b"\r\n\r\n")
    lines = head[: end if end >= 0 else len(head)].split(b"\r\n")[1:]
    values = [v for n, _, v in (line.partition(b":") for line in lines)
              if n.lower() == b"authorization"]  # fmt: skip
    if not values:
        return None
    if len(values) > 1:
        return b""
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None  # another scheme (Bearer…): no basic credentials given
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return b""
    return decoded if b":" in decoded else b""


class RefusalReports:
    """How often the agent hears of refused visitors: a token bucket per tunnel (``rate``
    a second, bursts of ``burst``); refusals beyond it are counted and told with the next
    report (``more``), so a flood costs the control connection a few messages a second."""

    def __init__(self, clock: Callable[[], float], rate: float = 5.0, burst: int = 20) -> None:
        self.clock, self.rate, self.burst = clock, rate, float(burst)
        self.tokens, self.then, self.held = float(burst), clock(), 0

    def report(self) -> int | None:
        """The number of refusals held back before this one when it may be reported now,
        else None (it is held)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.then) * self.rate)
        self.then = now
        if self.tokens < 1.0:
            self.held += 1
            return None
        self.tokens -= 1.0
        held, self.held = self.held, 0
        return held


__all__ = [
    "AUTH_MISSING",
    "AUTH_WRONG",
    "DENIED",
    "NOT_ALLOWED",
    "RATE_LIMITED",
    "REASONS",
    "Gate",
    "RefusalReports",
    "TokenBuckets",
    "basic_credentials",
    "visitor_ip",
]
