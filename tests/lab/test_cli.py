"""``natkit map add|list|delete`` as a user runs it: the real CLI, on a LAN host of the lab.

Every command runs as a subprocess inside a lab node (``ip netns exec``), never in the
host's namespace, where it would talk to this machine's real gateway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from natkit.lab import Lab
from natkit.lab import config as C
from tests.lab.helpers import http_get, http_server, reachable, udp_ask, udp_echo

NATKIT = str(Path(sys.executable).parent / "natkit")


@pytest.fixture(autouse=True)
def _private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """natkit's record of its mappings goes to a scratch dir, not root's home."""
    monkeypatch.setenv("NATKIT_STATE_DIR", str(tmp_path / "state"))
    # Piped output: rich lays tables out for 80 columns, a narrow terminal's width.
    monkeypatch.setenv("COLUMNS", "80")


def natkit(lab: Lab, node: str, *args: object) -> subprocess.CompletedProcess[str]:
    """Run ``natkit ARGS`` on a lab node."""
    return lab.run(node, [NATKIT, *map(str, args)], timeout=30, env=dict(os.environ))


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    )
    assert "Traceback" not in proc.stderr
    return proc


def failed(proc: subprocess.CompletedProcess[str]) -> str:
    """A clean failure: non-zero exit, an ``error:`` line on stderr, no traceback."""
    assert proc.returncode != 0, f"unexpected success:\n{proc.stdout}"
    assert "error:" in proc.stderr.lower(), proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    return proc.stderr


def no_result(proc: subprocess.CompletedProcess[str], as_json: bool) -> None:
    """A failure prints no result: nothing on stdout, or under --json only the error line."""
    if not as_json:
        assert not proc.stdout.strip(), proc.stdout
        return
    [line] = proc.stdout.strip().splitlines()
    error = json.loads(line)
    assert error["event"] == "error" and error["exit_code"] == proc.returncode, error
    assert error["message"] in proc.stderr


def last_json(proc: subprocess.CompletedProcess[str]) -> Any:
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr: {proc.stderr}"
    return json.loads(lines[-1])


def listed(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """``map list --json``: one ``mapping`` line per mapping, then ``listed`` with the count."""
    events = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    *mappings, last = events
    assert last == {"event": "listed", "count": len(mappings)}, events
    assert all(m["event"] == "mapping" for m in mappings), events
    return mappings


def upnpc_listing(lab: Lab, discover: bool = False) -> str:
    """The reference client's view of the router's mapping table. Its own SSDP discovery
    always waits 2 s, so by default it is given the IGD's description URL instead."""
    url = f"http://{C.RTR_LAN_IP}:{lab.cfg.upnp_port}/rootDesc.xml"
    argv = ["upnpc", "-l"] if discover else ["upnpc", "-u", url, "-l"]
    listing = lab.run("lan", argv, timeout=30).stdout
    assert C.RTR_WAN_IP in listing, f"upnpc found no IGD:\n{listing}"
    return listing


@pytest.fixture
def cleanup(lab: Lab) -> Iterator[list[tuple[str, int, str]]]:
    """(node, external port, protocol) of mappings to remove after the test, whatever happens."""
    todo: list[tuple[str, int, str]] = []
    yield todo
    for node, port, proto in todo:
        natkit(lab, node, "map", "delete", port, "--protocol", proto, "--via", "upnp")


MAPPING_KEYS = {
    "method",
    "protocol",
    "internal_ip",
    "internal_port",
    "external_ip",
    "external_port",
    "lease",
    "description",
}


def test_add_json_reachable_listed_deleted(lab: Lab, cleanup: list[tuple[str, int, str]]) -> None:
    with http_server(lab, "lan", C.LAN_IP, 0, "via the cli") as port:
        assert not reachable(lab, "wan", C.RTR_WAN_IP, port), "reachable before any mapping"
        desc = f"nkc cli {port}"
        cleanup.append(("lan", port, "tcp"))
        proc = ok(
            natkit(
                lab,
                "lan",
                "map",
                "add",
                port,
                "--via",
                "upnp",
                "--lease",
                300,
                "--description",
                desc,
                "--json",
            )
        )
        m = last_json(proc)
        assert isinstance(m, dict) and m.keys() >= MAPPING_KEYS and m["event"] == "mapped"
        assert m["method"] == "upnp" and m["protocol"] == "tcp"
        assert (m["internal_ip"], m["internal_port"]) == (C.LAN_IP, port)
        assert (m["external_ip"], m["external_port"]) == (C.RTR_WAN_IP, port)
        assert m["lease"] == 300 and m["description"] == desc

        # It really works: the Internet reaches the LAN server through the router.
        assert http_get(lab, "wan", m["external_ip"], m["external_port"]) == "via the cli"
        assert http_get(lab, "wan", C.RTR_WAN_IP, port) == "via the cli"
        # The reference client sees it.
        listing = upnpc_listing(lab, discover=True)
        assert f"TCP {port}->{C.LAN_IP}:{port}" in listing and desc in listing

        # natkit's own listing, JSON and human.
        table = listed(ok(natkit(lab, "lan", "map", "list", "--via", "upnp", "--json")))
        assert all(x.keys() >= MAPPING_KEYS for x in table)
        mine = [x for x in table if x["external_port"] == port and x["protocol"] == "tcp"]
        assert len(mine) == 1, listed
        assert mine[0]["description"] == desc and mine[0]["internal_ip"] == C.LAN_IP
        assert mine[0]["internal_port"] == port and mine[0]["method"] == "upnp", table
        assert 0 < mine[0]["lease"] <= 300
        human = ok(natkit(lab, "lan", "map", "list", "--via", "upnp")).stdout
        assert f"{C.RTR_WAN_IP}:{port}" in human and f"{C.LAN_IP}:{port}" in human
        assert all(word in human for word in desc.split()), human  # it may wrap
        assert "{" not in human

        # Delete it: gone from the router, from upnpc's listing and from the Internet.
        gone = last_json(ok(natkit(lab, "lan", "map", "delete", port, "--via", "upnp", "--json")))
        assert gone == {"event": "deleted", "method": "upnp", "external_port": port,
                        "protocol": "tcp", "existed": True}  # fmt: skip
        assert not reachable(lab, "wan", C.RTR_WAN_IP, port), "still reachable after delete"
        assert f"{port}->" not in upnpc_listing(lab)
        table = listed(ok(natkit(lab, "lan", "map", "list", "--via", "upnp", "--json")))
        assert not [x for x in table if x["external_port"] == port and x["protocol"] == "tcp"]


