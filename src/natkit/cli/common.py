"""Shared CLI plumbing: one console for humans on stdout, errors on stderr, JSON output."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

from rich.console import Console

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True, markup=True)
    raise SystemExit(code)
