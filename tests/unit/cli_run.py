"""Run the ``natkit`` command as a user does: a child process, its output piped."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SRC = str(Path(__file__).resolve().parents[2] / "src")


def env(**extra: str) -> dict[str, str]:
    """The test's environment, natkit from this tree first, ``extra`` on top."""
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def natkit(*args: str, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "natkit", *args],
        capture_output=True, text=True, timeout=timeout, env=env(**extra), check=False,
    )  # fmt: skip


def json_lines(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """Every stdout line is a JSON object with an ``event`` (docs/cli.md)."""
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events and all(isinstance(e, dict) and "event" in e for e in events), proc.stdout
    return events


def failed_json(proc: subprocess.CompletedProcess[str], exit_code: int) -> dict[str, Any]:
    """A clean failure under --json: the exit code, one ``error`` line last, no traceback."""
    assert proc.returncode == exit_code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    error = json_lines(proc)[-1]
    assert error["event"] == "error" and error["exit_code"] == exit_code, error
    return error


@contextlib.contextmanager
def relay_serve(tmp_path: Path, *tokens: str) -> Iterator[dict[str, Any]]:
    """``natkit relay serve --json`` on loopback for ``tokens``; yields its ready event."""
    first = random.randrange(41000, 49000, 10)
    argv = [sys.executable, "-m", "natkit", "relay", "serve", "--listen", "127.0.0.1:0",
            "--json", "--ports", f"{first}-{first + 9}"]  # fmt: skip
    for token in tokens:
        argv += ["--token", token]
    state = tmp_path / "relay"
    state.mkdir()
    with (tmp_path / "relay.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True,
                                env=env(NATKIT_STATE_DIR=str(state), PYTHONUNBUFFERED="1"))  # fmt: skip
    try:
        assert proc.stdout is not None
        ready: dict[str, Any] = json.loads(proc.stdout.readline() or "{}")
        assert ready.get("event") == "ready", (tmp_path / "relay.log").read_text()
        yield ready
    finally:
        proc.terminate()
        proc.wait(timeout=10)
