"""Is the local service there? ``expose``'s checks of the local side, without any CLI: is an
address this machine (a router's mapping can only forward to this machine), and does anything
listen on the port (else a visitor is refused, and that is not the mapping's fault)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

LOCAL_CHECK_TIMEOUT = 2.0


def is_this_machine(ip: str) -> bool:
    """Is ``ip`` one of this machine's own addresses (loopback included)? Binding to it
    succeeds only if so."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
    except OSError:
        return False
    return True


async def local_problem(host: str, port: int) -> str:
    """Why nothing answers on ``host:port`` (TCP); "" when something listens there. On this
    machine, told without connecting (the service never sees a probe: a connection it did
    not expect counts as a visitor); another machine's port is connected to."""
    if is_this_machine(host):
        return "nothing listens there" if nothing_bound(port, host) else ""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), LOCAL_CHECK_TIMEOUT)
    except asyncio.TimeoutError:
        return f"no answer within {LOCAL_CHECK_TIMEOUT:g} s"
    except OSError as exc:  # asyncio's own loop words it "Connect call failed (...)"
        return os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return ""


def nothing_bound(port: int, host: str = "0.0.0.0") -> bool:
    """Does no TCP socket of this machine listen on ``port`` at ``host`` (or at a wildcard
    address covering it; with the default, at any address)? Linux refuses a bind beside a
    listening socket even with SO_REUSEADDR, and allows it beside anything else (TIME_WAIT,
    a client's port). A port below 1024 that this user may not bind counts as in use."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
