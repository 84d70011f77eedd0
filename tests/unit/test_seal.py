"""Sealed data connections (natkit.relay.seal), byte for byte and without sockets: the clear
opening, the record format checked against an independent ChaCha20-Poly1305, the key
derivation checked against a hand-written HKDF, and the channel's refusals of every kind of
tampering. Hypothesis then feeds the channel any chunking of real records and any bytes."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natkit.errors import ProtocolError
from natkit.relay import seal
from natkit.relay.control import ticket_handle
from natkit.relay.seal import NeedData, SealedChannel

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DATA_KEY = bytes(range(32))
TICKET = "t-0123456789abcdef"
NONCE = bytes(range(100, 116))
TAG = 16


# ---- helpers ----------------------------------------------------------------------------


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 written out with hmac, so the test does not trust the library under test's
    choice of HKDF parameters."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for i in itertools.count(1):
        if len(okm) >= length:
            break
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def record_nonce(k: int) -> bytes:
    """The documented nonce of record ``k``: 4 zero bytes, then the counter big-endian."""
    return bytes(4) + k.to_bytes(8, "big")


def reference_record(key: bytes, k: int, plain: bytes) -> bytes:
    """Record ``k`` as the format says it is, built without natkit."""
    header = struct.pack("!I", len(plain))
    return header + ChaCha20Poly1305(key).encrypt(record_nonce(k), plain, header)


def channels(
    data_key: bytes = DATA_KEY, ticket: str = TICKET, nonce: bytes = NONCE
) -> tuple[SealedChannel, SealedChannel]:
    """(agent, relay) of one connection, keyed the way open_sealed/accept_sealed key them."""
    up, down = seal.derive_keys(data_key, ticket, nonce)
    return SealedChannel(send_key=up, recv_key=down), SealedChannel(send_key=down, recv_key=up)


def records(chan: SealedChannel) -> list[bytes]:
    """What ``chan`` sealed since the last call, one bytes object per record."""
    out = chan.take_output()
    assert len(out) % 2 == 0, "each record is a header buffer and a ciphertext buffer"
    return [bytes(h) + bytes(c) for h, c in zip(out[::2], out[1::2], strict=True)]


def wire(chan: SealedChannel) -> bytes:
    return b"".join(records(chan))


def drain(chan: SealedChannel, limit: int = seal.RECORD_MAX) -> tuple[bytes, bool]:
    """All plaintext readable now, and whether the stream ended cleanly."""
    out = bytearray()
    while True:
        try:
            piece = chan.read(limit)
        except NeedData:
            return bytes(out), False
        assert isinstance(piece, memoryview)
        assert len(piece) <= limit
        if not piece:
            return bytes(out), True
        out += piece


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def assert_refused(chan: SealedChannel) -> None:
    """The next read fails, and keeps failing: a bad record is never skipped over."""
    for _ in range(2):
        with pytest.raises(ProtocolError):
            chan.read(seal.RECORD_MAX)


# ---- the clear opening ------------------------------------------------------------------


def test_constants_are_the_documented_ones() -> None:
    assert (seal.PREFIX, seal.NONCE_SIZE, seal.KEY_SIZE, seal.TAG_SIZE) == (b"S", 16, 32, 16)
    assert seal.RECORD_MAX == 256 * 1024
    assert seal.MAX_TICKET == 64


def test_encode_opening_is_prefix_length_ticket_nonce() -> None:
    data = seal.encode_opening(TICKET, NONCE)
    assert data == b"S\x12t-0123456789abcdef" + NONCE
    assert data[0:1] == b"S"
    assert data[1] == len(TICKET) == 18
    assert data[2:20] == TICKET.encode()
    assert data[20:] == NONCE
    assert len(data) == 2 + 18 + 16


def test_the_agent_opens_with_the_ticket_handle_not_the_ticket() -> None:
    """What goes in clear is ``ticket_handle(ticket)`` (32 hex digits); the ticket itself
    only keys the connection, so the opening bytes never contain it."""
    handle = ticket_handle(TICKET)
    data = seal.encode_opening(handle, NONCE)
    assert data == b"S\x20" + handle.encode() + NONCE
    assert TICKET.encode() not in data
    assert seal.decode_opening(data) == (handle, NONCE)
    # The keys come from the ticket, not from what the opening shows.
    assert seal.derive_keys(DATA_KEY, TICKET, NONCE) != seal.derive_keys(DATA_KEY, handle, NONCE)


@pytest.mark.parametrize("ticket", ["a", TICKET, "x" * 64, "Z-_.~0" * 10])
def test_opening_round_trip(ticket: str) -> None:
    data = seal.encode_opening(ticket, NONCE)
    assert seal.opening_size(data[:2]) == len(data) == 2 + len(ticket) + 16
    assert seal.decode_opening(data) == (ticket, NONCE)


def test_opening_size_needs_only_the_first_two_bytes() -> None:
    assert seal.opening_size(b"S\x01") == 19
    assert seal.opening_size(b"S\x40") == 2 + 64 + 16
    assert seal.opening_size(b"S\x05 and whatever follows") == 23


@pytest.mark.parametrize(
    "head",
    [b"", b"S", b"\x16\x03", b"s\x05", b"T\x05", b"S\x00", b"S\x41", b"S\xff"],
    ids=["empty", "one-byte", "tls-hello", "lowercase", "wrong-prefix", "zero", "65", "255"],
)
def test_opening_size_refuses(head: bytes) -> None:
    """A TLS ClientHello (0x16 0x03) or anything else is not mistaken for an opening."""
    with pytest.raises(ProtocolError):
        seal.opening_size(head)


@pytest.mark.parametrize(
    ("ticket", "nonce"),
    [
        ("", NONCE),
        ("x" * 65, NONCE),
        ("é" * 33, NONCE),
        (TICKET, NONCE[:15]),
        (TICKET, NONCE + b"!"),
    ],
    ids=["empty-ticket", "65-chars", "66-utf8-bytes", "short-nonce", "long-nonce"],
)
def test_encode_opening_refuses(ticket: str, nonce: bytes) -> None:
    with pytest.raises(ProtocolError):
        seal.encode_opening(ticket, nonce)


def _opening(length: int, ticket: bytes, prefix: bytes = b"S") -> bytes:
    return prefix + bytes([length]) + ticket + NONCE


@pytest.mark.parametrize(
    "data",
    [
        _opening(4, b"abcd", prefix=b"X"),
        _opening(4, b"abcd", prefix=b"\x16"),
        _opening(0, b""),
        _opening(65, b"x" * 65),
        _opening(200, b"x" * 200),
        _opening(2, "é".encode()),
        _opening(4, b"ab\xffd"),
        _opening(4, b"abcd") + b"!",
    ],
    ids=["prefix", "tls", "zero", "65", "200", "utf8", "high-byte", "overlong"],
)
def test_decode_opening_refuses(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        seal.decode_opening(data)


def test_decode_opening_refuses_every_truncation() -> None:
    data = seal.encode_opening(TICKET, NONCE)
    for end in range(len(data)):
        with pytest.raises(ProtocolError):
            seal.decode_opening(data[:end])


@FUZZ
@given(st.binary(max_size=120))
def test_decode_opening_of_any_bytes_is_exact_or_refused(data: bytes) -> None:
    """Untrusted input: only ProtocolError escapes, and what is accepted re-encodes to itself."""
    try:
        ticket, nonce = seal.decode_opening(data)
    except ProtocolError:
        return
    assert seal.encode_opening(ticket, nonce) == data


# ---- key derivation ---------------------------------------------------------------------


@pytest.mark.parametrize("ticket", ["a", TICKET, "x" * 64])
def test_derive_keys_is_hkdf_sha256(ticket: str) -> None:
    up, down = seal.derive_keys(DATA_KEY, ticket, NONCE)
    okm = hkdf_sha256(DATA_KEY, NONCE, b"natkit sealed data v1 " + ticket.encode(), 64)
    assert (up, down) == (okm[:32], okm[32:])
    assert len(up) == len(down) == 32
    assert up != down


def test_derive_keys_differ_per_ticket_nonce_and_secret() -> None:
    base = seal.derive_keys(DATA_KEY, TICKET, NONCE)
    others = [
        seal.derive_keys(DATA_KEY, TICKET + "x", NONCE),
        seal.derive_keys(DATA_KEY, "t-0123456789abcdeg", NONCE),
        seal.derive_keys(DATA_KEY, TICKET, NONCE[:-1] + b"\x00"),
        seal.derive_keys(bytes(32), TICKET, NONCE),
    ]
    keys = {k for pair in [base, *others] for k in pair}
    assert len(keys) == 2 * (1 + len(others)), "no key is shared by two connections"


@pytest.mark.parametrize(
    ("data_key", "nonce"),
    [
        (DATA_KEY[:31], NONCE),
        (DATA_KEY + b"!", NONCE),
        (b"", NONCE),
        (DATA_KEY, NONCE[:15]),
        (DATA_KEY, NONCE + b"!"),
        (DATA_KEY, b""),
    ],
    ids=["key-31", "key-33", "key-0", "nonce-15", "nonce-17", "nonce-0"],
)
def test_derive_keys_refuses_bad_sizes(data_key: bytes, nonce: bytes) -> None:
    with pytest.raises(ProtocolError):
        seal.derive_keys(data_key, TICKET, nonce)


# ---- the record format ------------------------------------------------------------------


def test_records_are_length_then_ciphertext_and_tag_with_counter_nonces() -> None:
    """Pins the format: an independent ChaCha20-Poly1305 opens natkit's records, in both
    directions, with nonce = 4 zero bytes + counter and the length header as associated
    data."""
    agent, relay = channels()
    up, down = seal.derive_keys(DATA_KEY, TICKET, NONCE)
    payloads = [b"hello", b"x" * 1000, b"\x00", bytes(range(256))]
    for chan, key in [(agent, up), (relay, down)]:
        for p in payloads:
            chan.seal(p)
        out = chan.take_output()
        assert len(out) == 2 * len(payloads)
        for k, p in enumerate(payloads):
            header, body = bytes(out[2 * k]), bytes(out[2 * k + 1])
            assert header == len(p).to_bytes(4, "big")
            assert len(body) == len(p) + TAG
            assert ChaCha20Poly1305(key).decrypt(record_nonce(k), body, header) == p
            assert header + body == reference_record(key, k, p)
        assert chan.take_output() == []


def test_channel_opens_records_built_by_the_reference() -> None:
    agent, relay = channels()
    up, down = seal.derive_keys(DATA_KEY, TICKET, NONCE)
    relay.receive(b"".join(reference_record(up, k, p) for k, p in enumerate([b"ab", b"cde"])))
    agent.receive(reference_record(down, 0, b"down"))
    assert drain(relay) == (b"abcde", False)
    assert drain(agent) == (b"down", False)


def test_seal_of_nothing_sends_nothing() -> None:
    agent, _ = channels()
    agent.seal(b"")
    assert agent.take_output() == []


def test_data_above_record_max_is_split() -> None:
    agent, relay = channels()
    up, _ = seal.derive_keys(DATA_KEY, TICKET, NONCE)
    data = bytes(range(256)) * (2 * seal.RECORD_MAX // 256) + b"tail!"
    agent.seal(data)
    recs = records(agent)
    assert [int.from_bytes(r[:4], "big") for r in recs] == [seal.RECORD_MAX, seal.RECORD_MAX, 5]
    for k, r in enumerate(recs):
        assert r == reference_record(up, k, data[k * seal.RECORD_MAX : (k + 1) * seal.RECORD_MAX])
    relay.receive(b"".join(recs))
    sizes = []
    out = bytearray()
    while relay.has_input():
        piece = relay.read(seal.RECORD_MAX)
        sizes.append(len(piece))
        out += piece
    assert sizes == [seal.RECORD_MAX, seal.RECORD_MAX, 5]
    assert out == data


def test_record_of_exactly_record_max_is_one_record() -> None:
    agent, relay = channels()
    agent.seal(b"m" * seal.RECORD_MAX)
    recs = records(agent)
    assert len(recs) == 1
    relay.receive(recs[0])
    assert drain(relay) == (b"m" * seal.RECORD_MAX, False)


def test_empty_record_from_the_peer_is_skipped() -> None:
    """seal never makes one, but a length-0 record is well-formed: it carries nothing."""
    _, relay = channels()
    up, _ = seal.derive_keys(DATA_KEY, TICKET, NONCE)
    relay.receive(reference_record(up, 0, b"") + reference_record(up, 1, b"after"))
    assert bytes(relay.read(100)) == b"after"
    relay.receive(reference_record(up, 2, b""))
    relay.receive_eof()
    assert bytes(relay.read(100)) == b""


# ---- receiving --------------------------------------------------------------------------


def test_both_directions_round_trip() -> None:
    agent, relay = channels()
    agent.seal(b"up 1")
    agent.seal(bytearray(b"up 2"))
    relay.receive(wire(agent))
    relay.seal(memoryview(b"down"))
    agent.receive(wire(relay))
    assert drain(relay) == (b"up 1up 2", False)
    assert drain(agent) == (b"down", False)


def test_one_byte_at_a_time() -> None:
    agent, relay = channels()
    payloads = [b"first", b"second record", b"3"]
    for p in payloads:
        agent.seal(p)
    recs = records(agent)
    ends = list(itertools.accumulate(len(r) for r in recs))
    data = b"".join(recs)
    got = []
    for i in range(len(data)):
        relay.receive(data[i : i + 1])
        if i + 1 in ends:
            got.append(bytes(relay.read(seal.RECORD_MAX)))
        with pytest.raises(NeedData):
            relay.read(seal.RECORD_MAX)
    assert got == payloads


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000])
def test_any_chunk_size(size: int) -> None:
    agent, relay = channels()
    sent = [bytes([i]) * (i * 37 % 300) for i in range(1, 20)]
    for p in sent:
        agent.seal(p)
    data = wire(agent)
    got = bytearray()
    for pos in range(0, len(data), size):
        relay.receive(data[pos : pos + size])
        got += drain(relay)[0]
    assert got == b"".join(sent)


def test_read_honours_the_limit() -> None:
    agent, relay = channels()
    agent.seal(b"0123456789")
    agent.seal(b"ab")
    relay.receive(wire(agent))
    assert [bytes(relay.read(3)) for _ in range(4)] == [b"012", b"345", b"678", b"9"]
    assert bytes(relay.read(1)) == b"a"
    assert bytes(relay.read(100)) == b"b"
    with pytest.raises(NeedData):
        relay.read(3)


def test_read_never_joins_records() -> None:
    """A read returns part of one record: the zero-copy view is one record's plaintext."""
    agent, relay = channels()
    agent.seal(b"abc")
    agent.seal(b"def")
    relay.receive(wire(agent))
    assert bytes(relay.read(100)) == b"abc"
    assert bytes(relay.read(100)) == b"def"


