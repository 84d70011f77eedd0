"""The Python twin's typed events for what natkit.expose_core reports (pure conversion, no
network): each is the CLI's JSON line where the CLI's line has no fields of its own — the
IPv6 pinhole's renewed/lost/restored, switched — and a tunnel that never opened is no
Closed."""

from __future__ import annotations

from natkit import events
from natkit.expose_core import CoreEvent, ExposeCore, Settings
from natkit.exposure import typed_event
from natkit.portmap.pinhole_mappers import Pinhole

PINHOLE = Pinhole("pcp", "tcp", "2001:db8:77::10", 8080, 120, "2001:db8:77::1")


def _core() -> ExposeCore:
    return ExposeCore(Settings(8080), lambda event: None)  # made, never run


def test_pinhole_events_are_typed_as_the_cli_prints_them() -> None:
    kinds = {"renewed": events.PinholeRenewed, "lost": events.PinholeLost,
             "restored": events.PinholeRestored}  # fmt: skip
    for name, kind in kinds.items():
        info = {"reason": "the router rebooted"} if name == "lost" else {}
        typed = typed_event(CoreEvent("pinhole", name, info, pinhole=PINHOLE), _core())
        assert isinstance(typed, kind), typed
        assert typed.public_address == "[2001:db8:77::10]:8080" and typed.method == "pcp"
        cli_line = {"event": f"pinhole_{name}", **PINHOLE.to_json(), **info}
        assert typed.to_json() == cli_line


def test_switched_is_the_cli_line() -> None:
    info = {"from": "relay", "previous_address": "198.51.100.9:20000"}
    typed = typed_event(CoreEvent("core", "switched", info), _core())
    assert isinstance(typed, events.Switched) and typed.previous_method == "relay"
    assert typed.to_json() == {"event": "switched", **info}


def test_a_tunnel_that_never_opened_is_no_closed() -> None:
    never = CoreEvent("relay", "closed", {"public": "", "opened": False})
    assert typed_event(never, _core()) is None
    opened = CoreEvent("relay", "closed", {"public": "198.51.100.9:20000", "opened": True})
    assert typed_event(opened, _core()) == events.Closed("198.51.100.9:20000", "relay")
