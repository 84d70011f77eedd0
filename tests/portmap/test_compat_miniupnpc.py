"""natkit.compat.miniupnpc against the fake IGD on loopback (no root, nothing leaves 127/8).

The fake runs on an event loop in a thread of its own, so the compat module's blocking
calls can be made as the binding's users make them: from plain code, from a thread, and
from inside a coroutine whose loop they block. The lab test (tests/lab/
test_compat_miniupnpc.py) compares the same calls with the real PyPI binding's answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import itertools
import os
import pickle
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natkit.compat import miniupnpc
from natkit.compat.miniupnpc import IGDControlURL, MiniupnpcError
from tests.fakegw.igd import PUBLIC_IP, FakeIGD, Quirks

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
UNREACHABLE_COUNTER = 4294967293  # the binding's UPNPCOMMAND_HTTP_ERROR (-3) as unsigned


@contextmanager
def fake_igd(model: str = "pfsense", quirks: Quirks | None = None) -> Iterator[FakeIGD]:
    """A FakeIGD served by an event loop in a background thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    igd = FakeIGD(model, quirks=quirks)
    asyncio.run_coroutine_threadsafe(igd.__aenter__(), loop).result(5)
    try:
        yield igd
    finally:
        asyncio.run_coroutine_threadsafe(igd.__aexit__(None, None, None), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@pytest.fixture
def igd() -> Iterator[FakeIGD]:
    with fake_igd() as fake:
        yield fake


def selected(igd: FakeIGD) -> miniupnpc.UPnP:
    u = miniupnpc.UPnP(ssdp_target=igd.ssdp_target)
    u.discoverdelay = 200
    assert u.discover() == 1
    u.selectigd()
    return u


# ---- the binding's tutorial, call by call ------------------------------------------------


def test_tutorial_flow_maps_lists_and_deletes(igd: FakeIGD) -> None:
    u = miniupnpc.UPnP(ssdp_target=igd.ssdp_target)
    assert (u.discoverdelay, u.lanaddr, u.wanaddr, u.multicastif, u.minissdpdsocket) == (
        0, "", "", None, None,
    )  # fmt: skip
    u.discoverdelay = 200
    assert u.discover() == 1
    control = u.selectigd()
    assert control == igd.base + "/ctl/IPConn" and isinstance(control, str)
    assert (u.lanaddr, u.wanaddr) == ("127.0.0.1", PUBLIC_IP)
    assert u.externalipaddress() == PUBLIC_IP
    assert u.statusinfo() == ("Connected", 1234, "ERROR_NONE")
    assert u.connectiontype() == "IP_Routed"

    assert u.addportmapping(8080, "TCP", u.lanaddr, 8081, "my web", "", 600) is True
    entry = igd.entry(8080)
    assert entry is not None and (entry.client, entry.internal_port, entry.lease) == (
        "127.0.0.1", 8081, 600,
    )  # fmt: skip
    spec = u.getspecificportmapping(8080, "TCP")
    assert spec is not None
    client, iport, desc, enabled, lease = spec
    assert (client, iport, desc, enabled) == ("127.0.0.1", 8081, "my web", True)
    assert 0 < lease <= 600
    assert u.getgenericportmapping(0) == (
        8080, "TCP", ("127.0.0.1", 8081), "my web", "1", "", lease,
    )  # fmt: skip
    assert u.getgenericportmapping(1) is None
    assert u.getportmappingnumberofentries() == 1

    assert u.deleteportmapping(8080, "TCP") is True
    assert igd.entry(8080) is None
    assert u.getspecificportmapping(8080, "TCP") is None
    assert u.getgenericportmapping(0) is None


def test_selectigd_result_is_the_control_url_that_also_acts_as_the_gateway(igd: FakeIGD) -> None:
    u = miniupnpc.UPnP(ssdp_target=igd.ssdp_target)
    u.discover()
    gateway = u.selectigd()  # the tutorials' misuse: the result used as the gateway object
    assert type(gateway) is IGDControlURL and gateway.startswith("http://")
    assert gateway.lanaddr == u.lanaddr == "127.0.0.1"
    assert gateway.addportmapping(9000, "UDP", gateway.lanaddr, 9000, "game", "") is True
    assert igd.entry(9000, "UDP") is not None
    assert gateway.externalipaddress() == PUBLIC_IP
    assert gateway.deleteportmapping(9000, "UDP") is True
    with pytest.raises(AttributeError, match="no attribute 'addportmaping'"):
        gateway.addportmaping  # noqa: B018  # a typo is still an AttributeError
    copy = pickle.loads(pickle.dumps(gateway))
    assert copy == gateway and type(copy) is str


def test_lower_case_protocol_is_sent_upper_case(igd: FakeIGD) -> None:
    igd.quirks.upper_case_protocol_only = True  # routers that answer "tcp" with 402
    u = selected(igd)
    assert u.addportmapping(8500, "tcp", u.lanaddr, 8500, "x", "") is True
    assert igd.calls[-1].args["NewProtocol"] == "TCP"
    assert u.deleteportmapping(8500, "tcp") is True


def test_description_with_markup_characters_reaches_the_router_intact(igd: FakeIGD) -> None:
    u = selected(igd)
    desc = "a <b> & 'c'"  # the binding sends this unescaped, as broken XML
    u.addportmapping(8600, "TCP", u.lanaddr, 8600, desc, None)
    entry = igd.entry(8600)
    assert entry is not None and entry.description == desc
    assert igd.calls[-1].args["NewRemoteHost"] == ""  # None goes out empty, as the binding's


def test_none_description_is_the_binding_default(igd: FakeIGD) -> None:
    u = selected(igd)
    u.addportmapping(8601, "TCP", u.lanaddr, 8601, None, "")
    entry = igd.entry(8601)
    assert entry is not None and entry.description == "libminiupnpc"
    assert entry.lease == 0  # no lease given: the binding asks for 0 (permanent)


def test_addanyportmapping_returns_the_reserved_port_with_a_permanent_lease(
    igd: FakeIGD,
) -> None:
    u = selected(igd)
    u.addportmapping(7000, "TCP", "127.0.0.9", 7000, "someone else", "")
    port = u.addanyportmapping(7000, "TCP", u.lanaddr, 7000, "mine", "")
    assert port != 7000
    assert igd.calls[-1].action == "AddAnyPortMapping"
    assert igd.calls[-1].args["NewLeaseDuration"] == "0"
    entry = igd.entry(port)
    assert entry is not None and entry.client == "127.0.0.1"


def test_deleteportmappingrange(igd: FakeIGD) -> None:
    u = selected(igd)
    for port in (7100, 7101, 7200):
        u.addportmapping(port, "TCP", u.lanaddr, port, "r", "")
    assert u.deleteportmappingrange(7100, 7150, "TCP", 1) is True
    assert igd.entry(7100) is None and igd.entry(7101) is None and igd.entry(7200) is not None
    with pytest.raises(MiniupnpcError, match=r"^PortMappingNotFound: .*7100-7150") as info:
        u.deleteportmappingrange(7100, 7150, "TCP", 1)
    assert info.value.code == 730


def test_counters_wrap_like_the_binding_and_never_raise(igd: FakeIGD) -> None:
    u = miniupnpc.UPnP(ssdp_target=igd.ssdp_target)
    assert u.totalbytesent() == UNREACHABLE_COUNTER  # nothing selected yet
    u.discover()
    u.selectigd()
    assert u.totalbytesent() == 5_000_000_123 % 2**32  # the binding's unsigned int
    assert u.totalbytereceived() == 7654321
    assert (u.totalpacketsent(), u.totalpacketreceived()) == (4321, 5432)
    igd.quirks.faults["GetTotalPacketsSent"] = 501
    assert u.totalpacketsent() == 0  # a refusal reads 0, as the binding's


def test_counters_of_a_router_that_went_away() -> None:
    with fake_igd() as igd:
        u = selected(igd)
    assert u.totalbytesent() == UNREACHABLE_COUNTER


def test_selectigd_with_a_root_description_url_needs_no_discovery(igd: FakeIGD) -> None:
    u = miniupnpc.UPnP()
    control = u.selectigd(igd.location)
    assert control == igd.base + "/ctl/IPConn"
    assert u.lanaddr == "127.0.0.1"
    assert u.externalipaddress() == PUBLIC_IP
    assert igd.searches == []  # no SSDP at all


# ---- errors: the binding's Exception, with a message that says what to do ----------------


def test_conflict_is_an_exception_that_starts_with_the_binding_text(igd: FakeIGD) -> None:
    u = selected(igd)
    u.addportmapping(8080, "TCP", "127.0.0.9", 8080, "other host", "")
    with pytest.raises(Exception) as info:  # what binding users catch
        u.addportmapping(8080, "TCP", u.lanaddr, 8080, "mine", "")
    err = info.value
    assert isinstance(err, MiniupnpcError)
    assert str(err).startswith("ConflictInMappingEntry: ")
    assert err.binding_message == "ConflictInMappingEntry" and err.code == 718
    assert "8080/TCP" in str(err) and "pick another port" in str(err)


def test_refusals_and_http_errors(igd: FakeIGD) -> None:
    u = selected(igd)
    igd.quirks.faults["GetStatusInfo"] = 606
    with pytest.raises(MiniupnpcError, match=r"^Action not authorized: .*settings") as info:
        u.statusinfo()
    assert info.value.code == 606
    igd.quirks.http_errors["AddPortMapping"] = 500
    with pytest.raises(MiniupnpcError, match=r"^Miniupnpc HTTP error: .*HTTP 500"):
        u.addportmapping(8800, "TCP", u.lanaddr, 8800, "x", "")
    igd.quirks.faults["GetSpecificPortMappingEntry"] = 501
    assert u.getspecificportmapping(8800, "TCP") is None  # lookups answer None, as the binding's


def test_calls_before_selectigd(igd: FakeIGD) -> None:
    u = miniupnpc.UPnP(ssdp_target=igd.ssdp_target)
    with pytest.raises(MiniupnpcError, match=r"^No UPnP device discovered: discover\(\)"):
        u.selectigd()
    with pytest.raises(MiniupnpcError, match=r"^Miniupnpc HTTP error: .*selectigd\(\)"):
        u.addportmapping(1234, "TCP", "127.0.0.1", 1234, "x", "")
    assert u.getspecificportmapping(1234, "TCP") is None
    assert u.getgenericportmapping(0) is None


def test_discover_with_nothing_answering_raises_saying_so() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # a port that hears the searches and never answers
        u = miniupnpc.UPnP(ssdp_target=silent.getsockname())
        with pytest.raises(
            MiniupnpcError, match="no UPnP Internet Gateway Device answered"
        ) as info:
            u.discover()
    assert info.value.binding_message == "Success"  # what the binding says here
    with pytest.raises(MiniupnpcError, match=r"^No UPnP device discovered: no UPnP"):
        u.selectigd()


def test_selectigd_with_a_bad_url() -> None:
    with pytest.raises(MiniupnpcError, match="not an http:// URL with an IPv4 address"):
        miniupnpc.UPnP().selectigd("https://router.example/desc.xml")


# ---- argument forms ----------------------------------------------------------------------


def test_argument_forms_are_the_bindings(igd: FakeIGD) -> None:
    u = selected(igd)
    with pytest.raises(TypeError, match="'str' object cannot be interpreted as an integer"):
        u.addportmapping("8080", "TCP", u.lanaddr, 8080, "x", "")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="argument 2 must be str, not None"):
        u.addportmapping(8080, None, u.lanaddr, 8080, "x", "")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="argument 5 must be str or None, not int"):
        u.addportmapping(8080, "TCP", u.lanaddr, 8080, 5, "")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        u.addportmapping(8080, "TCP", u.lanaddr, 8080, "x")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        u.addportmapping(eport=8080)  # type: ignore[call-arg]  # positional only, as in C
    with pytest.raises(ValueError, match="embedded null character"):
        u.addportmapping(8080, "T\0CP", u.lanaddr, 8080, "x", "")
    with pytest.raises(OverflowError, match="external port must be from 0 to 65535, not 70000"):
        u.addportmapping(70000, "TCP", u.lanaddr, 8080, "x", "")
    with pytest.raises(OverflowError, match="leaseDuration"):
        u.addportmapping(8080, "TCP", u.lanaddr, 8080, "x", "", -1)
    with pytest.raises(OverflowError, match="manage"):
        u.deleteportmappingrange(1, 2, "TCP", 300)
    with pytest.raises(TypeError, match="argument 1 must be str or None, not int"):
        u.selectigd(1)  # type: ignore[arg-type]
    assert igd.table == {}  # nothing reached the router


