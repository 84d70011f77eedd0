"""``python -m natkit …``: the ``natkit`` command."""

from natkit.cli.main import entry

entry()
