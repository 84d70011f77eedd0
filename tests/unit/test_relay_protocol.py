"""The relay's control protocol, byte for byte: framing, schemas, the decoder's chunking and
its refusals, and the token's HMAC proof."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from typing import Any

import pytest

from natkit.errors import ProtocolError
from natkit.relay import protocol as P

# One valid message of every type, with the exact field values used below.
SAMPLES: dict[int, dict[str, Any]] = {
    P.HELLO: {"version": 1, "agent": "natkit"},
    P.CHALLENGE: {"nonce": "00ff" * 8},
    P.AUTH: {"token_id": "a" * 32, "mac": "b" * 64},
    P.WELCOME: {"session": "0123456789abcdef", "data_key": "00" * 32},
    P.ERROR: {"code": "auth", "message": "the relay does not accept this token"},
    P.OPEN: {"tunnel": "t0", "kind": "tcp", "name": "", "port": 20000},
    P.OPENED: {"tunnel": "t0", "public": "100.200.0.2:20000"},
    P.CLOSE: {"tunnel": "t0"},
    P.TICKETS: {"tunnel": "t0", "tickets": ["x" * 24, "y" * 24]},
    P.DIAL: {"id": 7, "host": "100.200.0.1", "port": 8080},
    P.DIALED: {"id": 7, "ok": False, "error": "TimeoutError"},
    P.PING: {"t": 1700000000.25},
    P.PONG: {"t": 1700000000.25},
    P.DATA: {"ticket": "z" * 24},
    P.START: {"tunnel": "t0", "visitor": "100.200.0.3:40000"},
    P.P2P_JOIN: {"name": "cam-1", "role": "listen", "instance": "0123456789abcdef"},
    P.P2P_PEER: {"name": "cam-1", "present": True, "ticket": "w" * 24},
    P.P2P_SIGNAL: {"name": "cam-1", "data": '{"candidate":"1 1 udp 1 100.200.0.1 4000"}'},
    P.P2P_LEAVE: {"name": "cam-1"},
    P.P2P_JOINED: {},
}

TYPE_CODES = {
    "HELLO": 1, "CHALLENGE": 2, "AUTH": 3, "WELCOME": 4, "ERROR": 5, "OPEN": 6, "OPENED": 7,
    "CLOSE": 8, "TICKETS": 9, "DIAL": 10, "DIALED": 11, "PING": 12, "PONG": 13, "DATA": 20,
    "START": 21, "P2P_JOIN": 30, "P2P_PEER": 31, "P2P_SIGNAL": 32, "P2P_LEAVE": 33,
    "P2P_JOINED": 34,
}  # fmt: skip


def frame(msg_type: int, body: bytes) -> bytes:
    """A frame built by hand: 1 byte type, 3 bytes big-endian length, the body."""
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def raw(msg_type: int, fields: Any) -> bytes:
    return frame(msg_type, json.dumps(fields).encode())


def decode_one(data: bytes) -> P.Message:
    messages = P.Decoder().feed(data)
    assert len(messages) == 1, messages
    return messages[0]


# ---- the wire format --------------------------------------------------------------------


def test_every_type_has_a_sample_and_the_documented_code() -> None:
    assert set(SAMPLES) == set(P.SCHEMAS) == set(P.NAMES)
    assert {P.NAMES[t]: t for t in P.NAMES} == TYPE_CODES


@pytest.mark.parametrize("msg_type", sorted(SAMPLES), ids=lambda t: P.NAMES[t])
def test_encode_is_type_length_json(msg_type: int) -> None:
    fields = SAMPLES[msg_type]
    data = P.encode(msg_type, **fields)
    body = json.dumps(fields, separators=(",", ":")).encode()
    assert data[0] == msg_type
    assert int.from_bytes(data[1:4], "big") == len(body)
    assert data[4:] == body
    assert data == frame(msg_type, body)
    assert struct.unpack("!I", data[:4])[0] == msg_type << 24 | len(body)


@pytest.mark.parametrize("msg_type", sorted(SAMPLES), ids=lambda t: P.NAMES[t])
def test_decode_round_trip(msg_type: int) -> None:
    msg = decode_one(P.encode(msg_type, **SAMPLES[msg_type]))
    assert msg.type == msg_type
    assert msg.name == P.NAMES[msg_type]
    assert msg.fields == SAMPLES[msg_type]
    for key, value in SAMPLES[msg_type].items():
        assert msg[key] == value


@pytest.mark.parametrize("msg_type", sorted(SAMPLES), ids=lambda t: P.NAMES[t])
def test_decode_accepts_any_json_spelling(msg_type: int) -> None:
    """Whitespace, key order and extra fields are the sender's business."""
    fields = dict(reversed(list(SAMPLES[msg_type].items())))
    fields["extra"] = {"nested": [1, 2, 3]}
    body = json.dumps(fields, indent=2).encode()
    msg = decode_one(frame(msg_type, b"  " + body + b"\n"))
    assert msg.fields == fields


