"""Every RFC 5780 classification path, against a scripted server that simulates the NAT's
mapping and filtering on loopback (see fakestun.py), and servers that misbehave."""

from __future__ import annotations

import pytest

from natkit.stun import StunUdp, binding_udp, discover_behaviour
from natkit.stun.client import BindingResult
from natkit.stun.retransmit import retransmit_schedule

from .fakestun import PUBLIC_IP, FakeStun

EIM, ADM, APDM = "endpoint-independent", "address-dependent", "address-and-port-dependent"
QUICK = {"rto": 0.05, "timeout": 0.5}


@pytest.mark.parametrize(("mapping", "expected"), [("eim", EIM), ("adm", ADM), ("apdm", APDM)])
@pytest.mark.parametrize(
    ("filtering", "expected_filtering"), [("eif", EIM), ("adf", ADM), ("apdf", APDM)]
)
async def test_classification(
    mapping: str, expected: str, filtering: str, expected_filtering: str
) -> None:
    async with FakeStun(mapping=mapping, filtering=filtering) as server:
        report = await discover_behaviour([server.spec], local_ip="127.0.0.1", **QUICK)
    assert report.mapping == expected
    assert report.filtering == expected_filtering
    assert report.behind_nat is True
    assert report.mapped is not None and report.mapped.startswith(PUBLIC_IP)
    assert report.port_preserving is (mapping == "eim")
    assert report.hairpinning is False  # nothing listens on the simulated public address
    assert report.notes == ()


async def test_filtering_nat_with_rfc_defaults() -> None:
    # The slowest case: both filtering tests go unanswered and wait their whole budget
    # (sized by test I's round trip; its wall time is measured by the benchmark, not here).
    async with FakeStun(mapping="apdm", filtering="apdf") as server:
        report = await discover_behaviour([server.spec], local_ip="127.0.0.1", rto=0.1)
    assert (report.mapping, report.filtering) == (APDM, APDM)


async def test_420_on_change_request_leaves_filtering_unknown() -> None:
    async with FakeStun(change="420", filtering="apdf") as server:
        report = await discover_behaviour([server.spec], local_ip="127.0.0.1", **QUICK)
    assert report.rfc5780 and report.mapping == EIM
    assert report.filtering is None
    assert any("420" in note for note in report.notes)


async def test_server_ignoring_change_request_is_not_taken_for_open_filtering() -> None:
    async with FakeStun(change="ignore") as server:
        report = await discover_behaviour([server.spec], local_ip="127.0.0.1", **QUICK)
    assert report.filtering is None  # not "endpoint-independent"
    assert any("ignores the request" in note for note in report.notes)


async def test_other_address_on_the_same_ip_is_not_used() -> None:
    async with FakeStun(other_address="same-ip") as server:
        report = await discover_behaviour([server.spec], local_ip="127.0.0.1", **QUICK)
    assert not report.rfc5780
    assert report.mapping is None and report.filtering is None
    assert any("not another IP and port" in note for note in report.notes)


async def test_mapping_across_two_servers_without_rfc5780() -> None:
    # Two non-RFC 5780 servers at different IPs; the simulated NAT is address-dependent.
    async with FakeStun(mapping="adm", other_address="none") as server:
        servers = [server.spec, f"127.0.0.2:{server.port + 1}"]
        report = await discover_behaviour(servers, local_ip="127.0.0.1", **QUICK)
        # Add a second port on the first IP: now the port alone is seen not to matter.
        three = [*servers, f"127.0.0.1:{server.port + 1}"]
        report3 = await discover_behaviour(three, local_ip="127.0.0.1", **QUICK)
    assert report.mapping is None  # changed between IPs: ADM or APDM, not guessed
    assert report.filtering is None
    assert report3.mapping == ADM


async def test_retransmission_recovers_lost_requests() -> None:
    async with FakeStun(drop_first=2) as server, await StunUdp.open("127.0.0.1") as sock:
        result = await sock.binding(
            ("127.0.0.1", server.port), retransmit_schedule(0.05, timeout=1.0)
        )
    assert result.transmissions == 3
    assert result.mapped == (PUBLIC_IP, result.local[1])


async def test_junk_and_foreign_answers_are_ignored_and_counted() -> None:
    async with FakeStun(junk=True) as server:
        [result] = await binding_udp([server.spec], local_ip="127.0.0.1", **QUICK)
        report = await discover_behaviour([server.spec], local_ip="127.0.0.1", **QUICK)
    assert isinstance(result, BindingResult) and result.mapped is not None
    assert result.mapped[0] == PUBLIC_IP  # not the foreign answer's 127.0.0.66
    assert (report.mapping, report.filtering) == (EIM, EIM)
    assert report.foreign_packets >= 6  # junk + foreign answer for each of 3+ requests


async def test_no_server_answers() -> None:
    async with FakeStun(drop_first=10**6) as server:
        report = await discover_behaviour([server.spec], local_ip="127.0.0.1", **QUICK)
    assert report.mapped is None and report.mapping is None and report.filtering is None
    assert report.answers[0].error is not None and "no STUN answer" in report.answers[0].error
    assert any("no STUN server answered" in note for note in report.notes)


async def test_no_servers_named() -> None:
    with pytest.raises(ValueError, match="--stun"):
        await discover_behaviour([])
    with pytest.raises(ValueError, match="--stun"):
        await binding_udp([])
