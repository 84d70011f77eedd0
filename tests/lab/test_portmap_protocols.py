"""UPnP IGD, NAT-PMP and PCP against the real thing (miniupnpd on a kernel NAT in the lab).

Each protocol alone, cross-checks with the reference NAT-PMP client (``natpmpc``), the
automatic choice between them, the Python API, and a kept mapping across a router reboot.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import natkit
from natkit.errors import DiscoveryError
from natkit.lab import Lab
from natkit.lab import config as C
from natkit.portmap.manager import KeptMapping, probe
from natkit.portmap.mapping import PortMapping
from natkit.portmap.pmp_mappers import NatPmpMapper
from tests.conftest import call_in_node, run_in_node
from tests.lab.helpers import http_get, http_server, udp_ask, udp_echo, wait_for, wait_router_uptime

GW = C.RTR_LAN_IP
METHODS = ("upnp", "natpmp", "pcp")


# ---- small helpers --------------------------------------------------------------------------


def split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def reach(lab: Lab, ip: str, port: int, timeout: float = 2.0) -> str | None:
    """The body served at ip:port as seen from ``wan``, or None if it cannot be reached."""
    try:
        return http_get(lab, "wan", ip, port, timeout=timeout)
    except OSError:
        return None


def unreachable(lab: Lab, ip: str, port: int) -> bool:
    # The router drops unsolicited packets, so an unmapped port just times out.
    return reach(lab, ip, port, timeout=0.5) is None


def has_rule(lab: Lab, port: int) -> bool:
    """Does the router's ruleset still mention ``port`` (the dnat or the filter accept)?"""
    return re.search(rf"\bdport {port}\b", lab.router_rules()) is not None


def dnat_rules_to(lab: Lab, ip: str, port: int) -> list[str]:
    return [
        line.strip()
        for line in lab.router_rules().splitlines()
        if "dnat" in line and line.rstrip().endswith(f"{ip}:{port}")
    ]


def free_external_port(lab: Lab) -> int:
    rules = lab.router_rules()
    while True:
        port = random.randint(20000, 60999)
        if f"dport {port} " not in rules:
            return port


def natpmpc(lab: Lab, node: str, *args: str) -> str:
    r = lab.run(node, ["natpmpc", "-g", GW, *args], timeout=30)
    assert r.returncode == 0, f"natpmpc {' '.join(args)} failed: {r.stdout} {r.stderr}"
    return r.stdout


@contextlib.contextmanager
def lan_pmp_blocked(lab: Lab) -> Iterator[None]:
    """The LAN host cannot send to UDP 5351 (its own firewall, outside the router's reboot)."""
    table = """table inet nkm_block {
        chain out {
            type filter hook output priority 0; policy accept;
            udp dport 5351 drop
        }
    }
    """
    r = lab.run("lan", ["nft", "-f", "-"], input=table)
    assert r.returncode == 0, r.stderr
    try:
        yield
    finally:
        lab.run("lan", ["nft", "delete", "table", "inet", "nkm_block"])


# ---- each protocol alone --------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_each_protocol_alone(make_lab: Callable[..., Lab], method: str) -> None:
    """A router offering only ``method``: map, reach the LAN service from wan, unmap."""
    lab = make_lab(f"only-{method}", portmap=frozenset({method}))
    with http_server(lab, "lan", C.LAN_IP, 0, f"via {method}") as port:
        assert unreachable(lab, C.RTR_WAN_IP, port), "reachable before any mapping"

        async def run() -> tuple[PortMapping, str | None, Any]:
            result = await probe(via=method)
            try:
                assert result.chosen.method == method
                assert result.gateway_ip == GW
                m = await result.chosen.add(port, protocol="tcp", lease=120)
                body = await asyncio.to_thread(reach, lab, m.external_ip, m.external_port)
                await result.chosen.remove(m)
            finally:
                result.chosen.close()
            return m, body, result

        m, body, result = run_in_node(lab, "lan", run)
        assert set(result.offered) == {method}
        assert (m.method, m.protocol, m.internal_ip, m.internal_port) == (
            method,
            "tcp",
            C.LAN_IP,
            port,
        )
        assert m.external_ip == C.RTR_WAN_IP and m.external_port == port
        assert m.lease == 120 and m.publicly_reachable
        assert body == f"via {method}", f"the mapping did not reach the service: {body!r}"
        assert not has_rule(lab, m.external_port), lab.router_rules()
        assert unreachable(lab, m.external_ip, m.external_port), "reachable after remove()"


