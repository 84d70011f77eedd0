"""The relay's control protocol: the typed messages byte for byte (natkit.relay.messages),
the decoder's chunking and refusals, the shared state machine of the control conversation
(natkit.relay.control) from both sides, and the token's HMAC proof."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from typing import Any

import pytest

from natkit.errors import NatkitError, ProtocolError
from natkit.relay import control
from natkit.relay import messages as M
from natkit.relay.access import AccessPolicy, Credential, RateLimit
from natkit.relay.control import LEGAL, ControlConnection, Phase, Side

INSTANCE = "inst0123456789abcdef"
RESUME = "resume0123456789abcdef0123456789"

# One valid message of every type.
SAMPLES: list[M.Message] = [
    M.Hello(version=M.VERSION, agent="natkit"),
    M.Challenge(nonce="00ff" * 8),
    M.Auth(token_id="a" * 32, mac="b" * 64, instance=INSTANCE, resume=RESUME),
    M.Welcome(
        session="0123456789abcdef", data_key="00" * 32, plaintext=False, cipher="aes-256-gcm"
    ),
    M.Error(code="auth", message="the relay does not accept this token"),
    M.Open(
        tunnel="t0", kind="tcp", name="", port=20000, exact=True, plaintext=False, takeover=False
    ),
    M.Opened(tunnel="t0", public="100.200.0.2:20000"),
    M.Close(tunnel="t0"),
    M.Tickets(tunnel="t0", tickets=("x" * 24, "y" * 24)),
    M.Dial(id=7, host="100.200.0.1", port=8080),
    M.Dialed(id=7, ok=False, error="TimeoutError"),
    M.Ping(t=1700000000.25),
    M.Pong(t=1700000000.25),
    M.Closed(tunnel="t0", code="taken-over", message="another agent took it over"),
    M.Notice(code="interference", message="a ticket was shown in clear"),
    M.Refused(tunnel="t0", visitor="100.200.0.2:40000", reason="denied", at=1.5e9, more=0),
    # An optional field in use (the sample above has it absent): a tunnel's access policy.
    M.Open(
        tunnel="t1",
        kind="http",
        name="app",
        port=0,
        exact=False,
        plaintext=False,
        takeover=False,
        access=AccessPolicy(
            allow=("100.200.0.0/24", "2001:db8::/32"),
            deny=("100.200.0.2/32",),
            credentials=(Credential("00" * 16, "ab" * 32),),
            rate=RateLimit(10, 1.0),
        ),
    ),
    M.Data(ticket="z" * 24),
    M.Start(tunnel="t0", visitor="100.200.0.3:40000"),
    M.P2PJoin(name="cam-1", role="listen", instance="0123456789abcdef"),
    M.P2PPeer(name="cam-1", present=True, ticket="w" * 24),
    M.P2PSignal(name="cam-1", data='{"candidate":"1 1 udp 1 100.200.0.1 4000"}'),
    M.P2PLeave(name="cam-1"),
    M.P2PJoined(),
    M.P2PError(name="cam-1", about="join", code="busy", message="room cam-1 is busy"),
]
BY_NAME = {type(m).__name__: m for m in reversed(SAMPLES)}  # the first of each type

TYPE_CODES = {
    "Hello": 1, "Challenge": 2, "Auth": 3, "Welcome": 4, "Error": 5, "Open": 6, "Opened": 7,
    "Close": 8, "Tickets": 9, "Dial": 10, "Dialed": 11, "Ping": 12, "Pong": 13, "Closed": 14,
    "Notice": 15, "Refused": 16, "Data": 20, "Start": 21, "P2PJoin": 30, "P2PPeer": 31, "P2PSignal": 32,
    "P2PLeave": 33, "P2PJoined": 34, "P2PError": 35,
}  # fmt: skip


def ids(msg: M.Message) -> str:
    return type(msg).__name__


def frame(msg_type: int, body: bytes) -> bytes:
    """A frame built by hand: 1 byte type, 3 bytes big-endian length, the body."""
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def raw(cls: type[M.Message], fields: Any) -> bytes:
    return frame(cls.TYPE, json.dumps(fields).encode())


def fields_of(msg: M.Message) -> dict[str, Any]:
    """The JSON fields of ``msg``: optional fields that are None are left out."""
    values = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}  # type: ignore[arg-type]
    return {
        name: list(v) if isinstance(v, tuple) else v.to_wire() if isinstance(v, AccessPolicy) else v
        for name, v in values.items()
        if not (v is None and name in type(msg).OPTIONAL)
    }


def kinds(cls: type[M.Message]) -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]


def decode_one(data: bytes) -> M.Message:
    messages = M.FrameDecoder().messages(data)
    assert len(messages) == 1, messages
    return messages[0]


# ---- the wire format --------------------------------------------------------------------


def test_every_type_has_a_sample_and_the_documented_code() -> None:
    assert {cls.__name__: t for t, cls in M.BY_TYPE.items()} == TYPE_CODES
    assert set(BY_NAME) == set(TYPE_CODES)
    for msg in SAMPLES:
        assert M.BY_TYPE[type(msg).TYPE] is type(msg)


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        (M.Hello(version=2, agent="natkit"), b'\x01\x00\x00\x1e{"version":2,"agent":"natkit"}'),
        (M.Close(tunnel="t0"), b'\x08\x00\x00\x0f{"tunnel":"t0"}'),
        (M.P2PJoined(), b"\x22\x00\x00\x02{}"),
        (
            M.Tickets(tunnel="t0", tickets=("ab", "cd")),
            b'\x09\x00\x00\x25{"tunnel":"t0","tickets":["ab","cd"]}',
        ),
        (
            M.Welcome(session="s1", data_key="00ff", plaintext=False, cipher="aes-256-gcm"),
            b'\x04\x00\x00\x4b{"session":"s1","data_key":"00ff","plaintext":false,'
            b'"cipher":"aes-256-gcm"}',
        ),
        (M.Ping(t=1.5), b'\x0c\x00\x00\x09{"t":1.5}'),
        (M.Dialed(id=7, ok=True, error=""), b'\x0b\x00\x00\x1d{"id":7,"ok":true,"error":""}'),
        (M.P2PLeave(name="r"), b'\x21\x00\x00\x0c{"name":"r"}'),
        (M.Data(ticket="abc"), b'\x14\x00\x00\x10{"ticket":"abc"}'),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, M.Message) else "",
)
def test_known_bytes(msg: M.Message, expected: bytes) -> None:
    assert M.encode(msg) == expected
    assert decode_one(expected) == msg
    assert M.decode_header(expected) == (type(msg).TYPE, len(expected) - 4)


@pytest.mark.parametrize("msg", SAMPLES, ids=ids)
def test_encode_is_type_length_compact_json_in_field_order(msg: M.Message) -> None:
    data = M.encode(msg)
    body = json.dumps(fields_of(msg), separators=(",", ":")).encode()
    assert data == frame(type(msg).TYPE, body)


@pytest.mark.parametrize("msg", SAMPLES, ids=ids)
def test_every_message_round_trips(msg: M.Message) -> None:
    again = decode_one(M.encode(msg))
    assert again == msg and type(again) is type(msg)
    msg_type, length = M.decode_header(M.encode(msg))
    assert M.decode_body(msg_type, M.encode(msg)[4 : 4 + length]) == msg


@pytest.mark.parametrize("msg", SAMPLES, ids=ids)
def test_any_json_spelling_of_the_same_fields_decodes(msg: M.Message) -> None:
    """Whitespace and key order are the sender's business (extra fields are not)."""
    fields = dict(reversed(list(fields_of(msg).items())))
    body = b"  " + json.dumps(fields, indent=2).encode() + b"\n"
    assert decode_one(frame(type(msg).TYPE, body)) == msg


