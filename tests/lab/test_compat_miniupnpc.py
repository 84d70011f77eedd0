"""natkit.compat.miniupnpc beside the real PyPI ``miniupnpc`` binding, on real miniupnpd.

ONE script, written for the binding's API, runs twice in the lab's ``lan`` namespace: once
with ``import miniupnpc`` (the C binding), once with ``from natkit.compat import
miniupnpc``, each time from an empty router table and with the same arguments. Every call's
answer is written down (a raised exception as its kind and the binding's text) and the two
transcripts must be equal, call by call. Every mapping either module makes must carry a
connection from the lab's Internet host (``wan``) to a listener on the LAN host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from natkit.compat import miniupnpc as compat
from natkit.lab import Lab
from natkit.lab import config as C
from natkit.portmap.upnp import UPnPMapper
from tests.conftest import IN_CI, call_in_node, run_in_node
from tests.lab.helpers import http_get, http_server, udp_ask, udp_echo

EXTERNAL = (41001, 41002, 41003)  # the script's external ports (TCP, UDP, AddAny TCP)
LEASE = 300
MINISSDPD_SOCKETS = ("/var/run/minissdpd.sock", "/run/minissdpd.sock")
COUNTERS = ("totalbytesent", "totalbytereceived", "totalpacketsent", "totalpacketreceived")


@dataclasses.dataclass(frozen=True)
class Near:
    """A value that ticks between the two runs (an uptime, a lease counting down)."""

    value: int
    slack: int

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Near) and abs(self.value - other.value) <= self.slack

    def __hash__(self) -> int:
        return 0


@dataclasses.dataclass(frozen=True)
class Raised:
    kind: str  # "Exception" for the binding's bare Exception and compat's subclass of it
    text: str  # the binding's message (compat: its binding_message)


@dataclasses.dataclass
class Script:
    """The binding's tutorial and more, for either module; ``transcript`` is what it saw."""

    module: types.ModuleType
    tcp_port: int  # LAN listeners the mappings lead to
    udp_port: int
    reach_tcp: Callable[[int], str]
    reach_udp: Callable[[int], bytes | None]
    transcript: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    errors: dict[str, Exception] = dataclasses.field(default_factory=dict)

    def call(
        self, label: str, fn: Callable[[], Any], near: tuple[int, ...] = (), slack: int = 5
    ) -> Any:
        try:
            value = fn()
        except Exception as exc:
            self.errors[label] = exc
            if type(exc) in (TypeError, ValueError, OverflowError):
                self.transcript.append((label, Raised(type(exc).__name__, str(exc))))
            else:
                assert isinstance(exc, Exception)
                self.transcript.append(
                    (label, Raised("Exception", getattr(exc, "binding_message", str(exc))))
                )
            return None
        shown = value
        if isinstance(value, tuple) and near:
            shown = tuple(Near(v, slack) if i in near else v for i, v in enumerate(value))
        self.transcript.append((label, shown))
        return value

    def run(self, minissdpd: str | None) -> None:
        m = self.module
        kw = {"minissdpdsocket": minissdpd} if minissdpd else {}
        u = m.UPnP(**kw)
        u.discoverdelay = 200
        self.call("discover", u.discover)
        gateway = self.call("selectigd", u.selectigd)
        self.call("lanaddr/wanaddr", lambda: (u.lanaddr, u.wanaddr))
        self.call("externalipaddress", u.externalipaddress)
        # The router's uptime: the second run starts some seconds after the first.
        self.call("statusinfo", u.statusinfo, near=(1,), slack=120)
        self.call("connectiontype", u.connectiontype)
        tcp, udp, anyport = EXTERNAL

        # The tutorial's mapping, then one through the selectigd() result as "gateway".
        self.call("add tcp", lambda: u.addportmapping(tcp, "TCP", u.lanaddr, self.tcp_port,
                                                       "compat script", "", LEASE))  # fmt: skip
        self.call("reach tcp", lambda: self.reach_tcp(tcp))
        if isinstance(gateway, str) and hasattr(gateway, "addportmapping"):
            self.call("add udp", lambda: gateway.addportmapping(  # the tutorials' misuse
                udp, "UDP", gateway.lanaddr, self.udp_port, "compat udp", "", LEASE))  # fmt: skip
        else:  # the binding's str has no such method: what the tutorials' readers meet
            self.call("add udp", lambda: gateway.addportmapping)
            self.call("add udp (u)", lambda: u.addportmapping(
                udp, "UDP", u.lanaddr, self.udp_port, "compat udp", "", LEASE))  # fmt: skip
        self.call("reach udp", lambda: self.reach_udp(udp))
        self.call("specific tcp", lambda: u.getspecificportmapping(tcp, "TCP"), near=(4,))
        self.call("specific udp", lambda: u.getspecificportmapping(udp, "UDP"), near=(4,))
        self.call("specific none", lambda: u.getspecificportmapping(tcp + 100, "TCP"))
        self.call("count", u.getportmappingnumberofentries)
        for i in range(3):
            self.call(f"generic {i}", lambda i=i: u.getgenericportmapping(i), near=(6,))

        # AddAnyPortMapping: the router picks (here: keeps) the port; lease 0 (permanent).
        reserved = self.call("add any", lambda: u.addanyportmapping(
            anyport, "TCP", u.lanaddr, self.tcp_port, "compat any", ""))  # fmt: skip
        if isinstance(reserved, int):
            self.call("reach any", lambda: self.reach_tcp(reserved))
            self.call("specific any", lambda: u.getspecificportmapping(reserved, "TCP"), near=(4,))

        # Refusals: another host's mapping (secure mode), a missing entry, bad arguments.
        self.call("add for another host", lambda: u.addportmapping(
            tcp + 10, "TCP", C.DEV_IP, 8080, "not mine", "", LEASE))  # fmt: skip
        self.call("add str port", lambda: u.addportmapping(
            str(tcp), "TCP", u.lanaddr, self.tcp_port, "x", ""))  # fmt: skip
        self.call("add proto None", lambda: u.addportmapping(
            tcp, None, u.lanaddr, self.tcp_port, "x", ""))  # fmt: skip

        for name in COUNTERS:  # they tick; both must read a counter, not an error value
            self.call(name, lambda name=name: type(getattr(u, name)()).__name__)
            self.call(f"{name} read", lambda name=name: getattr(u, name)() not in (0, 2**32 - 3))

        self.call("delete tcp", lambda: u.deleteportmapping(tcp, "TCP"))
        self.call("delete tcp again", lambda: u.deleteportmapping(tcp, "TCP"))
        self.call("delete udp", lambda: u.deleteportmapping(udp, "UDP", ""))
        self.call("delete range", lambda: u.deleteportmappingrange(anyport, anyport, "TCP", 1))
        self.call("generic after", lambda: u.getgenericportmapping(0))
        self.call("reach tcp after", lambda: self.reach_tcp(tcp))

        # Discovery on a named interface, by address and by name (multicastif).
        for label, interface in (("by address", C.LAN_IP), ("by name", C.HOST_IF)):
            w = m.UPnP(interface, **kw)
            self.call(f"multicastif {label} discover", w.discover)
            self.call(f"multicastif {label} selectigd", w.selectigd)
            self.call(f"multicastif {label} lanaddr", lambda w=w: w.lanaddr)

        # The root description URL form of selectigd(), on a new object.
        v = m.UPnP(**kw)
        location = f"http://{C.RTR_LAN_IP}:{C.UPNP_HTTP_PORT}/rootDesc.xml"
        self.call("selectigd(url)", lambda: v.selectigd(location))
        self.call("selectigd(url) lanaddr", lambda: v.lanaddr)
        self.call("selectigd(url) externalipaddress", v.externalipaddress)


