"""The relay's Prometheus endpoint (``--metrics HOST:PORT``): gauges and event counters."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from natkit.relay.gate import REASONS


def render(server: Any) -> bytes:
    lines = [
        f"natkit_relay_agents {len(server.sessions)}",
        f"natkit_relay_tunnels {server.names.live()}",
        f"natkit_relay_unauthenticated {server.limits.unauthenticated}",
        f"natkit_relay_p2p_rooms {len(server.rooms.rooms)}",
        f"natkit_relay_p2p_paths {sum(server.rooms.paths.values())}",
    ] + [f'natkit_relay_events_total{{event="{k}"}} {v}' for k, v in sorted(server.stats.items())]
    # Visitors refused by tunnels' access policies, by reason (every reason, zeros too).
    lines += [f'natkit_relay_refused_visitors_total{{reason="{r}"}} {server.refusals[r]}'
              for r in REASONS]  # fmt: skip
    return ("\n".join(lines) + "\n").encode()


async def serve(server: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        body = render(server)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))  # fmt: skip
        await writer.drain()
    writer.close()
