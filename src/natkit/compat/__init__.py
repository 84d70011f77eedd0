"""Drop-ins for the libraries people start from: their calls, served by natkit.

``natkit.compat.miniupnpc``: the PyPI ``miniupnpc`` binding's ``UPnP`` class in pure Python
over natkit's own UPnP IGD client (see docs/compat-miniupnpc.md). ``natkit.compat.ngrok``:
pyngrok's module-level calls in process, on a natkit relay; the ``natkit-ngrok`` command is
the agent pyngrok itself can start (see docs/compat-pyngrok.md).
"""
