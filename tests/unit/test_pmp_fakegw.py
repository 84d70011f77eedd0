"""Probe-and-choose and keep/renew/restore against a fake NAT-PMP + PCP gateway on loopback.

No root, no lab: natkit is pointed at 127.0.0.1 and the fake's port (``pmp_port``). Short
intervals stand in for a fast clock; waits are bounded (a failure, never a timing claim).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from natkit.errors import DiscoveryError, PcpError
from natkit.portmap.manager import KeptMapping, probe
from natkit.portmap.mapping import Method, PortMapping
from natkit.portmap.pmp_mappers import NatPmpMapper, PcpMapper
from tests.fakegw.pmp import EXTERNAL_IP, FakePmpGateway, fake_pmp_gateway

GW = "127.0.0.1"
PMP_ONLY: tuple[Method, ...] = ("pcp", "natpmp")  # never UPnP: no SSDP from the host
Events = list[tuple[str, dict[str, Any]]]


@pytest.fixture
def gw() -> Iterator[FakePmpGateway]:
    with fake_pmp_gateway() as fake:
        yield fake


def keeper(fake: FakePmpGateway, port: int = 4100, **kw: Any) -> tuple[KeptMapping, Events]:
    options: dict[str, Any] = {
        "gateway_ip": GW,
        "pmp_port": fake.port,
        "order": PMP_ONLY,
        "lease": 120,
        "timeout": 0.5,
        "check_interval": 0.05,
        "refresh_interval": 0.2,
        **kw,
    }
    k = KeptMapping(port, **options)
    events: Events = []
    k.on_event(lambda e, m, info: events.append((e, dict(info))))
    return k, events


async def until_true(cond: Callable[[], bool], limit: float = 10.0) -> None:
    """Wait (bounded) until ``cond()``; the fake's thread changes what it reads, so poll."""
    async with asyncio.timeout(limit):
        while not cond():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def until(events: Events, name: str, count: int = 1, limit: float = 10.0) -> None:
    """Wait (bounded) until ``name`` has been emitted ``count`` times."""
    await until_true(lambda: sum(1 for e, _ in events if e == name) >= count, limit)


# ---- probe and choose -----------------------------------------------------------------------


async def test_probe_prefers_pcp_when_both_answer(gw: FakePmpGateway) -> None:
    result = await probe(gateway_ip=GW, pmp_port=gw.port, order=PMP_ONLY)
    result.chosen.close()
    assert result.chosen.method == "pcp"
    assert result.gateway_ip == GW


async def test_probe_falls_back_to_natpmp_on_unsupp_version() -> None:
    with fake_pmp_gateway(pcp="unsupported") as fake:
        result = await probe(gateway_ip=GW, pmp_port=fake.port, order=PMP_ONLY)
        result.chosen.close()
    assert result.chosen.method == "natpmp"
    assert result.offered == {"natpmp": EXTERNAL_IP}
    assert "UNSUPP_VERSION" in result.refused["pcp"], result.refused


async def test_probe_chooses_natpmp_when_pcp_is_silent() -> None:
    with fake_pmp_gateway(pcp="silent") as fake:
        result = await probe(gateway_ip=GW, pmp_port=fake.port, order=PMP_ONLY, timeout=0.5)
        result.chosen.close()
    assert result.chosen.method == "natpmp"
    assert "pcp" in result.refused


async def test_probe_of_a_mute_gateway_is_a_discovery_error() -> None:
    with (
        fake_pmp_gateway(answering=False) as fake,
        pytest.raises(DiscoveryError, match="offers no port mapping") as info,
    ):
        await probe(gateway_ip=GW, pmp_port=fake.port, order=PMP_ONLY, timeout=0.3)
    assert f"{GW}:{fake.port}" in str(info.value)


async def test_pcp_to_a_natpmp_only_gateway_is_unsupp_version() -> None:
    with fake_pmp_gateway(pcp="unsupported") as fake:
        mapper = await PcpMapper.open(GW, port=fake.port)
        try:
            with pytest.raises(PcpError) as info:
                await mapper.add(4200, lease=60)
        finally:
            mapper.close()
    assert info.value.code == 1


# ---- the mappers against a real table ---------------------------------------------------------


