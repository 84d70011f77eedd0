"""Who may reach a tunnel: the agent's access policy, as the agent states it and as it
travels to the relay (in the tunnel's OPEN message), which enforces it at accept time
(:mod:`natkit.relay.gate`) before a byte goes to the agent.

A policy has address rules (``allow``/``deny`` CIDRs, IPv4 and IPv6: a deny wins, and an
allow list admits only its networks), HTTP basic-auth credentials (http tunnels only) and
a per-visitor-address connection rate (a token bucket).

The password never leaves the agent: a credential travels as a random salt and
HMAC-SHA256(salt, ``user:password``). The relay computes the same over what a visitor
presents and compares the two digests with :func:`hmac.compare_digest`. So neither the
relay's operator nor its logs ever see the password (the control connection is TLS
besides). A salted fast hash can still be guessed offline by someone holding it, for weak
passwords: use a long random one for anything that matters.

On the wire the policy is a JSON object with a version ``v``. A relay that meets a version
it does not know refuses to open the tunnel (it never serves a tunnel with a policy it
cannot enforce).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import math
import re
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

from natkit.errors import ProtocolError

ACCESS_VERSION = 1
MAX_CIDRS = 64  # per list (allow, deny)
MAX_CIDR_TEXT = 64  # "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128" is 43 characters
MAX_CREDENTIALS = 16
MAX_USER = 128
MAX_PASSWORD = 256
MAX_REALM = 64
MAX_RATE_COUNT = 100_000
RATE_PERIODS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
SALT_BYTES = 16
DEFAULT_REALM = "natkit"
_HEX = re.compile(r"[0-9a-f]+")
# A realm goes inside a quoted string of a response header: printable ASCII, no quote or
# backslash (which would need escaping), no control characters.
_REALM = re.compile(r"[ !#-\[\]-~]+")
_V1_KEYS = frozenset({"v", "allow", "deny", "auth", "realm", "rate"})

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_cidr(text: str) -> Network:
    """A network from ``10.0.0.0/8``, ``2001:db8::/32`` or a bare address (a /32 or /128).
    ValueError with what to write instead when the text is not one."""
    text = text.strip()
    if not text or len(text) > MAX_CIDR_TEXT:
        raise ValueError(f"{text[:80]!r} is not an IPv4 or IPv6 network (CIDR)")
    if "%" in text:
        raise ValueError(f"{text!r}: a network has no zone (%…); drop it")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            loose = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"{text!r} has host bits set: did you mean {loose}?") from None
        raise ValueError(f"{text!r} is not an IPv4 or IPv6 network (CIDR)") from None


@dataclasses.dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``count`` new connections per ``per`` seconds from one visitor address
    (bursts of up to ``count``)."""

    count: int
    per: float

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """``10/s``, ``600/min``, ``100/h`` (``10`` alone means per second)."""
        count, sep, unit = text.strip().partition("/")
        unit = unit.strip().lower() if sep else "s"
        if not count.strip().isdigit() or unit not in RATE_PERIODS:
            raise ValueError(f"rate limit {text!r} is not N/s, N/min or N/h (e.g. 10/s)")
        limit = cls(int(count), RATE_PERIODS[unit])
        problem = limit.problem()
        if problem:
            raise ValueError(f"rate limit {text!r}: {problem}")
        return limit

    def problem(self) -> str:
        if not 1 <= self.count <= MAX_RATE_COUNT:
            return f"the count must be 1 to {MAX_RATE_COUNT}"
        if not (math.isfinite(self.per) and 0.001 <= self.per <= 86400):
            return "the period must be 1 ms to a day"
        return ""

    def __str__(self) -> str:
        for unit in ("s", "min", "h"):
            if RATE_PERIODS[unit] == self.per:
                return f"{self.count}/{unit}"
        return f"{self.count}/{self.per:g}s"


@dataclasses.dataclass(frozen=True, slots=True)
class Credential:
    """One basic-auth user and password, as the relay gets it: ``digest`` =
    HMAC-SHA256(key=``salt``, ``user:password``), both hex."""

    salt: str
    digest: str

    @classmethod
    def make(cls, user: str, password: str) -> Credential:
        if not user or ":" in user or len(user) > MAX_USER or not user.isprintable():
            raise ValueError(
                f"basic-auth user must be 1 to {MAX_USER} printable characters without ':'"
            )
        if not password or len(password) > MAX_PASSWORD:
            raise ValueError(f"basic-auth password must be 1 to {MAX_PASSWORD} characters")
        salt = secrets.token_bytes(SALT_BYTES)
        return cls(salt.hex(), _digest(salt, f"{user}:{password}".encode()).hex())

    def matches(self, presented: bytes) -> bool:
        """Whether ``presented`` (a visitor's ``user:password`` bytes) is this credential:
        digests compared in constant time."""
        mine = bytes.fromhex(self.digest)
        return hmac.compare_digest(_digest(bytes.fromhex(self.salt), presented), mine)

    def problem(self) -> str:
        if len(self.salt) != 2 * SALT_BYTES or not _HEX.fullmatch(self.salt):
            return f"salt must be {2 * SALT_BYTES} lower-case hex digits"
        if len(self.digest) != 64 or not _HEX.fullmatch(self.digest):
            return "sha256 must be 64 lower-case hex digits"
        return ""


