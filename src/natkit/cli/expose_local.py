"""``natkit expose``'s check of ``--local-host`` (an address, or a name that resolves; a usage
error otherwise). The checks of the local service itself are :mod:`natkit.net.local_service`
(shared with the Python API), re-exported here."""

from __future__ import annotations

import contextlib
import ipaddress
import socket

import click

from natkit.net.local_service import is_this_machine, local_problem, nothing_bound
from natkit.relay.resolve import name_problem

__all__ = ["is_this_machine", "local_problem", "nothing_bound", "resolve_local_host"]


def resolve_local_host(host: str) -> str:
    """The IP address ``--local-host`` names; a click usage error (exit 2) for an empty
    value, a malformed address (``999.1.1.1``) or a name that does not resolve."""
    if not host.strip():
        raise click.BadParameter("give an IP address or a host name", param_hint="--local-host")
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    if all(part.isdigit() for part in host.split(".")):
        raise click.BadParameter(f"{host!r} is not an IP address", param_hint="--local-host")
    if why := name_problem(host):
        raise click.BadParameter(f"{host!r} is {why}", param_hint="--local-host")
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:  # UnicodeError: an empty label ("a..b")
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise click.BadParameter(
            f"{host!r} is neither an IP address nor a name this machine resolves ({why})",
            param_hint="--local-host",
        ) from None
    return str(infos[0][4][0])
