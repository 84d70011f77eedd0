"""Small socket helpers shared by the relay, the agent and peer-to-peer forwarding."""

from __future__ import annotations

import contextlib
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
