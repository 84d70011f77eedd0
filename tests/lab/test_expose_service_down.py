"""A local service that is down when ``expose`` starts (issue 14), on the real lab: the
router's mapping cannot be proven (nothing answers behind it), so the relay serves — but only
meanwhile. natkit watches the local port; once the service listens the mapping is made again,
the relay proves it from outside, and it takes over (``switched``). Visitors then reach the
service from wan (the Internet) through the router's mapping. Both twins: the CLI's JSON lines
and the Python API's typed events (the same engine, natkit.expose_core).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

import natkit
from natkit import events
from natkit.lab import Lab
from natkit.lab import config as C
from tests.conftest import call_in_node
from tests.lab import test_relay_control
from tests.lab.helpers import http_server, wait_for, wait_router_uptime
from tests.lab.test_relay_control import RELAY, RELAY_IP, TOKEN_A, Procs, visit

pytestmark = pytest.mark.lab

CLI_PORT = 18481  # nothing listens there at start: the service comes up during the test
API_PORT = 18482
procs = test_relay_control.procs  # the fixture: relays and agents killed at the end


def _names(seen: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in seen]


def test_cli_switches_to_the_mapping_once_the_service_listens(lab: Lab, procs: Procs) -> None:
    wait_router_uptime(lab)
    procs.relay()
    agent = procs.agent(CLI_PORT, via_relay=False)  # auto mode, --local-host LAN_IP
    first = agent.events_until("ready", 20)
    while "fallback" not in _names(first):  # it may come before or after the relay's ready
        first.append(agent.next_event(20))
    assert first[0] == {"event": "local_unreachable", "local_address": f"{C.LAN_IP}:{CLI_PORT}",
                        "reason": "nothing listens there"}, first  # fmt: skip
    ready = next(e for e in first if e["event"] == "ready")
    assert ready["method"] == "relay" and ready["public_address"].startswith(f"{RELAY_IP}:")
    assert ready["mapping"] in ("probing", "waiting_for_service"), ready
    fallback = next(e for e in first if e["event"] == "fallback")
    assert f"the service on port {CLI_PORT} is down" in fallback["reason"], fallback
    assert "tried again once the service listens" in fallback["reason"], fallback
    assert f"dport {CLI_PORT} dnat" not in lab.router_rules()  # the unproven mapping is gone

    with http_server(lab, "lan", C.LAN_IP, CLI_PORT, "up at last") as port:
        assert port == CLI_PORT
        later = agent.events_until("ready", 30)  # the watch looks every 2 s
        assert _names(later) == ["local_reachable", "switched", "closed", "ready"], later
        assert later[1] == {"event": "switched", "from": "relay",
                            "previous_address": ready["public_address"]}, later  # fmt: skip
        assert later[2]["method"] == "relay", later  # the tunnel's closed
        mapped = later[3]
        assert mapped["method"] in ("pcp", "natpmp", "upnp") and mapped["verified"], mapped
        assert mapped["public_address"] == f"{C.RTR_WAN_IP}:{CLI_PORT}", mapped
        assert visit(lab, mapped["public_address"]) == "up at last"  # from wan, the Internet
        assert agent.stop(signal.SIGTERM) == 0, agent.why()
    closing = agent.rest()
    assert _names(closing) == ["closed"] and closing[0]["removed"] is True, closing
    assert f"dport {CLI_PORT} dnat" not in lab.router_rules()
    assert "Traceback" not in agent.stderr, agent.why()


def test_python_api_switches_to_the_mapping_once_the_service_listens(
    lab: Lab, procs: Procs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NATKIT_STATE_DIR", str(tmp_path / "api-state"))
    wait_router_uptime(lab)
    procs.relay()
    seen: list[events.Event] = []
    exposed = call_in_node(
        lab, "lan",
        lambda: natkit.expose(API_PORT, relay=RELAY, token=TOKEN_A, local_host=C.LAN_IP,
                              check_interval=1, on_event=seen.append),
    )  # fmt: skip
    try:
        assert exposed.method == "relay", seen
        relay_address = exposed.public_address
        wait_for(lambda: any(isinstance(e, events.Fallback) for e in seen), 15, lambda: str(seen))
        before = len(seen)
        kinds = [type(e) for e in seen if not isinstance(e, events.Pinned)]
        assert kinds[0] is events.LocalUnreachable and sorted(k.__name__ for k in kinds) == [
            "Fallback", "LocalUnreachable", "Ready"], seen  # fmt: skip
        relay_ready = next(e for e in seen if isinstance(e, events.Ready))
        assert relay_ready.mapping_state in ("probing", "waiting_for_service"), relay_ready
        with http_server(lab, "lan", C.LAN_IP, API_PORT, "python, up at last"):
            wait_for(lambda: exposed.method != "relay" and exposed.verified, 30, lambda: str(seen))
            public = f"{C.RTR_WAN_IP}:{API_PORT}"
            assert exposed.public_address == public
            after = seen[before:]
            assert [type(e) for e in after] == [
                events.LocalReachable, events.Switched, events.Closed, events.Ready], seen  # fmt: skip
            switched = after[1]
            assert isinstance(switched, events.Switched)
            assert switched.previous_address == relay_address and switched.public_address == public
            assert switched.to_json() == {"event": "switched", "from": "relay",
                                          "previous_address": relay_address}  # fmt: skip
            assert after[2].method == "relay" and after[2].public_address == relay_address
            ready = after[3]
            assert isinstance(ready, events.Ready) and ready.verified, ready
            assert visit(lab, public) == "python, up at last"
    finally:
        exposed.close()
    closed = seen[-1]
    assert isinstance(closed, events.Closed) and closed.removed and closed.method != "relay"
    assert f"dport {API_PORT} dnat" not in lab.router_rules()
