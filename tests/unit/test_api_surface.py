"""The Python API's shape (issue 14, item 3): ``import natkit`` stays cheap and reaches
every subpackage lazily, sync and async twins take identical parameters, every exported
exception is raised somewhere in natkit, bad arguments get messages a user can act on,
and a user's typed program is ``mypy --strict`` clean. No network."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import natkit
from natkit import events
from natkit.api import takes_event_object
from natkit.portmap.mapping import PortMapping

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
TWINS = [
    ("open_port", "open_port_async"),
    ("connect", "connect_async"),
    ("expose", "expose_async"),
    ("list_mappings", "list_mappings_async"),
    ("delete_mapping", "delete_mapping_async"),
]


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_p2p_is_reachable_from_a_bare_import_natkit() -> None:
    # The README's example failed with AttributeError unless natkit.p2p was imported first.
    out = _python("import natkit; print(natkit.p2p.connect.__module__, natkit.events.Ready)")
    assert out.startswith("natkit.p2p ")


def test_import_natkit_loads_nothing_else() -> None:
    out = _python("import sys, natkit; print(sorted(m for m in sys.modules if 'natkit' in m))")
    assert out.strip() == "['natkit']"


def test_everything_in_all_resolves() -> None:
    for name in natkit.__all__:
        assert getattr(natkit, name) is not None, name
    assert set(natkit.__all__) <= set(dir(natkit))
    with pytest.raises(AttributeError):
        natkit.no_such_thing  # noqa: B018


@pytest.mark.parametrize(("sync", "async_"), TWINS)
def test_sync_and_async_twins_take_identical_parameters(sync: str, async_: str) -> None:
    a = inspect.signature(getattr(natkit, sync)).parameters
    b = inspect.signature(getattr(natkit, async_)).parameters
    assert list(a.values()) == list(b.values())


def test_every_exported_exception_is_raised_somewhere() -> None:
    exported = [
        name
        for name in natkit.__all__
        if isinstance(getattr(natkit, name), type) and issubclass(getattr(natkit, name), Exception)
    ]
    assert {"RelayError", "RelayAuthError", "RelayTrustError", "TunnelRefusedError"} <= set(
        exported
    )
    code = "\n".join(p.read_text() for p in SRC.rglob("*.py"))
    for name in exported:
        # raised by name, built to be raised later, or chosen as the class that
        # errors.upnp_error builds
        raised = re.search(rf"(raise {name}\(|= {name}\(|cls(: [^=\n]+)? = {name}\b)", code)
        assert raised, f"natkit exports {name} but never raises it"


def test_bad_ports_get_messages_a_user_can_act_on() -> None:
    with pytest.raises(TypeError, match=r"int from 1 to 65535.*without quotes"):
        natkit.open_port("8080")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="from 1 to 65535, not 0"):
        natkit.open_port(0)
    with pytest.raises(ValueError, match="from 1 to 65535, not 0"):
        natkit.connect(0, relay="127.0.0.1:1", token="t" * 32)
    with pytest.raises(ValueError, match="70000"):
        natkit.expose(70000)
    with pytest.raises(TypeError, match="int from 1 to 65535"):
        natkit.delete_mapping("8080")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="via must be"):
        natkit.expose(8080, via="carrier-pigeon")
    with pytest.raises(ValueError, match="one of http and tls"):
        natkit.expose(8080, http=True, tls=True, relay="127.0.0.1:1", token="t" * 32)


def test_a_relay_without_settings_names_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NATKIT_RELAY", raising=False)
    monkeypatch.delenv("NATKIT_TOKEN", raising=False)
    with pytest.raises(natkit.RelayError, match=r"NATKIT_RELAY.*NATKIT_TOKEN"):
        natkit.connect(8080)
    with pytest.raises(natkit.RelayError, match="NATKIT_TOKEN") as caught:
        natkit.connect(8080, "http", relay="127.0.0.1:1")
    assert "NATKIT_RELAY" not in str(caught.value)
    with pytest.raises(natkit.RelayError, match="NATKIT_RELAY"):
        natkit.expose(8080, via="relay")
    monkeypatch.setenv("NATKIT_RELAY", "127.0.0.1:1")
    with pytest.raises(natkit.RelayError, match="NATKIT_TOKEN"):
        natkit.expose(8080)  # $NATKIT_RELAY read: auto mode now wants the relay's token


def test_pyngrok_calling_shapes() -> None:
    from natkit.relay.api import tunnel_kind, tunnel_target

    assert tunnel_target(8080, None, "127.0.0.1") == ("127.0.0.1", 8080)
    assert tunnel_target(None, "8080", "127.0.0.1") == ("127.0.0.1", 8080)
    assert tunnel_target(None, "10.0.0.5:80", "127.0.0.1") == ("10.0.0.5", 80)
    assert tunnel_kind("http", "tcp") == "http"
    assert tunnel_kind(None, "tls") == "tls"
    with pytest.raises(ValueError, match="no equivalent of pyngrok's proto 'labeled'"):
        natkit.connect(8080, "labeled", relay="127.0.0.1:1", token="t" * 32)
    with pytest.raises(ValueError, match="proto must be tcp, http or tls"):
        natkit.connect(8080, "udp", relay="127.0.0.1:1", token="t" * 32)
    with pytest.raises(ValueError, match="not PORT or HOST:PORT"):
        natkit.connect(addr="localhost", relay="127.0.0.1:1", token="t" * 32)
    with pytest.raises(TypeError, match="not both"):
        natkit.connect(8080, addr="8080", relay="127.0.0.1:1", token="t" * 32)


def test_events_are_typed_and_match_the_cli_json() -> None:
    m = PortMapping("natpmp", "tcp", "192.168.1.2", 8080, "198.51.100.7", 8080, 3600)
    lost = events.from_mapping("lost", m, {"reason": "router rebooted"})
    assert lost == events.Lost("198.51.100.7:8080", "natpmp", m, reason="router rebooted")
    assert isinstance(lost, events.Event)
    line = lost.to_json()
    assert line["event"] == "lost" and line["reason"] == "router rebooted"
    assert line["external_port"] == 8080 and line["method"] == "natpmp"
    with pytest.raises(AttributeError):
        lost.reason = "x"  # type: ignore[misc]  # frozen
    relay = events.from_relay("reconnecting", {"reason": "refused", "delay": 0.5}, "r:20000")
    assert relay == events.Lost("r:20000", "relay", reason="refused", retry_in=0.5)
    ready = events.from_relay("ready", {"public": "r:20001"}, "")
    assert isinstance(ready, events.Ready) and ready.public_address == "r:20001"
    assert events.from_relay("notice", {}, "") is None


def test_old_style_listeners_are_told_apart_from_typed_ones() -> None:
    assert takes_event_object(lambda event: None)
    assert takes_event_object(print)  # *args
    assert not takes_event_object(lambda name, mapping, info: None)
    assert not takes_event_object(lambda name, info: None)


def test_a_users_typed_program_is_mypy_strict_clean() -> None:
    usage = Path(__file__).with_name("api_usage_typed.py")
    env = {**os.environ, "MYPYPATH": str(SRC)}
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(usage)],
        env=env, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # and mypy does look: a wrong call is caught
    wrong = usage.read_text() + "\nnatkit.open_port('8080')\n"
    bad = Path(os.environ.get("TMPDIR", "/tmp")) / "natkit_api_usage_wrong.py"
    bad.write_text(wrong)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(bad)],
        env=env, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 1 and "arg-type" in done.stdout, done.stdout


def test_p2p_reads_the_same_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NATKIT_RELAY", raising=False)
    monkeypatch.delenv("NATKIT_TOKEN", raising=False)
    with pytest.raises(natkit.RelayError, match=r"NATKIT_RELAY and .*NATKIT_TOKEN"):
        asyncio.run(natkit.p2p.connect("room"))
    monkeypatch.setenv("NATKIT_RELAY", "127.0.0.1:1")
    with pytest.raises(natkit.RelayError, match="NATKIT_TOKEN") as caught:
        asyncio.run(natkit.p2p.listen("room"))
    assert "NATKIT_RELAY" not in str(caught.value)
