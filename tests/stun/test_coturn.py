"""Binding and RFC 5780 discovery against a real coturn on loopback (no NAT in between)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from natkit.stun import (
    StunTimeoutError,
    StunTransportError,
    StunUdp,
    binding_tcp,
    binding_udp,
    discover_behaviour,
    discover_behaviour_sync,
)
from natkit.stun.client import BindingResult
from natkit.stun.retransmit import retransmit_schedule

from .conftest import Coturn, free_port_pair

LAB = {"rto": 0.1, "timeout": 1.5}  # what a quick report uses
EIM = "endpoint-independent"


async def test_binding_udp_gets_our_own_address(coturn5780: Coturn) -> None:
    [result] = await binding_udp([coturn5780.spec], local_ip="127.0.0.1", **LAB)
    assert isinstance(result, BindingResult)
    assert result.local[0] == "127.0.0.1"
    assert result.mapped == result.local  # no NAT on loopback
    assert result.source == coturn5780.primary
    assert result.response.other_address == ("127.0.0.2", coturn5780.port + 1)
    assert result.response.response_origin == coturn5780.primary
    assert result.transmissions == 1
    assert result.transport == "udp"
    json.dumps(result.to_json())


async def test_binding_udp_several_servers_from_one_socket(
    coturn5780: Coturn, coturn_one_ip: Coturn
) -> None:
    dead = free_port_pair(("127.0.0.1",))  # nothing listens there
    results = await binding_udp(
        [coturn5780.spec, coturn_one_ip.spec, f"127.0.0.1:{dead}"],
        local_ip="127.0.0.1",
        rto=0.1,
        timeout=0.5,
    )
    first, second, third = results
    assert isinstance(first, BindingResult) and isinstance(second, BindingResult)
    assert first.local == second.local == first.mapped == second.mapped
    assert second.response.other_address is None  # one IP: no RFC 5780
    assert isinstance(third, StunTimeoutError)
    assert f"127.0.0.1:{dead}" in str(third)


async def test_binding_tcp_gets_our_own_address(coturn5780: Coturn) -> None:
    result = await binding_tcp(coturn5780.spec, local_ip="127.0.0.1", timeout=2.0)
    assert result.transport == "tcp"
    assert result.local[0] == "127.0.0.1"
    assert result.mapped == result.local
    assert result.source == coturn5780.primary


async def test_binding_tcp_refused() -> None:
    dead = free_port_pair(("127.0.0.1",))
    with pytest.raises(StunTransportError, match="cannot connect"):
        await binding_tcp(f"127.0.0.1:{dead}", local_ip="127.0.0.1", timeout=2.0)


async def test_rfc5780_discovery_on_loopback(coturn5780: Coturn) -> None:
    report = await discover_behaviour([coturn5780.spec], local_ip="127.0.0.1", **LAB)
    assert report.rfc5780
    assert report.primary == coturn5780.spec
    assert report.other_address == f"127.0.0.2:{coturn5780.port + 1}"
    assert report.mapping == EIM
    assert report.filtering == EIM
    assert report.port_preserving is True
    assert report.hairpinning is True
    assert report.behind_nat is False
    assert report.mapped == report.local
    assert report.notes == ()
    assert report.foreign_packets == 0
    data = json.loads(json.dumps(report.to_json()))
    assert data["mapping"] == data["filtering"] == EIM
    assert data["rfc5780"] is True


async def test_rfc5780_discovery_with_rfc_defaults_is_quick_too(coturn5780: Coturn) -> None:
    # The RFC's initial RTO of 0.5 s: with answering servers nothing waits for it.
    report = await discover_behaviour([coturn5780.spec], local_ip="127.0.0.1")
    assert (report.mapping, report.filtering) == (EIM, EIM)


async def test_chosen_local_port_is_kept(coturn5780: Coturn) -> None:
    port = free_port_pair(("127.0.0.1",))
    report = await discover_behaviour(
        [coturn5780.spec], local_ip="127.0.0.1", local_port=port, **LAB
    )
    assert report.local == report.mapped == f"127.0.0.1:{port}"
    assert report.port_preserving is True


async def test_one_ip_coturn_answers_change_request_with_420(coturn_one_ip: Coturn) -> None:
    async with await StunUdp.open("127.0.0.1") as sock:
        result = await sock.binding(
            coturn_one_ip.primary,
            retransmit_schedule(0.1, timeout=1.5),
            change_ip=True,
            change_port=True,
        )
    assert result.response.error_code == 420
    assert "RFC 5780" in result.response.error_reason
    assert result.mapped is None


async def test_discovery_without_rfc5780_reports_filtering_unknown(coturn_one_ip: Coturn) -> None:
    report = await discover_behaviour([coturn_one_ip.spec], local_ip="127.0.0.1", **LAB)
    assert not report.rfc5780
    assert report.filtering is None  # unknown, not guessed
    assert report.mapping is None  # one server without RFC 5780 cannot tell
    assert report.port_preserving is True
    assert report.mapped == report.local
    assert any("RFC 5780" in note for note in report.notes)
    assert any("second server" in note for note in report.notes)


async def test_mapping_across_two_servers_without_rfc5780(
    coturn_factory: Callable[..., Coturn],
) -> None:
    a = coturn_factory("127.0.0.1")
    b = coturn_factory("127.0.0.2")
    report = await discover_behaviour([a.spec, b.spec], local_ip="127.0.0.1", **LAB)
    assert not report.rfc5780
    assert report.mapping == EIM  # the same mapping towards two IPs
    assert report.filtering is None
    assert [x.mapped for x in report.answers] == [report.mapped, report.mapped]


async def test_rfc5780_server_preferred_whatever_its_place(
    coturn5780: Coturn, coturn_one_ip: Coturn
) -> None:
    report = await discover_behaviour(
        [coturn_one_ip.spec, coturn5780.spec], local_ip="127.0.0.1", **LAB
    )
    assert report.primary == coturn5780.spec
    assert (report.mapping, report.filtering) == (EIM, EIM)
    assert len(report.answers) == 2 and all(a.error is None for a in report.answers)


def test_sync_facade(coturn5780: Coturn) -> None:
    report = discover_behaviour_sync([coturn5780.spec], local_ip="127.0.0.1", **LAB)
    assert (report.mapping, report.filtering, report.port_preserving) == (EIM, EIM, True)


async def test_concurrent_discoveries_do_not_mix(coturn5780: Coturn) -> None:
    reports = await asyncio.gather(
        *(discover_behaviour([coturn5780.spec], local_ip="127.0.0.1", **LAB) for _ in range(5))
    )
    assert len({r.local for r in reports}) == 5
    assert all(r.mapped == r.local and r.filtering == EIM for r in reports)
