"""Fuzz the relay's control protocol: whatever arrives on the control port, in whatever
chunks, only NatkitError escapes the decoder; random valid messages survive the round trip;
and a relay session fed random (well-formed) messages answers or drops, never crashes."""

from __future__ import annotations

import asyncio
import itertools
import json
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from natkit.errors import NatkitError, ProtocolError
from natkit.relay import protocol as P
from natkit.relay.server import RelayConfig, RelayServer, _Entry

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- strategies -----------------------------------------------------------------------------

SHORT_TEXT = st.text(max_size=40) | st.sampled_from(["", "t0", "app", "app.lab.test", "127.0.0.1"])
TICKET = st.text(alphabet=string.ascii_letters + string.digits + "-_", max_size=64)
ROOM_NAME = st.text(min_size=1, max_size=P.MAX_ROOM_NAME).filter(str.isprintable)
VALUES: dict[type, st.SearchStrategy[Any]] = {
    str: SHORT_TEXT | st.text(max_size=P.MAX_STRING),
    int: st.integers(0, 2**32),
    float: st.floats(allow_nan=False, allow_infinity=False) | st.integers(0, 2**32),
    bool: st.booleans(),
    list: st.lists(TICKET, max_size=P.MAX_TICKETS),
}


@st.composite
def valid_message(draw: st.DrawFn, types: list[int] | None = None) -> tuple[int, dict[str, Any]]:
    msg_type = draw(st.sampled_from(types or sorted(P.SCHEMAS)))
    fields = {key: draw(VALUES[kind]) for key, kind in P.SCHEMAS[msg_type].items()}
    if msg_type == P.OPEN:
        fields["kind"] = draw(st.sampled_from(P.KINDS))
    if msg_type in P.P2P_NAMED:
        fields["name"] = draw(ROOM_NAME)
    if msg_type == P.P2P_JOIN:
        fields["role"] = draw(st.sampled_from(P.ROLES))
    if msg_type == P.P2P_PEER:
        fields["ticket"] = draw(TICKET)
    if draw(st.booleans()):
        fields["extra"] = draw(st.none() | st.integers() | SHORT_TEXT)
    return msg_type, fields


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


SAMPLE_FRAMES = [
    P.encode(P.HELLO, version=1, agent="natkit"),
    P.encode(P.AUTH, token_id="a" * 32, mac="b" * 64),
    P.encode(P.OPEN, tunnel="t0", kind="http", name="app", port=0),
    P.encode(P.TICKETS, tunnel="t0", tickets=["x" * 24] * 3),
    P.encode(P.DIALED, id=1, ok=True, error=""),
    P.encode(P.PING, t=1.5),
    P.encode(P.START, tunnel="t0", visitor="1.2.3.4:5"),
]


@st.composite
def mutated_stream(draw: st.DrawFn) -> bytes:
    frames = draw(st.lists(st.sampled_from(SAMPLE_FRAMES), min_size=1, max_size=4))
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
            msg_type = draw(st.sampled_from(sorted(P.SCHEMAS)) | st.integers(0, 255))
            length = draw(st.integers(0, 64) | st.integers(0, 0xFFFFFF))
            data[pos:pos] = P.HEADER.pack(msg_type << 24 | length)
    return bytes(data)


def feed_all(chunks: list[bytes]) -> list[P.Message]:
    decoder = P.Decoder()
    out: list[P.Message] = []
    try:
        for chunk in chunks:
            out += decoder.feed(chunk)
    except NatkitError:
        return out
    assert len(decoder.buffered) < P.HEADER.size + P.MAX_FRAME
    return out


def assert_valid(msg: P.Message) -> None:
    """Whatever the decoder lets through is a message we could have sent ourselves."""
    assert msg.type in P.SCHEMAS
    again = P.Decoder().feed(P.encode(msg.type, **msg.fields))
    assert [(m.type, m.fields) for m in again] == [(msg.type, msg.fields)]


# ---- the decoder ------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=4096), st.lists(st.integers(0, 4096), max_size=8))
def test_fuzz_decoder_random_bytes(data: bytes, cuts: list[int]) -> None:
    for msg in feed_all(chunked(data, cuts)):
        assert_valid(msg)


@FUZZ
@given(st.binary(min_size=1, max_size=512), st.sampled_from(sorted(P.SCHEMAS)))
def test_fuzz_decoder_random_body_behind_a_valid_header(body: bytes, msg_type: int) -> None:
    data = P.HEADER.pack(msg_type << 24 | len(body)) + body
    for msg in feed_all([data]):
        assert_valid(msg)