def test_need_data_until_a_whole_record() -> None:
    agent, relay = channels()
    with pytest.raises(NeedData):
        relay.read(10)
    agent.seal(b"payload")
    (rec,) = records(agent)
    for cut in [1, 3, 4, 5, len(rec) - 1]:
        _, fresh = channels()
        fresh.receive(rec[:cut])
        with pytest.raises(NeedData):
            fresh.read(10)
        fresh.receive(rec[cut:])
        assert bytes(fresh.read(10)) == b"payload"


def test_has_input() -> None:
    agent, relay = channels()
    assert not relay.has_input()
    agent.seal(b"abcdef")
    rec = wire(agent)
    relay.receive(rec[:2])
    assert relay.has_input(), "part of a record is input"
    relay.receive(rec[2:])
    assert relay.has_input()
    assert bytes(relay.read(4)) == b"abcd"
    assert relay.has_input(), "the rest of an opened record is input"
    assert bytes(relay.read(4)) == b"ef"
    assert not relay.has_input()
    relay.receive_eof()
    assert not relay.has_input()


def test_clean_end() -> None:
    agent, relay = channels()
    relay.receive_eof()
    assert relay.eof
    for _ in range(2):
        piece = relay.read(10)
        assert isinstance(piece, memoryview)
        assert len(piece) == 0

    agent.seal(b"last words")
    _, relay = channels()
    relay.receive(wire(agent))
    relay.receive_eof()
    assert drain(relay, limit=4) == (b"last words", True)


