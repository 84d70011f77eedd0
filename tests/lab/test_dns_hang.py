"""Ctrl-C while the relay's name is being looked up and the DNS server never answers
(issue 14: the lookup held the process 4–6 s after Ctrl-C).

The lab node's resolver is pointed at a DNS "server" on the lab's Internet host that takes
the questions and never answers (``ip netns exec`` bind-mounts /etc/netns/NETNS/resolv.conf over /etc/resolv.conf, and
nsswitch.conf likewise),
so the lookup hangs for real: glibc's resolver waits its full timeout, and the queries stay
inside the lab.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from natkit.errors import EXIT_INTERRUPTED
from natkit.lab import Lab
from tests.lab.relay_helpers import NatkitProc

SILENT_DNS = "100.200.0.3"  # the Internet host's second address (wan)
HUNG_NAME = "relay.natkit-test.example"  # not in /etc/hosts: a DNS question
TOKEN = "dns-hang-test-token-0123456789"


# Holds port 53 and reads nothing: no answer, and no ICMP "port unreachable" either.
SILENT_SERVER = (
    "import socket, time\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    f"s.bind(({SILENT_DNS!r}, 53))\n"
    "print('bound', flush=True)\n"
    "time.sleep(120)\n"
)


@pytest.fixture
def silent_resolver(lab: Lab) -> Iterator[None]:
    server = lab.popen("wan", [sys.executable, "-c", SILENT_SERVER], stdout=subprocess.PIPE)
    assert server.stdout is not None and server.stdout.readline() == b"bound\n"
    directory = Path("/etc/netns") / lab.netns("lan")
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "resolv.conf": f"nameserver {SILENT_DNS}\noptions timeout:30 attempts:1\n",
        "nsswitch.conf": "hosts: files dns\n",  # no mDNS or systemd-resolved beside DNS
    }
    for name, text in files.items():
        (directory / name).write_text(text)
    try:
        yield
    finally:
        for name in files:
            (directory / name).unlink(missing_ok=True)
        directory.rmdir()
        server.kill()
        server.wait()


@pytest.mark.parametrize("via", ["relay", "auto"])
def test_ctrl_c_during_a_hung_relay_lookup_ends_at_once(
    lab: Lab, silent_resolver: None, via: str, tmp_path: Path
) -> None:
    args = ["expose", "18999", "--via", via, "--relay", f"{HUNG_NAME}:7835", "--token", TOKEN,
            "--json"]  # fmt: skip
    proc = NatkitProc(lab, "lan", args, state_dir=tmp_path)
    try:
        time.sleep(2.0)  # well into the lookup (its timeout is 30 s)
        assert proc.proc.poll() is None, (proc.stdout, proc.stderr)
        asked = time.monotonic()
        proc.proc.send_signal(signal.SIGINT)
        code = proc.proc.wait(timeout=10)
        waited = time.monotonic() - asked
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()
    for thread in proc._threads:
        thread.join(timeout=5)
    assert code == EXIT_INTERRUPTED, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "never retrieved" not in proc.stderr, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert events and events[-1]["event"] == "error", events
    assert events[-1]["exit_code"] == EXIT_INTERRUPTED, events
    # (In auto mode a `fallback` line may say the mapping cannot be proven while the
    # service is down; but nothing became public, through the router or a relay.)
    assert not any(e["event"] == "ready" for e in events), events
    # Not a limit on natkit's speed (it stops in ~0.06 s here): a lookup that held the exit
    # took 4–6 s before issue 14, and would take the resolver's whole 30 s here.
    assert waited < 3, f"natkit took {waited:.1f} s to stop after Ctrl-C"
    assert "dport 18999 dnat" not in lab.router_rules(), "a mapping was left behind"
