"""Router quirks that miniupnpd does not show, played by a scripted IGD on the LAN.

The scripted router runs on the lab's ``dev`` host and answers SOAP over real HTTP; natkit
runs on ``lan``. Each test scripts the faults seen on real routers (shared/lab-facts.md).
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from natkit.errors import NotAuthorizedError, UPnPError
from natkit.lab import Lab, netns
from natkit.lab import config as C
from natkit.portmap.description import DeviceDescription, Service
from natkit.portmap.igd import Gateway
from natkit.portmap.manager import KeptMapping
from natkit.portmap.upnp import UPnPMapper
from tests.conftest import run_in_node

WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"


@dataclass
class Call:
    action: str
    args: dict[str, str]
    headers: dict[str, str]


@dataclass
class ScriptedIGD:
    """Answers each action with the next scripted reply: a dict (success) or an int (fault)."""

    service_type: str
    script: dict[str, list[dict[str, str] | int]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    port: int = 0

    def reply(self, action: str) -> tuple[int, bytes]:
        queue = self.script.get(action, [])
        answer = queue.pop(0) if queue else {}
        if isinstance(answer, int):
            body = (
                '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
                "<s:Body><s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring>"
                '<detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
                f"<errorCode>{answer}</errorCode><errorDescription>scripted</errorDescription>"
                "</UPnPError></detail></s:Fault></s:Body></s:Envelope>"
            )
            return 500, body.encode()
        inner = "".join(f"<{k}>{v}</{k}>" for k, v in answer.items())
        body = (
            '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
            f'<s:Body><u:{action}Response xmlns:u="{self.service_type}">{inner}'
            f"</u:{action}Response></s:Body></s:Envelope>"
        )
        return 200, body.encode()

    def actions(self) -> list[str]:
        return [c.action for c in self.calls]


def _handle(conn: socket.socket, igd: ScriptedIGD) -> None:
    conn.settimeout(2)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        body += conn.recv(65536)
    action = headers.get("soapaction", "").strip('"').rpartition("#")[2]
    args = dict(re.findall(r"<(New\w+)>([^<]*)</New\w+>", body.decode()))
    igd.calls.append(Call(action, args, headers))
    status, payload = igd.reply(action)
    reason = "OK" if status == 200 else "Internal Server Error"
    conn.sendall(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/xml\r\nContent-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + payload
    )


@contextlib.contextmanager
def scripted_igd(lab: Lab, service_type: str) -> Iterator[tuple[ScriptedIGD, UPnPMapper]]:
    srv = netns.call_in(lab.netns("dev"), lambda: socket.create_server((C.DEV_IP, 0)))
    igd = ScriptedIGD(service_type, port=srv.getsockname()[1])
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            with conn, contextlib.suppress(OSError):
                _handle(conn, igd)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    svc = Service(service_type, "urn:upnp-org:serviceId:WANIPConn1",
                  f"http://{C.DEV_IP}:{igd.port}/ctl", "", "", "WANConnectionDevice")  # fmt: skip
    desc = DeviceDescription("InternetGatewayDevice", "quirky", "", "", "", (svc,))
    gw = Gateway(f"http://{C.DEV_IP}:{igd.port}/desc.xml", desc, svc, C.LAN_IP, "", "100.200.0.1")
    try:
        yield igd, UPnPMapper(gw)
    finally:
        stop.set()
        t.join()
        srv.close()


def test_requests_suit_picky_routers(lab: Lab) -> None:
    with scripted_igd(lab, WANIP1) as (igd, mapper):
        run_in_node(lab, "lan", lambda: mapper.add(8080, protocol="udp", description="a<b&c"))
        call = igd.calls[0]
        assert call.headers["soapaction"] == f'"{WANIP1}#AddPortMapping"'  # quoted
        assert call.headers["host"] == f"{C.DEV_IP}:{igd.port}"  # with port
        assert call.args["NewProtocol"] == "UDP"  # upper case
        assert call.args["NewPortMappingDescription"] == "a&lt;b&amp;c"  # escaped
        assert (
            call.args["NewInternalClient"] == C.LAN_IP and call.args["NewLeaseDuration"] == "3600"
        )


def test_725_only_permanent_leases_then_deleted_on_close(lab: Lab) -> None:
    with scripted_igd(lab, WANIP1) as (igd, mapper):
        igd.script["AddPortMapping"] = [725, {}]

        async def run() -> int:
            m = await mapper.add(8080, lease=3600)
            keeper = KeptMapping(8080)  # what open_port/expose hold: it owns the mapping
            keeper.mapper, keeper.mapping = mapper, m
            await keeper.close()  # a permanent mapping must not outlive us
            return m.lease

        assert run_in_node(lab, "lan", run) == 0
        leases = [c.args["NewLeaseDuration"] for c in igd.calls if c.action == "AddPortMapping"]
        assert leases == ["3600", "0"]
        assert igd.actions()[-1] == "DeletePortMapping"


def test_402_on_lease_tries_shorter_leases(lab: Lab) -> None:
    with scripted_igd(lab, WANIP1) as (igd, mapper):
        igd.script["AddPortMapping"] = [402, 402, {}]
        m = run_in_node(lab, "lan", lambda: mapper.add(8080, lease=86400))
        leases = [c.args["NewLeaseDuration"] for c in igd.calls if c.action == "AddPortMapping"]
        assert leases == ["86400", "3600", "600"] and m.lease == 600


def test_718_own_stale_entry_is_replaced(lab: Lab) -> None:
    with scripted_igd(lab, WANIP1) as (igd, mapper):
        igd.script["AddPortMapping"] = [718, {}]
        igd.script["GetSpecificPortMappingEntry"] = [
            {"NewInternalPort": "8080", "NewInternalClient": C.LAN_IP, "NewLeaseDuration": "100"}
        ]
        m = run_in_node(lab, "lan", lambda: mapper.add(8080))
        assert igd.actions() == [
            "AddPortMapping", "GetSpecificPortMappingEntry", "DeletePortMapping", "AddPortMapping",
            "GetSpecificPortMappingEntry",  # the read-back of the mapping made
        ]  # fmt: skip
        assert m.external_port == 8080


def test_718_someone_elses_on_igd2_uses_add_any(lab: Lab) -> None:
    with scripted_igd(lab, WANIP2) as (igd, mapper):
        igd.script["AddPortMapping"] = [718]
        igd.script["GetSpecificPortMappingEntry"] = [
            {"NewInternalPort": "8080", "NewInternalClient": C.DEV_IP, "NewLeaseDuration": "100"}
        ]
        igd.script["AddAnyPortMapping"] = [{"NewReservedPort": "40123"}]
        m = run_in_node(lab, "lan", lambda: mapper.add(8080))
        assert m.external_port == 40123 and m.internal_port == 8080
        assert "DeletePortMapping" not in igd.actions()  # never touch another host's mapping


def test_718_someone_elses_on_igd1_picks_another_port(lab: Lab) -> None:
    with scripted_igd(lab, WANIP1) as (igd, mapper):
        igd.script["AddPortMapping"] = [718, {}]
        igd.script["GetSpecificPortMappingEntry"] = [
            {"NewInternalPort": "22", "NewInternalClient": C.DEV_IP, "NewLeaseDuration": "0"}
        ]
        m = run_in_node(lab, "lan", lambda: mapper.add(8080))
        adds = [c.args["NewExternalPort"] for c in igd.calls if c.action == "AddPortMapping"]
        assert adds[0] == "8080" and adds[1] != "8080" and m.external_port == int(adds[1])


def test_724_same_port_values_required(lab: Lab) -> None:
    with scripted_igd(lab, WANIP1) as (igd, mapper):
        igd.script["AddPortMapping"] = [724]
        with pytest.raises(UPnPError) as info:
            run_in_node(lab, "lan", lambda: mapper.add(8080, external_port=9000))
        assert info.value.code == 724 and "internal and external ports to be equal" in str(
            info.value
        )


def test_606_explains_the_router_setting(lab: Lab) -> None:
    with scripted_igd(lab, WANIP1) as (igd, mapper):
        igd.script["AddPortMapping"] = [606]
        with pytest.raises(NotAuthorizedError) as info:
            run_in_node(lab, "lan", lambda: mapper.add(8080))
        assert info.value.code == 606 and "router's settings" in str(info.value)