@pytest.mark.parametrize("tail", [b"", b"next"], ids=["one-record", "two-records"])
def test_end_inside_a_record_is_refused(tail: bytes) -> None:
    agent, _ = channels()
    agent.seal(b"complete")
    if tail:
        agent.seal(tail)
    data = wire(agent)
    first = 4 + len(b"complete") + TAG
    for cut in range(1, len(data)):
        if cut == first:
            continue  # a record boundary: a clean end (see the test below)
        _, relay = channels()
        relay.receive(data[:cut])
        relay.receive_eof()
        if cut > first:
            assert bytes(relay.read(100)) == b"complete"
        assert_refused(relay)


def test_end_at_a_record_boundary_looks_clean() -> None:
    """Dropping whole records at the end is not detectable here: the framing above
    (sealpump's zero-length end chunk) must carry its own end marker."""
    agent, relay = channels()
    agent.seal(b"one")
    agent.seal(b"two")
    relay.receive(records(agent)[0])
    relay.receive_eof()
    assert drain(relay) == (b"one", True)


def test_bytes_after_the_end_are_refused() -> None:
    agent, relay = channels()
    agent.seal(b"late")
    relay.receive_eof()
    with pytest.raises(ProtocolError):
        relay.receive(wire(agent))
    with pytest.raises(ProtocolError):
        relay.receive(b"x")


