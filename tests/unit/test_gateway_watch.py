"""How often, and where, a kept mapping reads the routing table: on macOS/Windows (faked:
``sys.platform`` set, the command runner counting and answering with a table) at most every
10 s and in a worker thread; on Linux from /proc at every check, in the loop's own thread
(a thread that entered a network namespace must read its own). No time is measured: the
reads are counted, and the watch's clock is a number the test moves."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from natkit.errors import DiscoveryError
from natkit.net import routes
from tests.fakegw.pmp import FakePmpGateway, fake_pmp_gateway
from tests.unit.test_pmp_fakegw import keeper

NETSTAT = """\
Routing tables

Internet:
Destination        Gateway            Flags        Netif Expire
default            {gw}          UGScg          en0
127                127.0.0.1          UCS            lo0
"""


class Table:
    """The routing table's command, counted: which thread ran it, and what it says."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, gateway: str) -> None:
        self.gateway = gateway
        self.threads: list[threading.Thread] = []
        monkeypatch.setattr(routes, "run_command", self.run)

    def run(self, argv: list[str], timeout: float = routes.COMMAND_TIMEOUT) -> str:
        self.threads.append(threading.current_thread())
        if not self.gateway:
            raise DiscoveryError("cannot run /usr/sbin/netstat")
        return NETSTAT.format(gw=self.gateway)


@pytest.fixture
def mac(monkeypatch: pytest.MonkeyPatch) -> Table:
    monkeypatch.setattr(sys, "platform", "darwin")
    return Table(monkeypatch, "127.0.0.1")  # loopback: a keeper that follows it stays here


@pytest.fixture
def gw() -> Iterator[FakePmpGateway]:
    with fake_pmp_gateway() as fake:
        yield fake


async def test_off_linux_the_table_is_read_every_10_s_in_a_thread(mac: Table) -> None:
    now = [1000.0]
    watch = routes.GatewayWatch(clock=lambda: now[0])
    assert [await watch.current() for _ in range(5)] == ["127.0.0.1"] * 5
    assert len(mac.threads) == 1, "read at every call"
    assert mac.threads[0] is not threading.current_thread(), "read on the event loop"
    now[0] += 9.9
    mac.gateway = "192.168.1.1"  # changed, but not yet read again
    assert await watch.current() == "127.0.0.1"
    now[0] += 0.1
    assert await watch.current() == "192.168.1.1"
    assert len(mac.threads) == 2
    now[0] += 10
    mac.gateway = ""  # the table cannot be read: no gateway known, not an error
    assert await watch.current() is None


async def test_linux_reads_proc_at_every_call_in_place(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "lo\t00000000\t0100007F\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    )
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(routes, "ROUTE_FILES", (str(table),))
    reads: list[threading.Thread] = []
    read_proc = routes._read_proc

    def counted() -> list[routes.Route]:
        reads.append(threading.current_thread())
        return read_proc()

    monkeypatch.setattr(routes, "_read_proc", counted)
    monkeypatch.setattr(routes, "run_command", lambda *a, **k: pytest.fail("a command on Linux"))
    watch = routes.GatewayWatch(clock=lambda: 0.0)
    assert [await watch.current() for _ in range(3)] == ["127.0.0.1"] * 3
    assert reads == [threading.current_thread()] * 3
    assert await routes.read_routes_async() != []
    assert reads[-1] is threading.current_thread()


async def test_read_routes_async_runs_the_command_in_a_thread(mac: Table) -> None:
    (default,) = [r for r in await routes.read_routes_async() if r.destination.prefixlen == 0]
    assert str(default.gateway) == "127.0.0.1"
    assert mac.threads and mac.threads[0] is not threading.current_thread()


async def test_a_kept_mapping_reads_the_table_once_per_10_s_off_linux(
    mac: Table, gw: FakePmpGateway
) -> None:
    """A keeper on a (faked) Mac that follows the default gateway: the fake PCP gateway on
    127.0.0.1 is named for the start (no discovery), then the keeper follows the table
    (which says 127.0.0.1). Its checks are driven by hand, many per 10 s of the clock."""
    k, events = keeper(gw, check_interval=3600.0)  # checks only when the test calls _tick
    await k.start()
    try:
        k.fixed_gateway = None  # from now on it follows the default gateway
        now = [0.0]
        k.gateway_watch.clock = lambda: now[0]
        before = len(mac.threads)
        for _ in range(5):  # 5 checks (10 s at the default 2 s) within one interval
            await k._tick()
        assert len(mac.threads) - before == 1
        now[0] += routes.COMMAND_READ_INTERVAL
        for _ in range(5):
            await k._tick()
        assert len(mac.threads) - before == 2
        assert all(t is not threading.current_thread() for t in mac.threads)
        assert [e for e, _ in events] == ["ready"], "the same gateway: nothing to restore"
    finally:
        await k.close()
