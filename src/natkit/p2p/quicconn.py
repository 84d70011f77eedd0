"""aioquic's sans-I/O QuicConnection, with receive windows that follow the application.

aioquic grants the peer more credit (MAX_STREAM_DATA, MAX_DATA) as soon as data *arrives*,
doubling the window each time half of it is used, whatever the application has read. A slow
reader would then buffer without bound. Here credit follows what the application has
*consumed*: a stream may hold at most ``max_stream_data`` unread bytes and the whole
connection ``max_data``, so a sender that outruns its reader is held back by QUIC itself.

Everything natkit needs from aioquic's internals is in this module, so an aioquic upgrade
that moves them breaks here (and in its tests), nowhere else.
"""

from __future__ import annotations

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream
from cryptography.hazmat.primitives import serialization


class FlowControlledQuic(QuicConnection):
    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        original_destination_connection_id: bytes | None = None,
    ) -> None:
        super().__init__(
            configuration=configuration,
            original_destination_connection_id=original_destination_connection_id,
        )
        self._stream_window = configuration.max_stream_data
        self._connection_window = configuration.max_data
        self._consumed_total = 0

    def consumed(self, stream_id: int, count: int, settled: int) -> bool:
        """The application read ``count`` more bytes of ``stream_id``, ``settled`` in all
        (read or given up). True when new credit is due to the peer: it is granted in
        batches of half a window, not per read."""
        due = self._credit_connection(count)
        stream = self._streams.get(stream_id)
        # max_stream_data_local is 0 on our own unidirectional streams: nothing to grant.
        if (
            stream is not None
            and stream.max_stream_data_local
            and stream.max_stream_data_local - settled < self._stream_window // 2
        ):
            stream.max_stream_data_local = settled + self._stream_window
            due = True
        return due

    def release(self, stream_id: int, settled: int, delivered: int) -> tuple[int, bool]:
        """Nobody reads ``stream_id`` any more (reset, or closed with data unread): give
        back the connection credit its received bytes hold, beyond the ``settled`` ones.
        ``delivered`` counts what the session got (aioquic may have forgotten the stream).
        Returns the bytes given back and whether new credit is due; call again when more
        arrives."""
        stream = self._streams.get(stream_id)
        received = max(delivered, stream.receiver.highest_offset if stream else 0)
        extra = received - settled
        if extra <= 0:
            return 0, False
        return extra, self._credit_connection(extra)

    def _credit_connection(self, count: int) -> bool:
        self._consumed_total += count
        limit = self._local_max_data
        if limit.value - self._consumed_total < self._connection_window // 2:
            limit.value = self._consumed_total + self._connection_window
            return True
        return False

    def unsent(self, stream_id: int, written: int) -> int:
        """Bytes of the ``written`` so far on ``stream_id`` that have never been sent."""
        stream = self._streams.get(stream_id)
        if stream is None:  # finished and discarded: everything went out
            return 0
        return max(0, written - stream.sender.highest_offset)

    def datagrams_queued(self) -> int:
        return len(self._datagrams_pending)

    def peer_certificate_der(self) -> bytes | None:
        """The peer's TLS certificate (DER), once the handshake has shown it."""
        cert = self.tls._peer_certificate
        return None if cert is None else cert.public_bytes(serialization.Encoding.DER)

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream
    ) -> None:
        # aioquic's rule "double the window when half of it has arrived" must not fire:
        # hide the arrival count from it for this call. consumed() sets the window instead.
        highest = stream.receiver.highest_offset
        stream.receiver.highest_offset = 0
        try:
            super()._write_stream_limits(builder, space, stream)
        finally:
            stream.receiver.highest_offset = highest

    def _write_connection_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> None:
        # The same for MAX_DATA (MAX_STREAMS batching is left to aioquic).
        limit = self._local_max_data
        used = limit.used
        limit.used = 0
        try:
            super()._write_connection_limits(builder, space)
        finally:
            limit.used = used
