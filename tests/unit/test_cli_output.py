"""Output that is not a terminal: long tokens stay whole (issue 14: fingerprints wrapped
mid-line when piped), tables still fit the width."""

from __future__ import annotations

import subprocess
import sys

from tests.unit.cli_run import env

FINGERPRINT = "sha256:" + "0123456789abcdef" * 4
CODE = f"""
from rich.table import Table
from natkit.cli.common import err, out
out.print("pinned relay 127.0.0.1:20000 certificate {FINGERPRINT}")
err.print("pinned relay 127.0.0.1:20000 certificate {FINGERPRINT}")
t = Table(title="t")
t.add_column("address", no_wrap=True)
t.add_column("description")
t.add_row("100.200.0.1:8080", "words " * 30)
out.print(t)
"""


def test_piped_output_keeps_long_tokens_on_one_line() -> None:
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                          env=env(COLUMNS="40"), check=True, timeout=60)  # fmt: skip
    lines = proc.stdout.splitlines()
    assert lines[0] == f"pinned relay 127.0.0.1:20000 certificate {FINGERPRINT}"
    assert proc.stderr.splitlines() == [lines[0]]
    table = lines[1:]
    assert len(table) > 5 and all(len(line) <= 40 for line in table), table
    assert any("100.200.0.1:8080" in line for line in table)
