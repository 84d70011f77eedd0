"""Fuzz the relay's control protocol (natkit.relay.messages, natkit.relay.control): whatever
arrives, in whatever chunks and at whatever point of the conversation, only ProtocolError
escapes and the machine never loops; generated messages survive the round trip; random
legal conversations are accepted by both sides; and the chunking of a conversation never
changes what comes out of it."""

from __future__ import annotations

import dataclasses
import itertools
import json
import string
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natkit.errors import ProtocolError
from natkit.relay import messages as M
from natkit.relay.control import LEGAL, ControlConnection, Phase, Side
from tests.unit.access_samples import policies

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- strategies -----------------------------------------------------------------------------

ALNUM = string.ascii_letters + string.digits
SHORT_TEXT = st.text(max_size=40) | st.sampled_from(["", "t0", "app", "app.lab.test", "127.0.0.1"])
TICKET = st.text(alphabet=ALNUM + "-_", min_size=1, max_size=M.MAX_TICKET)
ROOM_NAME = st.text(min_size=1, max_size=M.MAX_ROOM_NAME).filter(str.isprintable)
IDENTITY = st.text(alphabet=ALNUM, min_size=16, max_size=64)
BY_KIND: dict[str, st.SearchStrategy[Any]] = {
    "str": SHORT_TEXT | st.text(max_size=M.MAX_STRING),
    "int": st.integers(0, 2**32),
    "float": st.floats(allow_nan=False, allow_infinity=False) | st.integers(0, 2**32),
    "bool": st.booleans(),
    "tuple[str, ...]": st.lists(TICKET, max_size=M.MAX_TICKETS).map(tuple),
    "AccessPolicy | None": st.none() | policies(),
}
# Fields whose message has rules beyond their JSON type.
SPECIAL: dict[tuple[type[M.Message], str], st.SearchStrategy[Any]] = {
    (M.Auth, "instance"): IDENTITY,
    (M.Auth, "resume"): IDENTITY,
    (M.Open, "kind"): st.sampled_from(M.KINDS),
    (M.Open, "port"): st.integers(0, 65535),
    (M.Dial, "host"): st.text(max_size=M.MAX_DIAL_HOST),
    (M.Data, "ticket"): TICKET,
    (M.P2PJoin, "role"): st.sampled_from(M.ROLES),
    (M.P2PPeer, "ticket"): st.just("") | TICKET,
    (M.P2PSignal, "data"): st.text(max_size=200) | st.text(alphabet="a\\", max_size=8192),
    (M.P2PError, "about"): st.sampled_from(["join", "signal"]),
    (M.Refused, "reason"): st.text(min_size=1, max_size=32),
    (M.Refused, "visitor"): st.text(max_size=M.MAX_DIAL_HOST + 8),
}
ROOM_TYPES = (M.P2PJoin, M.P2PPeer, M.P2PSignal, M.P2PLeave, M.P2PError)


def field_kinds(cls: type[M.Message]) -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]


def message_of(cls: type[M.Message]) -> st.SearchStrategy[M.Message]:
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for name, kind in field_kinds(cls).items():
        if (cls, name) in SPECIAL:
            fields[name] = SPECIAL[(cls, name)]
        elif name == "name" and cls in ROOM_TYPES:
            fields[name] = ROOM_NAME
        else:
            fields[name] = BY_KIND[kind]
    made = st.fixed_dictionaries(fields).map(lambda f: cls(**f))
    if cls is M.Open:  # basic auth only on http tunnels (Open.check)
        made = made.filter(
            lambda m: m.access is None or not m.access.credentials or m.kind == "http"
        )
    return made


ALL_TYPES = sorted(M.BY_TYPE.values(), key=lambda c: c.TYPE)


def messages_from(types: frozenset[type[M.Message]] | list[type[M.Message]]) -> Any:
    return st.one_of([message_of(c) for c in sorted(types, key=lambda c: c.TYPE)])


ANY_MESSAGE = messages_from(ALL_TYPES)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def other(side: Side) -> Side:
    return Side.RELAY if side is Side.AGENT else Side.AGENT


# ---- a pair of connections driven to a phase ------------------------------------------------

INSTANCE, RESUME = "i" * 16, "r" * 16
HANDSHAKE: list[tuple[Side, M.Message]] = [
    (Side.AGENT, M.Hello(version=M.VERSION, agent="fuzz")),
    (Side.RELAY, M.Challenge(nonce="n" * 32)),
    (Side.AGENT, M.Auth(token_id="a" * 32, mac="b" * 64, instance=INSTANCE, resume=RESUME)),
    (
        Side.RELAY,
        M.Welcome(session="s", data_key="00" * 32, plaintext=False, cipher="chacha20-poly1305"),
    ),
]


