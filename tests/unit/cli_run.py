"""Run the ``natkit`` command as a user does: a child process, its output piped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