def test_received_bytes_are_copied() -> None:
    """sealpump reuses one read buffer per thread: the channel must not keep views of it,
    and a view read earlier must survive later receives."""
    agent, relay = channels()
    agent.seal(b"first")
    agent.seal(b"second")
    data = wire(agent)
    shared = bytearray(len(data))
    shared[:] = data
    relay.receive(memoryview(shared)[:10])
    shared[:10] = bytes(10)
    relay.receive(memoryview(shared)[10:])
    shared[:] = bytes(len(shared))
    first = relay.read(100)
    second = relay.read(100)
    assert (bytes(first), bytes(second)) == (b"first", b"second")


def test_sealed_output_does_not_alias_the_input() -> None:
    agent, relay = channels()
    buf = bytearray(b"mutable")
    agent.seal(memoryview(buf))
    buf[:] = b"changed"
    relay.receive(wire(agent))
    assert bytes(relay.read(100)) == b"mutable"


# ---- refusals ---------------------------------------------------------------------------


def test_a_flipped_bit_anywhere_is_refused() -> None:
    """Header, ciphertext or tag: every single-bit change fails (the header is associated
    data, so a changed length cannot slip through either)."""
    agent, _ = channels()
    agent.seal(b"secret")
    (rec,) = records(agent)
    for pos in range(len(rec)):
        for bit in range(8):
            bad = bytearray(rec)
            bad[pos] ^= 1 << bit
            _, relay = channels()
            relay.receive(bad)
            relay.receive_eof()
            assert_refused(relay)


