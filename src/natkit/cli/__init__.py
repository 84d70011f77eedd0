"""The ``natkit`` command line."""
