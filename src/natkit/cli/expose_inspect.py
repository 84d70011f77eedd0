"""The inspector beside ``natkit expose --http`` (``--inspect ADDR``, ``--no-inspect``).

Imported only for HTTP tunnels with the inspector on: ``natkit expose`` of a TCP port
loads none of it.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from natkit.errors import NatkitError
from natkit.relay.agent import Agent, TunnelSpec, parse_hostport

if TYPE_CHECKING:
    from natkit.inspect.server import Inspector

DEFAULT_ADDR = "127.0.0.1:4040"
TRIES = 10  # the default port taken (another agent's inspector): 4041, 4042… like ngrok
TUNNEL_NAME = "command_line"  # ngrok's name for the tunnel its command line opened


def parse_inspect_addr(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``PORT`` (on 127.0.0.1); raises ValueError."""
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    return parse_hostport(text, allow_zero=True)


async def start_inspector(
    agent: Agent, spec: TunnelSpec, addr: str | None, idle: float = 600.0
) -> Inspector:
    """Serve the inspector at ``addr`` (None: 127.0.0.1:4040 or the next free port) and
    capture the tunnel's visitors, pausing after ``idle`` seconds with nobody looking (0:
    never). Raises NatkitError when the address cannot be had."""
    from natkit.inspect.server import Inspector
    from natkit.inspect.store import CaptureStore
    from natkit.inspect.tap import tap_factory

    host, port = parse_inspect_addr(addr or DEFAULT_ADDR)
    inspector = Inspector(CaptureStore(idle=idle or None))
    tries = TRIES if addr is None else 1
    for i in range(tries):
        try:
            await inspector.start(host, port + i if port else 0)
            break
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and i + 1 < tries:
                continue
            where = f"{host}:{port}" if tries == 1 else f"{host}:{port}-{port + tries - 1}"
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise NatkitError(
                f"cannot serve the inspector on {where}: {reason}; choose "
                "another address with --inspect HOST:PORT, or --no-inspect"
            ) from None
    name = spec.name or TUNNEL_NAME
    inspector.watch(name, spec.public, spec.local_host, spec.local_port)
    agent.capture(spec.id, tap_factory(inspector.store, name))
    return inspector


def tunnel_opened(inspector: Inspector, public: str) -> None:
    """The tunnel's public URL is known (or changed): the page shows it."""
    for tunnel in inspector.tunnels.values():
        tunnel.public_url = public