def test_the_whole_public_surface_of_the_binding_is_there() -> None:
    # The reference: a Linux test dependency (its pip install fails elsewhere); in CI it
    # must be there.
    real = pytest.importorskip("miniupnpc") if not IN_CI else importlib.import_module("miniupnpc")
    theirs = {name for name in dir(real.UPnP) if not name.startswith("_")}
    ours = {name for name in dir(miniupnpc.UPnP) if not name.startswith("_")}
    assert theirs == ours
    assert {name for name in dir(real) if not name.startswith("_")} <= set(dir(miniupnpc))


def test_attributes_are_the_bindings() -> None:
    u = miniupnpc.UPnP("192.168.1.2", None, 50, 1)
    assert (u.multicastif, u.minissdpdsocket, u.discoverdelay, u.localport) == (
        "192.168.1.2", None, 50, 1,
    )  # fmt: skip
    with pytest.raises(AttributeError):
        u.lanaddr = "10.0.0.1"  # type: ignore[misc]  # read-only, as the binding's
    with pytest.raises(AttributeError):
        u.wanaddr = "10.0.0.1"  # type: ignore[misc]
    with pytest.raises(TypeError):
        u.discoverdelay = 1.5  # type: ignore[assignment]
    with pytest.raises(Exception, match=r"^Invalid localport value"):
        miniupnpc.UPnP(localport=80)


