"""``natkit lab up|status|exec|reboot|down`` through the real CLI (subprocesses, as root).

These commands run in the host's namespace, but only create and drive network namespaces:
nothing here talks to the host's network. Every lab is named with the test prefix.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import natkit.lab.lab as lab_mod
from natkit.cli import main as cli_main
from natkit.errors import EXIT_LOCAL, MissingPackageError
from natkit.lab import Lab, netns
from natkit.lab import config as C
from tests.conftest import IN_CI, LAB_PREFIX
from tests.lab.helpers import http_get, http_server, reachable

NATKIT = str(Path(sys.executable).parent / "natkit")
NAME = f"{LAB_PREFIX}-cli"
OTHER = f"{LAB_PREFIX}-cli2"
# Interface names that exist only inside a lab's namespaces.
LAB_IFNAMES = {"lan-p", "dev-p", C.RTR_WAN_IF, C.RTR_LAN_BRIDGE}

# Outside CI a non-root developer skips; in CI (root) a missing lab capability fails instead.
pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not IN_CI, reason="the lab needs root")


def nk(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("env", dict(os.environ, COLUMNS="100"))
    return subprocess.run(
        [NATKIT, *args], capture_output=True, text=True, timeout=60, check=False, **kw
    )


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    )
    assert "Traceback" not in proc.stderr
    return proc


def failed(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, f"unexpected success:\n{proc.stdout}"
    assert "error" in proc.stderr.lower(), proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    return proc.stderr


def last_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def down(name: str) -> None:
    nk("lab", "down", "--name", name)


def lab_namespaces(name: str) -> list[str]:
    return [f"{name}-{node}" for node in C.NODES]


@pytest.fixture(scope="module")
def cli_lab() -> Iterator[dict[str, Any]]:
    """A lab built with ``natkit lab up --json``; yields what that printed."""
    try:
        status = last_json(ok(nk("lab", "up", "--name", NAME, "--replace", "--json")))
        yield status
    finally:
        down(NAME)
    assert not any(netns.exists(ns) for ns in lab_namespaces(NAME))


def test_up_and_status(cli_lab: dict[str, Any]) -> None:
    assert cli_lab["name"] == NAME and cli_lab["nat"] == "eim"
    assert cli_lab["portmap"] == ["natpmp", "pcp", "upnp"]
    nodes = cli_lab["nodes"]
    assert set(nodes) == set(C.NODES)
    assert nodes["lan"]["addresses"] == [f"{C.LAN_IP}/24"]
    assert nodes["dev"]["addresses"] == [f"{C.DEV_IP}/24"]
    assert set(nodes["rtr"]["addresses"]) == {f"{C.RTR_LAN_IP}/24", f"{C.RTR_WAN_IP}/24"}
    assert set(nodes["wan"]["addresses"]) == {f"{ip}/24" for ip in C.WAN_IPS}
    for node, info in nodes.items():
        assert info["netns"] == f"{NAME}-{node}" and netns.exists(info["netns"])
    router = cli_lab["router"]
    assert (router["lan_ip"], router["wan_ip"]) == (C.RTR_LAN_IP, C.RTR_WAN_IP)
    assert router["miniupnpd_running"] and isinstance(router["miniupnpd_pid"], int)

    status = last_json(ok(nk("lab", "status", "--name", NAME, "--json")))
    assert status["nodes"] == nodes and status["router"]["lan_ip"] == C.RTR_LAN_IP

    human = ok(nk("lab", "status", "--name", NAME)).stdout
    for node in C.NODES:
        assert f"{NAME}-{node}" in human
    for ip in (C.LAN_IP, C.DEV_IP, C.RTR_LAN_IP, C.RTR_WAN_IP, *C.WAN_IPS):
        assert ip in human, f"{ip} missing from:\n{human}"
    assert f"LAN {C.RTR_LAN_IP}" in human and f"WAN {C.RTR_WAN_IP}" in human
    assert "miniupnpd running" in human and "{" not in human


def test_exec_runs_on_the_node_and_passes_the_exit_code(cli_lab: dict[str, Any]) -> None:
    out = ok(nk("lab", "exec", "--name", NAME, "wan", "--", "ip", "-4", "addr")).stdout
    assert all(ip in out for ip in C.WAN_IPS) and C.LAN_IP not in out
    out = ok(nk("lab", "exec", "--name", NAME, "lan", "--", "ip", "-4", "-o", "addr")).stdout
    assert C.LAN_IP in out and C.WAN_IPS[0] not in out
    # Options of the command itself are not natkit's.
    out = ok(nk("lab", "exec", "--name", NAME, "lan", "--", "ip", "-o", "link", "show")).stdout
    assert C.HOST_IF in out
    proc = nk("lab", "exec", "--name", NAME, "dev", "--", "sh", "-c", "echo hi; exit 7")
    assert proc.returncode == 7 and proc.stdout == "hi\n"
    rules = ok(nk("lab", "exec", "--name", NAME, "rtr", "--", "nft", "list", "ruleset")).stdout
    assert "masquerade" in rules and "masquerade random" not in rules


def test_exec_errors(cli_lab: dict[str, Any]) -> None:
    proc = nk("lab", "exec", "--name", NAME, "moon", "--", "true")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = nk("lab", "exec", "--name", NAME, "lan", "--")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = failed(nk("lab", "exec", "--name", f"{LAB_PREFIX}-absent", "lan", "--", "true"))
    assert f"{LAB_PREFIX}-absent" in message


def test_up_of_an_existing_name_needs_replace(cli_lab: dict[str, Any]) -> None:
    message = failed(nk("lab", "up", "--name", NAME))
    assert "already exists" in message and NAME in message and "lab down" in message
    # The lab is untouched: same daemon, still up.
    status = last_json(ok(nk("lab", "status", "--name", NAME, "--json")))
    assert status["router"]["miniupnpd_pid"] == cli_lab["router"]["miniupnpd_pid"]
    assert status["router"]["miniupnpd_running"]


def test_bad_options_are_clear_errors() -> None:
    message = failed(nk("lab", "up", "--name", f"{LAB_PREFIX}-bad", "--portmap", "carrier-pigeon"))
    assert "carrier-pigeon" in message
    proc = nk("lab", "up", "--name", f"{LAB_PREFIX}-bad", "--nat", "cone")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not any(netns.exists(ns) for ns in lab_namespaces(f"{LAB_PREFIX}-bad"))
    message = failed(nk("lab", "status", "--name", f"{LAB_PREFIX}-absent"))
    assert "no lab named" in message


def test_reboot_forgets_mappings_and_restarts_the_daemon(
    cli_lab: dict[str, Any], tmp_path: Path
) -> None:
    the_lab = Lab.open(NAME)
    env = dict(os.environ, NATKIT_STATE_DIR=str(tmp_path))
    before = cli_lab["router"]["miniupnpd_pid"]
    with http_server(the_lab, "lan", C.LAN_IP, 0, "before reboot") as port:
        add = [NATKIT, "map", "add", str(port), "--via", "upnp", "--lease", "300", "--json"]
        ok(the_lab.run("lan", add, env=env, timeout=30))
        assert http_get(the_lab, "wan", C.RTR_WAN_IP, port) == "before reboot"
        assert f"dport {port} dnat" in the_lab.router_rules()

        ok(nk("lab", "reboot", "--name", NAME, "rtr"))

        status = last_json(ok(nk("lab", "status", "--name", NAME, "--json")))
        after = status["router"]["miniupnpd_pid"]
        assert status["router"]["miniupnpd_running"] and after not in (None, before)
        assert f"dport {port} dnat" not in the_lab.router_rules()
        assert not reachable(the_lab, "wan", C.RTR_WAN_IP, port), "mapping survived the reboot"
        listing = the_lab.run("lan", [NATKIT, "map", "list", "--via", "upnp", "--json"], env=env)
        lines = [json.loads(line) for line in ok(listing).stdout.splitlines()]
        assert lines[-1]["event"] == "listed"
        assert all(m["external_port"] != port for m in lines if m["event"] == "mapping")
        # The daemon answers again: a new mapping works.
        ok(the_lab.run("lan", add, env=env, timeout=30))
        assert http_get(the_lab, "wan", C.RTR_WAN_IP, port) == "before reboot"
        delete = [NATKIT, "map", "delete", str(port), "--via", "upnp"]
        ok(the_lab.run("lan", delete, env=env, timeout=30))


def ip_json(*args: str) -> Any:
    """``ip -j ARGS``, parsed (in the host's namespace unless ARGS has ``-n NS``)."""
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=False).stdout
    return json.loads(out or "[]")


