"""``natkit --version`` is answered before click, rich or asyncio are imported (issue 14:
ready in a blink), and says what click's own version option says."""

from __future__ import annotations

import subprocess
import sys

from natkit import __version__
from tests.unit.cli_run import env, natkit

HEAVY = ("click", "rich", "asyncio", "natkit.cli.common", "natkit.cli.app", "natkit.errors")


def test_version_imports_nothing_heavy() -> None:
    code = (
        "import sys; sys.argv = ['natkit', '--version']\n"
        "from natkit.cli.main import main; main()\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env(), check=True, timeout=60)  # fmt: skip
    assert proc.stdout.splitlines() == [f"natkit, version {__version__}", "[]"], proc.stdout


def test_every_spelling_gives_the_same_answer() -> None:
    expected = f"natkit, version {__version__}\n"
    # -v --version goes through click's own option: the fast path must match it.
    for args in (("--version",), ("-V",), ("-v", "--version")):
        proc = natkit(*args)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, expected, ""), args
