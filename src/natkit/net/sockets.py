"""Small socket helpers shared by the relay, the agent and peer-to-peer forwarding."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
from typing import Any

_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST


def reset_on_close(sock: Any) -> None:
    """Make closing ``sock`` send a RST: an abrupt end must reach the far side as one (a
    plain close() sends a FIN, and a cut-off stream would look complete)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def exclusive_listen(sock: socket.socket) -> None:
    """Let a listening socket take its port again at once after a restart (SO_REUSEADDR on
    POSIX), never letting another program bind the same port: Windows' SO_REUSEADDR means
    that, so where SO_EXCLUSIVEADDRUSE exists (Windows) it is asked for instead."""
    exclusive = getattr(socket, "SO_EXCLUSIVEADDRUSE", None)
    if exclusive is not None:
        sock.setsockopt(socket.SOL_SOCKET, exclusive, 1)
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


# TCP_CONGESTION exists on Linux only (where BBR does too).
_TCP_CONGESTION: int | None = getattr(socket, "TCP_CONGESTION", None)


def unpaced_on_loopback(sock: socket.socket, host: str) -> None:
    """Send without pacing when ``host`` (the socket's peer) is a loopback address and the
    socket's congestion control is BBR: switch it to reno.

    BBR paces every burst with a timer, which on loopback has no queue to protect and costs
    the sender CPU. Measured on the Debian VMs this project runs on (BBR their default,
    inherited by every network namespace): iperf3 over loopback ~3,000 MB/s with bbr against
    ~6,500 with cubic or reno, the sender's CPU per GB ~2.7x; in ``natkit p2p connect
    --forward`` the connector's CPU per GB 0.85 -> 0.58 s once its leg to the app was unpaced
    (docs/loopback-pacing.md). reno is always allowed to unprivileged processes
    (net.ipv4.tcp_allowed_congestion_control); on a lossless loopback it never leaves slow
    start, so it is as fast as cubic there. Other addresses keep the system's choice.
    """
    if _TCP_CONGESTION is None:
        return
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
        mapped = getattr(address, "ipv4_mapped", None)  # a dual-stack socket's IPv4 peer
        if not (mapped or address).is_loopback:
            return
        current = sock.getsockopt(socket.IPPROTO_TCP, _TCP_CONGESTION, 16)
        if current.split(b"\0", 1)[0].startswith(b"bbr"):
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_CONGESTION, b"reno")
    except (OSError, ValueError):  # not an address, not TCP, reno not built in: leave it
        pass