def test_the_lab_has_no_link_to_the_host(cli_lab: dict[str, Any]) -> None:
    assert not LAB_IFNAMES & {link["ifname"] for link in ip_json("link", "show")}
    for link in ip_json("-4", "addr", "show"):
        for info in link.get("addr_info", []):
            assert not info["local"].startswith(("192.168.77.", "100.200.")), link
    for dst in (C.LAN_IP, C.RTR_WAN_IP):
        for route in ip_json("route", "get", dst):
            assert route.get("dev") not in LAB_IFNAMES, route
    # Inside, every veth leads to another namespace of the same lab, never to the host.
    own = set(lab_namespaces(NAME))
    for ns in own:
        peers = {i["nsid"]: i.get("name") for i in ip_json("-n", ns, "netns", "list-id")}
        for link in ip_json("-n", ns, "link", "show"):
            if "link_netnsid" in link:
                assert peers.get(link["link_netnsid"]) in own - {ns}, (ns, link["ifname"], peers)

    # A service on the host's loopback is out of the LAN's reach (lan has its own loopback).
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        connect = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)"
        probe = nk("lab", "exec", "--name", NAME, "lan", "--", sys.executable, "-c", connect)
        assert probe.returncode != 0 and "ConnectionRefused" in probe.stderr, probe.stderr
        srv.setblocking(False)
        with pytest.raises(BlockingIOError):
            srv.accept()  # nothing connected to the host's server