@pytest.fixture
def binding() -> types.ModuleType:
    try:
        import miniupnpc
    except ImportError:
        if IN_CI or os.geteuid() == 0:
            pytest.fail("the PyPI miniupnpc binding is needed: pip install miniupnpc")
        pytest.skip("the PyPI miniupnpc binding is not installed")
    return miniupnpc


def _clear_router(lab: Lab) -> None:
    async def clear() -> None:
        mapper = await UPnPMapper.discover()
        for m in await mapper.list():
            await mapper.delete(m.external_port, m.protocol)

    run_in_node(lab, "lan", clear)


@contextlib.contextmanager
def _listeners(lab: Lab) -> Iterator[tuple[int, int]]:
    with (
        http_server(lab, "lan", C.LAN_IP, 0, "compat listener") as tcp,
        udp_echo(lab, "lan", C.LAN_IP) as udp,
    ):
        yield tcp, udp


def _run(lab: Lab, module: types.ModuleType, tcp: int, udp: int) -> Script:
    def reach_tcp(port: int) -> str:
        try:
            return http_get(lab, "wan", C.RTR_WAN_IP, port, timeout=2.0)
        except OSError as exc:
            return f"unreachable: {exc}"

    def reach_udp(port: int) -> bytes | None:
        return udp_ask(lab, "wan", C.RTR_WAN_IP, port, b"hi")

    script = Script(module, tcp, udp, reach_tcp, reach_udp)
    minissdpd = next((p for p in MINISSDPD_SOCKETS if os.path.exists(p)), None)
    _clear_router(lab)
    try:
        # The binding would ask the host's own MiniSSDPd (not in the lab): point it away.
        call_in_node(lab, "lan", lambda: script.run("/nonexistent.sock" if minissdpd else None))
    finally:
        _clear_router(lab)
    return script


