"""Sealed data connections, sans-I/O: ChaCha20-Poly1305 records keyed per connection.

Why not TLS on every data connection: OpenSSL keeps 16-21 KB per connection even when
idle (measured with ``SSL_MODE_RELEASE_BUFFERS``), 200 MB for 10,000 held visitors, and each
connection pays a handshake. The trust TLS would give is already there: the control
connection is TLS (the agent verified the relay) and the agent proved its token, so the
relay hands it a fresh random session secret over that channel (WELCOME ``data_key``).
A data connection then needs only keys of its own::

    agent -> relay   "S" | len(handle) | handle | nonce (16 random bytes)     (in clear)
                     then records; the first carries DATA {ticket}

The handle names the ticket without revealing it (a hash, see
:func:`natkit.relay.control.ticket_handle`): the ticket itself only keys the connection,
so one lifted from the wire is worthless, on a sealed or on a plaintext connection.

    keys = HKDF-SHA256(data_key, salt=nonce, info="natkit sealed data v1" | ticket), 64 bytes:
           the first 32 seal agent -> relay, the last 32 relay -> agent

Tickets are single-use and issued by the relay over the control connection, so no two
connections share keys; the agent's nonce guards against a ticket used twice by mistake.
A record is ``u32 length of plaintext`` (clear, authenticated as associated data) then the
ciphertext and its 16-byte tag. Nonces are a per-direction counter: records cannot be
dropped, replayed or reordered without the next one failing (a stream cut off between two
records is caught one level up: each visitor's stream ends with a sealed end mark, see
:mod:`natkit.relay.sealpump`). Anything that fails to open is a :class:`ProtocolError` and
the connection is dropped. An idle channel holds no buffer.
"""

from __future__ import annotations

import functools
import os
import struct
import threading
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from natkit.errors import ProtocolError

# Two AEADs with the same record format (32-byte keys, 12-byte nonces, 16-byte tags): the
# agent picks one per data connection and says which by the opening's first byte.
# AES-256-GCM is ~3x faster than ChaCha20-Poly1305 where the CPU has AES instructions
# (measured here: 11.9 vs 3.6 GB/s, 256 KiB records, Xeon with VAES); ChaCha20 is the
# safe choice everywhere else (it needs no hardware support to be fast and constant-time).
CHACHA = "chacha20-poly1305"
AES_GCM = "aes-256-gcm"
AEADS: dict[str, type[ChaCha20Poly1305] | type[AESGCM]] = {
    CHACHA: ChaCha20Poly1305,
    AES_GCM: AESGCM,
}
PREFIX = b"S"  # the first byte of a sealed data connection (control connections start TLS)
PREFIXES = {b"S": CHACHA, b"G": AES_GCM}
_PREFIX_OF = {name: prefix for prefix, name in PREFIXES.items()}
NONCE_SIZE = 16
KEY_SIZE = 32
TAG_SIZE = 16
RECORD_MAX = 256 * 1024  # plaintext bytes per record
MAX_TICKET = 64
_HEADER = struct.Struct("!I")
_INFO = b"natkit sealed data v1 "


class NeedData(Exception):
    """No whole record is buffered: feed more ciphertext first."""


def derive_keys(
    data_key: bytes, ticket: str, nonce: bytes, cipher: str = CHACHA
) -> tuple[bytes, bytes]:
    """(agent -> relay key, relay -> agent key) for one data connection (and its cipher:
    keys are never shared between the two)."""
    if len(data_key) != KEY_SIZE or len(nonce) != NONCE_SIZE:
        raise ProtocolError("sealed data connection: bad key or nonce size")
    label = b"" if cipher == CHACHA else cipher.encode() + b" "
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=2 * KEY_SIZE,
        salt=nonce,
        info=_INFO + label + ticket.encode(),
    ).derive(data_key)
    return okm[:KEY_SIZE], okm[KEY_SIZE:]


def encode_opening(handle: str, nonce: bytes, cipher: str = CHACHA) -> bytes:
    raw = handle.encode("ascii", "replace")
    if not handle.isascii() or not 0 < len(raw) <= MAX_TICKET or len(nonce) != NONCE_SIZE:
        raise ProtocolError("sealed data connection: bad ticket or nonce")
    return _PREFIX_OF[cipher] + bytes([len(raw)]) + raw + nonce


def cipher_prefix(cipher: str) -> bytes:
    """The byte that names ``cipher`` in an opening."""
    return _PREFIX_OF[cipher]


