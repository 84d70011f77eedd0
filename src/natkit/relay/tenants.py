"""Tenants: the tokens a relay accepts, each with its quotas and reserved host names.

A tokens file has one tenant a line::

    # LABEL:TOKEN [sessions=N] [tunnels=N] [ports=N] [hostnames=N] [reserve=NAME,NAME...]
    alice:9f2c...e1 tunnels=4 reserve=shop,blog
    bob:77aa...03

``sessions`` bounds the tenant's agents connected at once, ``tunnels`` its open tunnels,
``ports`` and ``hostnames`` the public ports and host names it holds, reservations for
agents that went away included. ``reserve`` names host names (under the relay's domain,
or whole) that only this tenant may use, with every name under them.
"""

from __future__ import annotations

import dataclasses

MIN_TOKEN = 16


@dataclasses.dataclass(frozen=True)
class Quota:
    sessions: int = 8
    tunnels: int = 16
    ports: int = 16
    hostnames: int = 16


@dataclasses.dataclass(frozen=True)
class Tenant:
    label: str
    token: str
    quota: Quota = Quota()
    reserve: tuple[str, ...] = ()  # host names, as written (completed with the domain later)


class TenantError(ValueError):
    """A tokens file line that cannot be used; the message names it."""


def parse_tenant(line: str, default_label: str, default: Quota | None = None) -> Tenant:
    words = line.split()
    label, sep, token = words[0].partition(":")
    if not sep:
        label, token = default_label, words[0]
    if not label:
        raise TenantError(
            f"line {default_label.removeprefix('token')}: the label before ':' is empty"
        )
    if len(token) < MIN_TOKEN:
        # Unlabelled, it is named by what was typed (a token this short is no secret).
        what = f"token {label!r}" if sep else f"token {token!r} ({len(token)} characters)"
        raise TenantError(f"{what} is too short: use at least {MIN_TOKEN} random characters")
    quota = dataclasses.asdict(default or Quota())
    reserve: tuple[str, ...] = ()
    for word in words[1:]:
        key, eq, value = word.partition("=")
        if not eq:
            raise TenantError(f"token {label!r}: {word!r} is not KEY=VALUE")
        if key == "reserve":
            reserve = tuple(n.strip().lower().rstrip(".") for n in value.split(",") if n.strip())
        elif key in quota:
            if not (value.isascii() and value.isdigit()):
                raise TenantError(f"token {label!r}: {key} must be a whole number, not {value!r}")
            quota[key] = int(value)
        else:
            known = ", ".join([*quota, "reserve"])
            raise TenantError(f"token {label!r}: unknown setting {key!r} (known: {known})")
    return Tenant(label, token, Quota(**quota), reserve)


def parse_tenants(lines: list[str], default: Quota | None = None) -> list[Tenant]:
    """Tenants from ``--token`` values and tokens-file lines (blank and # lines skipped)."""
    found: dict[str, Tenant] = {}
    for i, raw in enumerate(lines):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tenant = parse_tenant(line, f"token{i + 1}", default)
        if tenant.label in found:
            raise TenantError(f"token label {tenant.label!r} appears twice")
        if any(t.token == tenant.token for t in found.values()):
            raise TenantError(f"token {tenant.label!r} is the same token as another label's")
        found[tenant.label] = tenant
    return list(found.values())
