"""IPv6 through the lab's dual-stack router: a LAN host's global address is routed (no NAT)
but unsolicited inbound IPv6 is dropped, until natkit opens a pinhole through miniupnpd, by
UPnP IGD2 (WANIPv6FirewallControl) or PCP. Reachability is proven from wan, the Internet."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from natkit.lab import Lab, netns
from natkit.lab import config as C
from natkit.portmap.pinhole_keeper import KeptPinhole
from natkit.portmap.pinhole_mappers import Pinhole
from tests.lab import test_expose
from tests.lab.helpers import http_server, wait_router_uptime

NATKIT = str(Path(sys.executable).parent / "natkit")
ROUTER = C.RTR_LAN_IP6


def connect_from_wan(lab: Lab, ip: str, port: int, timeout: float = 1.0) -> str:
    """ "open" if a TCP connection from wan to [ip]:port succeeds, else why not: "timeout"
    (dropped on the way) or "refused"."""

    def attempt() -> str:
        try:
            with socket.create_connection((ip, port), timeout=timeout):
                return "open"
        except TimeoutError:
            return "timeout"
        except ConnectionRefusedError:
            return "refused"

    return netns.call_in(lab.netns("wan"), attempt)


def pinhole_rules(lab: Lab, port: int) -> list[str]:
    rules = lab.router_rules().splitlines()
    return [r.strip() for r in rules if f"dport {port} " in r and "@nh,192,128" in r]


@pytest.fixture
def v6_server(lab: Lab) -> Iterator[int]:
    with http_server(lab, "lan", C.LAN_IP6, text="hello over IPv6") as port:
        yield port


def test_lab_is_dual_stack_routed_without_nat_and_drops_unsolicited_inbound(
    lab: Lab, v6_server: int
) -> None:
    status = lab.status()["ipv6"]
    assert status["lan_ip"] == C.LAN_IP6 and status["router_wan_ip"] == C.RTR_WAN_IP6
    # Outbound IPv6 is routed, not translated: wan sees the LAN host's own address.
    server = netns.call_in(
        lab.netns("wan"), lambda: socket.create_server((C.WAN_IPS6[0], 0), family=socket.AF_INET6)
    )
    with server:
        server.settimeout(3)
        port = server.getsockname()[1]
        netns.call_in(
            lab.netns("lan"),
            lambda: socket.create_connection((C.WAN_IPS6[0], port), timeout=2).close(),
        )
        conn, peer = server.accept()
        conn.close()
    assert peer[0] == C.LAN_IP6
    # The service listens (the LAN reaches it), but from the Internet its SYNs are dropped:
    # a timeout, not a refusal.
    assert netns.call_in(
        lab.netns("dev"), lambda: socket.create_connection((C.LAN_IP6, v6_server), 2).close()
    ) is None  # fmt: skip
    assert connect_from_wan(lab, C.LAN_IP6, v6_server) == "timeout"
    assert pinhole_rules(lab, v6_server) == []


@pytest.mark.parametrize("via", ["upnp", "pcp"])
def test_pinhole_opens_reaches_and_closes(lab: Lab, v6_server: int, via: str) -> None:
    port = v6_server
    events: list[tuple[str, dict[str, Any]]] = []

    async def scenario() -> Pinhole:
        keeper = KeptPinhole(port, via=via, lease=600)
        keeper.on_event(lambda event, p, info: events.append((event, info)))
        pinhole = await keeper.start()
        opened = await asyncio.to_thread(connect_from_wan, lab, C.LAN_IP6, port)
        rules = await asyncio.to_thread(pinhole_rules, lab, port)
        await keeper.close()
        assert opened == "open", f"not reachable through {pinhole}: {opened}"
        assert len(rules) == 1 and " accept" in rules[0], rules
        return pinhole

    pinhole = netns.run_in(lab.netns("lan"), scenario)
    assert pinhole.method == via
    assert (pinhole.address, pinhole.port, pinhole.gateway) == (C.LAN_IP6, port, ROUTER)
    assert pinhole.public_address == f"[{C.LAN_IP6}]:{port}"
    assert [e for e, _ in events] == ["ready", "closed"]
    assert events[-1][1]["removed"] is True
    assert pinhole_rules(lab, port) == []
    assert connect_from_wan(lab, C.LAN_IP6, port) == "timeout"


def test_pcp_pinhole_renewed_then_closed_is_cut_to_the_routers_shortest_lifetime(
    lab: Lab, v6_server: int
) -> None:
    """miniupnpd 2.3.1 refuses to delete a PCP pinhole once it was renewed (NOT_AUTHORIZED;
    docs/miniupnpd-ipv6.md): natkit then cuts it to the shortest lifetime it grants."""
    port = v6_server
    closed: list[dict[str, Any]] = []

    async def scenario() -> None:
        keeper = KeptPinhole(port, via="pcp", lease=600)
        keeper.on_event(lambda event, p, info: closed.append(info) if event == "closed" else None)
        await keeper.start()
        assert keeper.pinholer is not None and keeper.pinhole is not None
        keeper.pinhole = await keeper.pinholer.renew(keeper.pinhole)
        await keeper.close()

    netns.run_in(lab.netns("lan"), scenario)
    assert closed and closed[0]["removed"] is False
    assert 0 < closed[0]["closes_in"] <= 120
    # Still open until then: the router holds it, with the short lifetime.
    assert connect_from_wan(lab, C.LAN_IP6, port) == "open"


@pytest.mark.parametrize("via", ["upnp", "pcp"])
def test_kept_pinhole_is_restored_after_a_router_reboot(lab: Lab, v6_server: int, via: str) -> None:
    port = v6_server
    events: list[str] = []
    wait_router_uptime(lab)  # PCP tells a reboot from its epoch (RFC 6887 8.5 slack)

    async def scenario() -> str:
        keeper = KeptPinhole(port, via=via, lease=600, check_interval=0.3)
        keeper.on_event(lambda event, p, info: events.append(event))
        await keeper.start()
        try:
            await asyncio.to_thread(lab.reboot_router)
            assert await asyncio.to_thread(pinhole_rules, lab, port) == []  # the reboot lost it
            for _ in range(100):
                if "restored" in events:
                    break
                await asyncio.sleep(0.1)
            return await asyncio.to_thread(connect_from_wan, lab, C.LAN_IP6, port)
        finally:
            await keeper.close()

    reached = netns.run_in(lab.netns("lan"), scenario)
    assert events[:3] == ["ready", "lost", "restored"], events
    assert reached == "open"


@pytest.mark.parametrize("via", ["upnp", "pcp"])
def test_cli_map_add_ipv6_prints_the_reachable_address_and_delete_closes_it(
    lab: Lab, v6_server: int, via: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NATKIT_STATE_DIR", str(tmp_path))  # natkit's records: a scratch dir
    port = str(v6_server)
    proc = lab.run("lan", [NATKIT, "map", "add", port, "--ipv6", "--via", via,
                           "--lease", "300", "--json"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    made = json.loads(proc.stdout.strip().splitlines()[-1])
    try:
        assert made["event"] == "mapped" and made["ipv6"] is True
        assert made["public_address_v6"] == f"[{C.LAN_IP6}]:{port}"
        assert made["method"] == via and made["lease"] == 300
        assert connect_from_wan(lab, C.LAN_IP6, v6_server) == "open"
    finally:
        gone = lab.run("lan", [NATKIT, "map", "delete", port, "--ipv6", "--json"])
    assert gone.returncode == 0, gone.stderr
    deleted = json.loads(gone.stdout)
    assert deleted["event"] == "deleted" and deleted["closed"] is True and deleted["ipv6"] is True
    assert connect_from_wan(lab, C.LAN_IP6, v6_server) == "timeout"
    again = lab.run("lan", [NATKIT, "map", "delete", port, "--ipv6"])
    assert again.returncode != 0 and "no record of an open IPv6 pinhole" in again.stderr


def test_cli_map_add_ipv6_refuses_natpmp(lab: Lab) -> None:
    human = lab.run("lan", [NATKIT, "map", "add", "8080", "--ipv6", "--via", "natpmp"])
    assert human.returncode != 0 and "NAT-PMP has no IPv6" in human.stderr


def first_ready(run: test_expose.Expose) -> dict[str, object]:
    """The first event after the local warning: the service here listens on IPv6 only, so
    ``expose`` says that nothing listens on the IPv4 side (local_unreachable) first."""
    event: dict[str, object] = run.next_event(timeout=15)
    if event["event"] == "local_unreachable":
        assert event["reason"] == "nothing listens on it", event
        event = run.next_event(timeout=15)
    return event


def test_expose_reports_and_removes_the_ipv6_pinhole(
    lab: Lab, v6_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = v6_server
    monkeypatch.setattr(test_expose, "NATKIT", NATKIT)
    run = test_expose.Expose(lab, [str(port), "--via", "upnp", "--json", "--lease", "120"])
    try:
        ready = first_ready(run)
        assert ready["event"] == "ready", ready
        assert ready["public_address"] == f"{C.RTR_WAN_IP}:{port}"
        assert ready["public_address_v6"] == f"[{C.LAN_IP6}]:{port}"
        assert connect_from_wan(lab, C.LAN_IP6, port) == "open"
        assert run.stop(signal.SIGINT) == 0
        closing = [json.loads(line) for line in run.rest()]
        assert [e["event"] for e in closing] == ["closed"], closing
        assert closing[0]["public_address_v6"] == f"[{C.LAN_IP6}]:{port}"
        assert closing[0]["pinhole_removed"] is True and closing[0]["removed"] is True
    finally:
        run.kill()
    assert pinhole_rules(lab, port) == []
    assert connect_from_wan(lab, C.LAN_IP6, port) == "timeout"


def test_expose_no_ipv6_makes_no_pinhole(
    lab: Lab, v6_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = v6_server
    monkeypatch.setattr(test_expose, "NATKIT", NATKIT)
    run = test_expose.Expose(lab, [str(port), "--via", "upnp", "--json", "--no-ipv6"])
    try:
        ready = first_ready(run)
        assert ready["event"] == "ready" and "public_address_v6" not in ready, ready
        assert pinhole_rules(lab, port) == []
        assert connect_from_wan(lab, C.LAN_IP6, port) == "timeout"
        assert run.stop(signal.SIGINT) == 0
    finally:
        run.kill()