def test_add_udp_other_external_port_human_output(
    lab: Lab, cleanup: list[tuple[str, int, str]]
) -> None:
    with udp_echo(lab, "lan", C.LAN_IP) as port:
        external = 20000 + port % 20000
        cleanup.append(("lan", external, "udp"))
        proc = ok(
            natkit(
                lab,
                "lan",
                "map",
                "add",
                port,
                "--external-port",
                external,
                "--protocol",
                "udp",
                "--lease",
                120,
                "--via",
                "upnp",
                "--description",
                "nkc-udp",
            )
        )
        # A short table a person can read: every essential, whole, on an 80-column output.
        out = proc.stdout
        assert len(out.splitlines()) < 10
        assert all(len(line) <= 80 for line in out.splitlines())
        for text in ("udp", f"{C.RTR_WAN_IP}:{external}", f"{C.LAN_IP}:{port}", "120 s", "upnp"):
            assert text in out, f"{text!r} missing from:\n{out}"
        assert "nkc-udp" in out
        assert "{" not in out and "warning" not in proc.stderr

        assert udp_ask(lab, "wan", C.RTR_WAN_IP, external, b"ping") == b"echo:ping"
        assert f"UDP {external}->{C.LAN_IP}:{port}" in upnpc_listing(lab)

        deleted = ok(natkit(lab, "lan", "map", "delete", external, "--protocol", "udp"))
        assert f"{external}" in deleted.stdout and "udp" in deleted.stdout
        assert f"{external}->" not in upnpc_listing(lab)
        assert udp_ask(lab, "wan", C.RTR_WAN_IP, external, b"ping", timeout=0.5) is None


def test_conflict_names_the_holder(lab: Lab, cleanup: list[tuple[str, int, str]]) -> None:
    with http_server(lab, "lan", C.LAN_IP, 0, "lan's") as port:
        cleanup.append(("dev", port, "tcp"))
        held = last_json(
            ok(
                natkit(
                    lab,
                    "dev",
                    "map",
                    "add",
                    port,
                    "--via",
                    "upnp",
                    "--lease",
                    300,
                    "--description",
                    "dev's",
                    "--json",
                )
            )
        )
        assert (held["internal_ip"], held["external_port"]) == (C.DEV_IP, port)

        for extra in ((), ("--json",)):
            proc = natkit(
                lab,
                "lan",
                "map",
                "add",
                port,
                "--external-port",
                port,
                "--via",
                "upnp",
                "--lease",
                300,
                *extra,
            )
            message = failed(proc)
            assert C.DEV_IP in message and str(port) in message, message
            assert "already mapped" in message
            no_result(proc, as_json=bool(extra))
        # dev's mapping is untouched.
        assert f"TCP {port}->{C.DEV_IP}:{port}" in upnpc_listing(lab)

        # Without an explicit external port, natkit finds a free one instead.
        m = last_json(
            ok(natkit(lab, "lan", "map", "add", port, "--via", "upnp", "--lease", 300, "--json"))
        )
        cleanup.append(("lan", m["external_port"], "tcp"))
        assert m["external_port"] != port and m["internal_port"] == port
        assert http_get(lab, "wan", m["external_ip"], m["external_port"]) == "lan's"


def test_router_without_upnp_is_a_clear_error(make_lab) -> None:  # type: ignore[no-untyped-def]
    off = make_lab("noupnp", portmap=frozenset({"natpmp", "pcp"}))
    for args in (
        ("map", "add", 8080, "--via", "upnp", "--timeout", 0.5),
        ("map", "add", 8080, "--via", "upnp", "--timeout", 0.5, "--json"),
        ("map", "list", "--via", "upnp", "--timeout", 0.5),
        ("map", "delete", 8080, "--via", "upnp", "--timeout", 0.5),
    ):
        proc = natkit(off, "lan", *args)
        message = failed(proc)
        assert "upnp" in message.lower(), message
        no_result(proc, as_json="--json" in args)
    # Nothing was mapped, and listing what natkit knows of still works.
    proc = ok(natkit(off, "lan", "map", "list", "--timeout", 0.5, "--json"))
    assert listed(proc) == []
    assert "no port mappings" in ok(natkit(off, "lan", "map", "list", "--timeout", 0.5)).stdout


@pytest.mark.parametrize(
    "args",
    [
        ("map", "add", "0"),
        ("map", "add", "70000"),
        ("map", "add", "8080", "--protocol", "sctp"),
        ("map", "add", "8080", "--lease", "-5"),
        ("map", "add", "8080", "--via", "carrier-pigeon"),
        ("map", "delete"),
        ("map", "frobnicate"),
    ],
)
def test_bad_arguments_are_usage_errors(lab: Lab, args: tuple[str, ...]) -> None:
    proc = natkit(lab, "lan", *args)
    assert proc.returncode == 2, proc
    assert "Error" in proc.stderr and "Traceback" not in proc.stderr
    assert not proc.stdout.strip()
