"""The relay's P2P rendezvous, sans network: the new control frames byte for byte and
fuzzed, the room rules (meet, busy, takeover, leave, limits, signals, rate) on fake
sessions, and the state staying consistent whatever two agents send."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natkit.errors import NatkitError, ProtocolError
from natkit.relay import protocol as P
from natkit.relay import rooms
from natkit.relay.server import RelayConfig, RelayServer, _Entry

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def frame(msg_type: int, body: bytes) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def decode_one(data: bytes) -> P.Message:
    (msg,) = P.Decoder().feed(data)
    return msg


# ---- the frames -------------------------------------------------------------------------


def test_p2p_frames_byte_for_byte() -> None:
    assert P.encode(P.P2P_JOINED) == b"\x22\x00\x00\x02{}"
    assert P.encode(P.P2P_LEAVE, name="r") == b'\x21\x00\x00\x0c{"name":"r"}'
    body = b'{"name":"r","role":"connect","instance":"i"}'
    assert P.encode(P.P2P_JOIN, name="r", role="connect", instance="i") == frame(30, body)
    msg = decode_one(frame(31, b'{"name":"r","present":false,"ticket":""}'))
    assert (msg.name, msg["present"], msg["ticket"]) == ("P2P_PEER", False, "")


@pytest.mark.parametrize("role", ["", "LISTEN", "server", "listen ", "client"])
def test_join_refuses_other_roles(role: str) -> None:
    body = json.dumps({"name": "r", "role": role, "instance": "i"}).encode()
    with pytest.raises(ProtocolError, match="role must be one of listen, connect"):
        decode_one(frame(P.P2P_JOIN, body))


@pytest.mark.parametrize(
    ("name", "why"),
    [("", "empty"), ("x" * (P.MAX_ROOM_NAME + 1), "longer than 128"), ("a\nb", "unprintable")],
)
def test_room_names_are_1_to_128_printable_characters(name: str, why: str) -> None:
    assert P.room_name_problem("x" * P.MAX_ROOM_NAME) == ""
    assert P.room_name_problem("камера 1 🎥") == ""
    rest: dict[int, dict[str, Any]] = {
        P.P2P_JOIN: {"role": "listen", "instance": ""},
        P.P2P_PEER: {"present": False, "ticket": ""},
        P.P2P_SIGNAL: {"data": ""},
        P.P2P_LEAVE: {},
    }
    for msg_type, fields in rest.items():
        body = json.dumps({"name": name, **fields}).encode()
        with pytest.raises(ProtocolError, match=why):
            decode_one(frame(msg_type, body))


def test_signal_size_is_counted_json_escaped() -> None:
    ascii_max = "a" * P.MAX_SIGNAL
    assert decode_one(P.encode(P.P2P_SIGNAL, name="r", data=ascii_max))["data"] == ascii_max
    assert P.MAX_SIGNAL > P.MAX_STRING  # the one field allowed past MAX_STRING
    for too_big in ("a" * (P.MAX_SIGNAL + 1), "é" * (P.MAX_SIGNAL // 6 + 1), "\x01" * 3000):
        with pytest.raises(ProtocolError, match="P2P_SIGNAL: data over 16384 bytes"):
            P.encode(P.P2P_SIGNAL, name="r", data=too_big)
    assert P.signal_size("é") == 6 and P.signal_size('"') == 2 and P.signal_size("a") == 1
    # Other fields keep MAX_STRING, even in P2P frames.
    with pytest.raises(ProtocolError, match="too long"):
        P.encode(P.P2P_JOIN, name="r", role="listen", instance="i" * (P.MAX_STRING + 1))
    with pytest.raises(ProtocolError, match="ticket too long"):
        P.encode(P.P2P_PEER, name="r", present=True, ticket="t" * 65)


def test_the_biggest_signal_still_fits_a_frame_when_forwarded() -> None:
    """The relay re-encodes what it forwards: a signal that passed must fit again, with
    the longest name made of the widest escapes."""
    name = "\U0001f3a5" * P.MAX_ROOM_NAME  # 12 bytes each once escaped
    data = "\\" * (P.MAX_SIGNAL // 2)  # 2 bytes each
    assert P.signal_size(data) == P.MAX_SIGNAL
    sent = json.dumps({"name": name, "data": data}, ensure_ascii=False).encode()
    msg = decode_one(frame(P.P2P_SIGNAL, sent))
    assert len(P.encode(P.P2P_SIGNAL, **msg.fields)) < P.MAX_FRAME


P2P_KEYS = ["name", "role", "instance", "present", "ticket", "data", "x"]
ANY_VALUE = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=200)
    | st.sampled_from(["listen", "connect", "", "r"])
    | st.lists(st.integers(), max_size=2)
)


@FUZZ
@given(
    st.sampled_from((*P.P2P_NAMED, P.P2P_JOINED)),
    st.dictionaries(st.sampled_from(P2P_KEYS), ANY_VALUE, max_size=7),
)
def test_fuzz_p2p_bodies_decode_only_into_valid_messages(
    msg_type: int, fields: dict[str, Any]
) -> None:
    body = json.dumps(fields).encode()
    try:
        msg = decode_one(frame(msg_type, body))
    except NatkitError:
        return
    again = decode_one(P.encode(msg.type, **msg.fields))
    assert again.fields == msg.fields
    if msg_type in P.P2P_NAMED:
        assert P.room_name_problem(msg["name"]) == ""
    if msg_type == P.P2P_JOIN:
        assert msg["role"] in P.ROLES


@FUZZ
@given(st.binary(max_size=300), st.sampled_from((*P.P2P_NAMED, P.P2P_JOINED)))
def test_fuzz_p2p_random_bodies_raise_only_protocol_errors(body: bytes, msg_type: int) -> None:
    with contextlib.suppress(ProtocolError):
        decode_one(frame(msg_type, body))


# ---- rooms on fake sessions -------------------------------------------------------------

TOKEN_A = "alice-token-0123456789abcdef"
TOKEN_B = "bob-token-0123456789abcdef"


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False
        self.backlog = 0

    def write(self, data: Any) -> None:
        assert not self.closing, "wrote to a closed transport"
        self.written += data

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40404)}.get(name, default)

    def get_write_buffer_size(self) -> int:
        return self.backlog


class Agent:
    """An authenticated control session on a relay, fed frames by hand."""

    def __init__(self, server: RelayServer, token: str = TOKEN_A) -> None:
        self.transport = FakeTransport()
        self.entry = _Entry(server)
        self.entry.connection_made(self.transport)
        self.entry.data_received(P.encode(P.HELLO, version=P.VERSION, agent="test"))
        (challenge,) = self.read()
        mac = P.auth_mac(token, challenge["nonce"], server.fingerprint)
        self.entry.data_received(P.encode(P.AUTH, token_id=P.token_id(token), mac=mac))
        assert [m.name for m in self.read()] == ["WELCOME"]

    def send(self, msg_type: int, **fields: Any) -> None:
        self.entry.data_received(P.encode(msg_type, **fields))

    def join(self, name: str, role: str, instance: str | None = None) -> list[P.Message]:
        instance = f"i{id(self)}" if instance is None else instance
        self.send(P.P2P_JOIN, name=name, role=role, instance=instance)
        return self.read()

    def read(self) -> list[P.Message]:
        out = P.Decoder().feed(bytes(self.transport.written))
        self.transport.written.clear()
        return out

    def end(self) -> None:
        self.entry.connection_lost(None)


def peer(msgs: list[P.Message]) -> tuple[bool, str]:
    (msg,) = msgs
    assert msg.type == P.P2P_PEER, msg
    return msg["present"], msg["ticket"]


def error(msgs: list[P.Message]) -> dict[str, Any]:
    (msg,) = msgs
    assert msg.type == P.ERROR, msg
    return msg.fields


@pytest.fixture(scope="module")
def relay_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("relay-state")
    RelayServer(RelayConfig(state_dir=path, tokens={"a": TOKEN_A}))  # the certificate, once
    return path


@pytest.fixture
async def server(relay_state: Path) -> AsyncIterator[RelayServer]:
    cfg = RelayConfig(
        tokens={"a": TOKEN_A, "b": TOKEN_B}, state_dir=relay_state, max_rooms_per_token=3
    )
    srv = RelayServer(cfg)
    yield srv
    await srv.close()


def consistent(srv: RelayServer) -> None:
    """The rendezvous' indexes agree with each other."""
    rz = srv.rendezvous
    for key, room in rz.rooms.items():
        assert room.key == key and 1 <= len(room.members) <= 2
        for role, m in room.members.items():
            assert rz.joined[m.session][room.name] == role
            assert not m.ticket or len(room.members) == 2  # tickets only for a pairing
    for s, names in rz.joined.items():
        assert names and s.token_id is not None
        for name, role in names.items():
            assert rz.rooms[(s.token_id, name)].members[role].session is s
    for ticket, (room, role, gen) in rz.tickets.items():
        assert rz.rooms[room.key] is room and room.members[role].ticket == ticket
        assert gen == room.generation
    assert sum(rz.rooms_per_token.values()) == len(rz.rooms)


