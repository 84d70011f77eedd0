"""qh3's sans-I/O QuicConnection, as natkit's P2P session drives it.

qh3 (an aioquic-derived QUIC whose packet and crypto work runs in Rust) moves a stream about
six times faster than aioquic here (bench/results/quic.md). Everything natkit needs from qh3
is in this module, so a qh3 upgrade that changes it breaks here (and in
tests/unit/test_p2p_quicconn.py), nowhere else. It uses qh3's public API
(``QuicConnection`` and its events, ``QuicConfiguration``, ``qh3.tls``'s PEM loaders,
``qh3.quic.packet.pull_quic_header``) and a few private names, each checked by the unit
tests: ``qh3._hazmat.Buffer``, the buffer ``pull_quic_header`` reads, which
``qh3.quic.packet`` uses without exporting it; and, for the per-datagram cost at line rate,
``QuicConnection._core.poll_transmit`` (:meth:`NatkitQuic.packets_to_send`),
``_quic_logger`` and ``_log_packets`` (skipped: qh3 walks every packet's header to log it
even with no logger).

The channel binding (:meth:`NatkitQuic.channel_binding`, which :mod:`natkit.p2p.proof` binds
the peers' proofs to). qh3 2.1 has no TLS exporter (RFC 5705 / RFC 8446 7.5): its TLS is
Python (``qh3.tls``) and the exporter master secret is never derived; deriving it ourselves
would mean reading ``QuicConnection.tls.key_schedule`` at the one moment its transcript hash
ends at the server's Finished (it moves on with the client's Finished): private and
fragile. What qh3 does hand out, through a public, documented setting, is the TLS key log:
``QuicConfiguration.secrets_log_file`` receives each traffic secret as a line in the NSS
key-log format (the one Wireshark reads). The first application traffic secrets
(``CLIENT_TRAFFIC_SECRET_0``, ``SERVER_TRAFFIC_SECRET_0``) come from the same inputs as the
exporter master secret (the handshake's master secret and its transcript up to the
server's Finished, certificate included): only the two ends of this connection know them
and no one can make them equal on two connections. natkit keeps them in memory (no file),
and the binding is an HMAC over both under a natkit label, so the secrets themselves are
used for nothing else (QUIC's own keys come from them under other labels).

One behaviour shapes natkit's design: qh3 grants the peer more credit (MAX_STREAM_DATA,
MAX_DATA) as soon as data *arrives*, whatever the application has read, and offers no way
to tie it to reading (its flow control lives in the native core). QUIC's own flow control
therefore bounds nothing for a slow reader; natkit runs its own per-stream credit on top
(:mod:`natkit.p2p.credit`).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import ssl
from typing import Any

from cryptography.hazmat.primitives import serialization
from qh3._hazmat import Buffer  # qh3.quic.packet uses it but does not re-export it
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError
from qh3.quic.packet import QuicErrorCode, QuicPacketType, pull_quic_header
from qh3.tls import load_pem_private_key, load_pem_x509_certificates

from natkit.p2p.auth import PeerIdentity

__all__ = [
    "CID_LENGTH",
    "ONE_RTT_SECRETS",
    "PEER_STREAMS",
    "NatkitQuic",
    "QuicConnectionError",
    "TrafficSecretLog",
    "initial_destination_cid",
    "new_connection",
]

CID_LENGTH = 8  # qh3's default connection ID length
#: How many bidirectional streams qh3 lets the peer open at once (its MAX_STREAMS, fixed in
#: qh3 2.1's QuicConnection; tests/unit/test_p2p_quicconn.py checks it).
PEER_STREAMS = 100
#: QUIC needs a peer address; the path switch stands behind it, whatever the path. qh3
#: accepts only numeric addresses (192.0.2.0/24: documentation, never routed).
PEER_ADDRESS = ("192.0.2.1", 1)


#: The key-log labels of the first 1-RTT secrets (NSS key-log format).
ONE_RTT_SECRETS = ("CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0")
_BINDING_LABEL = b"natkit-p2p channel binding"


class TrafficSecretLog(io.StringIO):
    """Where qh3 writes its key log (``secrets_log_file``): keeps the first 1-RTT secret of
    each direction in memory and nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: dict[str, bytes] = {}

    def write(self, s: str) -> int:
        for line in s.splitlines():
            label, _, rest = line.partition(" ")
            if label in ONE_RTT_SECRETS:  # "<label> <client random hex> <secret hex>"
                # the first only: both ends must use the handshake's, whatever comes later
                self.secrets.setdefault(label, bytes.fromhex(rest.partition(" ")[2]))
        return len(s)


