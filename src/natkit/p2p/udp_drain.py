"""Read and write a datagram socket in batches under asyncio (see :class:`SocketDrainer`)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

#: Datagrams read per wake-up beyond the one asyncio read (it reads one per loop iteration).
DRAIN_BATCH = 64

# Linux UDP generic segmentation offload (linux/udp.h; Python 3.11 has no name for it): one
# sendmsg() carrying a UDP_SEGMENT control message of the segment size leaves as that many
# datagrams, all of that size but the last. The stack (NAT included) handles the burst as one
# packet and splits it only where it must, so a QUIC burst costs one system call, not one each.
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = 103
_SEGMENT_SIZE = struct.Struct("=H")
GSO_MAX_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS
GSO_MAX_BYTES = 65000  # below a UDP datagram's 65,507-byte limit
# What sendmsg() raises when the kernel or the route cannot segment (then: one by one).
_GSO_REFUSED = frozenset({errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT})


class DatagramSender(Protocol):
    """What :meth:`SocketDrainer.send_many` needs of asyncio's datagram transport."""

    def sendto(self, data: bytes, addr: Any = None) -> None: ...

    def get_write_buffer_size(self) -> int: ...


def gso_groups(datagrams: Sequence[bytes]) -> list[Sequence[bytes]]:
    """Split ``datagrams`` (in order) into runs that one segmented send can carry: all of
    the first one's size, but for a shorter last one, within the kernel's limits."""
    groups: list[Sequence[bytes]] = []
    i, n = 0, len(datagrams)
    while i < n:
        size = len(datagrams[i])
        end = min(n, i + max(1, min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size if size else 1)))
        j = i + 1
        while j < end and len(datagrams[j]) == size:
            j += 1
        if j < end and 0 < len(datagrams[j]) < size:
            j += 1  # a shorter datagram may end a run
        groups.append(datagrams[i:j])
        i = j
    return groups


def _gso_supported(sock: socket.socket) -> bool:
    if sys.platform != "linux" or sock.type != socket.SOCK_DGRAM:
        return False
    try:
        # The kernel knows the option (Linux >= 4.18); then clear it again, so that only
        # the sends that ask for it (per message) are segmented.
        sock.setsockopt(SOL_UDP, UDP_SEGMENT, 1200)
        sock.setsockopt(SOL_UDP, UDP_SEGMENT, 0)
    except OSError:
        return False
    return True


class SocketDrainer:
    """Reads what else waits on a datagram transport's socket, up to :data:`DRAIN_BATCH`,
    so that the session hands QUIC a batch rather than one datagram per event-loop
    iteration (asyncio's own reader then finds the socket empty, which it takes in its
    stride), and sends a burst of datagrams with one system call where the kernel can
    segment (:meth:`send_many`). It works on a duplicate of the socket's descriptor:
    asyncio hands out only a wrapper without ``recvfrom`` and ``sendmsg``."""

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        wrapped = transport.get_extra_info("socket")
        self._sock: socket.socket | None = None
        self._gso = False
        if wrapped is not None:
            self._sock = socket.socket(fileno=os.dup(wrapped.fileno()))
            self._sock.setblocking(False)
            self._gso = _gso_supported(self._sock)
        self._busy = False

    def drain(self, on_datagram: Callable[[bytes, Any], None]) -> None:
        if self._sock is None or self._busy:
            return
        self._busy = True  # on_datagram may come back here (it is datagram_received)
        try:
            for _ in range(DRAIN_BATCH):
                try:
                    data, addr = self._sock.recvfrom(65536)
                except OSError:  # empty (BlockingIOError), or an ICMP error asyncio reports
                    return
                on_datagram(data, addr)
        finally:
            self._busy = False

    def send_many(
        self, transport: DatagramSender, datagrams: Sequence[bytes], addr: Any = None
    ) -> int:
        """Send ``datagrams`` in order to ``addr`` (None: the connected peer), segmented
        where the kernel can; what asyncio cannot send at once it buffers, as for its own
        ``sendto``. Returns how many were dropped for a socket error (an ICMP error
        reported late, a datagram too big for the route): QUIC resends what mattered."""
        sock = self._sock
        if sock is None or not self._gso or transport.get_write_buffer_size():
            for data in datagrams:  # (behind what asyncio already buffers, in order)
                transport.sendto(data, addr)
            return 0
        dropped = 0
        for k, group in enumerate(groups := gso_groups(datagrams)):
            if len(group) == 1:
                transport.sendto(group[0], addr)
                continue
            cmsg = [(SOL_UDP, UDP_SEGMENT, _SEGMENT_SIZE.pack(len(group[0])))]
            try:
                if addr is None:
                    sock.sendmsg(group, cmsg)
                else:
                    sock.sendmsg(group, cmsg, 0, addr)
            except (BlockingIOError, InterruptedError):  # full: asyncio buffers the rest
                for rest in groups[k:]:
                    for data in rest:
                        transport.sendto(data, addr)
                return dropped
            except OSError as exc:
                if exc.errno in _GSO_REFUSED:  # this route cannot segment: never again
                    self._gso = False
                    for rest in groups[k:]:
                        for data in rest:
                            transport.sendto(data, addr)
                    return dropped
                dropped += len(group)
        return dropped

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