def opening_cipher(head: bytes) -> str:
    """The cipher an opening names by its first byte."""
    cipher = PREFIXES.get(bytes(head[:1]))
    if cipher is None:
        raise ProtocolError("not a natkit sealed data connection")
    return cipher


def preferred_cipher() -> str:
    """AES-256-GCM where this machine has AES instructions, else ChaCha20-Poly1305;
    ``NATKIT_SEAL_CIPHER`` overrides (either name)."""
    forced = os.environ.get("NATKIT_SEAL_CIPHER", "")
    if forced in AEADS:
        return forced
    return AES_GCM if _has_aes_instructions() else CHACHA


@functools.lru_cache(maxsize=1)
def _has_aes_instructions() -> bool:
    """Linux: the CPU's flags (x86 ``aes``, arm64 ``aes`` in Features). Elsewhere: unknown,
    so no (ChaCha20 is never slow)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return "aes" in value.split()
    return False


def opening_size(head: bytes) -> int:
    """Total size of the clear opening, from its first two bytes."""
    if len(head) < 2 or bytes(head[:1]) not in PREFIXES or not 0 < head[1] <= MAX_TICKET:
        raise ProtocolError("not a natkit sealed data connection")
    return 2 + head[1] + NONCE_SIZE


def decode_opening(data: bytes) -> tuple[str, bytes]:
    """(ticket handle, nonce) from the clear opening."""
    size = opening_size(data[:2])
    if len(data) != size:
        raise ProtocolError("sealed data connection: truncated opening")
    try:
        ticket = data[2 : 2 + data[1]].decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("sealed data connection: ticket is not ASCII") from None
    return ticket, bytes(data[size - NONCE_SIZE :])


_NONCE = struct.Struct("!4xQ")  # 4 zero bytes, then the record counter
_COUNTER_END = 1 << 64


def _nonce(counter: int) -> bytes:
    if counter >= _COUNTER_END:
        raise ProtocolError("sealed data connection: record counter exhausted")
    return _NONCE.pack(counter)


class _CipherCache(dict[bytes, "ChaCha20Poly1305 | AESGCM"]):
    """AEAD objects of the keys in use lately, at most ``keep`` (oldest out):
    ``_CIPHERS.of(aead, key)``.

    An object holds ~2.3 KB of OpenSSL contexts (46 MB for 10,000 held visitors), so no
    channel holds its own; making one costs about as much as sealing a small record, so
    the busy channels of the moment share these (a hit is one dict lookup). A held, idle
    visitor costs nothing here once others have pushed its keys out; a channel's keys leave
    when it is closed (:meth:`SealedChannel.forget`)."""

    keep = 256

    def of(
        self, aead: type[ChaCha20Poly1305] | type[AESGCM], key: bytes
    ) -> ChaCha20Poly1305 | AESGCM:
        cipher = self.get(key)
        if cipher is None or type(cipher) is not aead:
            if len(self) >= self.keep:
                del self[next(iter(self))]
            cipher = self[key] = aead(key)
        return cipher


_CIPHERS = _CipherCache()


class _RecordBuffers:
    """Buffers for records that arrive in parts: taken when one starts, given back once it
    is opened. An idle channel holds none, and a busy one does not allocate (and fault in)
    256 KiB per record."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.free: list[bytearray] = []

    def take(self) -> bytearray:
        return self.free.pop() if self.free else bytearray(_HEADER.size + RECORD_MAX + TAG_SIZE)

    def give(self, buf: bytearray) -> None:
        if len(self.free) < self.keep:
            self.free.append(buf)


_BUFFERS = _RecordBuffers()
_SCRATCH = threading.local()


def _seal_scratch() -> memoryview:
    """This thread's buffer for :meth:`SealedChannel.seal_record`'s ciphertext: sealing into
    it (``encrypt_into``) spares an allocation and its zero fill per record, ~20 % of the
    cipher's time for 256 KiB records here."""
    view: memoryview | None = getattr(_SCRATCH, "out", None)
    if view is None:
        view = _SCRATCH.out = memoryview(bytearray(RECORD_MAX + TAG_SIZE))
    return view


