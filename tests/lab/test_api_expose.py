"""The Python API's twin of ``natkit expose`` and of ``map list|delete``, on the real lab
(miniupnpd on a kernel NAT, the relay on wan, the service on lan).

* ``natkit.expose`` in auto mode with a relay: the mapping is proven from outside by the
  relay's dial-back (``Ready(verified=True)``), visitors reach it, closing removes it.
* With a router that offers no mapping: ``Ready`` via the relay at once (the mapping still
  ``probing``), then ``Fallback`` when the router's verdict comes.
* The IPv6 pinhole beside the mapping (``public_address_v6``; none with ``ipv6=False``).
* ``natkit.list_mappings`` / ``delete_mapping`` see and delete what ``natkit map add`` made
  (UPnP from the router's table, NAT-PMP from natkit's records).
* ``async with natkit.open_port_async(...)`` without ``await``; typed and older listeners.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import natkit
from natkit import events
from natkit.lab import Lab
from natkit.lab import config as C
from tests.conftest import call_in_node, run_in_node
from tests.lab.helpers import http_server, wait_for, wait_router_uptime
from tests.lab.test_relay_control import NATKIT, RELAY, RELAY_IP, TOKEN_A, Procs, visit

pytestmark = pytest.mark.lab


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "api-state"
    path.mkdir()
    monkeypatch.setenv("NATKIT_STATE_DIR", str(path))  # pins and mapping records
    return path


@pytest.fixture
def procs(lab: Lab, tmp_path: Path) -> Iterator[Procs]:
    p = Procs(lab, tmp_path)
    try:
        yield p
    finally:
        p.kill_all()


def _expose(lab: Lab, port: int, seen: list[events.Event]) -> natkit.Exposed:
    return call_in_node(
        lab,
        "lan",
        lambda: natkit.expose(
            port,
            relay=RELAY,
            token=TOKEN_A,
            local_host=C.LAN_IP,
            check_interval=1,
            on_event=seen.append,
        ),
    )


def test_expose_auto_uses_the_mapping_the_relay_proves(lab: Lab, procs: Procs, state: Path) -> None:
    wait_router_uptime(lab)
    seen: list[events.Event] = []
    with http_server(lab, "lan", C.LAN_IP, 0, "mapped from python") as port:
        relay, _ = procs.relay()
        exposed = _expose(lab, port, seen)
        try:
            public = f"{C.RTR_WAN_IP}:{port}"
            assert exposed.method in ("pcp", "natpmp", "upnp") and exposed.verified, seen
            assert exposed.public_address == public
            ready = next(e for e in seen if isinstance(e, events.Ready))
            assert ready.verified and ready.public_address == public and ready.mapping is not None
            assert not any(isinstance(e, events.Fallback) for e in seen), seen
            assert visit(lab, public) == "mapped from python"
        finally:
            exposed.close()
        closed = seen[-1]
        assert isinstance(closed, events.Closed) and closed.removed, seen
        assert f"dport {port} dnat" not in lab.router_rules()
        assert relay.stop() == 0


def test_expose_auto_falls_back_to_the_relay(
    make_lab: Callable[..., Lab], tmp_path: Path, state: Path
) -> None:
    none = make_lab("apinomap", portmap=frozenset())
    procs = Procs(none, tmp_path)
    seen: list[events.Event] = []
    try:
        with http_server(none, "lan", C.LAN_IP, 0, "relayed from python") as port:
            relay, _ = procs.relay()
            exposed = _expose(none, port, seen)
            try:
                assert exposed.method == "relay" and exposed.mapping is None
                assert exposed.public_address.startswith(f"{RELAY_IP}:")
                # Relay first: public (returned) while UPnP's discovery still waits its 2 s;
                # the router's verdict follows.
                kinds = [type(e) for e in seen if not isinstance(e, events.Pinned)]
                assert kinds == [events.Ready], seen
                ready = next(e for e in seen if isinstance(e, events.Ready))
                assert ready.mapping_state == "probing", ready
                wait_for(lambda: any(isinstance(e, events.Fallback) for e in seen), 10,
                         lambda: str(seen))  # fmt: skip
                fallback = next(e for e in seen if isinstance(e, events.Fallback))
                assert fallback.reason.startswith("port mapping failed"), fallback
                assert visit(none, exposed.public_address) == "relayed from python"
            finally:
                exposed.close()
            assert isinstance(seen[-1], events.Closed)
            assert relay.stop() == 0
    finally:
        procs.kill_all()


def _map_add(lab: Lab, *args: str) -> None:
    done = lab.run("lan", [NATKIT, "map", "add", *args], timeout=30, env=dict(os.environ))
    assert done.returncode == 0, done.stderr


def test_list_and_delete_mappings(lab: Lab, state: Path) -> None:
    wait_router_uptime(lab)
    _map_add(lab, "45001", "--via", "upnp", "--lease", "300")
    _map_add(lab, "45002", "--via", "natpmp", "--lease", "300")
    try:
        listed = call_in_node(lab, "lan", natkit.list_mappings)
        ports = {(m.external_port, m.method) for m in listed}
        assert (45001, "upnp") in ports, listed
        assert 45002 in {p for p, _ in ports}, listed  # UPnP's table shows it, or the record

        assert call_in_node(lab, "lan", lambda: natkit.delete_mapping(45002, "tcp")) == "natpmp"
        assert call_in_node(lab, "lan", lambda: natkit.delete_mapping(45001)) == "upnp"
        left = {m.external_port for m in call_in_node(lab, "lan", natkit.list_mappings)}
        assert not left & {45001, 45002}, left
        assert "dport 45001" not in lab.router_rules() and "dport 45002" not in lab.router_rules()
    finally:  # a failed test leaves nothing behind on the shared lab's router
        for port in ("45001", "45002"):
            lab.run("lan", [NATKIT, "map", "delete", port], timeout=30, env=dict(os.environ))


def test_open_port_async_with_without_await_and_typed_events(lab: Lab) -> None:
    wait_router_uptime(lab)
    seen: list[events.Event] = []
    legacy: list[str] = []

    async def script() -> tuple[str, bool]:
        async with natkit.open_port_async(45003, via="pcp", lease=120, on_event=seen.append) as p:
            p.on_event(lambda name, mapping, info: legacy.append(name))  # the older form
            assert isinstance(p, natkit.OpenPort)
            return p.public_address, p.closed

    public, closed_inside = run_in_node(lab, "lan", script)
    assert public == f"{C.RTR_WAN_IP}:45003" and not closed_inside
    assert [type(e) for e in seen] == [events.Ready, events.Closed], seen
    assert seen[0].method == "pcp" and isinstance(seen[1], events.Closed) and seen[1].removed
    assert legacy == ["closed"]
    assert "dport 45003" not in lab.router_rules()


def test_expose_opens_the_ipv6_pinhole_beside_the_mapping(
    lab: Lab, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.lab.test_ipv6_pinholes import connect_from_wan, pinhole_rules

    monkeypatch.delenv("NATKIT_RELAY", raising=False)  # a kept router mapping, no relay
    wait_router_uptime(lab)
    seen: list[events.Event] = []
    with http_server(lab, "lan", C.LAN_IP6, 0, "hello over IPv6") as port:
        exposed = call_in_node(
            lab, "lan", lambda: natkit.expose(port, via="upnp", lease=120, on_event=seen.append)
        )
        try:
            assert exposed.public_address == f"{C.RTR_WAN_IP}:{port}"
            assert exposed.public_address_v6 == f"[{C.LAN_IP6}]:{port}"
            ready = next(e for e in seen if isinstance(e, events.Ready))
            assert ready.public_address_v6 == exposed.public_address_v6, ready
            assert connect_from_wan(lab, C.LAN_IP6, port) == "open"
        finally:
            exposed.close()
        assert pinhole_rules(lab, port) == []
        assert connect_from_wan(lab, C.LAN_IP6, port) == "timeout"

        without = call_in_node(lab, "lan", lambda: natkit.expose(port, via="upnp", ipv6=False))
        try:
            assert without.public_address_v6 == "" and pinhole_rules(lab, port) == []
        finally:
            without.close()


def test_asyncio_run_takes_open_port_async(lab: Lab, state: Path) -> None:
    wait_router_uptime(lab)
    import asyncio

    try:
        port = call_in_node(
            lab, "lan", lambda: asyncio.run(natkit.open_port_async(45004, via="pcp", lease=120))
        )
        assert isinstance(port, natkit.OpenPort)
        assert port.public_address == f"{C.RTR_WAN_IP}:45004" and port.method == "pcp"
        assert "dport 45004 dnat" in lab.router_rules()  # made; kept until its lease ends
    finally:
        call_in_node(lab, "lan", lambda: natkit.delete_mapping(45004))
    assert "dport 45004 dnat" not in lab.router_rules()