async def test_two_peers_meet_and_signal_both_ways(server: RelayServer) -> None:
    a, b = Agent(server), Agent(server)
    assert peer(a.join("cam", "listen")) == (False, "")
    present, tb = peer(b.join("cam", "connect"))
    present_a, ta = peer(a.read())
    assert present and present_a and ta and tb and ta != tb
    a.send(P.P2P_SIGNAL, name="cam", data="offer")
    b.send(P.P2P_SIGNAL, name="cam", data="answer ✓")
    assert [(m.name, m.fields) for m in b.read()] == [
        ("P2P_SIGNAL", {"name": "cam", "data": "offer"})
    ]
    assert a.read()[0].fields == {"name": "cam", "data": "answer ✓"}
    assert server.stats["p2p_rooms"] == 1 and server.stats["p2p_signals"] == 2
    consistent(server)


async def test_a_second_peer_of_a_role_is_busy_and_the_room_is_undisturbed(
    server: RelayServer,
) -> None:
    a, b, c = Agent(server), Agent(server), Agent(server)
    a.join("cam", "listen")
    b.join("cam", "connect")
    a.read()
    err = error(c.join("cam", "listen"))
    assert err["code"] == "busy" and err["room"] == "cam" and err["about"] == "join"
    assert "already has a listen peer" in err["message"]
    assert a.read() == [] and b.read() == []
    # The same connection may not play both roles either.
    err = error(a.join("cam", "connect"))
    assert err["code"] == "busy" and "already is the listen peer" in err["message"]
    consistent(server)