class SealedChannel:
    """One connection's two record streams: ``seal`` what we send, ``receive`` + ``read``
    what we get. Output is a list of buffers for one ``sendmsg`` (no copy to join them).

    Records are opened as soon as they are whole; one that arrives in parts is gathered in
    a buffer of its exact size, which the I/O side may fill directly (``recv_buffer``,
    ``received_into``): a large record is then copied once, by the kernel. The first
    record that fails ends the stream: ``read`` raises once the good ones are read.
    """

    __slots__ = (
        "_aead", "_error", "_got", "_hdr", "_opened", "_out", "_ready", "_rec", "_rec_buf",
        "_recv_key", "_send_key", "_sent", "eof", "limit",
    )  # fmt: skip

    def __init__(self, send_key: bytes, recv_key: bytes, cipher: str = CHACHA) -> None:
        # Keys, not cipher objects: a ChaCha20Poly1305 object holds ~2.3 KB of OpenSSL
        # contexts, 46 MB for 10,000 held visitors; busy channels share a few (_CIPHERS).
        self._send_key, self._recv_key = send_key, recv_key
        self._aead = AEADS[cipher]
        self._sent = self._opened = 0  # record counters (the nonces)
        self._out: list[bytes | memoryview] = []
        self._ready: list[memoryview] = []  # opened plaintext not read yet
        self._hdr = b""  # a record header split across receives
        self._rec: memoryview | None = None  # a record arriving in parts: header, body, tag
        self._rec_buf: bytearray | None = None  # the pooled buffer under _rec
        self._got = 0  # bytes of _rec received
        self._error = ""  # why the stream failed (sticky)
        self.limit = RECORD_MAX  # the largest record accepted (lower while unauthenticated)
        self.eof = False  # the peer's ciphertext has all been received

    # -- sending ---------------------------------------------------------------------------
    def seal(self, data: bytes | bytearray | memoryview) -> None:
        size = len(data) if not isinstance(data, memoryview) else data.nbytes
        if not size:
            return
        sealer = _CIPHERS.of(self._aead, self._send_key)
        if size <= RECORD_MAX and self._sent < _COUNTER_END:  # one record, the common case
            header = _HEADER.pack(size)
            self._out += (header, sealer.encrypt(_NONCE.pack(self._sent), data, header))
            self._sent += 1
            return
        view = memoryview(data).cast("B")
        for pos in range(0, size, RECORD_MAX):
            part = view[pos : pos + RECORD_MAX]
            header, nonce = _HEADER.pack(len(part)), _nonce(self._sent)
            self._out += (header, sealer.encrypt(nonce, part, header))
            self._sent += 1

    def seal_record(self, data: memoryview) -> tuple[bytes, memoryview]:
        """``data`` (1 to RECORD_MAX bytes) as one record, handed back to be sent at once
        rather than queued: the per-message path, when no output is waiting
        (:meth:`has_output`), so the order of records is kept.

        The ciphertext is in a buffer this thread reuses: it is valid until the thread's next
        ``seal_record``, so send it at once and copy what the socket did not take."""
        size = len(data)
        header = _HEADER.pack(size)
        sealer = _CIPHERS.get(self._send_key)  # a hit without a method call: this is per message
        if sealer is None or type(sealer) is not self._aead:
            sealer = _CIPHERS.of(self._aead, self._send_key)
        body = _seal_scratch()[: size + TAG_SIZE]
        sealer.encrypt_into(_nonce(self._sent), data, header, body)
        self._sent += 1
        return header, body

    def has_output(self) -> bool:
        return bool(self._out)

    def in_record(self) -> bool:
        """True while a record is arriving in parts (receive the rest into ``recv_buffer``)."""
        return self._rec is not None

    def take_output(self) -> list[bytes | memoryview]:
        """The records sealed since the last call (header and ciphertext buffers)."""
        out, self._out = self._out, []
        return out

    def forget(self) -> None:
        """The connection is closed: its cipher objects leave the shared cache."""
        _CIPHERS.pop(self._send_key, None)
        _CIPHERS.pop(self._recv_key, None)

    # -- receiving -------------------------------------------------------------------------
    def receive(self, data: bytes | bytearray | memoryview) -> None:
        """Ciphertext from the peer, in any chunking."""
        if self.eof:
            raise ProtocolError("sealed data connection: bytes after the end")
        view, pos = memoryview(data), 0
        while pos < len(view) and not self._error:
            if self._rec is not None:
                take = min(len(self._rec) - self._got, len(view) - pos)
                self._rec[self._got : self._got + take] = view[pos : pos + take]
                pos += take
                self.received_into(take)
                continue
            header: bytes | memoryview
            if not self._hdr and len(view) - pos >= _HEADER.size:  # a whole header: no copy
                header = view[pos : pos + _HEADER.size]
                pos += _HEADER.size
            else:
                take = min(_HEADER.size - len(self._hdr), len(view) - pos)
                header = self._hdr + bytes(view[pos : pos + take])
                pos += take
                if len(header) < _HEADER.size:
                    self._hdr = header
                    return
                self._hdr = b""
            (length,) = _HEADER.unpack(header)
            if length > self.limit:
                self._fail(f"a record of {length} bytes")
                return
            size = length + TAG_SIZE
            if len(view) - pos >= size:  # whole: opened where it lies
                self._open(header, view[pos : pos + size])
                pos += size
            else:
                self._rec_buf = _BUFFERS.take()
                self._rec = memoryview(self._rec_buf)[: _HEADER.size + size]
                self._rec[: _HEADER.size] = header
                self._got = _HEADER.size

    def open_record(self, data: memoryview) -> bytes | None:
        """The plaintext of ``data`` when it is exactly one whole record and nothing else is
        buffered (the small-message path: no buffering, no list); None when that is not
        the case, and the caller gives ``data`` to :meth:`receive` instead. A record that
        fails to open fails the stream, as in ``receive``, and raises ProtocolError."""
        if self._rec is not None or self._hdr or self._ready or self._error or self.eof:
            return None
        size = len(data)
        if size < _HEADER.size + TAG_SIZE:
            return None
        (length,) = _HEADER.unpack_from(data)
        if length + _HEADER.size + TAG_SIZE != size or length > self.limit:
            return None
        header = data[: _HEADER.size]
        opener = _CIPHERS.get(self._recv_key)
        if opener is None or type(opener) is not self._aead:
            opener = _CIPHERS.of(self._aead, self._recv_key)
        try:
            plain = opener.decrypt(_nonce(self._opened), data[_HEADER.size :], header)
        except InvalidTag:
            self._fail("a record failed to open")
            raise ProtocolError(self._error) from None
        self._opened += 1
        return plain

    def recv_buffer(self) -> memoryview | None:
        """The rest of a record that arrives in parts, to receive into directly (then call
        ``received_into``); None when no record is in progress."""
        if self._rec is None or self.eof:
            return None
        return self._rec[self._got :]

    def received_into(self, n: int) -> None:
        assert self._rec is not None
        self._got += n
        if self._got == len(self._rec):
            rec, self._rec = self._rec, None
            self._open(rec[: _HEADER.size], rec[_HEADER.size :])  # copies out: reusable now
            self._give_back()

    def receive_eof(self) -> None:
        self.eof = True

    def has_input(self) -> bool:
        """True when bytes wait that were not read out (whole records or parts of one)."""
        return bool(self._ready or self._hdr or self._error) or self._rec is not None

    def take_ready(self) -> list[memoryview]:
        """All the opened plaintext waiting, in order (no copy); an empty list when none is
        (``read`` then tells why: more is needed, the stream failed, or it ended)."""
        ready, self._ready = self._ready, []
        return ready

    def read(self, limit: int) -> memoryview:
        """Up to ``limit`` bytes of opened plaintext (no copy); empty at a clean end.

        Raises NeedData when no whole record waits, ProtocolError when a record did not
        open (tampered, out of order, not ours) or the stream ended inside one.
        """
        if limit <= 0:
            raise ValueError("read() needs a positive limit")
        if self._ready:
            view = self._ready[0]
            if len(view) > limit:
                self._ready[0] = view[limit:]
                return view[:limit]
            del self._ready[0]
            return view
        if self._error:
            raise ProtocolError(self._error)
        if not self.eof:
            raise NeedData
        if self._hdr or self._rec is not None:
            raise ProtocolError("sealed data connection: cut off inside a record")
        return memoryview(b"")

    def _open(self, header: bytes | memoryview, body: memoryview) -> None:
        try:
            nonce = (
                _NONCE.pack(self._opened) if self._opened < _COUNTER_END else _nonce(self._opened)
            )
            plain = _CIPHERS.of(self._aead, self._recv_key).decrypt(nonce, body, header)
        except InvalidTag:
            self._fail("a record failed to open")
            return
        self._opened += 1
        if plain:  # an empty record carries nothing
            self._ready.append(memoryview(plain))

    def _give_back(self) -> None:
        if self._rec_buf is not None:
            _BUFFERS.give(self._rec_buf)
            self._rec_buf = None

    def _fail(self, why: str) -> None:
        self._error = f"sealed data connection: {why}"
        self._rec, self._hdr = None, b""
        self._give_back()
