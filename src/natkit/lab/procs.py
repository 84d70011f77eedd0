"""Commands and daemons for the lab: run ``ip``/``nft``, start daemons in a namespace, and
stop them by pid (namespaces outlive the processes that made them, so nothing is found by
name)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from natkit.errors import LabError

SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


def which(binary: str) -> str | None:
    """Like ``shutil.which``, but also looks in sbin (not on every root's PATH)."""
    found = shutil.which(binary)
    if found:
        return found
    for d in SBIN_DIRS:
        path = os.path.join(d, binary)
        if os.access(path, os.X_OK):
            return path
    return None


def run(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise LabError(
            f"command failed ({proc.returncode}): {' '.join(argv)}: {proc.stderr.strip()}"
        )
    return proc.stdout


def ip(ns: str, *args: str) -> str:
    """``ip -n NS ARGS``: configure a namespace from outside."""
    return run(["ip", "-n", ns, *args])


def in_netns(ns: str, *args: str, input: str | None = None, check: bool = True) -> str:
    """``ip netns exec NS ARGS``: a command that has no ``-n`` of its own (nft, sysctl)."""
    return run(["ip", "netns", "exec", ns, *args], input=input, check=check)


def spawn(ns: str, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a daemon in netns ``ns``, its output appended to ``log``.

    ``ip netns exec`` execs the command, so the child's pid is the daemon's. It gets its own
    session so that a Ctrl-C meant for the CLI or pytest does not reach it.
    """
    with open(log, "ab") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )


def read_pid(pidfile: Path) -> int | None:
    """The pid in ``pidfile`` if that process is alive, else None."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state != "Z"


def kill(pid: int, timeout: float = 3.0) -> None:
    """SIGTERM, then SIGKILL; reap it if it is our child."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                pass
            if not pid_alive(pid):
                return
            time.sleep(0.02)


def log_tail(log: Path, lines: int = 8) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