def test_messages_are_frozen() -> None:
    msg = M.Close(tunnel="t0")
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.tunnel = "t1"  # type: ignore[misc]


def test_float_fields_take_ints_but_int_fields_take_no_floats() -> None:
    assert decode_one(raw(M.Ping, {"t": 5})) == M.Ping(t=5)
    with pytest.raises(ProtocolError, match="'id'"):
        decode_one(raw(M.Dial, {"id": 1.0, "host": "h", "port": 1}))
    with pytest.raises(ProtocolError, match="'port'"):
        decode_one(raw(M.Open, {**fields_of(BY_NAME["Open"]), "port": 80.5}))


# ---- chunking ---------------------------------------------------------------------------

STREAM = b"".join(M.encode(m) for m in SAMPLES)


def test_byte_by_byte_feeding_yields_every_message_once() -> None:
    decoder = M.FrameDecoder()
    got: list[M.Message] = []
    for i in range(len(STREAM)):
        got += decoder.messages(STREAM[i : i + 1])
    assert got == SAMPLES
    assert decoder.buffered == b"" and decoder.pending == 0


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 64, 1000, 1 << 20])
def test_any_chunk_size(size: int) -> None:
    stream = STREAM * 3
    decoder = M.FrameDecoder()
    got: list[M.Message] = []
    for i in range(0, len(stream), size):
        got += decoder.messages(stream[i : i + size])
    assert got == SAMPLES * 3


def test_every_split_point_of_two_frames() -> None:
    data = M.encode(BY_NAME["Tickets"]) + M.encode(BY_NAME["Start"])
    for cut in range(len(data) + 1):
        decoder = M.FrameDecoder()
        got = decoder.messages(data[:cut]) + decoder.messages(data[cut:])
        assert got == [BY_NAME["Tickets"], BY_NAME["Start"]], cut


def test_partial_frames_wait_and_buffered_holds_the_rest() -> None:
    data = M.encode(M.Data(ticket="abc"))
    decoder = M.FrameDecoder()
    assert decoder.messages(data[:2]) == []  # not even a header
    assert decoder.messages(data[2:4]) == []  # a header, no body
    assert decoder.messages(data[4:-1]) == []  # all but the last byte
    assert decoder.buffered == data[:-1] and decoder.pending == len(data) - 1
    assert decoder.messages(data[-1:]) == [M.Data(ticket="abc")]
    assert decoder.buffered == b""


