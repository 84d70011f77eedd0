"""``natkit --help`` lists the commands from a table instead of importing each command."""

from __future__ import annotations

import importlib
import subprocess
import sys

from natkit.cli.app import COMMANDS, SHORT_HELP


def test_the_table_says_what_each_command_says_of_itself() -> None:
    assert list(SHORT_HELP) == list(COMMANDS)
    for name, target in COMMANDS.items():
        module, attr = target.split(":")
        command = getattr(importlib.import_module(module), attr)
        assert SHORT_HELP[name] == command.get_short_help_str(1000), name


def test_help_lists_every_command_without_importing_them() -> None:
    probe = (
        "import sys\n"
        "sys.argv = ['natkit', '--help']\n"
        "from natkit.cli.main import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"commands = {sorted(t.split(':')[0] for t in COMMANDS.values())!r}\n"
        "loaded = [m for m in commands if m in sys.modules]\n"
        "print('LOADED', loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    for name in COMMANDS:
        assert f"  {name} " in out, out
    assert "LOADED []" in out, out