@FUZZ
@given(
    st.sampled_from(sorted(P.SCHEMAS)),
    st.dictionaries(
        st.sampled_from(
            [
                "tunnel",
                "kind",
                "name",
                "port",
                "t",
                "id",
                "ok",
                "ticket",
                "tickets",
                "nonce",
                "mac",
                "host",
                "error",
                "x",
            ]
        ),
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats()
        | SHORT_TEXT
        | st.lists(st.integers() | SHORT_TEXT, max_size=3),
        max_size=6,
    ),
)
def test_fuzz_decoder_random_json_objects(msg_type: int, fields: dict[str, Any]) -> None:
    body = json.dumps(fields).encode()
    try:
        (msg,) = P.Decoder().feed(P.HEADER.pack(msg_type << 24 | len(body)) + body)
    except NatkitError:
        return
    assert_valid(msg)
    for key, kind in P.SCHEMAS[msg_type].items():
        assert isinstance(msg[key], kind) or (kind is float and isinstance(msg[key], int))
        assert not (kind in (int, float) and isinstance(msg[key], bool))


@FUZZ
@given(mutated_stream(), st.lists(st.integers(0, 4096), max_size=8))
def test_fuzz_decoder_mutated_frames(data: bytes, cuts: list[int]) -> None:
    # Byte by byte, every frame before the first bad one comes out; in bigger chunks, a bad
    # frame takes the good ones of its own feed() down with it (the peer is dropped anyway).
    # Either way the messages are the same, in the same order, and valid.
    most = feed_all([data[i : i + 1] for i in range(len(data))])
    for msg in most:
        assert_valid(msg)
    for chunks in ([data], chunked(data, cuts)):
        got = feed_all(chunks)
        assert [(m.type, m.fields) for m in got] == [(m.type, m.fields) for m in most][: len(got)]


@FUZZ
@given(
    st.lists(valid_message(), min_size=1, max_size=6), st.lists(st.integers(0, 10**6), max_size=12)
)
def test_fuzz_round_trip_of_random_valid_messages(
    messages: list[tuple[int, dict[str, Any]]], cuts: list[int]
) -> None:
    try:
        stream = b"".join(P.encode(t, **f) for t, f in messages)
    except ValueError:  # a frame over MAX_FRAME: encode refuses it, as it should
        assume(False)
        return
    decoder = P.Decoder()
    got: list[P.Message] = []
    for chunk in chunked(stream, cuts):
        got += decoder.feed(chunk)
    assert [(m.type, m.fields) for m in got] == messages
    assert decoder.buffered == b""


@FUZZ
@given(st.text(max_size=80), st.text(max_size=80), st.text(max_size=80), st.text(max_size=100))
def test_fuzz_check_mac_only_says_yes_or_no(token: str, nonce: str, fp: str, mac: str) -> None:
    token = token.encode("utf-8", "replace").decode()
    nonce = nonce.encode("utf-8", "replace").decode()
    assert P.check_mac(token or "t", nonce, fp.encode("utf-8", "replace").decode(), mac) in (
        True,
        False,
    )
    right = P.auth_mac(token or "t", nonce, "fp")
    assert P.check_mac(token or "t", nonce, "fp", right) is True
    assume(mac != right)
    assert P.check_mac(token or "t", nonce, "fp", mac) is False


# ---- a relay session fed random messages --------------------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False
        self.protocol: Any = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closing, "wrote to a closed transport"
        self.written += data

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40404)}.get(name, default)

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False


TOKEN = "fuzz-token-0123456789"


@pytest.fixture(scope="module")
def relay_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("relay-state")
    RelayServer(RelayConfig(state_dir=path, tokens={"fuzz": TOKEN}))  # make the certificate once
    return path


def _authenticated(server: RelayServer) -> tuple[_Entry, FakeTransport]:
    transport = FakeTransport()
    entry = _Entry(server)
    entry.connection_made(transport)
    entry.data_received(P.encode(P.HELLO, version=P.VERSION, agent="fuzz"))
    (challenge,) = P.Decoder().feed(bytes(transport.written))
    assert challenge.type == P.CHALLENGE
    transport.written.clear()
    mac = P.auth_mac(TOKEN, challenge["nonce"], server.fingerprint)
    entry.data_received(P.encode(P.AUTH, token_id=P.token_id(TOKEN), mac=mac))
    (welcome,) = P.Decoder().feed(bytes(transport.written))
    assert welcome.type == P.WELCOME, welcome
    transport.written.clear()
    return entry, transport


AGENT_TYPES = [P.OPEN, P.CLOSE, P.PING, P.PONG, P.DIAL, P.DIALED, P.TICKETS, P.DATA, P.HELLO]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(valid_message(AGENT_TYPES), max_size=12),
    st.lists(st.integers(0, 10**5), max_size=6),
    st.binary(max_size=32),
)
def test_fuzz_relay_session(
    relay_state: Path,
    messages: list[tuple[int, dict[str, Any]]],
    cuts: list[int],
    tail: bytes,
) -> None:
    """An authenticated agent sends random well-formed messages (then maybe garbage): the
    relay answers with valid frames or drops the session; no other exception escapes."""

    async def main() -> None:
        cfg = RelayConfig(
            listen_host="127.0.0.1",
            tokens={"fuzz": TOKEN},
            ports=(1, 1),
            http_port=8080,
            https_port=8443,
            domain="lab.test",
            state_dir=relay_state,
            pool_size=2,
        )
        server = RelayServer(cfg)
        entry, transport = _authenticated(server)
        try:
            stream = b"".join(P.encode(t, **f) for t, f in messages) + tail
        except ValueError:
            stream = tail
        try:
            for chunk in chunked(stream, cuts):
                if transport.closing:
                    break
                entry.data_received(chunk)
                await asyncio.sleep(0)
            await asyncio.sleep(0)
            # Everything the relay said is well formed.
            for msg in P.Decoder().feed(bytes(transport.written)):
                assert msg.type in (P.OPENED, P.TICKETS, P.ERROR, P.PONG, P.DIALED), msg
                if msg.type == P.OPENED:
                    assert msg["public"].startswith(("http://", "https://", "127.0.0.1:"))
        finally:
            entry.connection_lost(None)
            await server.close()
            assert not server.sessions and not server.tunnels_by_key

    asyncio.run(main())


