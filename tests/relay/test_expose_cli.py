"""``natkit expose`` and ``natkit relay serve`` as a first user meets them (issue 14), for
real on loopback: the commands run as processes, the relay is a real one on 127.0.0.1 or
0.0.0.0, nothing is sent beyond 127.0.0.1.

* the relay's public addresses on a wildcard listen are the address the agent reached;
* a state directory that cannot be written stops map add, relay serve and expose at once
  (exit 5, a StateError naming it), before anything is asked of a router or a relay;
* --local-host is an IP address or a name that resolves (exit 2 otherwise), and a mapping
  cannot forward to another machine;
* a relay name that cannot be resolved is a RelayError naming it (exit 4), with no stray
  asyncio error; Ctrl-C before anything is public ends at exit 130;
* a local service that is down is warned of (local_unreachable), yet the tunnel opens;
* every --json line has an event; the relay's ready line says where public ports are.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from natkit.relay.agent import Agent, TunnelSpec
from natkit.relay.server import RelayConfig, RelayServer

TOKEN = "expose-cli-token-0123456789abcdef"
NATKIT = [sys.executable, "-m", "natkit.cli.main"]


def natkit(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:  # fmt: skip
    import os

    return subprocess.run([*NATKIT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)  # fmt: skip


def lines(stdout: str) -> list[dict[str, Any]]:
    found = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert all("event" in obj for obj in found), found
    return found


@pytest.fixture
def unwritable(tmp_path: Path) -> dict[str, str]:
    """A state directory that cannot be made (under a regular file: root cannot either)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return {"NATKIT_STATE_DIR": str(blocker / "natkit")}


def _state_error(result: subprocess.CompletedProcess[str], directory: str) -> None:
    assert result.returncode == 5, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    (error,) = lines(result.stdout)[-1:]
    assert error["event"] == "error" and error["error"] == "StateError", error
    assert directory in error["message"] and "NATKIT_STATE_DIR" in error["message"], error


def test_map_add_checks_the_state_directory_before_the_router(unwritable: dict[str, str]) -> None:
    # Were the router asked first, NAT-PMP to 127.0.0.1 would fail as a DiscoveryError.
    result = natkit("map", "add", "8080", "--via", "natpmp", "--gateway", "127.0.0.1",
                    "--timeout", "1", "--json", env=unwritable)  # fmt: skip
    _state_error(result, unwritable["NATKIT_STATE_DIR"])


def test_relay_serve_refuses_an_unwritable_state_directory(unwritable: dict[str, str]) -> None:
    result = natkit("relay", "serve", "--listen", "127.0.0.1:0", "--token", TOKEN, "--no-stun",
                    "--json", env=unwritable)  # fmt: skip
    _state_error(result, unwritable["NATKIT_STATE_DIR"])


def test_expose_via_relay_refuses_an_unwritable_state_directory(unwritable: dict[str, str]) -> None:  # fmt: skip
    # Before: it retried for ever ("Permission denied" saving the pin).
    result = natkit("expose", "8080", "--via", "relay", "--relay", "127.0.0.1:1", "--token",
                    TOKEN, "--json", env=unwritable)  # fmt: skip
    _state_error(result, unwritable["NATKIT_STATE_DIR"])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "give an IP address or a host name"),
        ("999.1.1.1", "'999.1.1.1' is not an IP address"),
        ("nonsense..host", "'nonsense..host' is not a valid host name"),
    ],
)
def test_local_host_is_validated(value: str, message: str, tmp_path: Path) -> None:
    result = natkit("expose", "8080", "--via", "relay", "--relay", "127.0.0.1:1", "--token",
                    TOKEN, "--local-host", value, "--json",
                    env={"NATKIT_STATE_DIR": str(tmp_path)})  # fmt: skip
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    (error,) = lines(result.stdout)
    assert error["event"] == "error" and message in error["message"], error


def test_a_mapping_cannot_forward_to_another_machine(tmp_path: Path) -> None:
    result = natkit("expose", "8080", "--via", "natpmp", "--gateway", "127.0.0.1",
                    "--local-host", "192.0.2.1", env={"NATKIT_STATE_DIR": str(tmp_path)})  # fmt: skip
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "192.0.2.1 is not this machine" in result.stderr, result.stderr


def test_an_unresolvable_relay_name_is_a_relay_error(tmp_path: Path) -> None:
    # "bad..name" is refused before any lookup (an empty label): no DNS query leaves.
    result = natkit("expose", "8080", "--via", "relay", "--relay", "bad..name:7835", "--token",
                    TOKEN, "--json", env={"NATKIT_STATE_DIR": str(tmp_path)})  # fmt: skip
    assert result.returncode == 4, (result.stdout, result.stderr)
    assert "never retrieved" not in result.stderr and "Traceback" not in result.stderr
    events = lines(result.stdout)
    assert [e["event"] for e in events] == ["local_unreachable", "error"], events
    assert events[-1]["error"] == "RelayNameError" and "'bad..name'" in events[-1]["message"]


def test_relay_token_too_short_names_what_was_typed() -> None:
    result = natkit("relay", "serve", "--token", "tooshort", "--json")
    assert result.returncode == 2
    (error,) = lines(result.stdout)
    assert "'tooshort' (8 characters) is too short" in error["message"], error
    assert "at least 16" in natkit("relay", "serve", "--help").stdout


