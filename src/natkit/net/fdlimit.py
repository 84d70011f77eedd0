"""The open-files limit of relay and agent processes (each visitor costs two descriptors)."""

from __future__ import annotations

import contextlib

try:
    import resource
except ImportError:  # Windows: no per-process descriptor limit to raise
    resource = None  # type: ignore[assignment]


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; returns the limit now (-1
    where the system has no such limit to read)."""
    if resource is None or not hasattr(resource, "RLIMIT_NOFILE"):
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (max(hard, 1 << 20), hard):  # root may raise the hard limit too
        if soft < want:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
                return want
    return soft
