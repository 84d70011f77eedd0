"""UPnP IGD against the real thing: miniupnpd on a kernel NAT in the lab."""

from __future__ import annotations

import time

import pytest

import natkit
from natkit.errors import DiscoveryError, MappingConflictError
from natkit.lab import Lab
from natkit.lab import config as C
from natkit.portmap.discovery import discover_igd
from natkit.portmap.upnp import UPnPMapper
from tests.conftest import call_in_node, run_in_node
from tests.lab.helpers import http_get, http_server, reachable, udp_ask, udp_echo


def test_discover_finds_the_lab_router(lab: Lab) -> None:
    gw = run_in_node(lab, "lan", lambda: discover_igd(timeout=3))
    assert gw.location == f"http://{C.RTR_LAN_IP}:{C.UPNP_HTTP_PORT}/rootDesc.xml"
    assert gw.service.service_type == "urn:schemas-upnp-org:service:WANIPConnection:2"
    assert gw.external_ip == C.RTR_WAN_IP
    assert gw.connected
    assert gw.local_ip == C.LAN_IP
    assert "MiniUPnPd" in gw.server


def test_map_reach_list_delete(lab: Lab) -> None:
    with http_server(lab, "lan", C.LAN_IP, 0, "behind the NAT") as port:
        assert not reachable(lab, "wan", C.RTR_WAN_IP, port), "reachable before any mapping"

        async def add() -> natkit.PortMapping:
            mapper = await UPnPMapper.discover()
            return await mapper.add(port, lease=300, description="natkit test")

        m = run_in_node(lab, "lan", add)
        assert (m.method, m.protocol, m.internal_ip, m.internal_port) == (
            "upnp",
            "tcp",
            C.LAN_IP,
            port,
        )
        assert m.external_ip == C.RTR_WAN_IP and m.external_port == port and m.lease == 300
        assert m.publicly_reachable
        assert http_get(lab, "wan", m.external_ip, m.external_port) == "behind the NAT"

        # The reference client sees it, and so does our own listing.
        listing = lab.run("lan", ["upnpc", "-l"]).stdout
        assert f"TCP {port}->{C.LAN_IP}:{port}" in listing and "natkit test" in listing

        async def listed() -> list[natkit.PortMapping]:
            return await (await UPnPMapper.discover()).list()

        assert any(x.external_port == port and x.description == "natkit test"
                   for x in run_in_node(lab, "lan", listed))  # fmt: skip

        async def delete() -> None:
            await (await UPnPMapper.discover()).delete(port, "tcp")

        run_in_node(lab, "lan", delete)
        assert f"dport {port} dnat" not in lab.router_rules()
        assert not reachable(lab, "wan", C.RTR_WAN_IP, port), "still reachable after delete"
        assert f"{port}->" not in lab.run("lan", ["upnpc", "-l"]).stdout


def test_udp_mapping(lab: Lab) -> None:
    with udp_echo(lab, "lan", C.LAN_IP) as port:

        async def add() -> natkit.PortMapping:
            return await (await UPnPMapper.discover()).add(port, protocol="udp", lease=120)

        m = run_in_node(lab, "lan", add)
        try:
            assert m.protocol == "udp"
            assert udp_ask(lab, "wan", m.external_ip, m.external_port, b"ping") == b"echo:ping"
        finally:
            run_in_node(lab, "lan", lambda: _delete(m.external_port, "udp"))
        assert udp_ask(lab, "wan", m.external_ip, m.external_port, b"ping", timeout=0.5) is None


async def _delete(port: int, proto: str) -> None:
    await (await UPnPMapper.discover()).delete(port, proto)


def test_lease_expires(lab: Lab) -> None:
    with http_server(lab, "lan", C.LAN_IP) as port:

        async def add() -> natkit.PortMapping:
            return await (await UPnPMapper.discover()).add(port, lease=2)

        m = run_in_node(lab, "lan", add)
        assert m.lease == 2
        assert reachable(lab, "wan", m.external_ip, m.external_port)
        deadline = time.monotonic() + 15
        while f"dport {port} dnat" in lab.router_rules():
            assert time.monotonic() < deadline, "miniupnpd kept an expired lease"
            time.sleep(0.25)
        assert not reachable(lab, "wan", m.external_ip, m.external_port)


def test_open_port_one_call_blocking(lab: Lab) -> None:
    """The seed's intent in one line, from a blocking script on the LAN host."""
    with http_server(lab, "lan", C.LAN_IP, 0, "one call") as port:

        def script() -> tuple[str, bool]:
            with natkit.open_port(port, lease=120) as p:
                addr = p.public_address
                ok = http_get(lab, "wan", *_split(addr)) == "one call"
            return addr, ok

        addr, ok = call_in_node(lab, "lan", script)
        assert addr == f"{C.RTR_WAN_IP}:{port}" and ok
        assert not reachable(lab, "wan", *_split(addr)), "mapping left behind after the with block"


async def test_open_port_async_context_manager(lab: Lab) -> None:
    with http_server(lab, "lan", C.LAN_IP, 0, "async") as port:

        async def run() -> str:
            async with await natkit.open_port_async(port, lease=120) as p:
                return p.public_address

        addr = run_in_node(lab, "lan", run)
        assert not reachable(lab, "wan", *_split(addr))


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def test_conflict_with_another_host(lab: Lab) -> None:
    """718 from someone else's mapping: natkit picks another port, or says who holds it."""
    with http_server(lab, "lan", C.LAN_IP, 0, "mine") as port:

        async def dev_takes_it() -> None:
            await (await UPnPMapper.discover()).add(port, lease=300, description="dev's")

        run_in_node(lab, "dev", dev_takes_it)
        try:

            async def lan_explicit() -> None:
                await (await UPnPMapper.discover()).add(port, external_port=port, lease=300)

            with pytest.raises(MappingConflictError) as info:
                run_in_node(lab, "lan", lan_explicit)
            assert info.value.code == 718 and C.DEV_IP in str(info.value)

            async def lan_any() -> natkit.PortMapping:
                return await (await UPnPMapper.discover()).add(port, lease=300)

            m = run_in_node(lab, "lan", lan_any)
            assert m.external_port != port and m.internal_port == port
            assert http_get(lab, "wan", m.external_ip, m.external_port) == "mine"
            run_in_node(lab, "lan", lambda: _delete(m.external_port, "tcp"))
        finally:
            run_in_node(lab, "dev", lambda: _delete(port, "tcp"))


def test_own_stale_mapping_is_refreshed(lab: Lab) -> None:
    """A mapping left by an earlier run of ours (same host, same port) is simply re-used."""
    with http_server(lab, "lan", C.LAN_IP) as port:

        async def twice() -> tuple[int, int]:
            a = await (await UPnPMapper.discover()).add(port, lease=300, description="run 1")
            b = await (await UPnPMapper.discover()).add(port, lease=300, description="run 2")
            return a.external_port, b.external_port

        first, second = run_in_node(lab, "lan", twice)
        assert first == second == port
        assert reachable(lab, "wan", C.RTR_WAN_IP, port)
        run_in_node(lab, "lan", lambda: _delete(port, "tcp"))


def test_no_igd_is_a_clear_error_in_bounded_time(make_lab) -> None:  # type: ignore[no-untyped-def]
    off = make_lab("noigd", portmap=frozenset({"natpmp", "pcp"}))
    t0 = time.monotonic()
    with pytest.raises(DiscoveryError, match="is UPnP enabled on the router"):
        run_in_node(off, "lan", lambda: discover_igd(timeout=1.0))
    assert time.monotonic() - t0 < 3