@pytest.mark.parametrize("method", ["natpmp", "pcp"])
def test_udp_mapping_alone(make_lab: Callable[..., Lab], method: str) -> None:
    lab = make_lab(f"udp-{method}", portmap=frozenset({method}))
    with udp_echo(lab, "lan", C.LAN_IP) as port:

        async def run() -> tuple[PortMapping, bytes | None]:
            result = await probe(via=method)
            try:
                m = await result.chosen.add(port, protocol="udp", lease=120)
                echo = await asyncio.to_thread(
                    udp_ask, lab, "wan", m.external_ip, m.external_port, b"ping"
                )
                await result.chosen.remove(m)
            finally:
                result.chosen.close()
            return m, echo

        m, echo = run_in_node(lab, "lan", run)
        assert (m.method, m.protocol, m.internal_port) == (method, "udp", port)
        assert m.external_ip == C.RTR_WAN_IP
        assert echo == b"echo:ping"
        assert not has_rule(lab, m.external_port), lab.router_rules()
        assert udp_ask(lab, "wan", m.external_ip, m.external_port, b"ping", timeout=0.5) is None


# ---- cross-checks with the reference NAT-PMP client -----------------------------------------


def test_natpmp_external_address_matches_natpmpc(lab: Lab) -> None:
    out = natpmpc(lab, "lan")
    found = re.search(r"Public IP address : (\S+)", out)
    assert found, out

    async def ours() -> str:
        mapper = await NatPmpMapper.open(GW)
        try:
            return await mapper.external_ip()
        finally:
            mapper.close()

    assert run_in_node(lab, "lan", ours) == found.group(1) == C.RTR_WAN_IP


def test_natpmpc_deletes_a_natkit_mapping(lab: Lab) -> None:
    with http_server(lab, "lan", C.LAN_IP, 0, "natkit made me") as port:

        async def add() -> PortMapping:
            mapper = await NatPmpMapper.open(GW)
            try:
                return await mapper.add(port, lease=120)
            finally:
                mapper.close()

        m = run_in_node(lab, "lan", add)
        assert m.method == "natpmp" and m.external_port == port
        assert reach(lab, m.external_ip, m.external_port) == "natkit made me"
        # RFC 6886 3.4: lifetime 0 for the private port deletes its mapping, whoever made it.
        out = natpmpc(lab, "lan", "-a", "0", str(port), "tcp", "0")
        assert "lifetime 0" in out.replace("liftime", "lifetime")
        assert not has_rule(lab, m.external_port), lab.router_rules()
        assert unreachable(lab, m.external_ip, m.external_port)


def test_natkit_sees_and_removes_a_natpmpc_mapping(lab: Lab) -> None:
    with http_server(lab, "lan", C.LAN_IP, 0, "natpmpc made me") as port:
        ext = free_external_port(lab)
        out = natpmpc(lab, "lan", "-a", str(ext), str(port), "tcp", "120")
        assert f"Mapped public port {ext} protocol TCP to local port {port}" in out, out
        assert reach(lab, C.RTR_WAN_IP, ext) == "natpmpc made me"

        async def remap_and_remove() -> tuple[PortMapping, list[str]]:
            mapper = await NatPmpMapper.open(GW)
            try:
                m = await mapper.add(port, external_port=ext, lease=120)
                rules = await asyncio.to_thread(dnat_rules_to, lab, C.LAN_IP, port)
                await mapper.remove(m)
                return m, rules
            finally:
                mapper.close()

        m, rules = run_in_node(lab, "lan", remap_and_remove)
        # natkit's request for that internal port refreshed natpmpc's mapping: same port, and
        # still one rule for the private port.
        assert m.external_port == ext and m.external_ip == C.RTR_WAN_IP
        assert len(rules) == 1 and f"dport {ext} " in rules[0], rules
        assert not has_rule(lab, ext), lab.router_rules()
        assert unreachable(lab, C.RTR_WAN_IP, ext)


