"""``natkit expose --relay`` in auto mode on a lab router that offers no mapping (issue 14):

* the relay tunnel opens while the router is probed: ``ready`` (via the relay, "mapping":
  "probing") comes before the probe's verdict, which follows as ``fallback``;
* Ctrl-C while the router is still probed (the relay is not there) ends at once with exit
  130: no fallback, no ready, no closed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from natkit.lab import config as C
from natkit.lab.lab import Lab

TOKEN = "expose-auto-token-0123456789abcdef"
RELAY = f"{C.WAN_IPS[0]}:7835"
NATKIT = [sys.executable, "-m", "natkit.cli.main"]


def _popen(lab: Lab, node: str, args: list[str], state: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(lab.command(node, [*NATKIT, *args]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NATKIT_STATE_DIR": str(state)})  # fmt: skip


def _events(proc: subprocess.Popen[str], until: str) -> list[dict[str, Any]]:
    assert proc.stdout is not None
    seen: list[dict[str, Any]] = []
    for line in proc.stdout:
        seen.append(json.loads(line))
        assert "event" in seen[-1], seen
        if seen[-1]["event"] == until:
            return seen
    raise AssertionError(f"no {until!r}: {seen}; {proc.stderr.read() if proc.stderr else ''}")


def test_the_relay_goes_ahead_while_the_router_is_probed(make_lab: Callable[..., Lab], tmp_path: Path) -> None:  # fmt: skip
    lab = make_lab("nomap-auto", portmap=frozenset(), coturn=False)
    relay = _popen(lab, "wan", ["relay", "serve", "--listen", RELAY, "--token", TOKEN,
                                "--ports", "20000-20099", "--no-stun", "--json"], tmp_path / "r")  # fmt: skip
    web = lab.popen("lan", [sys.executable, "-m", "natkit.lab.webserver", C.LAN_IP, "8080", "hi\n"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert _events(relay, "ready")[-1]["public_host"] == C.WAN_IPS[0]
        time.sleep(0.5)  # the web server is up by now (the agent checks the local port first)
        agent = _popen(lab, "lan", ["expose", "8080", "--relay", RELAY, "--token", TOKEN,
                                    "--local-host", C.LAN_IP, "--json"], tmp_path / "a")  # fmt: skip
        seen = _events(agent, "fallback")
        names = [e["event"] for e in seen]
        assert names == ["ready", "fallback"], seen  # UPnP's discovery waits its 2 s
        assert seen[0]["method"] == "relay" and seen[0]["mapping"] == "probing", seen
        assert seen[1]["reason"].startswith("port mapping failed"), seen
        agent.send_signal(signal.SIGINT)
        out, err = agent.communicate(timeout=15)
        assert agent.returncode == 0, err
        assert [json.loads(line)["event"] for line in out.splitlines()] == ["closed"], out
        assert "Traceback" not in err, err
    finally:
        for proc in (relay, web):
            proc.terminate()
            proc.wait(10)


def test_ctrl_c_while_probing_ends_at_once(make_lab: Callable[..., Lab], tmp_path: Path) -> None:  # fmt: skip
    lab = make_lab("nomap-intr", portmap=frozenset(), coturn=False)
    # No relay runs: the agent retries while the router is probed.
    agent = _popen(lab, "lan", ["expose", "8080", "--relay", RELAY, "--token", TOKEN, "--json"],
                   tmp_path)  # fmt: skip
    time.sleep(0.8)
    agent.send_signal(signal.SIGINT)
    out, err = agent.communicate(timeout=15)
    assert agent.returncode == 130, (out, err)
    events = [json.loads(line)["event"] for line in out.splitlines()]
    # Nothing became public and nothing went on after Ctrl-C. (The router here answers PCP
    # and NAT-PMP with "port unreachable" at once and UPnP is given up after 0.4 s, so on a
    # slow start the mapping's `fallback` may come before the signal: it says why the
    # mapping failed, not that the relay was used.)
    assert "ready" not in events and "closed" not in events, out
    assert set(events[:-1]) <= {"local_unreachable", "fallback", "lost"}, out
    assert events[-1] == "error", out
    assert "Traceback" not in err, err


def test_a_mapping_proven_later_takes_over(make_lab: Callable[..., Lab], tmp_path: Path) -> None:
    """No head start for the mapping: the relay tunnel is announced first, then the router's
    mapping (PCP, NAT-PMP or UPnP) is proven from outside and takes over."""
    lab = make_lab("takeover", coturn=False)
    relay = _popen(lab, "wan", ["relay", "serve", "--listen", RELAY, "--token", TOKEN,
                                "--ports", "20000-20099", "--no-stun", "--json"], tmp_path / "r")  # fmt: skip
    web = lab.popen("lan", [sys.executable, "-m", "natkit.lab.webserver", C.LAN_IP, "8080", "hi\n"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _events(relay, "ready")
        time.sleep(0.5)
        agent = subprocess.Popen(
            lab.command("lan", [*NATKIT, "expose", "8080", "--relay", RELAY, "--token", TOKEN,
                                "--local-host", C.LAN_IP, "--json"]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "NATKIT_STATE_DIR": str(tmp_path / "a"),
                 "NATKIT_EXPOSE_HEAD_START": "0"},
        )  # fmt: skip
        seen = _events(agent, "switched")
        assert [e["event"] for e in seen] == ["ready", "switched"], seen
        assert seen[0]["method"] == "relay" and seen[0]["mapping"] == "probing", seen
        assert seen[1]["previous_address"] == seen[0]["public_address"], seen
        mapped = _events(agent, "ready")
        assert [e["event"] for e in mapped] == ["closed", "ready"], mapped  # the relay's, then
        assert mapped[0]["method"] == "relay", mapped
        assert mapped[1]["method"] in ("pcp", "natpmp", "upnp") and mapped[1]["verified"], mapped
        agent.send_signal(signal.SIGTERM)
        out, err = agent.communicate(timeout=15)
        assert agent.returncode == 0 and "Traceback" not in err, err
        closed = json.loads(out.splitlines()[-1])
        assert closed["event"] == "closed" and closed["removed"] is True, out
    finally:
        for proc in (relay, web):
            proc.terminate()
            proc.wait(10)
