"""Discovery, ranking, quirk retries and errors against the fake IGD on loopback (no root).

Each router model serves a description modelled on the real router's and behaves with the
quirks that router is known for (tests/fakegw/igd.py); natkit finds it through an explicit
SSDP target, so nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from natkit.errors import DiscoveryError, NotAuthorizedError, ProtocolError, UPnPError
from natkit.portmap.discovery import discover_igd
from natkit.portmap.manager import KeptMapping
from natkit.portmap.upnp import UPnPMapper
from tests.fakegw.igd import MODELS, PUBLIC_IP, SSDP_GROUP_HOST, FakeIGD, Quirks, WanState

IGD1 = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
IP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
IP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
PPP1 = "urn:schemas-upnp-org:service:WANPPPConnection:1"
PPP2 = "urn:schemas-upnp-org:service:WANPPPConnection:2"
DSL_PPP1 = "urn:dslforum-org:service:WANPPPConnection:1"
TIMEOUT = 3.0


async def _mapper(igd: FakeIGD) -> UPnPMapper:
    return await UPnPMapper.discover(timeout=TIMEOUT, ssdp_target=igd.ssdp_target)


# ---- discovery of every model -------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "service_type", "control_path"),
    [
        ("livebox", PPP2, "/upnp/control/WANPPPConn1"),
        ("huawei_hg531", DSL_PPP1, "/ctrlu/WANPPPConnection_1"),
        # WANIPConnection:1 says Disconnected and 0.0.0.0: the PPP service wins.
        ("fritzbox", PPP1, "/igdupnp/control/WANPPPConn1"),
        ("tplink_er605", IP1, "/ipc"),
        ("eero", IP1, "/ctl/IPConn"),
        ("sagemcom_fast3890", IP1, "/upnp/control/WANIPConn1"),
        ("pfsense", IP2, "/ctl/IPConn"),
    ],
)
async def test_each_router_model_is_found_with_its_wan_service(
    model: str, service_type: str, control_path: str
) -> None:
    async with FakeIGD(model) as igd:
        gw = await discover_igd(timeout=TIMEOUT, ssdp_target=igd.ssdp_target)
        assert gw.location == igd.location
        assert gw.service.service_type == service_type
        assert gw.service.control_url == igd.base + control_path
        assert gw.connected is True and gw.external_ip == PUBLIC_IP
        assert gw.server == MODELS[model].server
        # ... and it maps: the entry is in the router's table.
        mapper = UPnPMapper(gw)
        m = await mapper.add(8080, lease=600)
        entry = igd.entry(m.external_port)
        assert entry is not None and (entry.client, entry.internal_port) == ("127.0.0.1", 8080)
        assert m.external_ip == PUBLIC_IP and m.lease == 600
        await mapper.remove(m)
        assert igd.entry(m.external_port) is None


async def test_searches_go_only_to_the_target_and_include_igd1() -> None:
    async with FakeIGD("pfsense", quirks=Quirks(only_st="nothing")) as igd:
        with pytest.raises(DiscoveryError, match="is UPnP enabled"):
            await discover_igd(timeout=1.0, ssdp_target=igd.ssdp_target)
        hosts = {host for host, _ in igd.searches}
        # Both copies of each search reached the target, unicast (the network guard would
        # have failed this test on any multicast datagram from the host's namespace).
        assert hosts == {f"127.0.0.1:{igd.ssdp_port}", SSDP_GROUP_HOST}
        assert IGD1 in {st for _, st in igd.searches}


async def test_sagemcom_answers_only_the_igd1_search() -> None:
    async with FakeIGD("sagemcom_fast3890") as igd:
        gw = await discover_igd(timeout=TIMEOUT, ssdp_target=igd.ssdp_target)
        assert gw.location == igd.location and igd.answers > 0
        # The first search is the one it answers: found without waiting for a later round.
        assert igd.searches[0][1] == "urn:schemas-upnp-org:device:InternetGatewayDevice:1"


async def test_eero_answers_only_searches_for_the_multicast_group() -> None:
    async with FakeIGD("eero") as igd:
        gw = await discover_igd(timeout=TIMEOUT, ssdp_target=igd.ssdp_target)
        assert gw.location == igd.location and igd.answers > 0


async def test_carp_router_answering_from_its_own_lan_address_is_accepted() -> None:
    async with FakeIGD("pfsense") as igd:
        assert igd.lan_address != igd.gateway_address  # searched .1, answers from .2
        gw = await discover_igd(timeout=TIMEOUT, ssdp_target=igd.ssdp_target)
        assert gw.location.startswith("http://127.0.0.2:")


# ---- ranking: a refused call lowers the rank, never drops the service ---------------------


@pytest.mark.parametrize(
    "quirks",
    [
        Quirks(faults={"GetStatusInfo": 401}),  # a UPnP fault
        Quirks(http_errors={"GetStatusInfo": 401}),  # a bare HTTP 401 (TR-064 style auth)
        Quirks(faults={"GetStatusInfo": 501}, http_errors={"GetExternalIPAddress": 500}),
    ],
    ids=["upnp-401", "http-401", "both-refused"],
)
async def test_refused_ranking_calls_keep_the_only_service(quirks: Quirks) -> None:
    async with FakeIGD("livebox", quirks=quirks) as igd:
        gw = await discover_igd(timeout=TIMEOUT, ssdp_target=igd.ssdp_target)
        assert gw.service.service_type == PPP2
        assert gw.connected is None  # the router did not say
        assert gw.notes and "GetStatusInfo" in gw.notes[0]
        m = await UPnPMapper(gw).add(8080)
        assert igd.entry(m.external_port) is not None


async def test_refused_status_ranks_below_a_connected_service() -> None:
    # FRITZ!Box: both services refuse GetStatusInfo; only the PPP one has a public address.
    async with FakeIGD("fritzbox", quirks=Quirks(http_errors={"GetStatusInfo": 401})) as igd:
        gw = await discover_igd(timeout=TIMEOUT, ssdp_target=igd.ssdp_target)
        assert gw.service.service_type == PPP1 and gw.external_ip == PUBLIC_IP


async def test_external_address_0000_is_unknown_not_public() -> None:
    async with FakeIGD("pfsense") as igd:
        igd.wan["/ctl/IPConn"] = WanState("Connected", "0.0.0.0")
        gw = await discover_igd(timeout=TIMEOUT, ssdp_target=igd.ssdp_target)
        assert gw.external_ip == ""
        m = await UPnPMapper(gw).add(8080)
        assert m.external_ip == "" and not m.publicly_reachable
        assert m.reachability_note == "the router did not say its external address"


async def test_broken_description_is_recovered() -> None:
    async with FakeIGD("fritzbox", quirks=Quirks(broken_description=True)) as igd:
        gw = await discover_igd(timeout=TIMEOUT, ssdp_target=igd.ssdp_target)
        assert "not valid XML" in gw.description.repaired
        assert gw.service.service_type == PPP1
        assert gw.description.friendly_name == ""  # its tag was the broken one
        assert gw.description.model_name == "FRITZ!Box 7590"


# ---- errors say what the router answered ----------------------------------------------------


async def test_gateway_refusal_ends_discovery_early_and_names_it() -> None:
    model = dataclasses.replace(MODELS["livebox"], fixture="tplink_er605.xml")
    async with FakeIGD(model) as igd:
        igd.services.clear()  # every control URL now answers 404: nothing answers SOAP
        t0 = time.monotonic()
        with pytest.raises(DiscoveryError) as info:
            await discover_igd(timeout=30.0, ssdp_target=igd.ssdp_target)
        elapsed = time.monotonic() - t0
    message = str(info.value)
    assert message.startswith("the router at 127.0.0.1 answered, but its UPnP service cannot")
    assert "HTTP 404" in message and "is UPnP enabled" not in message
    assert elapsed < 15.0, "waited out the whole timeout after the router itself refused"


async def test_606_names_the_router_the_action_and_its_answer() -> None:
    async with FakeIGD("fritzbox", quirks=Quirks(faults={"AddPortMapping": 606})) as igd:
        mapper = await _mapper(igd)
        with pytest.raises(NotAuthorizedError) as info:
            await mapper.add(8080)
    assert str(info.value).startswith(
        "the router at 127.0.0.1 (FRITZ!Box 7590) refused AddPortMapping: UPnP error 606"
    )
    assert "router's settings" in str(info.value)


async def test_bare_http_error_names_the_router() -> None:
    async with FakeIGD("livebox", quirks=Quirks(http_errors={"AddPortMapping": 403})) as igd:
        mapper = await _mapper(igd)
        with pytest.raises(ProtocolError, match=r"^the router at 127\.0\.0\.1 \(Orange Livebox\) "
                           r"answered HTTP 403 to AddPortMapping$"):  # fmt: skip
            await mapper.add(8080)


# ---- mapping quirks ---------------------------------------------------------------------------


async def test_low_external_port_refused_picks_another() -> None:
    async with FakeIGD("tplink_er605") as igd:
        mapper = await _mapper(igd)
        m = await mapper.add(80)
        assert m.internal_port == 80 and m.external_port >= 1024
        entry = igd.entry(m.external_port)
        assert entry is not None and entry.internal_port == 80
        adds = [c.args["NewExternalPort"] for c in igd.calls if c.action == "AddPortMapping"]
        assert adds[0] == "80"


async def test_explicit_low_external_port_refused_says_what_to_do() -> None:
    async with FakeIGD("tplink_er605") as igd:
        mapper = await _mapper(igd)
        with pytest.raises(
            ProtocolError, match=r"answered HTTP 500 to AddPortMapping.*1024 or higher"
        ):
            await mapper.add(80, external_port=80)


async def test_protocol_is_sent_upper_case_and_read_in_any_case() -> None:
    quirks = Quirks(upper_case_protocol_only=True, lower_case_protocol_in_entries=True)
    async with FakeIGD("pfsense", quirks=quirks) as igd:
        mapper = await _mapper(igd)
        m = await mapper.add(8080, protocol="udp")
        assert igd.entry(m.external_port, "UDP") is not None
        assert {c.args["NewProtocol"] for c in igd.calls if "NewProtocol" in c.args} == {"UDP"}
        listed = await mapper.list()
        assert [(x.protocol, x.external_port) for x in listed] == [("udp", m.external_port)]


async def test_725_permanent_lease_is_deleted_on_close() -> None:
    async with FakeIGD("livebox", quirks=Quirks(only_permanent_leases=True)) as igd:
        mapper = await _mapper(igd)
        m = await mapper.add(8080, lease=3600)
        assert m.lease == 0 and igd.entry(8080) is not None
        keeper = KeptMapping(8080)
        keeper.mapper, keeper.mapping = mapper, m
        await keeper.close()
        assert igd.entry(8080) is None


async def test_402_on_long_leases_tries_shorter() -> None:
    async with FakeIGD("pfsense", quirks=Quirks(max_lease=3600)) as igd:
        m = await (await _mapper(igd)).add(8080, lease=86400)
        assert m.lease == 3600
        entry = igd.entry(8080)
        assert entry is not None and entry.lease == 3600


async def test_timed_lease_that_vanishes_is_made_permanent() -> None:
    async with FakeIGD("pfsense", quirks=Quirks(timed_leases_vanish=True)) as igd:
        m = await (await _mapper(igd)).add(8080, lease=3600)
        assert m.lease == 0  # permanent: KeptMapping deletes it on exit
        entry = igd.entry(8080)
        assert entry is not None and entry.lease == 0
        leases = [c.args["NewLeaseDuration"] for c in igd.calls if c.action == "AddPortMapping"]
        assert leases == ["3600", "0"]


async def test_renewal_that_rewrites_the_internal_port_is_repaired() -> None:
    async with FakeIGD("pfsense") as igd:
        mapper = await _mapper(igd)
        m = await mapper.add(8080, lease=600)
        igd.quirks.renewal_rewrites_internal_port = 9999
        renewed = await mapper.renew(m)
        entry = igd.entry(renewed.external_port)
        assert entry is not None and entry.internal_port == 8080
        assert renewed.external_port == m.external_port
        assert "DeletePortMapping" in igd.actions()


async def test_renewal_rewritten_every_time_is_an_error() -> None:
    async with FakeIGD("pfsense") as igd:
        mapper = await _mapper(igd)
        m = await mapper.add(8080, lease=600)
        igd.quirks.renewal_rewrites_internal_port = 9999
        igd.quirks.timed_leases_vanish = False
        # Make the repair fail too: every add (even a fresh one) stores the wrong port.
        original = igd._add

        def always_wrong(args: dict[str, str], headers: dict[str, str], *, any_port: bool) -> int:
            return original({**args, "NewInternalPort": "9999"}, headers, any_port=any_port)

        igd._add = always_wrong  # type: ignore[method-assign]
        with pytest.raises(ProtocolError, match=r"lists it for 127\.0\.0\.1:9999"):
            await mapper.renew(m)


async def test_718_from_another_host_uses_add_any_on_igd2() -> None:
    async with FakeIGD("pfsense") as igd:
        mapper = await _mapper(igd)
        await mapper.add(8080)
        igd.table[(8080, "TCP")].client = "127.0.0.9"  # someone else holds 8080 now
        m = await mapper.add(8080)
        assert m.external_port != 8080
        assert "AddAnyPortMapping" in igd.actions() and "DeletePortMapping" not in igd.actions()
        entry = igd.entry(8080)
        assert entry is not None and entry.client == "127.0.0.9"  # theirs, untouched


async def test_refused_external_address_does_not_fail_a_made_mapping() -> None:
    quirks = Quirks(faults={"GetExternalIPAddress": 501})
    async with FakeIGD("pfsense", quirks=quirks) as igd:
        m = await (await _mapper(igd)).add(8080)
        assert m.external_ip == "" and igd.entry(8080) is not None


async def test_unknown_action_fault_is_a_upnp_error() -> None:
    async with FakeIGD("huawei_hg531") as igd:
        mapper = await _mapper(igd)
        with pytest.raises(UPnPError) as info:
            await mapper.client.call("ForceTermination")
        assert info.value.code == 401 and "HG531 V1" in str(info.value)


async def test_ssdp_answer_from_another_port_than_searched_is_taken() -> None:
    async with FakeIGD("tplink_er605") as igd:
        assert igd.answer_port not in (igd.ssdp_port, 1900)
        gw = await discover_igd(timeout=TIMEOUT, ssdp_target=igd.ssdp_target)
        assert gw.location == igd.location
