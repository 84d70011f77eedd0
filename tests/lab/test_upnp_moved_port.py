"""A router that comes back from a reboot with its IGD on another SOAP port."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from natkit.lab import config as C
from natkit.portmap.manager import KeptMapping
from natkit.portmap.mapping import PortMapping
from natkit.portmap.upnp import UPnPMapper
from tests.conftest import run_in_node
from tests.lab.helpers import http_server, reachable


def test_upnp_mapping_survives_a_moved_soap_port(make_lab) -> None:  # type: ignore[no-untyped-def]
    lab = make_lab("moved", portmap=frozenset({"upnp"}))
    events: list[tuple[str, str]] = []

    def listen(event: str, m: PortMapping, info: dict[str, Any]) -> None:
        events.append((event, info.get("reason", "")))

    with http_server(lab, "lan", C.LAN_IP, 0, "moved") as port:

        async def run() -> str:
            keeper = KeptMapping(port, via="upnp", lease=300, check_interval=0.3)
            keeper.on_event(listen)
            await keeper.start()
            try:
                await asyncio.to_thread(lambda: lab.reboot_router(move_upnp_port=True))
                deadline = time.monotonic() + 10
                while not any(e == "restored" for e, _ in events):
                    assert time.monotonic() < deadline, f"not restored: {events}"
                    await asyncio.sleep(0.1)
                assert isinstance(keeper.mapper, UPnPMapper)
                location = keeper.mapper.gateway.location
                ok = await asyncio.to_thread(reachable, lab, "wan", C.RTR_WAN_IP, port)
                assert ok, "service unreachable after restore"
                return str(location)
            finally:
                await keeper.close()

        location = run_in_node(lab, "lan", run)
    assert location == f"http://{C.RTR_LAN_IP}:{C.UPNP_HTTP_PORT + 1}/rootDesc.xml"
    lost = [reason for e, reason in events if e == "lost"]
    assert lost and "stopped answering" in lost[0]
    assert [e for e, _ in events][-1] == "closed"
    assert f"dport {port} dnat" not in lab.router_rules()
