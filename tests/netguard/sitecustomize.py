"""Puts the network guard into every Python process the tests start (via PYTHONPATH)."""

import natkit_netguard

natkit_netguard.install()
