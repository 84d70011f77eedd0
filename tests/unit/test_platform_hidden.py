"""``natkit expose --via relay`` carrying visitors with the Linux-only parts hidden: a
child process where ``os.splice``/``os.pipe2``, ``fcntl``, ``resource``, ``uvloop`` and
``socket.sendmsg`` do not exist and /proc cannot be opened, optionally on a Windows-like
event loop (the default one cannot watch sockets, the one natkit falls back on has no
signal handlers). The relay and the service run in the test's own process; everything is
on 127.0.0.1. What this cannot show: that Windows' or macOS's own sockets behave as
Linux's do here (see docs/platforms.md)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from natkit.relay.server import RelayServer
from tests.relay.test_relay_data_conns import TOKEN, _visit, echo, relay

__all__ = ["echo", "relay"]  # fixtures shared with the in-process data connection tests

SRC = Path(__file__).resolve().parents[2] / "src"
LOOPBACK = "127.0.0.1"

# Run before natkit is imported (the network guard's sitecustomize has run already).
HIDE = r"""
import asyncio, asyncio.selector_events, builtins, io, os, socket, sys
hide = os.environ["NATKIT_TEST_HIDE"].split(",")
if "splice" in hide:
    del os.splice, os.pipe2
for name in ("fcntl", "resource", "uvloop"):
    if name in hide:
        sys.modules[name] = None  # import fails as where the module does not exist
if "sendmsg" in hide:
    class _Missing:
        def __get__(self, obj, cls):
            raise AttributeError("sendmsg")
    socket.socket.sendmsg = _Missing()
if "proc" in hide:
    _open = builtins.open
    def _no_proc(file, *args, **kwargs):
        if str(file).startswith("/proc"):
            raise FileNotFoundError(2, "no /proc here", str(file))
        return _open(file, *args, **kwargs)
    builtins.open = io.open = _no_proc
if "windows-loop" in hide:
    # The default loop cannot watch sockets (like the proactor); the selector loop natkit
    # falls back on has no signal handlers (like Windows' SelectorEventLoop).
    class ProactorLike(asyncio.selector_events.BaseSelectorEventLoop):
        def add_reader(self, *args):
            raise NotImplementedError
        def add_writer(self, *args):
            raise NotImplementedError
    asyncio.new_event_loop = ProactorLike
    asyncio.SelectorEventLoop = asyncio.selector_events.BaseSelectorEventLoop
    import natkit.net.loops
    _made = natkit.net.loops.new_event_loop
    def _reporting():
        loop = _made()
        print("loop", type(loop).__name__, file=sys.stderr, flush=True)
        return loop
    natkit.net.loops.new_event_loop = _reporting
from natkit.net import fdlimit
from natkit.relay import pump, seal, sealpump
print("caps", pump.USE_SPLICE, sealpump._sendmsg.__name__, fdlimit.raise_fd_limit(),
      seal.preferred_cipher(), file=sys.stderr, flush=True)
from natkit.cli.main import main
sys.argv[0] = "natkit"
main()
"""
EVERYTHING = "splice,fcntl,resource,uvloop,sendmsg,proc"


async def _events(proc: asyncio.subprocess.Process, until: str) -> dict[str, Any]:
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        if not line:
            raise AssertionError(f"the agent ended before {until!r}")
        event: dict[str, Any] = json.loads(line)
        if event["event"] == until:
            return event


@pytest.mark.parametrize(
    ("hide", "plaintext"),
    [
        (EVERYTHING, True),
        (EVERYTHING, False),
        (EVERYTHING + ",windows-loop", True),
        (EVERYTHING + ",windows-loop", False),
    ],
    ids=["plain", "sealed", "plain-windows-loop", "sealed-windows-loop"],
)
async def test_the_agent_carries_visitors_without_the_linux_only_parts(
    relay: RelayServer, echo: int, tmp_path: Path, hide: str, plaintext: bool
) -> None:
    env = {
        **os.environ,
        "NATKIT_STATE_DIR": str(tmp_path / "state"),
        "NATKIT_TEST_HIDE": hide,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("NATKIT_EVENT_LOOP", None)
    env.pop("NATKIT_NO_SPLICE", None)
    env.pop("NATKIT_SEAL_CIPHER", None)
    args = ["expose", str(echo), "--via", "relay", "--relay", f"{LOOPBACK}:{relay.listen_port}",
            "--token", TOKEN, "--json"] + (["--plaintext-data"] if plaintext else [])  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HIDE, *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        ready = await _events(proc, "ready")
        port = int(ready["public_address"].rsplit(":", 1)[1])
        for i in range(8):  # more than the relay's pool of data connections
            payload = b"visitor %d " % i * 3000
            assert await _visit(port, payload) == payload
        together = [b"together %d " % i * 20000 for i in range(6)]
        assert await asyncio.gather(*(_visit(port, p) for p in together)) == together
        # Ctrl-C (no loop signal handler on the Windows-like loop: asyncio's runner, woken
        # through the signal wake-up socket, cancels the command, which cleans up).
        proc.send_signal(signal.SIGINT)
        closed = await _events(proc, "closed")
        assert closed["method"] == "relay"
        assert await asyncio.wait_for(proc.wait(), 20) in (0, 130)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    stderr = (await proc.stderr.read()).decode()
    assert "Traceback" not in stderr, stderr
    # The hidden parts were missed, and their fallbacks taken: the Protocol bridge, one
    # send instead of sendmsg, no descriptor limit, ChaCha20 (no /proc/cpuinfo to read).
    assert "caps False _send_joined -1 chacha20-poly1305" in stderr, stderr
    if "windows-loop" in hide:
        assert "loop BaseSelectorEventLoop" in stderr, stderr  # the fallback was taken


async def test_check_reports_without_the_linux_only_parts(
    relay: RelayServer, tmp_path: Path
) -> None:
    """``natkit check`` (STUN on loopback, the relay's round trip) in a child without /proc,
    fcntl, resource, uvloop and splice: no routing table to read (so no gateway),
    the rest is measured."""
    import collections

    from natkit.stun.server import serve

    stun = await serve(LOOPBACK, 0, collections.Counter())
    assert stun.transport is not None
    stun_port = stun.transport.get_extra_info("sockname")[1]
    env = {
        **os.environ,
        "NATKIT_STATE_DIR": str(tmp_path / "state"),
        "NATKIT_TEST_HIDE": EVERYTHING,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HIDE, "check", "--json", "--no-portmap",
            "--stun", f"{LOOPBACK}:{stun_port}",
            "--relay", f"{LOOPBACK}:{relay.listen_port}", "--token", TOKEN,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        stun.transport.close()
    assert proc.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()
    report = json.loads(out)
    assert report["udp"] is True and report["public_ipv4"] == LOOPBACK
    assert report["gateway"] is None  # no /proc: no routing table on this "platform"
    assert report["relay"]["rtt_ms"] is not None and report["relay"]["error"] is None
    assert isinstance(report["local_ipv6"], list)  # from the interfaces, not /proc