def test_a_flipped_bit_in_a_later_record_is_refused_after_the_good_ones() -> None:
    agent, relay = channels()
    agent.seal(b"good")
    agent.seal(b"tampered")
    good, bad = records(agent)
    flipped = bytearray(bad)
    flipped[10] ^= 0x01
    relay.receive(good + flipped)
    assert bytes(relay.read(100)) == b"good"
    assert_refused(relay)


def test_a_shortened_length_header_is_refused() -> None:
    """The length is authenticated: claiming fewer bytes (and so a different split of
    ciphertext and tag) does not open."""
    agent, _ = channels()
    agent.seal(b"0123456789")
    (rec,) = records(agent)
    for length in range(10):
        _, relay = channels()
        relay.receive(struct.pack("!I", length) + rec[4:])
        assert_refused(relay)


def test_swapped_records_are_refused() -> None:
    agent, relay = channels()
    agent.seal(b"first")
    agent.seal(b"other")  # the same length: only the nonce tells them apart
    a, b = records(agent)
    relay.receive(b + a)
    assert_refused(relay)


def test_a_dropped_record_is_refused() -> None:
    agent, relay = channels()
    for p in [b"zero", b"one", b"two"]:
        agent.seal(p)
    r0, _, r2 = records(agent)
    relay.receive(r0 + r2)
    assert bytes(relay.read(100)) == b"zero"
    assert_refused(relay)


