"""``natkit map add PORT --ipv6`` in a child process that looks like a Mac or a Windows
machine: /proc cannot be opened (with the other Linux-only parts hidden, as in
test_platform_hidden.py), ``sys.platform`` is set, the routing commands answer from files
(never run), and ``--via pcp`` (no UPnP discovery: nothing is sent anywhere), and ifaddr lists made-up interfaces. The router
cannot be found, or (as here, where the Mac's en0 does not exist) cannot be reached: the
error must say so and how to name it, from the CLI, with no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_platform_hidden import EVERYTHING, HIDE, SRC

SAMPLES = Path(__file__).parent / "routes_samples"
RUN_MAIN = "from natkit.cli.main import main\n"
# After the Linux-only parts are hidden, before natkit's CLI runs: the platform (what natkit
# asks when it reads the tables), its commands (a file's text, or a failure) and its
# interfaces.
FAKE_PLATFORM = r"""
import json, ifaddr
import natkit.cli.map, natkit.cli.map_v6, rich.console, rich.table  # first: libraries that test win32 at import
sys.platform = os.environ["NATKIT_TEST_PLATFORM"]
from natkit.errors import DiscoveryError
from natkit.net import routes
answers = json.loads(os.environ["NATKIT_TEST_COMMANDS"])
def run_command(argv, timeout=routes.COMMAND_TIMEOUT):
    name = argv[0].replace("\\", "/").rsplit("/", 1)[-1]
    answer = answers[name]
    if answer.startswith("fail:"):
        raise DiscoveryError(answer[5:])
    with open(answer, encoding="utf-8", errors="replace") as f:
        return f.read()
routes.run_command = run_command
ifaddr.get_adapters = lambda: [ifaddr.Adapter("en0", "en0", [
    ifaddr.IP(("2001:db8:1234:5600:1c2b:3d4e:5f60:7182", 0, 0), 64, "en0"),
    ifaddr.IP(("fe80::1c2b:3d4e:5f60:7182", 0, 6), 64, "en0")], index=6)]
"""


def _child(platform: str, commands: dict[str, str], tmp_path: Path) -> tuple[int, str]:
    assert RUN_MAIN in HIDE
    code = HIDE.replace(RUN_MAIN, FAKE_PLATFORM + RUN_MAIN)
    env = {
        **os.environ,
        "NATKIT_STATE_DIR": str(tmp_path / "state"),
        "NATKIT_TEST_HIDE": EVERYTHING,
        "NATKIT_TEST_PLATFORM": platform,
        "NATKIT_TEST_COMMANDS": json.dumps(commands),
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code, "map", "add", "8080", "--ipv6", "--via", "pcp",
         "--timeout", "0.3"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("platform", "commands", "expected"),
    [
        ("darwin", {"route": "fail:cannot read the routing table with route: it exited with "
                             "status 1"},
         "cannot find the IPv6 default router"),
        ("win32", {"route.exe": "fail:cannot run C:\\Windows\\System32\\route.exe"},
         "cannot find the IPv6 default router"),
        ("win32", {"route.exe": str(SAMPLES / "windows_route_print_en.txt")},  # IPv4 only
         "no IPv6 default route"),
        # Found (router and address named), but en0 is no interface here: told, not raised.
        ("darwin", {"route": str(SAMPLES / "darwin_route_get_inet6_default.txt"),
                    "ifconfig": str(SAMPLES / "darwin_ifconfig_en0_inet6.txt")},
         "cannot reach the IPv6 router fe80::a2b5:3cff:fe12:3456%en0 from "
         "[2001:db8:1234:5600:1c2b:3d4e:5f60:7182]"),
    ],
)  # fmt: skip
def test_a_missing_ipv6_router_is_told_from_the_cli(
    tmp_path: Path, platform: str, commands: dict[str, str], expected: str
) -> None:
    status, output = _child(platform, commands, tmp_path)
    assert status != 0
    assert "Traceback" not in output, output
    flat = " ".join(output.split())  # rich wraps long lines
    assert expected in flat and "--gateway" in flat, output
    assert "caps False" in output  # the Linux-only parts were hidden indeed
