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
# Its receiving twin, UDP_GRO: the kernel hands such a burst (and datagrams it coalesced on
# arrival) to one recvmsg(), with the segment size in a control message.
UDP_GRO = 104
_GRO_SIZE = struct.Struct("=i")
_GRO_ANCILLARY = socket.CMSG_SPACE(_GRO_SIZE.size) if hasattr(socket, "CMSG_SPACE") else 0
GRO_READ_SIZE = 65535  # what one coalesced read may hold
# What sendmsg() raises when the kernel or the route cannot segment (then: one by one).
_GSO_REFUSED = frozenset({errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT})


OnDatagram = Callable[[bytes, Any], None]  # a datagram and the address it came from
OnDatagrams = Callable[[list[bytes], Any], None]  # datagrams of one read, from one address
OnError = Callable[[Exception], None]


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


def _gro_segment_size(ancillary: list[tuple[int, int, bytes]]) -> int:
    for level, kind, data in ancillary:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= _GRO_SIZE.size:
            return int(_GRO_SIZE.unpack_from(data)[0])
    return 0


def split_coalesced(data: bytes, segment: int) -> list[bytes]:
    """The datagrams of one GRO read (``segment``: their size, 0 when it was one)."""
    if segment <= 0 or len(data) <= segment:
        return [data]
    return [data[i : i + segment] for i in range(0, len(data), segment)]


class SocketDrainer:
    """Batched I/O on a datagram transport's socket, so that the session hands QUIC a
    batch rather than one datagram per event-loop iteration, and the kernel is entered
    once per burst rather than once per datagram:

    - receiving, on Linux, :meth:`take_over` reads the socket instead of asyncio, with UDP
      GRO (one read, a burst); elsewhere :meth:`drain` reads what else waits, up to
      :data:`DRAIN_BATCH`, after asyncio's one read per loop iteration (asyncio's reader
      then finds the socket empty, which it takes in its stride);
    - sending, :meth:`send_many` segments a burst (UDP GSO) where the kernel can.

    It works on a duplicate of the socket's descriptor: asyncio hands out only a wrapper
    without ``recvmsg`` and ``sendmsg``."""

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        wrapped = transport.get_extra_info("socket")
        self._sock: socket.socket | None = None
        self._gso = False
        if wrapped is not None:
            self._sock = socket.socket(fileno=os.dup(wrapped.fileno()))
            self._sock.setblocking(False)
            self._gso = _gso_supported(self._sock)
        self._busy = False
        self._reading: asyncio.AbstractEventLoop | None = None  # take_over()'s loop

    @property
    def reads_itself(self) -> bool:
        """Did :meth:`take_over` take reading over (with GRO)?"""
        return self._reading is not None

    @property
    def segments(self) -> bool:
        """Does :meth:`send_many` segment (GSO)?"""
        return self._gso

    def take_over(
        self,
        transport: asyncio.BaseTransport,
        on_datagrams: OnDatagrams,
        on_error: OnError,
    ) -> bool:
        """Read the socket ourselves, with UDP GRO (Linux): asyncio's reader stops, and
        each wake-up reads up to :data:`DRAIN_BATCH` (coalesced) reads, handing each read's
        datagrams (one source address) to ``on_datagrams`` (socket errors, such as a late ICMP
        error, to ``on_error``, as asyncio would). False, changing nothing, where GRO is
        not available: then call :meth:`drain` from ``datagram_received``."""
        sock = self._sock
        if sock is None or sys.platform != "linux" or not _GRO_ANCILLARY:
            return False
        if not isinstance(transport, asyncio.ReadTransport):
            return False
        # asyncio's reader must stop before GRO starts: it would take a coalesced burst for
        # one datagram. (Paused in connection_made(), it is never started.)
        transport.pause_reading()
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            transport.resume_reading()
            return False
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), self._read_ready, sock, on_datagrams, on_error)
        self._reading = loop
        return True

    def _read_ready(
        self, sock: socket.socket, on_datagrams: OnDatagrams, on_error: OnError
    ) -> None:
        for _ in range(DRAIN_BATCH):
            if self._sock is not sock:
                return  # closed by a callback
            try:
                data, ancillary, _flags, addr = sock.recvmsg(GRO_READ_SIZE, _GRO_ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error reported on this socket
                on_error(exc)
                return
            on_datagrams(split_coalesced(data, _gro_segment_size(ancillary)), addr)

    def drain(self, on_datagram: OnDatagram) -> None:
        if self._sock is None or self._busy or self._reading is not None:
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
            if self._reading is not None and not self._reading.is_closed():
                self._reading.remove_reader(self._sock.fileno())
            self._reading = None
            self._sock.close()
            self._sock = None