def test_known_bytes_decode() -> None:
    data = b"\x01\x00\x00\x1c" + b'{"version":1,"agent":"test"}'
    assert len(data) == 4 + 0x1C
    msg = decode_one(data)
    assert (msg.type, msg.fields) == (P.HELLO, {"version": 1, "agent": "test"})
    assert P.encode(P.HELLO, version=1, agent="test") == data


def test_float_fields_take_ints_but_int_fields_take_no_floats() -> None:
    assert decode_one(raw(P.PING, {"t": 5}))["t"] == 5
    with pytest.raises(ProtocolError):
        decode_one(raw(P.DIAL, {"id": 1.0, "host": "h", "port": 1}))
    with pytest.raises(ProtocolError):
        decode_one(raw(P.OPEN, {"tunnel": "t", "kind": "tcp", "name": "", "port": 80.5}))


# ---- chunking ---------------------------------------------------------------------------


def test_byte_by_byte_feeding_yields_every_message_once() -> None:
    stream = b"".join(P.encode(t, **f) for t, f in SAMPLES.items())
    decoder = P.Decoder()
    got: list[P.Message] = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
    assert [(m.type, m.fields) for m in got] == list(SAMPLES.items())
    assert decoder.buffered == b""


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 64, 1000, 1 << 20])
def test_any_chunk_size(size: int) -> None:
    stream = b"".join(P.encode(t, **f) for t, f in SAMPLES.items()) * 3
    decoder = P.Decoder()
    got: list[P.Message] = []
    for i in range(0, len(stream), size):
        got += decoder.feed(stream[i : i + size])
    assert [(m.type, m.fields) for m in got] == list(SAMPLES.items()) * 3


def test_partial_frames_wait_and_buffered_holds_the_rest() -> None:
    data = P.encode(P.DATA, ticket="abc")
    decoder = P.Decoder()
    assert decoder.feed(data[:2]) == []  # not even a header
    assert decoder.feed(data[2:4]) == []  # a header, no body
    assert decoder.feed(data[4:-1]) == []  # all but the last byte
    assert decoder.buffered == data[:-1]
    (msg,) = decoder.feed(data[-1:])
    assert msg["ticket"] == "abc"
    assert decoder.buffered == b""


def test_several_frames_in_one_feed_and_the_bytes_after_them() -> None:
    start = P.encode(P.START, tunnel="t0", visitor="1.2.3.4:5")
    tail = P.encode(P.PING, t=1)[:6]
    messages = P.Decoder().feed(start + start + tail)
    assert [m.name for m in messages] == ["START", "START"]
    decoder = P.Decoder()
    decoder.feed(start + tail)
    assert decoder.buffered == tail


def test_empty_feed() -> None:
    decoder = P.Decoder()
    assert decoder.feed(b"") == []
    assert decoder.buffered == b""


# ---- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("msg_type", [0, 14, 19, 22, 99, 0x16, 0x47, 255])
def test_unknown_type_is_refused_from_the_header_alone(msg_type: int) -> None:
    with pytest.raises(ProtocolError, match="unknown relay message type"):
        P.Decoder().feed(bytes([msg_type, 0, 0, 2]))  # no body needed to refuse it
    with pytest.raises(ProtocolError, match="unknown relay message type"):
        P.encode(msg_type, tunnel="t0")


def test_oversize_frame_is_refused_from_the_header_alone() -> None:
    for length in (P.MAX_FRAME + 1, 0xFFFFFF):
        with pytest.raises(ProtocolError, match="exceeds"):
            P.Decoder().feed(bytes([P.PING]) + length.to_bytes(3, "big"))


def test_a_frame_of_exactly_max_frame_bytes_is_fine() -> None:
    head = b'{"t":1'
    body = head + b" " * (P.MAX_FRAME - len(head) - 1) + b"}"
    assert len(body) == P.MAX_FRAME
    assert decode_one(frame(P.PING, body))["t"] == 1