def test_a_replayed_record_is_refused() -> None:
    agent, relay = channels()
    agent.seal(b"once")
    agent.seal(b"twice")
    r0, r1 = records(agent)
    relay.receive(r0 + r0 + r1)
    assert bytes(relay.read(100)) == b"once"
    assert_refused(relay)


def test_a_record_replayed_from_another_connection_is_refused() -> None:
    """Same secret and ticket, another nonce (a ticket used twice): other keys."""
    agent, _ = channels()
    _, relay = channels(nonce=bytes(16))
    agent.seal(b"from the first connection")
    relay.receive(wire(agent))
    assert_refused(relay)


@pytest.mark.parametrize(
    "other",
    [
        {"data_key": bytes(32)},
        {"ticket": "t-another-ticket"},
        {"nonce": bytes(16)},
    ],
    ids=["other-secret", "other-ticket", "other-nonce"],
)
def test_a_record_sealed_with_another_key_is_refused(other: dict[str, object]) -> None:
    stranger, _ = channels(**other)  # type: ignore[arg-type]
    _, relay = channels()
    stranger.seal(b"not for you")
    relay.receive(wire(stranger))
    assert_refused(relay)


def test_a_reflected_record_is_refused() -> None:
    """The two directions have their own keys: the agent's records sent back to it fail."""
    agent, relay = channels()
    agent.seal(b"echo")
    agent.receive(wire(agent))
    assert_refused(agent)
    relay.seal(b"echo")
    relay.receive(wire(relay))
    assert_refused(relay)


@pytest.mark.parametrize("length", [seal.RECORD_MAX + 1, 1 << 24, 0xFFFFFFFF])
def test_a_length_above_record_max_is_refused_at_once(length: int) -> None:
    """Refused from the header alone, not buffered until up to 4 GiB have arrived."""
    _, relay = channels()
    relay.receive(struct.pack("!I", length))
    assert_refused(relay)


def test_a_length_of_record_max_waits_for_the_body() -> None:
    _, relay = channels()
    relay.receive(struct.pack("!I", seal.RECORD_MAX) + bytes(100))
    with pytest.raises(NeedData):
        relay.read(10)


def test_the_record_counter_does_not_wrap() -> None:
    """2**64 records cannot be sent in a test: start the counter near its end (private
    state) to check that a nonce is never reused."""
    agent, _ = channels()
    agent._sent = (1 << 64) - 1
    agent.seal(b"the last record")
    header, body = agent.take_output()
    up, _ = seal.derive_keys(DATA_KEY, TICKET, NONCE)
    nonce = b"\0\0\0\0" + b"\xff" * 8
    assert ChaCha20Poly1305(up).decrypt(nonce, body, header) == b"the last record"
    with pytest.raises(ProtocolError):
        agent.seal(b"one too many")


# ---- hypothesis -------------------------------------------------------------------------

PAYLOADS = st.lists(st.binary(max_size=300), max_size=12)
CUTS = st.lists(st.integers(0, 10_000), max_size=30)
LIMITS = st.integers(1, 400)


@FUZZ
@given(payloads=PAYLOADS, cuts=CUTS, limit=LIMITS, downstream=st.booleans(), end=st.booleans())
def test_any_payloads_round_trip_through_any_chunking(
    payloads: list[bytes], cuts: list[int], limit: int, downstream: bool, end: bool
) -> None:
    agent, relay = channels()
    sender, receiver = (relay, agent) if downstream else (agent, relay)
    for p in payloads:
        sender.seal(p)
    data = wire(sender)
    assert len(data) == sum(len(p) + 4 + TAG for p in payloads if p)
    got = bytearray()
    for chunk in chunked(data, cuts):
        receiver.receive(chunk)
        got += drain(receiver, limit)[0]
    if end:
        receiver.receive_eof()
        assert drain(receiver, limit) == (b"", True)
    assert got == b"".join(payloads)
    assert not receiver.has_input()