def _digest(salt: bytes, user_pass: bytes) -> bytes:
    return hmac.new(salt, user_pass, hashlib.sha256).digest()


def split_user_pass(text: str) -> tuple[str, str]:
    """``USER:PASS`` (the password may contain ':') → (user, password)."""
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("basic auth must be USER:PASS (both non-empty)")
    return user, password


@dataclasses.dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Who may reach one tunnel. ``allow``/``deny``: CIDRs in normal form; ``credentials``:
    basic auth (http tunnels); ``rate``: connections per visitor address. ``version``: of
    the wire form this came in (a relay refuses versions it does not know)."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    credentials: tuple[Credential, ...] = ()
    realm: str = DEFAULT_REALM
    rate: RateLimit | None = None
    version: int = ACCESS_VERSION

    @property
    def empty(self) -> bool:
        return not (self.allow or self.deny or self.credentials or self.rate)

    def problem(self, kind: str | None = None) -> str:
        """What makes this policy invalid ('' when nothing); with ``kind``, also for a
        tunnel of that kind (basic auth needs HTTP: the relay reads the request head)."""
        if self.version != ACCESS_VERSION:
            return f"access policy version {self.version} (this natkit knows {ACCESS_VERSION})"
        for name, cidrs in (("allow", self.allow), ("deny", self.deny)):
            if len(cidrs) > MAX_CIDRS:
                return f"more than {MAX_CIDRS} {name} networks"
            for text in cidrs:
                try:
                    if str(parse_cidr(text)) != text:
                        return f"{name} network {text[:80]!r} is not in normal form"
                except ValueError as exc:
                    return str(exc)
        if len(self.credentials) > MAX_CREDENTIALS:
            return f"more than {MAX_CREDENTIALS} basic-auth credentials"
        for cred in self.credentials:
            if cred.problem():
                return f"basic-auth credential: {cred.problem()}"
        if not 0 < len(self.realm) <= MAX_REALM or not _REALM.fullmatch(self.realm):
            return f"realm must be 1 to {MAX_REALM} printable ASCII characters without quotes"
        if self.rate is not None and self.rate.problem():
            return f"rate limit: {self.rate.problem()}"
        if kind is not None and self.credentials and kind != "http":
            return (
                "basic auth needs an HTTP tunnel (--http): the relay reads the request's "
                f"Authorization header, which a {kind} tunnel does not show it"
            )
        return ""

    # ---- the wire form (inside OPEN) ------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": self.version,
            "allow": list(self.allow),
            "deny": list(self.deny),
            "auth": [{"salt": c.salt, "sha256": c.digest} for c in self.credentials],
            "realm": self.realm,
            "rate": None if self.rate is None else {"count": self.rate.count, "per": self.rate.per},
        }

    @classmethod
    def from_wire(cls, obj: object) -> AccessPolicy:
        """The policy in an OPEN message; ProtocolError when malformed. A version this
        relay does not know is returned as such (fields unread), to be refused."""
        if not isinstance(obj, dict):
            raise ProtocolError("relay OPEN: access is not a JSON object")
        version = obj.get("v")
        if not isinstance(version, int) or isinstance(version, bool) or not 0 < version < 2**16:
            raise ProtocolError("relay OPEN: access has no version v")
        if version != ACCESS_VERSION:
            return cls(version=version)
        if set(obj) != _V1_KEYS:
            raise ProtocolError(f"relay OPEN: access v1 fields must be exactly {sorted(_V1_KEYS)}")
        policy = cls(
            allow=_strings(obj["allow"], "allow", MAX_CIDRS),
            deny=_strings(obj["deny"], "deny", MAX_CIDRS),
            credentials=_credentials(obj["auth"]),
            realm=_string(obj["realm"], "realm"),
            rate=_rate(obj["rate"]),
        )
        problem = policy.problem()
        if problem:
            raise ProtocolError(f"relay OPEN: access: {problem}")
        return policy

    def describe(self) -> str:
        """A one-line summary without secrets (for logs and the CLI)."""
        parts = []
        if self.allow:
            parts.append("allow " + ",".join(self.allow))
        if self.deny:
            parts.append("deny " + ",".join(self.deny))
        if self.credentials:
            parts.append(f"basic auth ({len(self.credentials)} user(s), realm {self.realm!r})")
        if self.rate is not None:
            parts.append(f"rate {self.rate} per address")
        return "; ".join(parts) or "open to all"


