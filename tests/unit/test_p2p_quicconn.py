"""What natkit relies on in qh3 (natkit.p2p.quicconn): fails clearly when an upgrade moves it."""

from __future__ import annotations

import inspect

import qh3
from qh3.quic import events as qe
from qh3.quic.connection import QuicConnection

from natkit.p2p import quicconn
from natkit.p2p.auth import PeerIdentity

WINDOW = 64 << 10


def test_the_qh3_names_natkit_uses_are_there() -> None:
    for name in (
        "connect", "receive_datagram", "receive_many_datagrams", "datagrams_to_send",
        "get_timer", "handle_timer", "next_event", "get_next_available_stream_id",
        "send_stream_data", "reset_stream", "stop_stream", "send_datagram_frame", "send_ping",
        "close", "get_peercert", "get_send_buffer_size", "max_concurrent_bidi_streams",
    ):  # fmt: skip
        assert hasattr(QuicConnection, name), f"qh3 {qh3.__version__} has no QuicConnection.{name}"
    for event in ("StreamDataReceived", "DatagramFrameReceived", "StreamReset",
                  "StopSendingReceived", "ProtocolNegotiated", "HandshakeCompleted",
                  "ConnectionTerminated"):  # fmt: skip
        assert hasattr(qe, event), f"qh3 {qh3.__version__} has no event {event}"
    # the private one: the buffer qh3.quic.packet.pull_quic_header reads
    from qh3._hazmat import Buffer

    assert Buffer(data=b"\x01").pull_uint8() == 1
    # NatkitQuic overrides QuicConnection._log_packets (skipped without a QUIC logger)
    assert list(inspect.signature(QuicConnection._log_packets).parameters) == [
        "self", "event", "data",
    ]  # fmt: skip
    client, _server, _ = _pair()
    assert client._quic_logger is None
    # NatkitQuic.packets_to_send polls qh3's native core (QuicConnection._core) itself
    assert client._core is not None and callable(client._core.poll_transmit)


def _pair() -> tuple[quicconn.NatkitQuic, quicconn.NatkitQuic, list[float]]:
    ident_c, ident_s = PeerIdentity.generate("c"), PeerIdentity.generate("s")
    common = dict(alpn="t", idle_timeout=30.0, max_datagram_size=1200,
                  stream_window=WINDOW, connection_window=4 * WINDOW)  # fmt: skip
    client = quicconn.new_connection(is_client=True, identity=ident_c, **common)  # type: ignore[arg-type]
    client.connect(quicconn.PEER_ADDRESS, now=0.0)
    first = client.datagrams_to_send(now=0.0)
    dcid = quicconn.initial_destination_cid(first[0][0])
    assert dcid is not None
    server = quicconn.new_connection(
        is_client=False,
        identity=ident_s,
        original_dcid=dcid,
        **common,  # type: ignore[arg-type]
    )
    server.receive_batch([d for d, _ in first], now=0.0)
    return client, server, [0.0]


def _pump(a: quicconn.NatkitQuic, b: quicconn.NatkitQuic, clock: list[float]) -> None:
    for _ in range(10_000):
        clock[0] += 0.001
        ab = a.packets_to_send(now=clock[0])  # natkit's (the session uses it) ...
        ba = [d for d, _ in b.datagrams_to_send(now=clock[0])]  # ... and qh3's own
        if not ab and not ba:
            return
        if ab:
            b.receive_batch(ab, now=clock[0])
        if ba:
            a.receive_batch(ba, now=clock[0])


def test_handshake_peer_certificate_and_header_parsing() -> None:
    client, server, clock = _pair()
    _pump(client, server, clock)
    der = client.peer_certificate_der()
    assert der is not None and der.startswith(b"\x30")  # a DER certificate
    assert quicconn.initial_destination_cid(b"\x40" + bytes(40)) is None  # a short header
    assert quicconn.initial_destination_cid(b"") is None
    assert client.can_open_stream()
    # qh3's MAX_STREAMS, which bounds natkit's unread streams (SessionConfig.connection_window)
    assert client.max_concurrent_bidi_streams == quicconn.PEER_STREAMS


def test_qh3_grants_credit_on_arrival_which_is_why_natkit_has_its_own() -> None:
    """If this fails, qh3 has learned to tie QUIC credit to reading: natkit.p2p.credit could
    then give way to QUIC's own flow control."""
    client, server, clock = _pair()
    _pump(client, server, clock)
    client.send_stream_data(0, b"x" * (16 * WINDOW), end_stream=True)
    _pump(client, server, clock)
    received = 0
    while (event := server.next_event()) is not None:
        if isinstance(event, qe.StreamDataReceived):
            received += len(event.data)
    # No event was read while it all arrived: QUIC's window did not hold the sender back.
    assert received == 16 * WINDOW and client.unsent(0) == 0


def test_qh3_discards_a_replayed_packet() -> None:
    """Session datagrams cannot be replayed to the application: a packet that arrives twice
    is processed once (RFC 9000, 12.3). It still proves nothing about the *path* it came
    in on: an on-path attacker can copy a genuine packet onto another path so that the copy
    arrives first (see natkit.p2p.paths)."""
    client, server, clock = _pair()
    _pump(client, server, clock)
    while server.next_event() is not None:
        pass
    client.send_datagram_frame(b"once")
    packets = [d for d, _ in client.datagrams_to_send(now=clock[0])]
    got = []
    for _ in range(2):  # delivered, then replayed by someone on the path
        server.receive_batch(packets, now=clock[0])
        while (event := server.next_event()) is not None:
            if isinstance(event, qe.DatagramFrameReceived):
                got.append(event.data)
    assert got == [b"once"]


def test_qh3_holds_no_datagram_back() -> None:
    """natkit bounds datagrams between two flushes only (SessionConfig.datagram_queue),
    because qh3 sends every queued DATAGRAM frame on the next flush, congestion window or
    not. If this fails, qh3 queues them: bound that queue too."""
    client, server, clock = _pair()
    _pump(client, server, clock)
    for _ in range(3):  # no ACK comes back in between: the window is long exhausted
        for _ in range(2000):
            client.send_datagram_frame(b"d" * 1000)
        assert len(client.datagrams_to_send(now=clock[0])) == 2000
    for _ in range(2000):
        client.send_datagram_frame(b"d" * 1000)
    assert len(client.packets_to_send(now=clock[0])) == 2000


def test_the_channel_binding_is_shared_by_both_ends_and_unique_to_the_connection() -> None:
    """natkit.p2p.proof binds to it; it rests on qh3's public key log (secrets_log_file,
    NSS key-log format). If this fails, qh3 stopped writing the 1-RTT traffic secrets there."""
    from qh3.quic.configuration import QuicConfiguration

    assert "secrets_log_file" in QuicConfiguration.__dataclass_fields__
    client, server, clock = _pair()
    assert client.channel_binding() is None  # no 1-RTT keys yet
    _pump(client, server, clock)
    assert client.traffic_log is not None
    assert set(client.traffic_log.secrets) == set(quicconn.ONE_RTT_SECRETS)
    binding = client.channel_binding()
    assert binding is not None and len(binding) == 32
    assert server.channel_binding() == binding
    other_client, other_server, clock = _pair()
    _pump(other_client, other_server, clock)
    assert other_client.channel_binding() not in (None, binding)