def test_second_lab_without_portmap_and_with_random_nat(cli_lab: dict[str, Any]) -> None:
    try:
        up = f"lab up --name {OTHER} --portmap none --nat random --replace --json"
        status = last_json(ok(nk(*up.split())))
        assert status["name"] == OTHER and status["nat"] == "random" and status["portmap"] == []
        router = status["router"]
        assert not router["miniupnpd_running"] and router["miniupnpd_pid"] is None
        assert router["upnp_description"] is None and router["natpmp_port"] is None
        human = ok(nk("lab", "status", "--name", OTHER)).stdout
        assert "miniupnpd off" in human and "portmap=none" in human
        # Nothing runs on its router: no daemon.
        pids = subprocess.run(
            ["ip", "netns", "pids", f"{OTHER}-rtr"], capture_output=True, text=True, check=True
        ).stdout.split()
        assert pids == []
        rules = ok(nk("lab", "exec", "--name", OTHER, "rtr", "--", "nft", "list", "ruleset")).stdout
        assert "masquerade random" in rules
        assert "masquerade random" in Lab.open(OTHER).router_rules()

        # Both labs are up side by side, each with its own namespaces and router.
        first = last_json(ok(nk("lab", "status", "--name", NAME, "--json")))
        assert first["router"]["miniupnpd_running"] and first["nat"] == "eim"
        for name in (NAME, OTHER):
            assert all(netns.exists(ns) for ns in lab_namespaces(name))
        out = ok(nk("lab", "exec", "--name", OTHER, "wan", "--", "ip", "-4", "addr")).stdout
        assert all(ip in out for ip in C.WAN_IPS)

        # Replacing rebuilds it with the new settings.
        status = last_json(
            ok(nk("lab", "up", "--name", OTHER, "--portmap", "natpmp", "--replace", "--json"))
        )
        assert status["portmap"] == ["natpmp"] and status["nat"] == "eim"
        assert status["router"]["miniupnpd_running"] and status["router"]["natpmp_port"] == 5351
        assert status["router"]["upnp_description"] is None
    finally:
        first_down = nk("lab", "down", "--name", OTHER)
        second_down = nk("lab", "down", "--name", OTHER)
    ok(first_down)
    ok(second_down)
    assert OTHER in second_down.stdout
    assert not any(netns.exists(ns) for ns in lab_namespaces(OTHER))
    assert not Path(lab_mod.STATE_ROOT, OTHER).exists()
    assert "no lab named" in failed(nk("lab", "status", "--name", OTHER))
    # The first lab did not notice.
    first = last_json(ok(nk("lab", "status", "--name", NAME, "--json")))
    assert first["router"]["miniupnpd_running"]


def test_not_root_is_a_clear_error() -> None:
    name = f"{LAB_PREFIX}-x"
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    env = dict(os.environ, HOME="/nonexistent")
    for cmd in (["lab", "up", "--name", name], ["lab", "down", "--name", name]):
        proc = subprocess.run(
            [*nobody, NATKIT, *cmd],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        message = failed(proc)
        assert "root" in message, message
    assert not any(netns.exists(ns) for ns in lab_namespaces(name))


def test_missing_package_names_the_apt_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_which = lab_mod._which
    monkeypatch.setattr(lab_mod, "_which", lambda b: None if b == "miniupnpd" else real_which(b))
    with pytest.raises(MissingPackageError) as info:
        lab_mod.check_host()
    assert info.value.packages == ["miniupnpd-nftables"]
    assert "apt-get install -y miniupnpd-nftables" in str(info.value)

    # Through the CLI's entry point: a one-line error, exit code 5 (this machine), nothing built.
    name = f"{LAB_PREFIX}-nopkg"
    monkeypatch.setattr(sys, "argv", ["natkit", "lab", "up", "--name", name])
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main()
    assert exit_info.value.code == EXIT_LOCAL
    err = capsys.readouterr().err
    assert "error:" in err and "apt-get install -y miniupnpd-nftables" in err
    assert "Traceback" not in err
    assert not any(netns.exists(ns) for ns in lab_namespaces(name))