class Proc:
    """A natkit process whose JSON lines are read as they come."""

    def __init__(self, *args: str, state: Path) -> None:
        import os

        self.p = subprocess.Popen([*NATKIT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env={**os.environ, "NATKIT_STATE_DIR": str(state)})  # fmt: skip

    def event(self, timeout: float = 20) -> dict[str, Any]:
        assert self.p.stdout is not None
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.p.stdout, selectors.EVENT_READ)
        assert sel.select(timeout), "no line in time"
        line = self.p.stdout.readline()
        assert line, self.p.stderr.read() if self.p.stderr else ""
        obj: dict[str, Any] = json.loads(line)
        assert "event" in obj, obj
        return obj

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20) -> tuple[int, str, str]:
        self.p.send_signal(sig)
        out, err = self.p.communicate(timeout=timeout)
        return self.p.returncode, out, err


@pytest.fixture
def relay_proc(tmp_path: Path) -> Iterator[tuple[Proc, dict[str, Any]]]:
    proc = Proc("relay", "serve", "--listen", "127.0.0.1:0", "--token", TOKEN, "--ports",
                "41150-41199", "--no-stun", "--json", state=tmp_path / "relay-state")  # fmt: skip
    ready = proc.event()
    yield proc, ready
    if proc.p.poll() is None:
        proc.stop(signal.SIGTERM)


def test_relay_ready_line_says_where_public_ports_are(relay_proc: tuple[Proc, dict[str, Any]]) -> None:  # fmt: skip
    _, ready = relay_proc
    assert ready["event"] == "ready" and ready["public_host"] == "127.0.0.1", ready


def test_a_local_service_that_is_down_is_warned_of(relay_proc: tuple[Proc, dict[str, Any]], tmp_path: Path) -> None:  # fmt: skip
    _, ready = relay_proc
    agent = Proc("expose", "1", "--via", "relay", "--relay", ready["listen"], "--token", TOKEN,
                 "--json", state=tmp_path / "agent")  # fmt: skip
    warning = agent.event()
    assert warning == {"event": "local_unreachable", "local_address": "127.0.0.1:1",
                       "reason": "nothing listens there"}, warning  # fmt: skip
    up = agent.event()
    assert up["event"] == "ready" and up["public_address"].startswith("127.0.0.1:411"), up
    code, out, _ = agent.stop()
    assert code == 0 and lines(out)[-1]["event"] == "closed", out


def test_relay_mode_has_a_status_block(relay_proc: tuple[Proc, dict[str, Any]], tmp_path: Path) -> None:  # fmt: skip
    _, ready = relay_proc
    agent = Proc("expose", "1", "--via", "relay", "--relay", ready["listen"], "--token", TOKEN,
                 state=tmp_path / "agent")  # fmt: skip
    assert agent.p.stdout is not None
    first = agent.p.stdout.readline()
    assert first.startswith("state"), first
    text = first
    while "Ctrl-C to stop" not in text:
        text += agent.p.stdout.readline()
    code, out, err = agent.stop()
    for label in ("public address", "127.0.0.1:411", "forwards to", "127.0.0.1:1", "via"):
        assert label in text, text
    assert "nothing answers on 127.0.0.1:1" in err, err
    assert code == 0 and "tunnel closed" in out


def test_ctrl_c_before_anything_is_public_ends_at_once(tmp_path: Path) -> None:
    # A relay that is not there: the agent retries until interrupted.
    agent = Proc("expose", "8080", "--via", "relay", "--relay", "127.0.0.1:1", "--token", TOKEN,
                 state=tmp_path)  # fmt: skip
    time.sleep(1.5)
    code, out, err = agent.stop(timeout=10)
    assert code == 130, (out, err)
    assert "tunnel closed" not in out and "Traceback" not in err, (out, err)


@pytest.fixture
async def wildcard_relay(tmp_path: Path) -> AsyncIterator[RelayServer]:
    server = RelayServer(RelayConfig(listen_host="0.0.0.0", listen_port=0, tokens={"a": TOKEN},
                                     ports=(41200, 41249), state_dir=tmp_path / "relay",
                                     stun=False, pool_size=1))  # fmt: skip
    await server.start()
    yield server
    await server.close()


async def _public(server: RelayServer, tmp_path: Path) -> str:
    spec = TunnelSpec(9, local_host="127.0.0.1")
    agent = Agent(f"127.0.0.1:{server.listen_port}", TOKEN, [spec],
                  known_relays=tmp_path / "known.json")  # fmt: skip
    task = asyncio.get_running_loop().create_task(agent.run())
    try:
        return await asyncio.wait_for(agent.wait_open(spec.id), 10)
    finally:
        task.cancel()
        await agent.close()


async def test_a_wildcard_relay_hands_out_the_address_the_agent_reached(wildcard_relay: RelayServer, tmp_path: Path) -> None:  # fmt: skip
    # Before: "0.0.0.0:41200".
    public = await _public(wildcard_relay, tmp_path)
    assert public.startswith("127.0.0.1:412"), public


async def test_public_host_wins_over_the_address_reached(wildcard_relay: RelayServer, tmp_path: Path) -> None:  # fmt: skip
    wildcard_relay.cfg.public_host = "relay.example"
    public = await _public(wildcard_relay, tmp_path)
    assert public.startswith("relay.example:412"), public