async def test_rooms_are_per_token(server: RelayServer) -> None:
    a, b = Agent(server, TOKEN_A), Agent(server, TOKEN_B)
    assert peer(a.join("cam", "listen")) == (False, "")
    assert peer(b.join("cam", "connect")) == (False, "")
    b.send(P.P2P_SIGNAL, name="cam", data="hello?")
    assert a.read() == [] and b.read() == []
    assert len(server.rendezvous.rooms) == 2
    consistent(server)


async def test_leave_and_session_end_tell_the_other_peer(server: RelayServer) -> None:
    a, b = Agent(server), Agent(server)
    a.join("cam", "listen")
    _, ticket = peer(b.join("cam", "connect"))
    a.read()
    b.send(P.P2P_LEAVE, name="cam")
    assert peer(a.read()) == (False, "")
    assert ticket not in server.rendezvous.tickets and not server.rendezvous.tickets
    assert peer(b.join("cam", "connect"))[0]
    assert peer(a.read())[0]
    b.end()
    assert peer(a.read()) == (False, "")
    a.send(P.P2P_LEAVE, name="cam")
    a.send(P.P2P_LEAVE, name="cam")  # twice, or for a room never joined: nothing happens
    assert not server.rendezvous.rooms and not server.rendezvous.joined
    consistent(server)


async def test_the_same_instance_on_a_new_connection_takes_its_place_over(
    server: RelayServer,
) -> None:
    """An agent back after an outage, before the relay saw its old connection die."""
    old, b = Agent(server), Agent(server)
    old.join("cam", "listen", instance="inst-1")
    _, tb = peer(b.join("cam", "connect"))
    _, t_old = peer(old.read())
    new = Agent(server)
    present, t_new = peer(new.join("cam", "listen", instance="inst-1"))
    assert present and t_new not in (t_old, tb)
    assert [m.fields for m in old.read()] == [{"name": "cam"}]  # P2P_LEAVE: replaced
    present_b, tb2 = peer(b.read())  # a new pairing: b is told again, with a fresh ticket
    assert present_b and tb2 != tb
    assert t_old not in server.rendezvous.tickets and tb not in server.rendezvous.tickets
    old.end()  # the old connection's end no longer touches the room
    assert b.read() == [] and len(server.rendezvous.rooms) == 1
    # Another instance does not take over; and an empty instance is nobody's.
    assert error(Agent(server).join("cam", "listen", instance="other"))["code"] == "busy"
    Agent(server).join("door", "listen", instance="")
    assert error(Agent(server).join("door", "listen", instance=""))["code"] == "busy"
    consistent(server)


async def test_a_repeated_join_gives_a_fresh_ticket(server: RelayServer) -> None:
    a, b = Agent(server), Agent(server)
    a.join("cam", "listen")
    b.join("cam", "connect")
    _, t1 = peer(a.read())
    present, t2 = peer(a.join("cam", "listen"))
    assert present and t2 != t1 and t1 not in server.rendezvous.tickets
    assert b.read() == []
    consistent(server)