# ---- the automatic choice -------------------------------------------------------------------


def test_auto_with_everything_on_chooses_pcp(lab: Lab) -> None:
    events: list[str] = []
    with http_server(lab, "lan", C.LAN_IP, 0, "auto") as port:

        async def run() -> tuple[PortMapping, str, str | None]:
            keeper = KeptMapping(port, lease=120)
            keeper.on_event(lambda e, m, info: events.append(e))
            m = await keeper.start()
            try:
                assert keeper.probe_result is not None
                chosen = keeper.probe_result.chosen.method
                body = await asyncio.to_thread(reach, lab, m.external_ip, m.external_port)
            finally:
                await keeper.close()
            return m, chosen, body

        m, chosen, body = run_in_node(lab, "lan", run)
    assert chosen == "pcp" and m.method == "pcp"
    assert m.public_address == f"{C.RTR_WAN_IP}:{port}"
    assert body == "auto"
    assert events == ["ready", "closed"]
    assert not has_rule(lab, m.external_port)


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        (("upnp", "natpmp"), "natpmp"),
        (("upnp", "pcp"), "pcp"),
        (("natpmp", "pcp"), "pcp"),
        (("upnp",), "upnp"),
    ],
    ids=["no-pcp", "no-natpmp", "no-upnp", "upnp-only"],
)
def test_auto_with_a_protocol_switched_off(
    make_lab: Callable[..., Lab], offered: tuple[str, ...], expected: str
) -> None:
    lab = make_lab("auto-" + "-".join(offered), portmap=frozenset(offered))
    switched_off = set(METHODS) - set(offered)
    with http_server(lab, "lan", C.LAN_IP, 0, f"auto {expected}") as port:

        async def run() -> tuple[str, dict[str, str], str, str, str | None]:
            result = await probe()
            result.chosen.close()
            async with await natkit.open_port_async(port, lease=120) as p:
                body = await asyncio.to_thread(reach, lab, *split(p.public_address))
                method, addr = p.method, p.public_address
            return result.chosen.method, result.refused, method, addr, body

        probed, refused, method, addr, body = run_in_node(lab, "lan", run)
    assert probed == expected and method == expected
    assert switched_off <= set(refused), refused
    assert addr == f"{C.RTR_WAN_IP}:{port}"
    assert body == f"auto {expected}"
    assert not has_rule(lab, port), lab.router_rules()
    assert unreachable(lab, C.RTR_WAN_IP, port)


def test_auto_with_nothing_offered_is_a_quick_discovery_error(
    make_lab: Callable[..., Lab],
) -> None:
    lab = make_lab("auto-none", portmap=frozenset())

    async def run() -> tuple[BaseException, float]:
        t0 = time.monotonic()
        with pytest.raises(DiscoveryError) as info:
            await probe()
        return info.value, time.monotonic() - t0

    exc, elapsed = run_in_node(lab, "lan", run)
    assert elapsed < 3.0, f"probe took {elapsed:.2f} s"
    text = str(exc)
    assert "offers no port mapping" in text
    assert all(f"{m}:" in text for m in METHODS), text


# ---- the Python API ---------------------------------------------------------------------------