def test_same_script_same_answers_as_the_binding(lab: Lab, binding: types.ModuleType) -> None:
    with _listeners(lab) as (tcp, udp):
        reference = _run(lab, binding, tcp, udp)
        ours = _run(lab, compat, tcp, udp)
    for name, run in (("binding", reference), ("compat", ours)):
        print(f"{name}:", *run.transcript, sep="\n  ")
        print(*(f"{k}: {type(e).__name__}: {e}" for k, e in run.errors.items()), sep="\n  ")

    expected = dict(reference.transcript)
    # The binding really did all this on the real router: the script is not vacuous.
    assert expected["discover"] == 1
    assert expected["selectigd"] == f"http://{C.RTR_LAN_IP}:{C.UPNP_HTTP_PORT}/ctl/IPConn"
    assert expected["lanaddr/wanaddr"] == (C.LAN_IP, C.RTR_WAN_IP)
    assert expected["reach tcp"] == expected["reach any"] == "compat listener"
    assert expected["reach udp"] == b"echo:hi"
    assert expected["reach tcp after"].startswith("unreachable")
    assert expected["multicastif by name selectigd"] == expected["selectigd"]
    assert isinstance(expected["add for another host"], Raised)
    assert expected["add str port"] == Raised(
        "TypeError", "'str' object cannot be interpreted as an integer"
    )

    # The tutorial's misuse: the binding's str has no addportmapping; ours carries it.
    assert isinstance(reference.errors["add udp"], AttributeError)
    theirs = [(k, v) for k, v in reference.transcript if k not in ("add udp", "add udp (u)")]
    mine = [(k, v) for k, v in ours.transcript if k != "add udp"]
    got = dict(ours.transcript)
    assert got["add udp"] is True and expected["add udp (u)"] is True
    assert mine == theirs

    # Our messages start with the binding's words, then say what happened.
    for label, exc in ours.errors.items():
        said = str(reference.errors[label])
        if isinstance(exc, compat.MiniupnpcError):
            assert str(exc).startswith(f"{said}: ") and len(str(exc)) > len(said) + 20, label
    assert "secure mode" in str(ours.errors["add for another host"])