def test_encode_refuses_to_build_an_oversize_frame() -> None:
    with pytest.raises(ValueError, match="too large"):
        P.encode(P.PING, t=1.0, pad="x" * P.MAX_FRAME)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"not json",
        b'{"ticket": "a"',
        b"\xff\xfe{}",
        b'{"ticket": "\xc3"}',  # truncated UTF-8
        b"[" * 30000 + b"]" * 30000,  # deeper than the parser's recursion limit
        b'{"ticket": ' + b"1" * 5000 + b"}",  # an integer too long to convert
    ],
)
def test_not_json_is_refused(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_one(frame(P.DATA, body))


@pytest.mark.parametrize("body", [b"[]", b'"text"', b"42", b"null", b"true", b'[{"ticket":"a"}]'])
def test_json_that_is_not_an_object_is_refused(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="not a JSON object"):
        decode_one(frame(P.DATA, body))


@pytest.mark.parametrize("msg_type", sorted(SAMPLES), ids=lambda t: P.NAMES[t])
def test_each_missing_field_is_refused(msg_type: int) -> None:
    for key in P.SCHEMAS[msg_type]:
        fields = {k: v for k, v in SAMPLES[msg_type].items() if k != key}
        with pytest.raises(ProtocolError, match=repr(key)):
            decode_one(raw(msg_type, fields))
        with pytest.raises(ProtocolError):
            P.encode(msg_type, **fields)


WRONG: dict[type, list[Any]] = {
    str: [1, 1.5, None, True, [], {}],
    int: ["1", 1.5, None, True, False, [], {}],
    float: ["1", None, True, False, [], {}],
    bool: [0, 1, "true", None, [], {}],
    list: ["a", 1, None, {}, True],
}


@pytest.mark.parametrize("msg_type", sorted(SAMPLES), ids=lambda t: P.NAMES[t])
def test_each_mistyped_field_is_refused(msg_type: int) -> None:
    for key, kind in P.SCHEMAS[msg_type].items():
        for bad in WRONG[kind]:
            fields = {**SAMPLES[msg_type], key: bad}
            with pytest.raises(ProtocolError, match=repr(key)):
                decode_one(raw(msg_type, fields))
            with pytest.raises(ProtocolError):
                P.encode(msg_type, **fields)


@pytest.mark.parametrize(
    ("msg_type", "key"),
    [(P.HELLO, "version"), (P.OPEN, "port"), (P.DIAL, "id"), (P.DIAL, "port"), (P.PING, "t")],
)
def test_bool_is_not_a_number(msg_type: int, key: str) -> None:
    for value in (True, False):
        body = json.dumps({**SAMPLES[msg_type], key: value}).encode()
        assert b"true" in body or b"false" in body
        with pytest.raises(ProtocolError):
            decode_one(frame(msg_type, body))


def test_string_length_limit() -> None:
    ok = {**SAMPLES[P.ERROR], "message": "m" * P.MAX_STRING}
    assert decode_one(raw(P.ERROR, ok))["message"] == ok["message"]
    with pytest.raises(ProtocolError, match="too long"):
        decode_one(raw(P.ERROR, {**ok, "message": "m" * (P.MAX_STRING + 1)}))


@pytest.mark.parametrize("value", [-1, -(2**63), 2**32 + 1, 2**64, 10**100])
def test_integer_range(value: int) -> None:
    with pytest.raises(ProtocolError, match="out of range"):
        decode_one(raw(P.DIAL, {"id": value, "host": "h", "port": 1}))


def test_integer_bounds_accepted() -> None:
    for value in (0, 65535, 2**31):
        assert decode_one(raw(P.DIAL, {"id": value, "host": "h", "port": 1}))["id"] == value


def test_tickets_list_is_checked() -> None:
    good = {"tunnel": "t0", "tickets": ["a" * 64] * P.MAX_TICKETS}
    assert len(decode_one(raw(P.TICKETS, good))["tickets"]) == P.MAX_TICKETS
    assert decode_one(raw(P.TICKETS, {"tunnel": "t0", "tickets": []}))["tickets"] == []
    for bad in (
        ["a"] * (P.MAX_TICKETS + 1),
        ["a" * 65],
        [1],
        [None],
        [["a"]],
        [{"a": 1}],
    ):
        with pytest.raises(ProtocolError, match="ticket"):
            decode_one(raw(P.TICKETS, {"tunnel": "t0", "tickets": bad}))


@pytest.mark.parametrize("kind", ["tcp", "http", "tls"])
def test_open_kinds(kind: str) -> None:
    assert decode_one(raw(P.OPEN, {**SAMPLES[P.OPEN], "kind": kind}))["kind"] == kind


@pytest.mark.parametrize("kind", ["", "udp", "TCP", "https", "tcp "])
def test_open_refuses_other_kinds(kind: str) -> None:
    with pytest.raises(ProtocolError, match="kind"):
        decode_one(raw(P.OPEN, {**SAMPLES[P.OPEN], "kind": kind}))


def test_a_bad_frame_after_a_good_one_raises() -> None:
    """The peer is dropped: the decoder does not hand out half a batch silently."""
    good = P.encode(P.PING, t=1)
    with pytest.raises(ProtocolError):
        P.Decoder().feed(good + frame(P.PING, b"[]"))


# ---- authentication ---------------------------------------------------------------------

TOKEN = "correct-horse-battery-staple"
NONCE = "6e6f6e63652d6f6e65"
FP = "sha256:" + "ab" * 32


def test_token_id_is_a_stable_public_handle() -> None:
    tid = P.token_id(TOKEN)
    assert tid == P.token_id(TOKEN)
    assert len(tid) == 32 and int(tid, 16) >= 0
    assert tid != P.token_id(TOKEN + "x")
    assert TOKEN not in tid
    expected = hashlib.sha256(b"natkit-token-id\x00" + TOKEN.encode()).hexdigest()[:32]
    assert tid == expected
    assert tid != hashlib.sha256(TOKEN.encode()).hexdigest()[:32]  # domain-separated


def test_auth_mac_is_hmac_over_version_nonce_and_fingerprint() -> None:
    mac = P.auth_mac(TOKEN, NONCE, FP)
    msg = f"natkit-auth-v{P.VERSION}\x00{NONCE}\x00{FP}".encode()
    assert mac == hmac.new(TOKEN.encode(), msg, hashlib.sha256).hexdigest()
    assert len(mac) == 64 and TOKEN not in mac
    assert P.check_mac(TOKEN, NONCE, FP, mac)


def test_a_mac_for_anything_else_fails() -> None:
    mac = P.auth_mac(TOKEN, NONCE, FP)
    assert not P.check_mac(TOKEN, NONCE + "0", FP, mac)  # replayed against a fresh nonce
    assert not P.check_mac(TOKEN, NONCE, "sha256:" + "cd" * 32, mac)  # a man in the middle
    assert not P.check_mac(TOKEN + "!", NONCE, FP, mac)  # another token
    assert not P.check_mac(TOKEN, NONCE, FP, mac.upper())
    assert not P.check_mac(TOKEN, NONCE, FP, mac[:-1])
    assert not P.check_mac(TOKEN, NONCE, FP, "")
    assert not P.check_mac(TOKEN, NONCE, FP, P.auth_mac(TOKEN, FP, NONCE))  # fields swapped
    # The separators matter: moving a character across the boundary changes the MAC.
    assert P.auth_mac(TOKEN, NONCE + "a", "b" + FP) != P.auth_mac(TOKEN, NONCE + "ab", FP)


@pytest.mark.parametrize("mac", ["é" * 64, "\u00e9", "\ud800", "ａ" * 64, "\x00" * 64])
def test_check_mac_with_non_ascii_from_the_wire_is_false_not_an_exception(mac: str) -> None:
    """hmac.compare_digest raises TypeError for non-ASCII str: a MAC off the wire must not."""
    assert P.check_mac(TOKEN, NONCE, FP, mac) is False


def test_check_mac_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the module P uses
    mac = P.auth_mac(TOKEN, NONCE, FP)
    assert P.check_mac(TOKEN, NONCE, FP, mac)
    assert not P.check_mac(TOKEN, NONCE, FP, "0" * 64)
    assert len(calls) == 2


def test_auth_message_carries_no_token() -> None:
    data = P.encode(P.AUTH, token_id=P.token_id(TOKEN), mac=P.auth_mac(TOKEN, NONCE, FP))
    assert TOKEN.encode() not in data
    assert decode_one(data)["token_id"] == P.token_id(TOKEN)