def test_several_frames_in_one_feed_and_the_bytes_after_them() -> None:
    start = M.encode(BY_NAME["Start"])
    tail = M.encode(M.Ping(t=1))[:6]
    decoder = M.FrameDecoder()
    assert decoder.messages(start + start + tail) == [BY_NAME["Start"]] * 2
    assert decoder.buffered == tail
    assert decoder.next() is None


def test_empty_feed() -> None:
    decoder = M.FrameDecoder()
    assert decoder.messages(b"") == [] and decoder.next() is None
    assert decoder.buffered == b""


# ---- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("msg_type", [0, 17, 19, 22, 29, 36, 99, 0x16, 0x47, 255])
def test_unknown_type_is_refused_from_the_header_alone(msg_type: int) -> None:
    assert msg_type not in M.BY_TYPE
    with pytest.raises(ProtocolError, match="unknown relay message type"):
        M.FrameDecoder().messages(bytes([msg_type, 0, 0, 2]))  # no body needed to refuse it
    with pytest.raises(ProtocolError, match="unknown relay message type"):
        M.decode_header(bytes([msg_type, 0, 0, 0]))


def test_oversize_frame_is_refused_from_the_header_alone() -> None:
    for length in (M.MAX_FRAME + 1, 0xFFFFFF):
        with pytest.raises(ProtocolError, match="exceeds"):
            M.FrameDecoder().messages(bytes([M.Ping.TYPE]) + length.to_bytes(3, "big"))


def test_a_frame_of_exactly_max_frame_bytes_is_fine() -> None:
    head = b'{"t":1'
    body = head + b" " * (M.MAX_FRAME - len(head) - 1) + b"}"
    assert len(body) == M.MAX_FRAME
    assert decode_one(frame(M.Ping.TYPE, body)) == M.Ping(t=1)


