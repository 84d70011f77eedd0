"""``python -m natkit.compat.ngrok_agent``: the ``natkit-ngrok`` command."""

from natkit.compat.ngrok_agent.cli import entry

entry()
