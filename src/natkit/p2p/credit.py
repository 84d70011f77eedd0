"""Sans-I/O per-stream credit: a receiver grants what its application has *read*.

qh3 grants QUIC flow-control credit as data arrives (see :mod:`natkit.p2p.quicconn`), so a
slow reader would buffer without bound. natkit's streams therefore carry their own credit,
as QUIC's MAX_STREAM_DATA would: each peer opens one unidirectional *control stream* and
writes fixed-size grant records on it::

    u64 stream id, u64 limit      -- "you may send stream bytes up to offset ``limit``"
    u64 DEFAULT_KEY, u64 window   -- "each stream you open may send ``window`` bytes at first"

A sender holds back what is beyond its credit (:class:`SendQueue`); a receiver grants half
a window at a time as its application reads (:class:`ReceiveCredit`) and treats data beyond
what it granted as a protocol violation. A stream that is being read holds at most one
window; a stream nobody has read yet holds at most the first window, which the session sets
so that all the streams the peer may open at once stay within its connection window.
"""

from __future__ import annotations

import struct
from collections import deque

from natkit.errors import ProtocolError

RECORD = struct.Struct("!QQ")
#: The key of the record that announces the first window of every stream.
DEFAULT_KEY = (1 << 64) - 1


def encode_grant(stream_id: int, limit: int) -> bytes:
    return RECORD.pack(stream_id, limit)


def encode_default(window: int) -> bytes:
    return RECORD.pack(DEFAULT_KEY, window)


class GrantReader:
    """Split the peer's control stream into ``(key, value)`` records."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        buf = self._buf
        buf += data
        whole = len(buf) - len(buf) % RECORD.size
        records = [RECORD.unpack_from(buf, i) for i in range(0, whole, RECORD.size)]
        del buf[:whole]  # at most one partial record stays
        return records


class ReceiveCredit:
    """What the peer may send on one stream of ours, following our application's reads."""

    def __init__(self, window: int, initial: int | None = None) -> None:
        self.window = window
        # What the DEFAULT_KEY record announced: a stream nobody has read yet holds at most
        # this; the first read grants a whole window.
        self.limit = window if initial is None else initial

    def consumed(self, settled: int) -> int | None:
        """``settled`` bytes are read (or given up): the new limit to grant, if one is due.
        Credit goes out in batches of half a window, not per read."""
        if self.limit - settled < self.window // 2:
            self.limit = settled + self.window
            return self.limit
        return None

    def check(self, stream_id: int, delivered: int) -> None:
        """Raise :class:`ProtocolError` if the peer sent beyond the credit we granted."""
        if delivered > self.limit:
            raise ProtocolError(
                f"the peer sent {delivered} bytes on stream {stream_id} but was granted "
                f"{self.limit}: it ignores natkit's stream credit (an incompatible natkit?)"
            )


class SendQueue:
    """What one stream of ours has written but may not send yet for lack of credit.

    It keeps the written chunks as they came (immutable ``bytes``), so that a write within
    the credit reaches QUIC as the very object written: no copy on the way in or out, at
    line rate the sender's busiest loop."""

    def __init__(self, initial_window: int | None) -> None:
        self.limit = initial_window or 0
        self.known = initial_window is not None  # the peer's first window has arrived
        self.sent = 0
        self.fin = False  # write_eof() came: FIN follows the last queued byte
        self.fin_sent = False
        self._chunks: deque[bytes] = deque()
        self._queued = 0

    @property
    def queued(self) -> int:
        return self._queued

    def learn_default(self, window: int) -> None:
        if not self.known:
            self.known = True
            self.limit = max(self.limit, window)

    def grant(self, limit: int) -> None:
        self.limit = max(self.limit, limit)

    def push(self, data: bytes, end: bool) -> None:
        if data:
            self._chunks.append(bytes(data))  # (no copy for bytes)
            self._queued += len(data)
        self.fin = self.fin or end

    def take(self) -> tuple[bytes, bool]:
        """What may go to QUIC now, and whether the FIN goes with it."""
        room = max(0, self.limit - self.sent)
        parts: list[bytes] = []
        chunks = self._chunks
        while chunks and room > 0:
            head = chunks[0]
            if len(head) <= room:
                parts.append(chunks.popleft())
                room -= len(head)
            else:  # the credit ends inside this chunk
                parts.append(head[:room])
                chunks[0] = head[room:]
                room = 0
        chunk = parts[0] if len(parts) == 1 else b"".join(parts)
        self._queued -= len(chunk)
        self.sent += len(chunk)
        fin = self.fin and not chunks and not self.fin_sent
        self.fin_sent = self.fin_sent or fin
        return chunk, fin

    def discard(self) -> None:
        """The stream was reset or stopped: what is queued will never go."""
        self._chunks.clear()
        self._queued = 0
        self.fin_sent = True
