"""The relay's name, looked up without holding the process hostage.

``loop.getaddrinfo`` runs in the default executor: a lookup that hangs (a DNS server that does
not answer) then holds ``asyncio.run``'s shutdown for its full timeout, so Ctrl-C waited 4–6 s,
and a lookup that failed after its waiter was cancelled logged "Future exception was never
retrieved". Here each lookup has a daemon thread of its own, which nothing waits for at exit,
and its outcome is handed over as a value, never as a stray exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
from typing import Any

from natkit.errors import RelayError

LOOKUP_TIMEOUT = 10.0


class RelayNameError(RelayError):
    """The relay's host name cannot be resolved."""


Outcome = tuple[str, str]  # (address, "") or ("", why it failed)


def name_problem(host: str) -> str:
    """Why ``host`` cannot be a DNS name at all ("" if it may be one): told without a
    lookup (RFC 1035: labels of 1-63 octets, 253 in all)."""
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or any(not 0 < len(label) <= 63 for label in labels):
        return "not a valid host name (an empty or over-long label)"
    return ""


def _settle(fut: asyncio.Future[Outcome], outcome: Outcome) -> None:
    if not fut.done():
        fut.set_result(outcome)


async def resolve_relay(host: str, port: int, timeout: float = LOOKUP_TIMEOUT) -> str:
    """An address of ``host`` (an IP address is returned as it is); :class:`RelayNameError`
    naming it when it cannot be resolved within ``timeout``."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    if why := name_problem(host):
        raise RelayNameError(f"the relay's name {host!r} is {why}: check --relay")
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Outcome] = loop.create_future()

    def lookup() -> None:
        outcome: Outcome
        try:
            infos: list[Any] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            outcome = (str(infos[0][4][0]), "") if infos else ("", "no address")
        except (OSError, UnicodeError) as exc:  # UnicodeError: an empty label, "a..b"
            outcome = ("", getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(_settle, fut, outcome)

    threading.Thread(target=lookup, name=f"resolve {host}", daemon=True).start()
    try:
        address, why = await asyncio.wait_for(fut, timeout)
    except asyncio.TimeoutError:
        address, why = "", f"no answer within {timeout:g} s"
    if not address:
        raise RelayNameError(
            f"the relay's name {host!r} cannot be resolved ({why}): check --relay, or give "
            "the relay's IP address"
        )
    return address
