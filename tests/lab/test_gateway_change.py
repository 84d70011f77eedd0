"""A kept mapping follows a change of default gateway (and survives one that offers nothing)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from natkit.lab import Lab
from natkit.lab import config as C
from natkit.portmap.manager import KeptMapping
from natkit.portmap.mapping import PortMapping
from tests.conftest import run_in_node
from tests.lab.helpers import http_server, reachable


def _set_gateway(lab: Lab, via: str) -> None:
    out = lab.run("lan", ["ip", "route", "replace", "default", "via", via])
    assert out.returncode == 0, out.stderr


def test_kept_mapping_follows_the_default_gateway(lab: Lab) -> None:
    events: list[tuple[str, dict[str, Any]]] = []

    def listen(event: str, m: PortMapping, info: dict[str, Any]) -> None:
        events.append((event, dict(info)))

    def wait_for(name: str, count: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for e, _ in events if e == name) < count:
            assert time.monotonic() < deadline, f"no {name!r} event: {events}"
            time.sleep(0.05)

    with http_server(lab, "lan", C.LAN_IP, 0, "follow") as port:

        async def run() -> None:
            keeper = KeptMapping(port, via="natpmp", lease=120, check_interval=0.3)
            keeper.on_event(listen)
            await keeper.start()
            try:
                # The LAN's default route moves to dev, a host that is no router at all.
                await asyncio.to_thread(_set_gateway, lab, C.DEV_IP)
                await asyncio.to_thread(wait_for, "lost", 1)
                await asyncio.sleep(1.0)  # it keeps trying, and does not pretend
                assert not any(e == "restored" for e, _ in events), events
                # And back to the real router: the mapping is re-created there.
                await asyncio.to_thread(_set_gateway, lab, C.RTR_LAN_IP)
                await asyncio.to_thread(wait_for, "restored", 1)
                assert keeper.gateway_ip == C.RTR_LAN_IP
                assert await asyncio.to_thread(reachable, lab, "wan", C.RTR_WAN_IP, port)
            finally:
                _set_gateway(lab, C.RTR_LAN_IP)
                await keeper.close()

        run_in_node(lab, "lan", run)
    lost = [info for e, info in events if e == "lost"]
    assert "gateway changed" in lost[0]["reason"]
    assert f"dport {port} dnat" not in lab.router_rules()