@pytest.mark.parametrize("method", ["pcp", "natpmp"])
async def test_short_lifetime_and_another_port(method: str) -> None:
    with fake_pmp_gateway(max_lifetime=30, port_offset=7) as fake:
        mapper: PcpMapper | NatPmpMapper = (
            await PcpMapper.open(GW, port=fake.port)
            if method == "pcp"
            else await NatPmpMapper.open(GW, port=fake.port)
        )
        try:
            m = await mapper.add(4300, lease=3600)
            entry = fake.mapped("tcp", 4300)
            await mapper.remove(m)
            gone = fake.mapped("tcp", 4300)
        finally:
            mapper.close()
    assert (m.method, m.internal_port, m.external_port, m.lease) == (method, 4300, 4307, 30)
    assert m.external_ip == EXTERNAL_IP
    assert entry is not None and entry.external_port == 4307
    assert gone is None


@pytest.mark.parametrize("missing_delete", ["success", "no_resources"])
async def test_pcp_held_tells_kept_from_lost(missing_delete: str) -> None:
    with fake_pmp_gateway(missing_delete=missing_delete) as fake:
        mapper = await PcpMapper.open(GW, port=fake.port)
        try:
            m = await mapper.add(4400, lease=60)
            kept = await mapper.held(m)
            still = fake.mapped("tcp", 4400)
            fake.lose_mappings()
            lost = await mapper.held(m)
        finally:
            mapper.close()
    assert kept is True and lost is False
    assert still is not None and still.nonce == bytes.fromhex(m.nonce), "the probe touched it"


# ---- keep, renew, restore -----------------------------------------------------------------


async def test_silent_loss_is_seen_and_restored_with_pcp(gw: FakePmpGateway) -> None:
    k, events = keeper(gw)
    first = await k.start()
    try:
        assert k.loss_check == "pcp-nonce"
        assert events[0][1]["loss_check"] == "pcp-nonce"
        epoch = gw.epoch
        gw.lose_mappings()  # the epoch runs on: only the probe can tell
        await until(events, "restored")
        entry = gw.mapped("tcp", 4100)
    finally:
        await k.close()
    names = [e for e, _ in events]
    assert names == ["ready", "lost", "restored", "closed"], events
    assert "epoch ran on" in events[1][1]["reason"]
    assert gw.epoch >= epoch
    assert entry is not None and entry.external_port == first.external_port
    assert events[2][1]["changed"] is False
    assert gw.mapped("tcp", 4100) is None, "not deleted on close"


async def test_silent_loss_like_miniupnpd_answers() -> None:
    """miniupnpd answers a delete of a mapping it lost with NO_RESOURCES (lab-measured)."""
    with fake_pmp_gateway(missing_delete="no_resources") as fake:
        k, events = keeper(fake)
        await k.start()
        try:
            fake.lose_mappings()
            await until(events, "restored")
        finally:
            await k.close()
    assert [e for e, _ in events] == ["ready", "lost", "restored", "closed"], events


async def test_a_server_ignoring_nonces_falls_back_to_refreshing() -> None:
    """Without nonce checks the probe would delete the mapping: natkit re-makes it at once,
    then refreshes it every interval; a loss is repaired but (honestly) not reported."""
    with fake_pmp_gateway(checks_nonce=False) as fake:
        k, events = keeper(fake)
        await k.start()
        try:
            assert fake.mapped("tcp", 4100) is not None, "not re-made after the probe"
            await until_true(lambda: k.loss_check == "refresh")
            fake.lose_mappings()
            await until_true(lambda: fake.mapped("tcp", 4100) is not None)
        finally:
            await k.close()
    assert [e for e, _ in events] == ["ready", "closed"], events


async def test_natpmp_silent_loss_is_repaired_by_the_refresh() -> None:
    with fake_pmp_gateway(pcp="unsupported") as fake:
        k, events = keeper(fake)
        m = await k.start()
        try:
            assert m.method == "natpmp"
            await until_true(lambda: k.loss_check == "refresh")
            maps_before = fake.count(0, 2)
            fake.lose_mappings()
            await until_true(lambda: fake.mapped("tcp", 4100) is not None)
        finally:
            await k.close()
    assert fake.count(0, 2) > maps_before
    assert [e for e, _ in events] == ["ready", "closed"], events


