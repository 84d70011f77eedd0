"""Where ``natkit-ngrok`` is, for ``PyngrokConfig(ngrok_path=...)``."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[3]  # the directory natkit is imported from


def natkit_ngrok_path(directory: Path | None = None) -> str:
    """The ``natkit-ngrok`` console script next to this interpreter or on PATH; else (natkit
    run from a source tree, a venv whose scripts are not on PATH) a small launcher written
    into ``directory`` that runs it with this interpreter and this natkit."""
    beside = Path(sys.executable).parent / "natkit-ngrok"
    if beside.exists():
        return str(beside)
    found = shutil.which("natkit-ngrok")
    if found:
        return found
    if directory is None:
        raise FileNotFoundError(
            "natkit-ngrok is not installed (pip install natkit): give a directory to write "
            "a launcher into"
        )
    launcher = directory / "natkit-ngrok"
    launcher.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(SRC)!r})\n"
        "from natkit.compat.ngrok_agent.cli import entry\nentry()\n"
    )
    launcher.chmod(0o755)
    return str(launcher)