async def test_rooms_per_token_are_limited(server: RelayServer) -> None:
    a = Agent(server)
    for i in range(3):
        assert peer(a.join(f"r{i}", "listen")) == (False, "")
    err = error(a.join("r3", "listen"))
    assert err["code"] == "limit" and "3 P2P rooms" in err["message"]
    assert peer(Agent(server, TOKEN_B).join("r3", "listen")) == (False, "")  # another token
    a.send(P.P2P_LEAVE, name="r0")
    assert peer(a.join("r3", "listen")) == (False, "")
    consistent(server)


async def test_signals_without_a_peer_are_dropped_quietly(server: RelayServer) -> None:
    a = Agent(server)
    a.send(P.P2P_SIGNAL, name="nowhere", data="x")
    a.join("cam", "listen")
    a.send(P.P2P_SIGNAL, name="cam", data="x")
    assert a.read() == [] and server.stats["p2p_signals_dropped"] == 2


async def test_signals_are_rate_limited_per_connection(server: RelayServer) -> None:
    a, b = Agent(server), Agent(server)
    a.join("cam", "listen")
    b.join("cam", "connect")
    a.read()
    big = "s" * P.MAX_SIGNAL
    sent = 0
    for _ in range(20):  # ~340 KiB at once: over the 128 KiB burst
        a.send(P.P2P_SIGNAL, name="cam", data=big)
        sent += 1
    forwarded = [m for m in b.read() if m.type == P.P2P_SIGNAL]
    refused = a.read()
    assert 5 <= len(forwarded) <= 8 and len(forwarded) + len(refused) == sent
    assert {(m["code"], m["about"], m["room"]) for m in refused} == {("rate", "signal", "cam")}
    assert server.stats["p2p_rate_limited"] == len(refused)
    # The other direction has its own bucket.
    b.send(P.P2P_SIGNAL, name="cam", data=big)
    assert len(a.read()) == 1


async def test_a_peer_that_does_not_read_gets_no_more_signals(server: RelayServer) -> None:
    a, b = Agent(server), Agent(server)
    a.join("cam", "listen")
    b.join("cam", "connect")
    a.read()
    b.transport.backlog = rooms.MAX_PEER_BACKLOG + 1
    a.send(P.P2P_SIGNAL, name="cam", data="x")
    assert b.read() == []
    assert "not reading" in error(a.read())["message"]


# ---- two agents sending anything ----------------------------------------------------------

NAMES = st.sampled_from(["cam", "door", "x" * P.MAX_ROOM_NAME])
ACTIONS = st.lists(
    st.one_of(
        st.tuples(
            st.just("join"),
            st.integers(0, 2),
            NAMES,
            st.sampled_from(P.ROLES),
            st.sampled_from(["i1", "i2", ""]),
        ),
        st.tuples(st.just("signal"), st.integers(0, 2), NAMES, st.text(max_size=64)),
        st.tuples(st.just("leave"), st.integers(0, 2), NAMES),
        st.tuples(st.just("end"), st.integers(0, 2)),
        st.tuples(st.just("peer"), st.integers(0, 2)),  # a relay-only frame: dropped
    ),
    max_size=25,
)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ACTIONS)
def test_fuzz_rooms_stay_consistent(relay_state: Path, actions: list[tuple[Any, ...]]) -> None:
    async def main() -> None:
        srv = RelayServer(RelayConfig(tokens={"a": TOKEN_A}, state_dir=relay_state))
        agents = [Agent(srv) for _ in range(3)]
        try:
            for action, who, *args in actions:
                agent = agents[who]
                if agent.transport.closing:
                    agents[who] = agent = Agent(srv)
                if action == "join":
                    agent.send(P.P2P_JOIN, name=args[0], role=args[1], instance=args[2])
                elif action == "signal":
                    agent.send(P.P2P_SIGNAL, name=args[0], data=args[1])
                elif action == "leave":
                    agent.send(P.P2P_LEAVE, name=args[0])
                elif action == "peer":
                    agent.send(P.P2P_PEER, name="cam", present=True, ticket="t")
                    assert agent.transport.closing  # an agent may not send it
                    agent.end()
                else:
                    agent.end()
                    agent.transport.closing = True
                for other in agents:
                    for msg in other.read():
                        assert msg.type in (P.P2P_PEER, P.P2P_SIGNAL, P.P2P_LEAVE, P.ERROR)
                consistent(srv)
        finally:
            for agent in agents:
                agent.end()
            assert not srv.rendezvous.rooms and not srv.rendezvous.tickets
            assert not srv.rendezvous.joined and not srv.rendezvous.buckets
            await srv.close()

    asyncio.run(main())