def test_relay_session_examples(relay_state: Path) -> None:
    """The answers the fuzzer takes on trust, spelled out once."""

    async def main() -> list[P.Message]:
        cfg = RelayConfig(
            listen_host="127.0.0.1",
            tokens={"fuzz": TOKEN},
            ports=(1, 1),
            http_port=8080,
            domain="lab.test",
            state_dir=relay_state,
        )
        server = RelayServer(cfg)
        entry, transport = _authenticated(server)
        requests: list[tuple[int, dict[str, Any]]] = [
            (P.PING, {"t": 3}),
            (P.OPEN, {"tunnel": "h", "kind": "http", "name": "App", "port": 0}),
            (P.OPEN, {"tunnel": "h", "kind": "http", "name": "app", "port": 0}),
            (P.OPEN, {"tunnel": "g", "kind": "http", "name": "app", "port": 0}),
            (P.OPEN, {"tunnel": "b", "kind": "http", "name": "bad name", "port": 0}),
            (P.OPEN, {"tunnel": "s", "kind": "tls", "name": "x", "port": 0}),
            (P.OPEN, {"tunnel": "p", "kind": "tcp", "name": "", "port": 80}),
            (P.DIAL, {"id": 1, "host": "100.200.0.9", "port": 80}),
            (P.DIAL, {"id": 2, "host": "127.0.0.1", "port": 70000}),
            (P.CLOSE, {"tunnel": "h"}),
            (P.CLOSE, {"tunnel": "nope"}),
        ]
        for t, f in requests:
            entry.data_received(P.encode(t, **f))
        await asyncio.sleep(0.05)
        out = P.Decoder().feed(bytes(transport.written))
        entry.connection_lost(None)
        await server.close()
        return out

    out = asyncio.run(main())
    summary = [
        (m.name, m.fields.get("code") or m.fields.get("public") or m.fields.get("ok"))
        for m in out
        if m.type != P.TICKETS
    ]
    assert summary == [
        ("PONG", None),
        ("OPENED", "http://app.lab.test:8080"),
        ("ERROR", "exists"),
        ("ERROR", "refused"),  # the name is held (by this very session)
        ("ERROR", "refused"),  # not a host name
        ("ERROR", "refused"),  # no --https-port
        ("ERROR", "refused"),  # outside the port range
        ("DIALED", False),  # not the agent's own address
        ("DIALED", False),  # not a TCP port
    ], summary
    errors = [m["message"] for m in out if m.type == P.ERROR]
    assert "already open" in errors[0]
    assert "held by another tunnel" in errors[1]
    assert "invalid host name" in errors[2]
    assert "does not serve tls" in errors[3]
    assert "outside the relay's range" in errors[4]
    dialed = [m for m in out if m.type == P.DIALED]
    assert "not the address this agent connects from" in dialed[0]["error"]
    assert "not a TCP port" in dialed[1]["error"]


def test_garbage_before_authentication_drops_the_connection(relay_state: Path) -> None:
    async def main() -> None:
        server = RelayServer(RelayConfig(tokens={"fuzz": TOKEN}, state_dir=relay_state))
        for data in (b"GET / HTTP/1.1\r\n\r\n", b"\x00" * 8, P.encode(P.PING, t=1)):
            transport = FakeTransport()
            entry = _Entry(server)
            entry.connection_made(transport)
            entry.data_received(data)
            assert transport.closing, data
            assert not server.sessions
            entry.connection_lost(None)
        # A wrong MAC (even a non-ASCII one) is refused with ERROR auth, counted.
        for mac in ("0" * 64, "é" * 64):
            transport = FakeTransport()
            entry = _Entry(server)
            entry.connection_made(transport)
            entry.data_received(P.encode(P.HELLO, version=1, agent="x"))
            entry.data_received(P.encode(P.AUTH, token_id=P.token_id(TOKEN), mac=mac))
            msgs = P.Decoder().feed(bytes(transport.written))
            assert [m.name for m in msgs] == ["CHALLENGE", "ERROR"]
            assert msgs[1]["code"] == "auth" and transport.closing
            entry.connection_lost(None)
        assert server.stats["auth_failures"] == 2
        assert server.stats["garbage"] >= 1
        assert not server.sessions
        await server.close()

    asyncio.run(main())


def test_protocol_error_is_a_natkit_error() -> None:
    assert issubclass(ProtocolError, NatkitError)
