"""STUN retransmission over UDP (RFC 8489 6.2.1), as pure functions.

A request is sent, then re-sent after RTO, 2·RTO, 4·RTO, ... until Rc requests have gone
out; after the last one the client waits Rm·RTO more. With the RFC's defaults (RTO 500 ms,
Rc 7, Rm 16) requests leave at 0, 0.5, 1.5, 3.5, 7.5, 15.5 and 31.5 s and the transaction
fails at 39.5 s. That suits the Internet; a lab or a report that must be quick passes a
smaller RTO and a ``timeout`` that cuts the schedule short.
"""

from __future__ import annotations

from natkit.net.retransmit import cap_schedule

RTO = 0.5  # initial RTO when the round-trip time is unknown
RC = 7  # requests in all
RM = 16  # the wait after the last request, in initial RTOs
TI = 39.5  # transaction timeout over TCP, where nothing is retransmitted (RFC 8489 6.2.2)
# Floor for an RTO computed from a measured RTT: loopback and LAN RTTs are far below the
# timer resolution that matters here, and an RTO of microseconds would only flood.
MIN_RTO = 0.05


def retransmit_schedule(
    rto: float = RTO, rc: int = RC, rm: float = RM, *, timeout: float | None = None
) -> list[float]:
    """How long to wait after each transmission: one entry per request sent.

    ``timeout`` bounds the sum: the schedule is cut (its last wait shortened) so that the
    transaction ends within it.
    """
    if rto <= 0 or rc < 1 or rm <= 0:
        raise ValueError("rto and rm must be positive and rc at least 1")
    waits = [rto * 2**i for i in range(rc - 1)] + [rto * rm]
    return waits if timeout is None else cap_schedule(waits, timeout)


def send_times(waits: list[float]) -> list[float]:
    """When each request leaves, counted from the first (for logs and tests)."""
    times = [0.0]
    for wait in waits[:-1]:
        times.append(times[-1] + wait)
    return times[: len(waits)]


def rto_from_rtt(rtt: float) -> float:
    """RTO after one RTT sample, per RFC 6298 2.2 (SRTT = R, RTTVAR = R/2, RTO = SRTT +
    4·RTTVAR = 3R), which RFC 8489 6.2.1 asks for; floored at :data:`MIN_RTO`.

    Use it only for a sample from a request that was sent once (Karn's algorithm): the
    answer to a retransmitted request may belong to any of its copies.
    """
    if rtt < 0:
        raise ValueError("rtt must not be negative")
    return max(MIN_RTO, 3 * rtt)