def _string(value: object, name: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_CIDR_TEXT * 2:
        raise ProtocolError(f"relay OPEN: access {name} is not a short string")
    return value


def _strings(value: object, name: str, limit: int) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > limit:
        raise ProtocolError(f"relay OPEN: access {name} is not a list of at most {limit}")
    return tuple(_string(v, name) for v in value)


def _credentials(value: object) -> tuple[Credential, ...]:
    if not isinstance(value, list) or len(value) > MAX_CREDENTIALS:
        raise ProtocolError(f"relay OPEN: access auth is not a list of at most {MAX_CREDENTIALS}")
    out = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {"salt", "sha256"}:
            raise ProtocolError("relay OPEN: access auth entries are {salt, sha256}")
        out.append(Credential(_string(item["salt"], "salt"), _string(item["sha256"], "sha256")))
    return tuple(out)


def _rate(value: object) -> RateLimit | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"count", "per"}:
        raise ProtocolError("relay OPEN: access rate is {count, per} or null")
    count, per = value["count"], value["per"]
    if not isinstance(count, int) or isinstance(count, bool):
        raise ProtocolError("relay OPEN: access rate count is not an integer")
    if not isinstance(per, (int, float)) or isinstance(per, bool):
        raise ProtocolError("relay OPEN: access rate per is not a number")
    return RateLimit(count, float(per))


# ---- building a policy from options (CLI, Python API, pyngrok) ----------------------------------


def build_policy(
    *,
    allow: Iterable[str] = (),
    deny: Iterable[str] = (),
    basic_auth: Iterable[str] | str | None = None,
    rate_limit: str | RateLimit | None = None,
    realm: str = DEFAULT_REALM,
    kind: str | None = None,
) -> AccessPolicy | None:
    """The policy for these options (None when they say nothing). ``basic_auth``:
    ``"USER:PASS"`` or several; ``rate_limit``: ``"10/s"`` or a :class:`RateLimit`.
    ValueError (with what to fix) when an option is wrong, or does not fit ``kind``."""
    if isinstance(allow, str) or isinstance(deny, str):
        raise ValueError("allow and deny take a list of networks, e.g. ['10.0.0.0/8']")
    auth = [basic_auth] if isinstance(basic_auth, str) else list(basic_auth or ())
    rate = RateLimit.parse(rate_limit) if isinstance(rate_limit, str) else rate_limit
    policy = AccessPolicy(
        allow=_normal_cidrs(allow, "allow"),
        deny=_normal_cidrs(deny, "deny"),
        credentials=tuple(Credential.make(*split_user_pass(a)) for a in auth),
        realm=realm,
        rate=rate,
    )
    problem = policy.problem(kind)
    if problem:
        raise ValueError(problem)
    return None if policy.empty else policy


def _normal_cidrs(texts: Iterable[str], name: str) -> tuple[str, ...]:
    out: list[str] = []
    for text in texts:
        net = str(parse_cidr(text))
        if net not in out:
            out.append(net)
    if len(out) > MAX_CIDRS:
        raise ValueError(f"at most {MAX_CIDRS} {name} networks per tunnel")
    return tuple(out)


def from_pyngrok_options(
    options: Mapping[str, Any], kind: str | None = None
) -> AccessPolicy | None:
    """natkit's policy for pyngrok's (ngrok's) tunnel options: ``auth`` ("user:pass",
    ngrok config v2), ``basic_auth`` (a list of "user:pass", v2 and v3) and
    ``ip_restriction`` ({``allow_cidrs``, ``deny_cidrs``}, v2). Other options are not
    access control and are ignored here. ValueError when one is malformed."""
    auth: list[str] = []
    for key in ("auth", "basic_auth"):
        value = options.get(key)
        if isinstance(value, str):
            auth.append(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            auth.extend(value)
        elif value is not None:
            raise ValueError(f"pyngrok option {key} must be 'user:pass' or a list of them")
    restriction = options.get("ip_restriction") or {}
    if not isinstance(restriction, Mapping):
        raise ValueError("pyngrok option ip_restriction must be {allow_cidrs, deny_cidrs}")
    lists = {k: restriction.get(k) or [] for k in ("allow_cidrs", "deny_cidrs")}
    for key, value in lists.items():
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"pyngrok option ip_restriction.{key} must be a list of CIDRs")
    return build_policy(
        allow=lists["allow_cidrs"], deny=lists["deny_cidrs"], basic_auth=auth, kind=kind
    )


__all__ = [
    "ACCESS_VERSION",
    "AccessPolicy",
    "Credential",
    "RateLimit",
    "build_policy",
    "from_pyngrok_options",
    "parse_cidr",
]
