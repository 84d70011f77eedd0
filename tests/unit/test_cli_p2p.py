"""``natkit p2p connect`` as a user meets it (issue 14): a relay that refuses the connection
is an error at once naming its address (not a 10 s wait ending in an internal function's
name), and an empty room says that it waits, and for whom. Real ``natkit`` processes and a
real relay, on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from natkit.errors import EXIT_RELAY, EXIT_USAGE
from tests.unit.cli_run import env, failed_json, natkit, relay_serve

TOKEN = "p2p-cli-token-0123456789abcdef"
SECRET = "p2p-cli-secret-0123456789"
LOOPBACK = "127.0.0.1"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def connect_args(relay: str, *extra: str) -> list[str]:
    return ["p2p", "connect", "room", "--relay", relay, "--token", TOKEN, "--no-portmap",
            "--secret", SECRET, "--forward", "0:8080", *extra]  # fmt: skip


@pytest.mark.parametrize("as_json", [True, False])
def test_a_relay_that_refuses_the_connection_is_an_error_naming_it(
    as_json: bool, tmp_path: Path
) -> None:
    port = closed_port()
    extra = ("--json",) if as_json else ()
    proc = natkit(*connect_args(f"{LOOPBACK}:{port}", *extra), NATKIT_STATE_DIR=str(tmp_path))
    assert proc.returncode == EXIT_RELAY, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "agent.run" not in proc.stderr
    assert f"cannot connect to the relay at {LOOPBACK}:{port}: Connection refused" in proc.stderr
    if as_json:
        error = failed_json(proc, EXIT_RELAY)
        assert error["error"] == "RelayError" and f"{LOOPBACK}:{port}" in error["message"]
    else:
        assert not proc.stdout


def test_a_local_port_in_use_fails_before_any_relay_is_asked(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind((LOOPBACK, 0))
        held.listen()
        port = held.getsockname()[1]
        relay = f"{LOOPBACK}:{closed_port()}"
        args = connect_args(relay, "--json")
        args[args.index("0:8080")] = f"{port}:8080"
        error = failed_json(natkit(*args, NATKIT_STATE_DIR=str(tmp_path)), 1)
    assert f"cannot listen on {LOOPBACK}:{port}" in error["message"], error


def test_a_forward_port_out_of_range_is_a_usage_error() -> None:
    args = connect_args(f"{LOOPBACK}:1", "--json")
    args[args.index("0:8080")] = "70000:8080"
    assert "70000" in failed_json(natkit(*args), EXIT_USAGE)["message"]


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[str]:
    """``natkit relay serve`` on loopback; yields its HOST:PORT."""
    with relay_serve(tmp_path, TOKEN) as ready:
        yield f"{LOOPBACK}:{ready['listen'].rsplit(':', 1)[1]}"


@pytest.mark.parametrize("as_json", [True, False])
def test_an_empty_room_says_it_waits_and_for_whom(
    relay: str, as_json: bool, tmp_path: Path
) -> None:
    argv = [sys.executable, "-m", "natkit", *connect_args(relay, *(("--json",) if as_json else ()))]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(NATKIT_STATE_DIR=str(tmp_path / "peer")))  # fmt: skip
    try:
        stream = proc.stdout if as_json else proc.stderr
        assert stream is not None
        line = stream.readline()  # the first thing it says; the room stays empty
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    if as_json:
        assert json.loads(line) == {"event": "waiting", "room": "room", "role": "connect",
                                    "peer_role": "listen", "relay": relay, "timeout": 60}  # fmt: skip
    else:
        assert line.startswith(f"waiting in room 'room' on relay {relay}"), line
        assert "natkit p2p listen room" in line and "up to 60 s" in line, line


@pytest.mark.parametrize(
    ("to", "allow", "expected"),
    [
        (None, (22,), ("127.0.0.1", {22})),
        (None, (22, 80), ("127.0.0.1", {22, 80})),
        ("10.0.0.5", (22,), ("10.0.0.5", {22})),
        ("10.0.0.5:8080", (), ("10.0.0.5", {8080})),
        ("10.0.0.5:8080", (22,), ("10.0.0.5", {8080, 22})),
        ("[::1]:22", (), ("::1", {22})),
        ("fd00::5", (443,), ("fd00::5", {443})),
    ],
)
def test_listen_forwards_only_what_it_was_told(
    to: str | None, allow: tuple[int, ...], expected: tuple[str, set[int]]
) -> None:
    from natkit.cli.p2p import _target

    assert _target(to, allow) == (expected[0], frozenset(expected[1]))


@pytest.mark.parametrize(
    ("to", "allow"), [(None, ()), ("10.0.0.5", ()), ("fd00::5", ()), (None, (0,)), ("h:x", ())]
)
def test_listen_refuses_to_expose_what_was_not_named(
    to: str | None, allow: tuple[int, ...]
) -> None:
    import click

    from natkit.cli.p2p import _target

    with pytest.raises(click.UsageError):
        _target(to, allow)