def at_step(steps: int) -> dict[Side, ControlConnection]:
    """Both sides after the first ``steps`` messages of the handshake (4: READY)."""
    conns = {side: ControlConnection(side) for side in Side}
    for sender, msg in HANDSHAKE[:steps]:
        conns[other(sender)].receive_data(conns[sender].send(msg))
        assert conns[other(sender)].next_event() == msg
    return conns


def drain(conn: ControlConnection, out: list[M.Message], limit: int) -> None:
    """Take every message the connection gives into ``out``, at most ``limit`` (more
    would be a loop); only ProtocolError may escape, and then the conversation is closed."""
    try:
        while (msg := conn.next_event()) is not None:
            out.append(msg)
            assert len(out) <= limit, "next_event keeps giving messages"
    except ProtocolError:
        assert conn.phase is Phase.CLOSED
        assert conn.next_event() is None
        raise


def feed(conn: ControlConnection, chunks: list[bytes]) -> tuple[list[M.Message], bool]:
    """(messages, whether it ended in a ProtocolError)."""
    got: list[M.Message] = []
    limit = sum(len(c) for c in chunks) // M.HEADER.size + 1
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            drain(conn, got, limit)
    except ProtocolError:
        return got, True
    return got, False


OWN_TURN = {Side.AGENT: {Phase.HELLO, Phase.AUTH}, Side.RELAY: {Phase.CHALLENGE, Phase.WELCOME}}
PEER_MAY_SEND = {
    side: frozenset().union(*(v for (_, who), v in LEGAL.items() if who is other(side)))
    for side in Side
}


def assert_legal(conn: ControlConnection, got: list[M.Message]) -> None:
    """What came out is well formed and was the peer's to send."""
    for msg in got:
        assert type(msg) in PEER_MAY_SEND[conn.side]
        assert M.decode_body(type(msg).TYPE, M.encode(msg)[M.HEADER.size :]) == msg


# ---- random bytes into the state machine ------------------------------------------------------

SAMPLE_FRAMES = [
    *(M.encode(m) for _, m in HANDSHAKE),
    M.encode(M.Open(tunnel="t0", kind="http", name="app", port=0, exact=False, plaintext=False,
                    takeover=False)),
    M.encode(M.Tickets(tunnel="t0", tickets=("x" * 24,) * 3)),
    M.encode(M.Dialed(id=1, ok=True, error="")),
    M.encode(M.Ping(t=1.5)),
    M.encode(M.Start(tunnel="t0", visitor="1.2.3.4:5")),
    M.encode(M.P2PSignal(name="r", data="x")),
]  # fmt: skip


@st.composite
def mutated_stream(draw: st.DrawFn) -> bytes:
    frames = draw(st.lists(st.sampled_from(SAMPLE_FRAMES), min_size=1, max_size=5))
    data = bytearray(b"".join(frames))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "flip", "set", "truncate", "header"]))
        if kind == "insert":
            data[pos:pos] = draw(
                st.binary(max_size=16) | st.sampled_from([b'"', b"{", b"}", b"\\"])
            )
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif kind == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and pos < len(data):
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, ord('"'), ord(":")]))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "header":
            msg_type = draw(st.sampled_from(sorted(M.BY_TYPE)) | st.integers(0, 255))
            length = draw(st.integers(0, 64) | st.integers(0, 0xFFFFFF))
            data[pos:pos] = M.HEADER.pack(msg_type << 24 | length)
    return bytes(data)


SIDES = st.sampled_from(list(Side))
STEPS = st.integers(0, 4)
CUTS = st.lists(st.integers(0, 1 << 16), max_size=8)


@FUZZ
@given(SIDES, STEPS, st.binary(max_size=4096), CUTS)
def test_fuzz_random_bytes_into_either_side_at_any_phase(
    side: Side, steps: int, data: bytes, cuts: list[int]
) -> None:
    conn = at_step(steps)[side]
    got, failed = feed(conn, chunked(data, cuts))
    assert_legal(conn, got)
    if failed:
        assert conn.phase is Phase.CLOSED
    elif conn.phase is Phase.CLOSED:  # the relay refused the agent during the handshake
        assert side is Side.AGENT and isinstance(got[-1], M.Error)


@FUZZ
@given(SIDES, STEPS, mutated_stream(), CUTS)
def test_fuzz_mutated_frames_into_either_side_at_any_phase(
    side: Side, steps: int, data: bytes, cuts: list[int]
) -> None:
    """Byte by byte or in any chunks, the same messages come out before the first bad one."""
    one_by_one, _ = feed(at_step(steps)[side], [data[i : i + 1] for i in range(len(data))])
    got, _ = feed(at_step(steps)[side], chunked(data, cuts))
    assert got == one_by_one
    assert_legal(at_step(steps)[side], got)