def test_open_port_blocking_and_on_change(lab: Lab) -> None:
    """The blocking handle as a context manager; ``on_change`` fires when a reboot costs
    the mapping its public port (another host took it before natkit could restore it)."""
    changes: list[PortMapping] = []
    wait_router_uptime(lab)
    with http_server(lab, "lan", C.LAN_IP, 0, "blocking") as port:
        taken = False

        def script() -> tuple[str, str, str | None, str]:
            nonlocal taken
            with natkit.open_port(port, via="natpmp", lease=120) as p:
                first = p.public_address
                assert p.method == "natpmp" and first == f"{C.RTR_WAN_IP}:{port}"
                assert reach(lab, *split(first)) == "blocking"
                p.on_change(changes.append)
                with lan_pmp_blocked(lab):
                    lab.reboot_router()
                    # dev takes our public port while natkit cannot talk to the router.
                    out = natpmpc(lab, "dev", "-a", str(port), str(port), "tcp", "120")
                    assert f"Mapped public port {port} " in out, out
                    taken = True
                wait_for(lambda: bool(changes), 20, "on_change after the reboot")
                second = p.public_address
                body = reach(lab, *split(second))
            return first, second, body, repr(p)

        try:
            first, second, body, text = call_in_node(lab, "lan", script)
        finally:
            if taken:
                natpmpc(lab, "dev", "-a", "0", str(port), "tcp", "0")
    assert len(changes) == 1 and changes[0].public_address == second
    assert second != first and second.startswith(f"{C.RTR_WAN_IP}:")
    assert body == "blocking", "the restored mapping does not reach the service"
    assert text.startswith("<Port tcp")
    assert not has_rule(lab, split(second)[1]), "natkit left its mapping behind"
    assert not has_rule(lab, port), "dev's mapping should be gone too (cleanup)"


@pytest.mark.parametrize("method", METHODS)
def test_open_port_async_context_manager(lab: Lab, method: str) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    with http_server(lab, "lan", C.LAN_IP, 0, f"async {method}") as port:

        async def run() -> tuple[str, str, str | None, bool]:
            async with await natkit.open_port_async(port, via=method, lease=120) as p:
                p.on_event(lambda e, m, info: events.append((e, info)))
                body = await asyncio.to_thread(reach, lab, *split(p.public_address))
                addr, got = p.public_address, p.method
            return addr, got, body, p.closed

        addr, got, body, closed = run_in_node(lab, "lan", run)
    assert got == method and addr == f"{C.RTR_WAN_IP}:{port}"
    assert body == f"async {method}"
    assert closed
    assert [e for e, _ in events] == ["closed"] and events[0][1].get("removed") is True
    assert not has_rule(lab, port), lab.router_rules()


# ---- a kept mapping across a router reboot --------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_kept_mapping_survives_a_reboot(lab: Lab, method: str) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    if method != "upnp":
        wait_router_uptime(lab)
    with http_server(lab, "lan", C.LAN_IP, 0, f"kept {method}") as port:

        async def run() -> tuple[PortMapping, PortMapping, str | None]:
            keeper = KeptMapping(port, via=method, lease=120, check_interval=0.5)
            keeper.on_event(lambda e, m, info: events.append((e, info)))
            before = await keeper.start()
            try:
                await asyncio.to_thread(lab.reboot_router)
                deadline = time.monotonic() + 10
                while not any(e == "restored" for e, _ in events):
                    assert time.monotonic() < deadline, f"not restored: {events}"
                    await asyncio.sleep(0.05)
                assert keeper.mapping is not None
                after = keeper.mapping
                body = await asyncio.to_thread(reach, lab, after.external_ip, after.external_port)
            finally:
                await keeper.close()
            return before, after, body

        before, after, body = run_in_node(lab, "lan", run)
    names = [e for e, _ in events]
    assert names[0] == "ready" and names[-1] == "closed", names
    assert "lost" in names and names.index("lost") < names.index("restored"), names
    restored = events[names.index("restored")][1]
    assert restored["changed"] is False and restored["previous"] == before.public_address
    assert after.public_address == before.public_address == f"{C.RTR_WAN_IP}:{port}"
    assert after.method == method
    assert body == f"kept {method}", "unreachable after the mapping was restored"
    assert events[-1][1].get("removed") is True
    assert not has_rule(lab, port), lab.router_rules()
