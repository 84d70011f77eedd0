"""Retransmission schedules shared by natkit's UDP request/response clients."""

from __future__ import annotations

from collections.abc import Sequence


def cap_schedule(waits: Sequence[float], timeout: float) -> list[float]:
    """Cut ``waits`` (the wait after each send) so that they add up to at most ``timeout``."""
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    out: list[float] = []
    total = 0.0
    for wait in waits:
        if total >= timeout:
            break
        out.append(min(wait, timeout - total))
        total += out[-1]
    return out or [timeout]
