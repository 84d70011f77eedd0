"""Noticing that a NAT-PMP/PCP gateway lost its state (rebooted), from its epoch counter.

RFC 6886 3.6 and RFC 6887 8.5: the server's epoch must advance about as fast as our own
clock. If it goes backwards, or runs much slower than ours, the gateway restarted and
every mapping must be re-created.
"""

from __future__ import annotations


class EpochTracker:
    def __init__(self) -> None:
        self.server_epoch: int | None = None
        self.client_time: float | None = None

    def update(self, epoch: int, now: float) -> bool:
        """Record a reply's epoch; return True if the gateway lost its mappings since the last."""
        prev_epoch, prev_time = self.server_epoch, self.client_time
        self.server_epoch, self.client_time = epoch, now
        if prev_epoch is None or prev_time is None:
            return False
        if epoch < prev_epoch - 1:
            return True
        client_delta = now - prev_time
        server_delta = epoch - prev_epoch
        return (
            client_delta + 2 < server_delta - server_delta / 16
            or server_delta + 2 < client_delta - client_delta / 16
        )