@FUZZ
@given(st.binary(min_size=1, max_size=512), st.sampled_from(sorted(M.BY_TYPE)))
def test_fuzz_random_body_behind_a_valid_header(body: bytes, msg_type: int) -> None:
    data = M.HEADER.pack(msg_type << 24 | len(body)) + body
    try:
        msgs = M.FrameDecoder().messages(data)
    except ProtocolError:
        return
    assert len(msgs) == 1 and msg_type == type(msgs[0]).TYPE
    assert M.FrameDecoder().messages(M.encode(msgs[0])) == msgs


JSON_VALUES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | SHORT_TEXT
    | st.lists(st.integers() | SHORT_TEXT, max_size=3)
)
ALL_FIELD_NAMES = sorted({n for c in ALL_TYPES for n in field_kinds(c)} | {"x"})


@FUZZ
@given(
    st.sampled_from(ALL_TYPES),
    st.dictionaries(st.sampled_from(ALL_FIELD_NAMES), JSON_VALUES, max_size=8),
)
def test_fuzz_random_json_objects(cls: type[M.Message], fields: dict[str, Any]) -> None:
    body = json.dumps(fields).encode()
    try:
        (msg,) = M.FrameDecoder().messages(M.HEADER.pack(cls.TYPE << 24 | len(body)) + body)
    except ProtocolError:
        return
    assert type(msg) is cls and set(fields) == set(field_kinds(cls))
    for name, kind in field_kinds(cls).items():
        value = getattr(msg, name)
        assert not isinstance(value, bool) or kind == "bool"
        if kind == "str":
            assert isinstance(value, str)
    assert M.FrameDecoder().messages(M.encode(msg)) == [msg]


# ---- generated messages -------------------------------------------------------------------------


@FUZZ
@given(ANY_MESSAGE)
def test_fuzz_encode_decode_round_trip(msg: M.Message) -> None:
    data = M.encode(msg)
    assert M.decode_header(data) == (type(msg).TYPE, len(data) - M.HEADER.size)
    assert M.FrameDecoder().messages(data) == [msg]


@FUZZ
@given(st.lists(ANY_MESSAGE, min_size=1, max_size=8), st.lists(st.integers(0, 10**6), max_size=12))
def test_fuzz_round_trip_in_any_chunking(msgs: list[M.Message], cuts: list[int]) -> None:
    stream = b"".join(M.encode(m) for m in msgs)
    decoder = M.FrameDecoder()
    got: list[M.Message] = []
    for chunk in chunked(stream, cuts):
        got += decoder.messages(chunk)
    assert got == msgs and decoder.buffered == b""


# ---- random legal conversations -------------------------------------------------------------


@st.composite
def conversation(draw: st.DrawFn) -> list[tuple[Side, M.Message]]:
    """A handshake, then messages either side may send once established."""
    out = list(HANDSHAKE)
    for _ in range(draw(st.integers(0, 12))):
        side = draw(SIDES)
        out.append((side, draw(messages_from(LEGAL[(Phase.READY, side)]))))
    return out


@FUZZ
@given(conversation())
def test_fuzz_legal_conversations_are_accepted_by_both_sides(
    talk: list[tuple[Side, M.Message]],
) -> None:
    conns = {side: ControlConnection(side) for side in Side}
    for sender, msg in talk:
        receiver = conns[other(sender)]
        receiver.receive_data(conns[sender].send(msg))
        got: list[M.Message] = []
        drain(receiver, got, 1)
        assert got == [msg]
    assert conns[Side.AGENT].phase is conns[Side.RELAY].phase is Phase.READY


@FUZZ
@given(conversation(), CUTS, CUTS)
def test_fuzz_the_chunking_of_a_conversation_changes_nothing(
    talk: list[tuple[Side, M.Message]], agent_cuts: list[int], relay_cuts: list[int]
) -> None:
    """Each side gets the other's bytes in random chunks and answers its handshake turn as
    soon as it is due: both see exactly the other's messages, in order."""
    said = {side: [m for s, m in talk if s is side] for side in Side}
    wire = {side: b"".join(M.encode(m) for m in said[side]) for side in Side}
    for side, cuts in ((Side.AGENT, agent_cuts), (Side.RELAY, relay_cuts)):
        conn = ControlConnection(side)
        mine = iter(said[side])
        got: list[M.Message] = []

        def my_turn() -> None:
            while conn.phase in OWN_TURN[side]:  # noqa: B023
                conn.send(next(mine))  # noqa: B023

        my_turn()
        for chunk in chunked(wire[other(side)], cuts):
            conn.receive_data(chunk)
            while (msg := conn.next_event()) is not None:
                got.append(msg)
                my_turn()
        assert got == said[other(side)]
        assert conn.phase is Phase.READY
