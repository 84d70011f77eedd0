"""``natkit map`` on the lab's router (real miniupnpd: UPnP, NAT-PMP and PCP on one table),
issue 14's findings: a mapping made with PCP is listed as PCP (not as the UPnP row the
shared table shows) and deleted with PCP; deleting a mapping that does not exist is the same
error whatever the protocol, except NAT-PMP's blind delete by internal port, which says it
cannot tell."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from natkit.errors import EXIT_ERROR, EXIT_LOCAL
from natkit.lab import Lab
from natkit.lab import config as C
from tests.lab.test_cli import _private_state, natkit, ok  # noqa: F401  (autouse fixture)


def events(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines and all("event" in e for e in lines), proc.stdout
    return lines


def listed(lab: Lab) -> list[dict[str, Any]]:
    *mappings, last = events(ok(natkit(lab, "lan", "map", "list", "--json")))
    assert last == {"event": "listed", "count": len(mappings)}
    return mappings


def test_a_pcp_mapping_is_listed_and_deleted_as_pcp(lab: Lab) -> None:
    port = 23456
    [made] = events(ok(natkit(lab, "lan", "map", "add", port, "--via", "pcp", "--lease", 120,
                              "--json")))  # fmt: skip
    assert made["event"] == "mapped" and made["method"] == "pcp"
    external = made["external_port"]
    try:
        mine = [m for m in listed(lab) if m["external_port"] == external]
        # The router's UPnP table shows it too: listed once, as what made it.
        assert [m["method"] for m in mine] == ["pcp"], mine
        assert (mine[0]["internal_ip"], mine[0]["internal_port"]) == (C.LAN_IP, port)
        human = ok(natkit(lab, "lan", "map", "list")).stdout
        row = next(line for line in human.splitlines() if f":{external}" in line)
        assert "pcp" in row and "upnp" not in row, human
    finally:
        gone = events(ok(natkit(lab, "lan", "map", "delete", external, "--json")))
    assert gone == [{"event": "deleted", "method": "pcp", "external_port": external,
                     "protocol": "tcp", "existed": True}]  # fmt: skip
    assert not [m for m in listed(lab) if m["external_port"] == external]


@pytest.mark.parametrize("via", ["auto", "upnp", "natpmp", "pcp"])
def test_deleting_a_mapping_that_does_not_exist_is_an_error(lab: Lab, via: str) -> None:
    absent = 34567
    for extra in ((), ("--json",)):
        proc = natkit(lab, "lan", "map", "delete", absent, "--via", via, *extra)
        assert proc.returncode == EXIT_ERROR, (proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert f"no {'' if via in ('auto', 'upnp') else via + ' '}mapping of external port " \
               f"{absent}/tcp on {C.RTR_LAN_IP}" in proc.stderr, proc.stderr  # fmt: skip
        if extra:
            [error] = events(proc)
            assert error["event"] == "error" and error["exit_code"] == EXIT_ERROR
        else:
            assert not proc.stdout


def test_natpmp_delete_by_internal_port_says_it_cannot_tell(lab: Lab) -> None:
    args = ("map", "delete", 34568, "--via", "natpmp", "--internal-port", 34568)
    [answer] = events(ok(natkit(lab, "lan", *args, "--json")))
    assert answer == {"event": "deleted", "method": "natpmp", "external_port": 34568,
                      "protocol": "tcp", "existed": None}  # fmt: skip
    human = ok(natkit(lab, "lan", *args)).stdout
    assert "natkit cannot tell" in human and "34568" in human


@pytest.mark.parametrize("via", ["pcp", "natpmp"])
def test_a_mapping_that_cannot_be_recorded_is_not_left_behind(
    lab: Lab, via: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unusable state directory (a service user's HOME=/nonexistent; here a path under a
    file, which even root cannot create): a StateError (exit 5) naming it, found before the
    router is asked, so no mapping natkit could not record is left for its lease (map.py
    also removes one again should the directory fail after the router mapped)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("NATKIT_STATE_DIR", str(blocker / "state"))
    port = 23457 if via == "pcp" else 23458
    for extra in ((), ("--json",)):
        proc = natkit(lab, "lan", "map", "add", port, "--via", via, "--lease", 120, *extra)
        assert proc.returncode == EXIT_LOCAL, (proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert f"state directory {blocker / 'state'}" in proc.stderr, proc.stderr
        assert "NATKIT_STATE_DIR" in proc.stderr
        if extra:
            [error] = events(proc)
            assert error["event"] == "error" and error["error"] == "StateError"
        assert f"dport {port} dnat" not in lab.router_rules(), "the mapping was left behind"
    proc = natkit(lab, "lan", "map", "list", "--json")
    assert proc.returncode == EXIT_LOCAL and events(proc)[-1]["error"] == "StateError"
