"""Drop-in replacements for the libraries people start from, running on natkit.

``natkit.compat.miniupnpc``: the PyPI ``miniupnpc`` binding's ``UPnP`` class in pure Python
over natkit's own UPnP IGD client (see docs/compat-miniupnpc.md).
"""
