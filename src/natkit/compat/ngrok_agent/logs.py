"""ngrok's log lines (logfmt), which pyngrok reads for the API address and the session.

pyngrok splits each line with ``shlex`` into ``key=value`` pairs and looks for
``msg="starting web service"`` with ``addr=``, ``msg="tunnel session started"``,
``msg="client session established"``, and ``lvl=eror`` with ``err=`` for a failed start.

Once started, nobody may read the pipe any more (pyngrok with ``monitor_thread=False``): a
line that cannot be written at once is dropped, never left to block the agent.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from typing import IO

_PLAIN = re.compile(r"[A-Za-z0-9_.:/@+\-,\[\]]*")


def _value(value: object) -> str:
    text = str(value).replace("\n", " ").replace("\r", " ")
    if text and _PLAIN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_line(lvl: str, msg: str, **fields: object) -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%dT%H:%M:%S%z")
    parts = [f"t={now}", f"lvl={lvl}", f"msg={_value(msg)}"]
    parts += [f"{key}={_value(value)}" for key, value in fields.items()]
    return " ".join(parts) + "\n"


class LogWriter:
    """Writes log lines to ``stdout``, ``stderr``, a file, or nowhere (``false``)."""

    def __init__(self, target: str) -> None:
        self.fd: int | None = None
        self.file: IO[str] | None = None
        if target in ("stdout", "stderr"):
            self.fd = 1 if target == "stdout" else 2
        elif target not in ("false", "none", ""):
            self.file = open(target, "a", encoding="utf-8")  # noqa: SIM115 - kept open

    def started(self) -> None:
        """Startup is over: from now on a full pipe drops lines instead of blocking."""
        if self.fd is not None and not os.isatty(self.fd):
            # Windows' Python before 3.12 cannot make a pipe non-blocking: there a reader
            # that stops reading can still hold the agent up (pyngrok's monitor_thread).
            with contextlib.suppress(OSError):
                os.set_blocking(self.fd, False)

    def __call__(self, lvl: str, msg: str, **fields: object) -> None:
        line = format_line(lvl, msg, **fields)
        if self.file is not None:
            self.file.write(line)
            self.file.flush()
        if self.fd is None:
            return
        data = line.encode()
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except BlockingIOError:
            pass  # nobody reads: the line is dropped, the agent goes on
        except OSError:
            self.fd = None  # the reader went away
