"""The open-files limit of relay and agent processes (each visitor costs two descriptors)."""

from __future__ import annotations

import contextlib
import resource


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; returns the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (max(hard, 1 << 20), hard):  # root may raise the hard limit too
        if soft < want:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
                return want
    return soft