def test_multicastif_names_an_interface_by_address_or_name() -> None:
    from natkit.compat._binding_args import interface_address

    assert interface_address("127.0.0.1") == "127.0.0.1"
    assert interface_address("lo") == "127.0.0.1"
    with pytest.raises(MiniupnpcError, match=r"^Miniupnpc Socket error: .*'nosuch0' is neither"):
        miniupnpc.UPnP("nosuch0").discover()  # refused before anything is sent


@given(st.text(max_size=200))
def test_numbers_from_the_router_are_read_as_c_atoi_does(text: str) -> None:
    from natkit.compat._binding_args import leading_int

    value = leading_int(text)  # never raises, whatever the router wrote
    digits = re.match(r"\s*([0-9]+)", text)
    assert value == (int(digits.group(1)[:20]) if digits else 0)


# ---- blocking calls from anywhere ---------------------------------------------------------


def test_works_from_threads_and_from_inside_a_running_event_loop(igd: FakeIGD) -> None:
    ports_to_use = itertools.count(20000)  # next() on it is atomic

    def tutorial() -> int:
        u = selected(igd)
        port = next(ports_to_use)
        u.addportmapping(port, "TCP", u.lanaddr, port, "thread", "")
        found = u.getspecificportmapping(port, "TCP")
        u.deleteportmapping(port, "TCP")
        assert found is not None
        return found[1]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        ports = list(pool.map(lambda _: tutorial(), range(4)))
    assert sorted(ports) == [20000, 20001, 20002, 20003]

    async def blocking_inside_a_coroutine() -> int:
        return tutorial()  # blocks this loop, as the binding would; still works

    assert asyncio.run(blocking_inside_a_coroutine()) == 20004