@st.composite
def hostile_stream(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(bytes that arrive, plaintext the real agent sealed): real records then mutations
    (insert, delete, flip, truncate, duplicate a stretch), or plain noise."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200)), b""
    agent, _ = channels()
    payloads = draw(st.lists(st.binary(max_size=40), min_size=1, max_size=4))
    for p in payloads:
        agent.seal(p)
    data = bytearray(wire(agent))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "flip", "truncate", "duplicate"]))
        if kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=24))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 60))]
        elif kind == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "duplicate":
            data[pos:pos] = data[draw(st.integers(0, pos)) : pos]
    return bytes(data), b"".join(payloads)


@FUZZ
@given(hostile=hostile_stream(), cuts=CUTS, limit=LIMITS, end=st.booleans())
def test_hostile_bytes_give_only_need_data_or_protocol_error(
    hostile: tuple[bytes, bytes], cuts: list[int], limit: int, end: bool
) -> None:
    """Whatever arrives, ``read`` returns plaintext or raises NeedData/ProtocolError (any
    other exception fails this test), and what comes out is a prefix of what the real agent
    sealed: forged, rearranged or repeated records never come out."""
    stream, sealed = hostile
    _, relay = channels()
    got = bytearray()
    try:
        for chunk in chunked(stream, cuts):
            relay.receive(chunk)
            got += drain(relay, limit)[0]
        if end:
            relay.receive_eof()
            got += drain(relay, limit)[0]
    except ProtocolError:
        pass
    assert bytes(got) == sealed[: len(got)]


# ---- the two AEADs ------------------------------------------------------------------------------


@pytest.mark.parametrize("cipher", [seal.CHACHA, seal.AES_GCM])
def test_both_ciphers_round_trip_and_name_themselves_in_the_opening(cipher: str) -> None:
    nonce = bytes(range(16))
    up, down = seal.derive_keys(b"k" * 32, "ticket", nonce, cipher)
    a = seal.SealedChannel(send_key=up, recv_key=down, cipher=cipher)
    b = seal.SealedChannel(send_key=down, recv_key=up, cipher=cipher)
    a.seal(b"hello " * 1000)
    b.receive(b"".join(bytes(x) for x in a.take_output()))
    assert bytes(b.read(1 << 20)) == b"hello " * 1000
    opening = seal.encode_opening("handle", nonce, cipher)
    assert seal.opening_cipher(opening) == cipher
    assert seal.decode_opening(opening) == ("handle", nonce)


def test_the_ciphers_derive_different_keys_and_do_not_open_each_other() -> None:
    nonce = bytes(16)
    chacha = seal.derive_keys(b"k" * 32, "t", nonce, seal.CHACHA)
    aes = seal.derive_keys(b"k" * 32, "t", nonce, seal.AES_GCM)
    assert chacha != aes
    a = seal.SealedChannel(send_key=aes[0], recv_key=aes[1], cipher=seal.AES_GCM)
    b = seal.SealedChannel(send_key=aes[1], recv_key=aes[0], cipher=seal.CHACHA)
    a.seal(b"x")
    b.receive(b"".join(bytes(x) for x in a.take_output()))
    with pytest.raises(ProtocolError):
        b.read(10)


def test_an_unknown_opening_byte_is_not_ours() -> None:
    with pytest.raises(ProtocolError):
        seal.opening_cipher(b"X")
    with pytest.raises(ProtocolError):
        seal.opening_size(b"X\x05")


def test_the_preferred_cipher_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATKIT_SEAL_CIPHER", seal.AES_GCM)
    assert seal.preferred_cipher() == seal.AES_GCM
    monkeypatch.setenv("NATKIT_SEAL_CIPHER", seal.CHACHA)
    assert seal.preferred_cipher() == seal.CHACHA