class NatkitQuic(QuicConnection):
    """qh3's connection with the few questions natkit asks of it."""

    traffic_log: TrafficSecretLog | None = None  # set by new_connection()

    def channel_binding(self) -> bytes | None:
        """32 bytes both ends of this QUIC connection share and nobody else knows, once TLS
        has its 1-RTT keys (see the module's docstring); None before."""
        found = self.traffic_log.secrets if self.traffic_log is not None else {}
        if not all(label in found for label in ONE_RTT_SECRETS):
            return None
        key = b"".join(found[label] for label in ONE_RTT_SECRETS)
        return hmac.new(key, _BINDING_LABEL, hashlib.sha256).digest()

    def peer_certificate_der(self) -> bytes | None:
        """The peer's TLS certificate (DER), once the handshake has shown it."""
        cert = self.get_peercert()
        return None if cert is None else bytes(cert.public_bytes())

    def unsent(self, stream_id: int) -> int:
        """Bytes queued on ``stream_id`` that have never been sent (0 once it is gone)."""
        return int(self.get_send_buffer_size(stream_id))

    def can_open_stream(self) -> bool:
        """May we open another bidirectional stream (the peer's MAX_STREAMS allows it)?
        qh3 raises instead of waiting when it does not."""
        return self.get_next_available_stream_id() // 4 < self.max_concurrent_bidi_streams

    def packets_to_send(self, now: float) -> list[bytes]:
        """``datagrams_to_send()`` without the address (always :data:`PEER_ADDRESS`) and
        without qh3's Python around each datagram (a wrapper call and two logging calls
        that do nothing without a QUIC logger): at line rate this loop runs once per
        datagram, on the busiest side. Raises QuicConnectionError as qh3 does."""
        core = self._core
        if core is None or self._quic_logger is not None:
            return [data for data, _addr in self.datagrams_to_send(now)]
        poll, packets = core.poll_transmit, []
        try:
            while (transmit := poll(now)) is not None:
                packets.append(transmit[0])
        except RuntimeError as exc:  # as qh3's _call_core
            raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
        return packets

    def _log_packets(self, event: str, data: bytes) -> None:
        # qh3 2.1 walks every packet's header of every datagram sent to log it, whether or
        # not a QUIC logger is set (natkit sets none): a tenth of a sender's CPU.
        if self._quic_logger is not None:
            super()._log_packets(event, data)

    def receive_batch(self, datagrams: list[bytes], now: float) -> None:
        """Feed datagrams in one call into the native core (one per call while handshaking:
        qh3 does that itself)."""
        if len(datagrams) == 1:
            self.receive_datagram(datagrams[0], PEER_ADDRESS, now=now)
        else:
            self.receive_many_datagrams(datagrams, PEER_ADDRESS, now=now)


def initial_destination_cid(data: bytes) -> bytes | None:
    """The destination connection ID of a client's Initial packet, else None."""
    try:
        header: Any = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
    except (ValueError, RuntimeError):
        return None
    if header.packet_type != QuicPacketType.INITIAL:
        return None
    return bytes(header.destination_cid)


def new_connection(
    *,
    is_client: bool,
    alpn: str,
    identity: PeerIdentity,
    idle_timeout: float,
    max_datagram_size: int,
    stream_window: int,
    connection_window: int,
    original_dcid: bytes | None = None,
) -> NatkitQuic:
    """A client (``original_dcid`` None) or server connection.

    QUIC's windows are set large (qh3 grants them on arrival anyway); natkit's credit
    bounds what is buffered. No CA vouches for a peer: its certificate is pinned to the
    fingerprint that came sealed through signalling."""
    cfg = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[alpn],
        idle_timeout=idle_timeout,
        max_datagram_size=max_datagram_size,
        max_datagram_frame_size=65536,
        max_stream_data=stream_window,
        max_data=connection_window,
        verify_mode=ssl.CERT_NONE,
    )
    traffic_log = TrafficSecretLog()
    cfg.secrets_log_file = traffic_log  # for the channel binding: kept in memory only
    if not is_client:  # qh3 wants its own certificate and key types, loaded from PEM
        cert_pem = identity.certificate.public_bytes(serialization.Encoding.PEM)
        key_pem = identity.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cfg.certificate = load_pem_x509_certificates(cert_pem)[0]
        cfg.private_key = load_pem_private_key(key_pem)
    conn = NatkitQuic(configuration=cfg, original_destination_connection_id=original_dcid)
    conn.traffic_log = traffic_log
    return conn