def test_encode_refuses_to_build_an_oversize_frame() -> None:
    tickets = tuple(f"{i:064d}" for i in range(M.MAX_TICKETS))
    assert len(M.encode(M.Tickets(tunnel="t", tickets=tickets))) < M.MAX_FRAME  # the most
    signal = M.P2PSignal(name="\U0001f3a5" * M.MAX_ROOM_NAME, data="\\" * (M.MAX_SIGNAL // 2))
    assert len(M.encode(signal)) < M.MAX_FRAME  # the widest signal still fits once escaped


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
        decode_one(frame(M.Data.TYPE, body))


@pytest.mark.parametrize("body", [b"[]", b'"text"', b"42", b"null", b"true", b'[{"ticket":"a"}]'])
def test_json_that_is_not_an_object_is_refused(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="not a JSON object"):
        decode_one(frame(M.Data.TYPE, body))


@pytest.mark.parametrize("msg", SAMPLES, ids=ids)
def test_each_missing_field_is_refused(msg: M.Message) -> None:
    for key in set(kinds(type(msg))) - type(msg).OPTIONAL:
        fields = {k: v for k, v in fields_of(msg).items() if k != key}
        # (with an optional field present, the count still fits: the missing one is named)
        with pytest.raises(ProtocolError, match=f"fields must be exactly|{key!r} missing"):
            decode_one(raw(type(msg), fields))


@pytest.mark.parametrize("msg", SAMPLES, ids=ids)
def test_an_extra_field_is_refused(msg: M.Message) -> None:
    with pytest.raises(ProtocolError, match="fields must be exactly"):
        decode_one(raw(type(msg), {**fields_of(msg), "extra": 1}))
    # The same number of fields, one of them renamed.
    for key in fields_of(msg):
        fields = {("other" if k == key else k): v for k, v in fields_of(msg).items()}
        optional = key in type(msg).OPTIONAL  # absent is fine: "other" is what is wrong
        with pytest.raises(
            ProtocolError, match="fields must be exactly" if optional else repr(key)
        ):
            decode_one(raw(type(msg), fields))


WRONG: dict[str, list[Any]] = {
    "str": [1, 1.5, None, True, [], {}],
    "int": ["1", 1.5, None, True, False, [], {}],
    "float": ["1", None, True, False, [], {}],
    "bool": [0, 1, "true", None, [], {}],
    "tuple[str, ...]": ["a", 1, None, {}, True, [1], [None], [["a"]]],
    "AccessPolicy | None": ["a", 1, None, True, [], [{}]],
}


@pytest.mark.parametrize("msg", SAMPLES, ids=ids)
def test_each_mistyped_field_is_refused(msg: M.Message) -> None:
    for key, kind in kinds(type(msg)).items():
        for bad in WRONG[kind]:
            fields = {**fields_of(msg), key: bad}
            with pytest.raises(ProtocolError, match=repr(key)):
                decode_one(raw(type(msg), fields))


@pytest.mark.parametrize(
    ("cls", "key"),
    [(M.Hello, "version"), (M.Open, "port"), (M.Dial, "id"), (M.Dial, "port"), (M.Ping, "t")],
)
def test_bool_is_not_a_number(cls: type[M.Message], key: str) -> None:
    for value in (True, False):
        body = json.dumps({**fields_of(BY_NAME[cls.__name__]), key: value}).encode()
        assert b"true" in body or b"false" in body
        with pytest.raises(ProtocolError, match=repr(key)):
            decode_one(frame(cls.TYPE, body))


def test_encode_checks_our_own_messages_too() -> None:
    bad: list[M.Message] = [
        M.Hello(version=True, agent="x"),
        M.Hello(version="2", agent="x"),  # type: ignore[arg-type]
        M.Error(code="x", message="m" * (M.MAX_STRING + 1)),
        M.Open(tunnel="t", kind="udp", name="", port=0, exact=False, plaintext=False,
               takeover=False),
        M.Data(ticket=""),
        M.P2PJoin(name="", role="listen", instance="i"),
        M.Tickets(tunnel="t", tickets=("a" * 65,)),
        M.Dial(id=-1, host="h", port=1),
    ]  # fmt: skip
    for msg in bad:
        with pytest.raises(ProtocolError):
            M.encode(msg)


def test_string_length_limit() -> None:
    ok = {"code": "x", "message": "m" * M.MAX_STRING}
    assert decode_one(raw(M.Error, ok)) == M.Error(**ok)
    with pytest.raises(ProtocolError, match="too long"):
        decode_one(raw(M.Error, {**ok, "message": "m" * (M.MAX_STRING + 1)}))
    # Non-ASCII characters count as characters, not bytes.
    assert decode_one(raw(M.Error, {"code": "x", "message": "é" * M.MAX_STRING}))


@pytest.mark.parametrize("value", [-1, -(2**63), 2**32 + 1, 2**64, 10**100])
def test_integer_range(value: int) -> None:
    with pytest.raises(ProtocolError, match="out of range"):
        decode_one(raw(M.Dial, {"id": value, "host": "h", "port": 1}))


def test_integer_bounds_accepted() -> None:
    for value in (0, 65535, 2**31):
        assert decode_one(raw(M.Dial, {"id": value, "host": "h", "port": 1})).id == value  # type: ignore[attr-defined]


def test_open_port_at_most_65535() -> None:
    fields = fields_of(BY_NAME["Open"])
    assert decode_one(raw(M.Open, {**fields, "port": 65535})).port == 65535  # type: ignore[attr-defined]
    with pytest.raises(ProtocolError, match="port out of range"):
        decode_one(raw(M.Open, {**fields, "port": 65536}))


def test_dial_host_is_bounded() -> None:
    ok = {"id": 1, "host": "h" * M.MAX_DIAL_HOST, "port": 1}
    assert decode_one(raw(M.Dial, ok))
    with pytest.raises(ProtocolError, match="host longer"):
        decode_one(raw(M.Dial, {**ok, "host": "h" * (M.MAX_DIAL_HOST + 1)}))


def test_tickets_list_is_checked() -> None:
    good = {"tunnel": "t0", "tickets": ["a" * M.MAX_TICKET] * M.MAX_TICKETS}
    assert len(decode_one(raw(M.Tickets, good)).tickets) == M.MAX_TICKETS  # type: ignore[attr-defined]
    assert decode_one(raw(M.Tickets, {"tunnel": "t0", "tickets": []})) == M.Tickets(
        tunnel="t0", tickets=()
    )
    for bad in (["a"] * (M.MAX_TICKETS + 1), ["a" * (M.MAX_TICKET + 1)], [""], ["é"]):
        with pytest.raises(ProtocolError, match="bad ticket list"):
            decode_one(raw(M.Tickets, {"tunnel": "t0", "tickets": bad}))
    for bad_type in ([1], [None], [["a"]], [{"a": 1}]):
        with pytest.raises(ProtocolError, match="'tickets'"):
            decode_one(raw(M.Tickets, {"tunnel": "t0", "tickets": bad_type}))


def test_data_ticket_is_1_to_64_characters() -> None:
    assert decode_one(raw(M.Data, {"ticket": "t" * M.MAX_TICKET}))
    for bad in ("", "t" * (M.MAX_TICKET + 1)):
        with pytest.raises(ProtocolError, match="bad ticket"):
            decode_one(raw(M.Data, {"ticket": bad}))


@pytest.mark.parametrize("kind", ["tcp", "http", "tls"])
def test_open_kinds(kind: str) -> None:
    assert decode_one(raw(M.Open, {**fields_of(BY_NAME["Open"]), "kind": kind})).kind == kind  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["", "udp", "TCP", "https", "tcp "])
def test_open_refuses_other_kinds(kind: str) -> None:
    with pytest.raises(ProtocolError, match="kind must be one of tcp, http, tls"):
        decode_one(raw(M.Open, {**fields_of(BY_NAME["Open"]), "kind": kind}))


@pytest.mark.parametrize(
    "value",
    ["", "short", "x" * 15, "x" * 65, "has-dash-0123456789", "with space 012345", "é" * 16,
     "０" * 16],
)  # fmt: skip
@pytest.mark.parametrize("key", ["instance", "resume"])
def test_auth_identity_is_16_to_64_ascii_letters_or_digits(key: str, value: str) -> None:
    fields = fields_of(BY_NAME["Auth"])
    for good in ("a" * 16, "Z9" * 32):
        assert decode_one(raw(M.Auth, {**fields, key: good}))
    with pytest.raises(ProtocolError, match=f"{key} must be 16 to 64 letters or digits"):
        decode_one(raw(M.Auth, {**fields, key: value}))


@pytest.mark.parametrize("role", ["", "LISTEN", "server", "listen ", "client"])
def test_join_refuses_other_roles(role: str) -> None:
    with pytest.raises(ProtocolError, match="role must be one of listen, connect"):
        decode_one(raw(M.P2PJoin, {"name": "r", "role": role, "instance": "i"}))


@pytest.mark.parametrize("about", ["", "JOIN", "leave", "signals"])
def test_p2p_error_about_is_join_or_signal(about: str) -> None:
    fields = {"name": "r", "about": about, "code": "busy", "message": "m"}
    with pytest.raises(ProtocolError, match="about must be join or signal"):
        decode_one(raw(M.P2PError, fields))
    assert decode_one(raw(M.P2PError, {**fields, "about": "signal"}))


@pytest.mark.parametrize(
    ("name", "why"),
    [("", "empty"), ("x" * (M.MAX_ROOM_NAME + 1), "longer than 128"), ("a\nb", "unprintable")],
)
def test_room_names_are_1_to_128_printable_characters(name: str, why: str) -> None:
    assert M.room_name_problem("x" * M.MAX_ROOM_NAME) == ""
    assert M.room_name_problem("камера 1 🎥") == ""
    assert why in M.room_name_problem(name)
    rest: dict[type[M.Message], dict[str, Any]] = {
        M.P2PJoin: {"role": "listen", "instance": ""},
        M.P2PPeer: {"present": False, "ticket": ""},
        M.P2PSignal: {"data": ""},
        M.P2PLeave: {},
        M.P2PError: {"about": "join", "code": "c", "message": "m"},
    }
    for cls, fields in rest.items():
        with pytest.raises(ProtocolError, match=why):
            decode_one(raw(cls, {"name": name, **fields}))


def test_signal_size_is_counted_json_escaped() -> None:
    ascii_max = "a" * M.MAX_SIGNAL
    assert decode_one(M.encode(M.P2PSignal(name="r", data=ascii_max))).data == ascii_max  # type: ignore[attr-defined]
    assert M.MAX_SIGNAL > M.MAX_STRING  # the one field allowed past MAX_STRING
    for too_big in ("a" * (M.MAX_SIGNAL + 1), "é" * (M.MAX_SIGNAL // 6 + 1), "\x01" * 3000):
        with pytest.raises(ProtocolError, match="data over 16384 bytes"):
            M.encode(M.P2PSignal(name="r", data=too_big))
        with pytest.raises(ProtocolError, match="data over 16384 bytes"):
            decode_one(raw(M.P2PSignal, {"name": "r", "data": too_big}))
    assert (M.signal_size("é"), M.signal_size('"'), M.signal_size("a")) == (6, 2, 1)
    # Other fields keep MAX_STRING, even in P2P messages.
    with pytest.raises(ProtocolError, match="too long"):
        M.encode(M.P2PJoin(name="r", role="listen", instance="i" * (M.MAX_STRING + 1)))
    with pytest.raises(ProtocolError, match="ticket too long"):
        M.encode(M.P2PPeer(name="r", present=True, ticket="t" * (M.MAX_TICKET + 1)))


def test_a_bad_frame_after_a_good_one_raises() -> None:
    """The peer is dropped: the decoder does not hand out half a batch silently."""
    good = M.encode(M.Ping(t=1))
    with pytest.raises(ProtocolError):
        M.FrameDecoder().messages(good + frame(M.Ping.TYPE, b"[]"))
    decoder = M.FrameDecoder()
    decoder.feed(good + frame(M.Ping.TYPE, b"[]"))
    assert decoder.next() == M.Ping(t=1)  # one at a time, the good one comes first
    with pytest.raises(ProtocolError):
        decoder.next()


def test_protocol_error_is_a_natkit_error() -> None:
    assert issubclass(ProtocolError, NatkitError)


# ---- the state machine ----------------------------------------------------------------------

NONCE = "6e6f6e63652d6f6e65"
HELLO = M.Hello(version=M.VERSION, agent="test")
CHALLENGE = M.Challenge(nonce=NONCE)
AUTH = BY_NAME["Auth"]
WELCOME = BY_NAME["Welcome"]
HANDSHAKE: list[tuple[Side, M.Message, Phase]] = [
    (Side.AGENT, HELLO, Phase.CHALLENGE),
    (Side.RELAY, CHALLENGE, Phase.AUTH),
    (Side.AGENT, AUTH, Phase.WELCOME),
    (Side.RELAY, WELCOME, Phase.READY),
]
CONTROL_TYPES = [type(m) for m in SAMPLES]


def pair() -> dict[Side, ControlConnection]:
    return {Side.AGENT: ControlConnection(Side.AGENT), Side.RELAY: ControlConnection(Side.RELAY)}


def deliver(conns: dict[Side, ControlConnection], sender: Side, msg: M.Message) -> M.Message:
    """``sender`` sends ``msg``, the other side reads it."""
    data = conns[sender].send(msg)
    assert data == M.encode(msg)
    receiver = conns[Side.RELAY if sender is Side.AGENT else Side.AGENT]
    receiver.receive_data(data)
    got = receiver.next_event()
    assert receiver.next_event() is None
    assert got is not None
    return got


def ready() -> dict[Side, ControlConnection]:
    conns = pair()
    for sender, msg, _ in HANDSHAKE:
        deliver(conns, sender, msg)
    return conns


def at(phase: Phase) -> dict[Side, ControlConnection]:
    """A pair of connections both at ``phase`` of the handshake."""
    conns = pair()
    for sender, msg, after in HANDSHAKE:
        if conns[Side.AGENT].phase is phase:
            break
        deliver(conns, sender, msg)
        assert conns[Side.AGENT].phase is conns[Side.RELAY].phase is after
    assert conns[Side.AGENT].phase is phase
    return conns


def test_the_handshake_from_both_sides() -> None:
    conns = pair()
    assert conns[Side.AGENT].phase is conns[Side.RELAY].phase is Phase.HELLO
    assert conns[Side.AGENT].peer is Side.RELAY and conns[Side.RELAY].peer is Side.AGENT
    for sender, msg, after in HANDSHAKE:
        assert deliver(conns, sender, msg) == msg
        assert conns[Side.AGENT].phase is after and conns[Side.RELAY].phase is after
    assert conns[Side.AGENT].phase is Phase.READY


def test_the_whole_handshake_in_one_chunk_and_byte_by_byte() -> None:
    agent_bytes = M.encode(HELLO) + M.encode(AUTH)
    relay = ControlConnection(Side.RELAY)
    relay.receive_data(agent_bytes)
    assert relay.next_event() == HELLO
    # The agent's Auth is already buffered, but not its turn until the relay challenged.
    relay.send(CHALLENGE)
    assert relay.next_event() == AUTH
    relay.send(WELCOME)
    assert relay.phase is Phase.READY and relay.next_event() is None

    agent = ControlConnection(Side.AGENT)
    agent.send(HELLO)
    got: list[M.Message] = []
    for byte in [bytes([b]) for b in M.encode(CHALLENGE)]:
        agent.receive_data(byte)
        while (msg := agent.next_event()) is not None:
            got.append(msg)
    assert got == [CHALLENGE] and agent.phase is Phase.AUTH


def test_an_auth_read_before_the_challenge_is_sent_is_out_of_turn() -> None:
    """A relay must answer Hello before it reads on: an agent that runs ahead is refused."""
    relay = ControlConnection(Side.RELAY)
    relay.receive_data(M.encode(HELLO) + M.encode(AUTH))
    assert relay.next_event() == HELLO
    with pytest.raises(ProtocolError, match="agent may not send Auth while waiting for the relay"):
        relay.next_event()
    assert relay.phase is Phase.CLOSED


HANDSHAKE_PHASES = [Phase.HELLO, Phase.CHALLENGE, Phase.AUTH, Phase.WELCOME]


@pytest.mark.parametrize("phase", HANDSHAKE_PHASES, ids=lambda p: p.name)
@pytest.mark.parametrize("side", list(Side), ids=lambda s: s.name)
def test_out_of_turn_messages_during_the_handshake(phase: Phase, side: Side) -> None:
    """Whatever ``side`` may not send now: refused when it tries (nothing changes), and a
    ProtocolError that closes the conversation when the other side reads it."""
    allowed = LEGAL.get((phase, side), frozenset())
    refused = [m for m in SAMPLES if type(m) not in allowed]
    assert len(refused) >= len(SAMPLES) - 2
    for msg in refused:
        conns = at(phase)
        with pytest.raises(ProtocolError, match=f"{side.value} may not send {type(msg).__name__}"):
            conns[side].send(msg)
        assert conns[side].phase is phase  # a refused send changes nothing
        peer = conns[Side.RELAY if side is Side.AGENT else Side.AGENT]
        peer.receive_data(M.encode(msg))
        with pytest.raises(ProtocolError, match=f"{side.value} may not send"):
            peer.next_event()
        assert peer.phase is Phase.CLOSED
        assert peer.next_event() is None  # closed: nothing more comes out


def test_legal_handshake_table() -> None:
    assert LEGAL[(Phase.HELLO, Side.AGENT)] == {M.Hello}
    assert LEGAL[(Phase.CHALLENGE, Side.RELAY)] == {M.Challenge, M.Error}
    assert LEGAL[(Phase.AUTH, Side.AGENT)] == {M.Auth}
    assert LEGAL[(Phase.WELCOME, Side.RELAY)] == {M.Welcome, M.Error}
    for phase in HANDSHAKE_PHASES:  # one side speaks at a time
        assert ((phase, Side.AGENT) in LEGAL) != ((phase, Side.RELAY) in LEGAL)
    for side in Side:
        assert (Phase.CLOSED, side) not in LEGAL


@pytest.mark.parametrize("phase", [Phase.CHALLENGE, Phase.WELCOME], ids=lambda p: p.name)
def test_an_error_during_the_handshake_closes_both_sides(phase: Phase) -> None:
    conns = at(phase)
    error = M.Error(code="auth", message="no")
    assert deliver(conns, Side.RELAY, error) == error  # the agent gets to read why
    for side in Side:
        conn = conns[side]
        assert conn.phase is Phase.CLOSED
        conn.receive_data(M.encode(M.Ping(t=1)))  # ignored once closed
        assert conn.next_event() is None
        with pytest.raises(ProtocolError, match="while closed"):
            conn.send(M.Ping(t=1))


AGENT_READY = {
    M.Open, M.Close, M.Dial, M.Ping, M.Pong, M.P2PJoin, M.P2PSignal, M.P2PLeave,
}  # fmt: skip
RELAY_READY = {
    M.Opened, M.Closed, M.Tickets, M.Dialed, M.Notice, M.Refused, M.Error, M.Ping, M.Pong,
    M.P2PPeer, M.P2PSignal, M.P2PLeave, M.P2PError,
}  # fmt: skip


def test_legal_after_ready_is_the_documented_set() -> None:
    assert LEGAL[(Phase.READY, Side.AGENT)] == AGENT_READY
    assert LEGAL[(Phase.READY, Side.RELAY)] == RELAY_READY
    never = {M.Hello, M.Challenge, M.Auth, M.Welcome, M.Data, M.Start, M.P2PJoined}
    assert not never & (AGENT_READY | RELAY_READY)  # handshake and data-connection only


@pytest.mark.parametrize("msg", SAMPLES, ids=ids)
@pytest.mark.parametrize("side", list(Side), ids=lambda s: s.name)
def test_after_ready_each_side_sends_what_legal_allows(side: Side, msg: M.Message) -> None:
    conns = ready()
    peer = conns[Side.RELAY if side is Side.AGENT else Side.AGENT]
    allowed = type(msg) in (AGENT_READY if side is Side.AGENT else RELAY_READY)
    if allowed:
        assert deliver(conns, side, msg) == msg
        assert conns[side].phase is peer.phase is Phase.READY  # Error included: no close
        assert deliver(conns, side, msg) == msg  # and again
    else:
        with pytest.raises(ProtocolError, match="while established"):
            conns[side].send(msg)
        assert conns[side].phase is Phase.READY
        peer.receive_data(M.encode(msg))
        with pytest.raises(ProtocolError, match=f"{side.value} may not send"):
            peer.next_event()
        assert peer.phase is Phase.CLOSED


def test_a_malformed_frame_closes_the_conversation() -> None:
    conns = ready()
    relay = conns[Side.RELAY]
    relay.receive_data(M.encode(M.Ping(t=1)) + frame(M.Ping.TYPE, b"{}"))
    assert relay.next_event() == M.Ping(t=1)
    with pytest.raises(ProtocolError, match="fields must be exactly"):
        relay.next_event()
    assert relay.phase is Phase.CLOSED and relay.next_event() is None


def test_close_ends_the_conversation() -> None:
    conns = ready()
    conns[Side.AGENT].close()
    assert conns[Side.AGENT].phase is Phase.CLOSED
    with pytest.raises(ProtocolError):
        conns[Side.AGENT].send(M.Ping(t=1))
    conns[Side.AGENT].receive_data(M.encode(M.Pong(t=1)))
    assert conns[Side.AGENT].next_event() is None


def test_too_much_unread_data_is_refused() -> None:
    relay = ready()[Side.RELAY]
    ping = M.encode(M.Ping(t=1))
    relay.receive_data(ping * (control.MAX_PENDING // len(ping)))  # at the bound: fine
    with pytest.raises(ProtocolError, match="too much data"):
        relay.receive_data(ping)
    assert relay.phase is Phase.CLOSED


# ---- authentication ---------------------------------------------------------------------

TOKEN = "correct-horse-battery-staple"
FP = "sha256:" + "ab" * 32


def test_token_id_is_a_stable_public_handle() -> None:
    tid = control.token_id(TOKEN)
    assert tid == control.token_id(TOKEN)
    assert len(tid) == 32 and int(tid, 16) >= 0
    assert tid != control.token_id(TOKEN + "x")
    expected = hashlib.sha256(b"natkit-token-id\x00" + TOKEN.encode()).hexdigest()[:32]
    assert tid == expected
    assert tid != hashlib.sha256(TOKEN.encode()).hexdigest()[:32]  # domain-separated


def test_auth_mac_is_hmac_over_version_nonce_fingerprint_and_identity() -> None:
    mac = control.auth_mac(TOKEN, NONCE, FP, INSTANCE, RESUME)
    msg = f"natkit-auth-v{M.VERSION}\x00{NONCE}\x00{FP}\x00{INSTANCE}\x00{RESUME}".encode()
    assert mac == hmac.new(TOKEN.encode(), msg, hashlib.sha256).hexdigest()
    assert len(mac) == 64 and TOKEN not in mac
    assert control.check_mac(TOKEN, NONCE, FP, INSTANCE, RESUME, mac) is True


@pytest.mark.parametrize(
    "changed",
    [
        {"token": TOKEN + "!"},
        {"nonce": NONCE + "0"},  # replayed against a fresh nonce
        {"fp": "sha256:" + "cd" * 32},  # a man in the middle
        {"instance": "another0123456789abc"},  # claiming another agent process
        {"resume": "another0123456789abcdef012345678"},
    ],
    ids=lambda d: next(iter(d)),
)
def test_a_mac_binds_every_input(changed: dict[str, str]) -> None:
    args = {"token": TOKEN, "nonce": NONCE, "fp": FP, "instance": INSTANCE, "resume": RESUME}
    other = {**args, **changed}

    def mac_of(a: dict[str, str]) -> str:
        return control.auth_mac(a["token"], a["nonce"], a["fp"], a["instance"], a["resume"])

    def check(a: dict[str, str], mac: str) -> bool:
        return control.check_mac(a["token"], a["nonce"], a["fp"], a["instance"], a["resume"], mac)

    mac = mac_of(args)
    assert check(args, mac) is True
    assert check(other, mac) is False
    assert mac_of(other) != mac
    assert check(other, mac_of(other)) is True


def test_a_mac_for_anything_else_fails() -> None:
    mac = control.auth_mac(TOKEN, NONCE, FP, INSTANCE, RESUME)
    for other in (mac.upper(), mac[:-1], mac + "0", "", "0" * 64):
        assert control.check_mac(TOKEN, NONCE, FP, INSTANCE, RESUME, other) is False
    swapped = control.auth_mac(TOKEN, FP, NONCE, INSTANCE, RESUME)
    assert control.check_mac(TOKEN, NONCE, FP, INSTANCE, RESUME, swapped) is False
    swapped = control.auth_mac(TOKEN, NONCE, FP, RESUME, INSTANCE)
    assert control.check_mac(TOKEN, NONCE, FP, INSTANCE, RESUME, swapped) is False
    # The separators matter: moving a character across the boundary changes the MAC.
    moved = control.auth_mac(TOKEN, NONCE + "a", "b" + FP, INSTANCE, RESUME)
    assert moved != control.auth_mac(TOKEN, NONCE + "ab", FP, INSTANCE, RESUME)


@pytest.mark.parametrize("mac", ["é" * 64, "\u00e9", "\ud800", "ａ" * 64, "\x00" * 64])
def test_check_mac_with_non_ascii_from_the_wire_is_false_not_an_exception(mac: str) -> None:
    """hmac.compare_digest raises TypeError for non-ASCII str: a MAC off the wire must not."""
    assert control.check_mac(TOKEN, NONCE, FP, INSTANCE, RESUME, mac) is False


def test_check_mac_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the module control uses
    mac = control.auth_mac(TOKEN, NONCE, FP, INSTANCE, RESUME)
    assert control.check_mac(TOKEN, NONCE, FP, INSTANCE, RESUME, mac)
    assert not control.check_mac(TOKEN, NONCE, FP, INSTANCE, RESUME, "0" * 64)
    assert len(calls) == 2


def test_the_auth_message_carries_no_token_and_no_resume_digest() -> None:
    mac = control.auth_mac(TOKEN, NONCE, FP, INSTANCE, RESUME)
    auth = M.Auth(token_id=control.token_id(TOKEN), mac=mac, instance=INSTANCE, resume=RESUME)
    data = M.encode(auth)
    assert TOKEN.encode() not in data
    assert decode_one(data) == auth


def test_resume_digest_is_deterministic_and_hides_the_secret() -> None:
    digest = control.resume_digest(RESUME)
    assert digest == control.resume_digest(RESUME)
    assert digest == hashlib.sha256(b"natkit-resume\x00" + RESUME.encode()).hexdigest()
    assert digest != control.resume_digest(RESUME + "x") and RESUME not in digest


def test_ticket_handle_is_deterministic_and_not_the_ticket() -> None:
    ticket = "x2v1q3F9k0M7e8r5t6y7u8i9o0p1"
    handle = control.ticket_handle(ticket)
    assert handle == control.ticket_handle(ticket)
    assert handle != ticket and ticket not in handle
    assert len(handle) == 32 and int(handle, 16) >= 0
    assert handle == hashlib.sha256(b"natkit-ticket\x00" + ticket.encode()).hexdigest()[:32]
    assert handle != control.ticket_handle(ticket + "x")
    assert handle != control.token_id(ticket)  # domain-separated from token ids
    assert len({control.ticket_handle(f"t{i}") for i in range(1000)}) == 1000


def test_numbers_that_are_not_finite_are_not_json() -> None:
    from natkit.errors import ProtocolError
    from natkit.relay import messages

    with pytest.raises(ProtocolError, match="finite"):
        messages.encode(messages.Ping(t=float("inf")))
    body = b'{"t":NaN}'
    with pytest.raises(ProtocolError):
        messages.decode_body(messages.Ping.TYPE, body)
