"""Replace a small file whole, never leaving it half written, from any number of processes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file of its own in the same directory,
    then rename it over ``path``: a crash leaves the old file, and two writers at once
    (two agents sharing a state directory) each rename their own file — a fixed temporary
    name let one rename the other's away (FileNotFoundError). Raises OSError."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