@pytest.mark.parametrize("pcp_mode", ["serve", "unsupported"])
async def test_reboot_is_seen_from_the_epoch(pcp_mode: str) -> None:
    with fake_pmp_gateway(pcp=pcp_mode) as fake:
        k, events = keeper(fake, refresh_interval=3600)  # only the epoch can tell
        first = await k.start()
        try:
            fake.reboot()
            await until(events, "restored")
            entry = fake.mapped("tcp", 4100)
        finally:
            await k.close()
    names = [e for e, _ in events]
    assert names == ["ready", "lost", "restored", "closed"], events
    assert "rebooted" in events[1][1]["reason"]
    assert entry is not None and entry.external_port == first.external_port


async def test_a_gateway_that_stops_answering_is_lost_then_restored(gw: FakePmpGateway) -> None:
    k, events = keeper(gw)
    await k.start()
    try:
        gw.answering = False
        await until(events, "lost")
        await asyncio.sleep(0.3)
        assert not any(e == "restored" for e, _ in events), "restored while mute"
        gw.answering = True
        await until(events, "restored")
    finally:
        await k.close()
    assert "stopped answering" in events[1][1]["reason"]
    assert gw.mapped("tcp", 4100) is None


async def test_short_leases_are_renewed(gw: FakePmpGateway) -> None:
    gw.max_lifetime = 1  # renewed at half the granted lifetime
    k, events = keeper(gw, refresh_interval=3600)
    m = await k.start()
    try:
        assert m.lease == 1
        await until(events, "renewed", count=2)
        entry = gw.mapped("tcp", 4100)
    finally:
        await k.close()
    assert entry is not None
    assert not any(e == "lost" for e, _ in events), events
    assert all(not info["changed"] for e, info in events if e == "renewed")


@pytest.mark.parametrize("pcp_mode", ["serve", "unsupported"])
async def test_a_loss_is_looked_for_before_a_renewal(pcp_mode: str) -> None:
    """A renewal re-makes a lost mapping unseen, so where a loss can be seen (PCP's probe, a
    UPnP table: not here for NAT-PMP) it is looked for first."""
    with fake_pmp_gateway(pcp=pcp_mode, max_lifetime=2) as fake:
        k, events = keeper(fake, refresh_interval=3600)  # only the renewal comes round
        await k.start()
        try:
            fake.lose_mappings()
            await until_true(lambda: any(e in ("renewed", "restored") for e, _ in events))
        finally:
            await k.close()
    names = [e for e, _ in events]
    if pcp_mode == "serve":
        assert names[:3] == ["ready", "lost", "restored"], events
    else:  # NAT-PMP, no table: repaired by the renewal, and not reported
        assert names[:2] == ["ready", "renewed"] and "lost" not in names, events


async def test_a_restore_onto_another_port_is_reported_as_changed(gw: FakePmpGateway) -> None:
    other: list[PortMapping] = []
    k, events = keeper(gw)
    first = await k.start()
    try:
        # Someone else's mapping takes our external port while the router forgets ours.
        gw.lose_mappings()
        gw.port_offset = 1
        await until(events, "restored")
        assert k.mapping is not None
        other.append(k.mapping)
    finally:
        await k.close()
    restored = next(info for e, info in events if e == "restored")
    assert restored["changed"] is True and restored["previous"] == first.public_address
    assert other[0].external_port == first.external_port + 1


async def test_the_fake_answers_an_unknown_pcp_version_in_its_own() -> None:
    """RFC 6887 9 version negotiation, as the fake plays it (version 2, UNSUPP_VERSION)."""
    with fake_pmp_gateway() as fake:
        loop = asyncio.get_running_loop()
        got: asyncio.Future[bytes] = loop.create_future()

        class Once(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                if not got.done():
                    got.set_result(data)

        transport, _ = await loop.create_datagram_endpoint(
            Once, remote_addr=(GW, fake.port), family=socket.AF_INET
        )
        try:
            transport.sendto(bytes([3, 0]) + bytes(22))  # a PCP version 3 ANNOUNCE
            reply = await asyncio.wait_for(got, 5)
        finally:
            transport.close()
    assert (reply[0], reply[1], reply[3]) == (2, 0x80, 1)
