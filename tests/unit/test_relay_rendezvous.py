"""The relay's P2P rendezvous, sans network: the room rules of natkit.rendezvous.rooms (meet,
busy, takeover, leave, limits, signals, rate) on fake control sessions, the relay-fallback
path on socket pairs, the state staying consistent whatever agents send, and the agent's
side (natkit.rendezvous.client) fed typed messages."""

from __future__ import annotations

import asyncio
import collections
import socket
import types
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natkit.errors import ProtocolError
from natkit.relay import messages as M
from natkit.rendezvous import rooms
from natkit.rendezvous.client import RendezvousError, RoomClient

TOKEN_A = "a" * 32  # token ids
TOKEN_B = "b" * 32


class Session:
    """A control session as a room sees it: what it was sent, and how much it has not
    written out yet."""

    def __init__(self, token_id: str = TOKEN_A, instance: str = "agent-1") -> None:
        self.token_id: str | None = token_id
        self.instance = instance
        self.sent: list[M.Message] = []
        self.unsent = 0

    def send(self, msg: M.Message) -> None:
        M.encode(msg)  # every message a room sends must be one we can put on the wire
        self.sent.append(msg)

    def backlog(self) -> int:
        return self.unsent

    def read(self) -> list[M.Message]:
        out, self.sent = self.sent, []
        return out


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(rooms, "time", types.SimpleNamespace(monotonic=fake.monotonic))
    return fake


class Relay:
    def __init__(self, max_rooms: int = 3) -> None:
        self.stats: collections.Counter[str] = collections.Counter()
        self.spawned: list[Coroutine[Any, Any, None]] = []
        self.rz = rooms.Rooms(self.stats, self.spawned.append, max_rooms_per_token=max_rooms)

    def join(self, s: Session, name: str, role: str, instance: str | None = None) -> list[Any]:
        instance = f"i{id(s)}" if instance is None else instance
        self.rz.on_message(s, M.P2PJoin(name=name, role=role, instance=instance))
        return s.read()

    def signal(self, s: Session, name: str, data: str) -> None:
        self.rz.on_message(s, M.P2PSignal(name=name, data=data))

    def leave(self, s: Session, name: str) -> None:
        self.rz.on_message(s, M.P2PLeave(name=name))


@pytest.fixture
def relay(clock: FakeClock) -> Iterator[Relay]:
    r = Relay()
    yield r
    for coro in r.spawned:
        coro.close()


def peer(msgs: list[M.Message]) -> tuple[bool, str]:
    (msg,) = msgs
    assert isinstance(msg, M.P2PPeer), msg
    return msg.present, msg.ticket


def error(msgs: list[M.Message]) -> M.P2PError:
    (msg,) = msgs
    assert isinstance(msg, M.P2PError), msg
    return msg


def consistent(rz: rooms.Rooms) -> None:
    """The rendezvous' indexes agree with each other."""
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


def test_two_peers_meet_and_signal_both_ways(relay: Relay) -> None:
    a, b = Session(), Session()
    assert peer(relay.join(a, "cam", "listen")) == (False, "")
    present, tb = peer(relay.join(b, "cam", "connect"))
    present_a, ta = peer(a.read())
    assert present and present_a and ta and tb and ta != tb
    assert relay.rz.has_ticket(ta) and relay.rz.has_ticket(tb)
    relay.signal(a, "cam", "offer")
    relay.signal(b, "cam", "answer ✓")
    assert b.read() == [M.P2PSignal(name="cam", data="offer")]
    assert a.read() == [M.P2PSignal(name="cam", data="answer ✓")]
    assert relay.stats["p2p_rooms"] == 1 and relay.stats["p2p_signals"] == 2
    consistent(relay.rz)


def test_a_second_peer_of_a_role_is_busy_and_the_room_is_undisturbed(relay: Relay) -> None:
    a, b, c = Session(), Session(), Session()
    relay.join(a, "cam", "listen")
    relay.join(b, "cam", "connect")
    a.read()
    err = error(relay.join(c, "cam", "listen"))
    assert (err.code, err.name, err.about) == ("busy", "cam", "join")
    assert "already has a listen peer" in err.message
    assert a.read() == [] and b.read() == []
    # The same connection may not play both roles either.
    err = error(relay.join(a, "cam", "connect"))
    assert err.code == "busy" and "already is the listen peer" in err.message
    consistent(relay.rz)


def test_rooms_are_per_token(relay: Relay) -> None:
    a, b = Session(TOKEN_A), Session(TOKEN_B)
    assert peer(relay.join(a, "cam", "listen")) == (False, "")
    assert peer(relay.join(b, "cam", "connect")) == (False, "")
    relay.signal(b, "cam", "hello?")
    assert a.read() == [] and b.read() == []
    assert len(relay.rz.rooms) == 2
    consistent(relay.rz)


def test_leave_and_session_end_tell_the_other_peer(relay: Relay) -> None:
    a, b = Session(), Session()
    relay.join(a, "cam", "listen")
    _, ticket = peer(relay.join(b, "cam", "connect"))
    a.read()
    relay.leave(b, "cam")
    assert peer(a.read()) == (False, "")
    assert not relay.rz.has_ticket(ticket) and not relay.rz.tickets
    assert peer(relay.join(b, "cam", "connect"))[0]
    assert peer(a.read())[0]
    relay.rz.session_ended(b)
    assert peer(a.read()) == (False, "")
    relay.leave(a, "cam")
    relay.leave(a, "cam")  # twice, or for a room never joined: nothing happens
    relay.leave(a, "never")
    assert not relay.rz.rooms and not relay.rz.joined and not relay.rz.rooms_per_token
    consistent(relay.rz)


def test_the_same_instance_on_a_new_connection_takes_its_place_over(relay: Relay) -> None:
    """An agent back after an outage, before the relay saw its old connection die."""
    old, b = Session(), Session()
    relay.join(old, "cam", "listen", instance="inst-1")
    _, tb = peer(relay.join(b, "cam", "connect"))
    _, t_old = peer(old.read())
    new = Session()
    present, t_new = peer(relay.join(new, "cam", "listen", instance="inst-1"))
    assert present and t_new not in (t_old, tb)
    assert old.read() == [M.P2PLeave(name="cam")]  # replaced
    present_b, tb2 = peer(b.read())  # a new pairing: b is told again, with a fresh ticket
    assert present_b and tb2 != tb
    assert not relay.rz.has_ticket(t_old) and not relay.rz.has_ticket(tb)
    assert relay.stats["p2p_takeovers"] == 1
    relay.rz.session_ended(old)  # the old connection's end no longer touches the room
    assert b.read() == [] and len(relay.rz.rooms) == 1
    # Another instance does not take over; and an empty instance is nobody's.
    assert error(relay.join(Session(), "cam", "listen", instance="other")).code == "busy"
    relay.join(Session(), "door", "listen", instance="")
    assert error(relay.join(Session(), "door", "listen", instance="")).code == "busy"
    consistent(relay.rz)


def test_a_repeated_join_gives_a_fresh_ticket(relay: Relay) -> None:
    a, b = Session(), Session()
    relay.join(a, "cam", "listen")
    relay.join(b, "cam", "connect")
    _, t1 = peer(a.read())
    present, t2 = peer(relay.join(a, "cam", "listen"))
    assert present and t2 != t1 and not relay.rz.has_ticket(t1) and relay.rz.has_ticket(t2)
    assert b.read() == []
    consistent(relay.rz)


def test_rooms_per_token_are_limited(relay: Relay) -> None:
    a = Session()
    for i in range(3):
        assert peer(relay.join(a, f"r{i}", "listen")) == (False, "")
    err = error(relay.join(a, "r3", "listen"))
    assert (err.code, err.about, err.name) == ("limit", "join", "r3")
    assert "3 P2P rooms" in err.message
    assert peer(relay.join(Session(TOKEN_B), "r3", "listen")) == (False, "")  # another token
    relay.leave(a, "r0")
    assert peer(relay.join(a, "r3", "listen")) == (False, "")
    consistent(relay.rz)


def test_signals_without_a_peer_are_dropped_quietly(relay: Relay) -> None:
    a = Session()
    relay.signal(a, "nowhere", "x")
    relay.join(a, "cam", "listen")
    relay.signal(a, "cam", "x")
    assert a.read() == [] and relay.stats["p2p_signals_dropped"] == 2


def test_signals_are_rate_limited_per_connection(relay: Relay, clock: FakeClock) -> None:
    a, b = Session(), Session()
    relay.join(a, "cam", "listen")
    relay.join(b, "cam", "connect")
    a.read()
    big = "s" * M.MAX_SIGNAL
    cost = M.MAX_SIGNAL + rooms.SIGNAL_COST
    fits = (rooms.SIGNAL_BURST - rooms.SIGNAL_COST) // cost  # what is left after the JOIN
    assert fits == 7
    for _ in range(10):
        relay.signal(a, "cam", big)
    forwarded, refused = b.read(), a.read()
    assert len(forwarded) == fits and all(isinstance(m, M.P2PSignal) for m in forwarded)
    assert len(refused) == 10 - fits
    assert {(m.code, m.about, m.name) for m in refused} == {("rate", "signal", "cam")}  # type: ignore[attr-defined]
    assert relay.stats["p2p_rate_limited"] == len(refused)
    # The other direction has its own bucket.
    relay.signal(b, "cam", big)
    assert len(a.read()) == 1
    # The bucket refills at SIGNAL_RATE a second.
    clock.now += 1.0
    for _ in range(3):
        relay.signal(a, "cam", big)
    level = rooms.SIGNAL_BURST - rooms.SIGNAL_COST - fits * cost + rooms.SIGNAL_RATE
    assert len(b.read()) == level // cost == 2
    assert error(a.read()).code == "rate"
    # JOINs come out of the same bucket: once it is low, they are refused too.
    left = level - 2 * cost
    relay.signal(a, "cam", "s" * (left - rooms.SIGNAL_COST - 100))
    assert len(b.read()) == 1 and a.read() == []
    err = error(relay.join(a, "cam", "listen"))
    assert (err.code, err.about) == ("rate", "join")


def test_a_peer_that_does_not_read_gets_no_more_signals(relay: Relay) -> None:
    a, b = Session(), Session()
    relay.join(a, "cam", "listen")
    relay.join(b, "cam", "connect")
    a.read()
    b.unsent = rooms.MAX_PEER_BACKLOG + 1
    relay.signal(a, "cam", "x")
    assert b.read() == []
    err = error(a.read())
    assert (err.code, err.about) == ("rate", "signal") and "not reading" in err.message


@pytest.mark.parametrize(
    "msg",
    [
        M.P2PPeer(name="cam", present=True, ticket="t"),
        M.P2PError(name="cam", about="join", code="busy", message="m"),
        M.P2PJoined(),
        M.Ping(t=1),
    ],
    ids=lambda m: type(m).__name__,
)
def test_relay_only_messages_from_an_agent_are_a_protocol_error(relay: Relay, msg: Any) -> None:
    with pytest.raises(ProtocolError, match="unexpected"):
        relay.rz.on_message(Session(), msg)


# ---- the relay-fallback path ------------------------------------------------------------------


def test_two_data_connections_with_their_tickets_are_joined(relay: Relay) -> None:
    a, b = Session(), Session()
    relay.join(a, "cam", "listen")
    _, tb = peer(relay.join(b, "cam", "connect"))
    _, ta = peer(a.read())

    async def main() -> None:
        loop = asyncio.get_running_loop()
        a_far, a_near = socket.socketpair()
        b_far, b_near = socket.socketpair()
        for s in (a_far, a_near, b_far, b_near):
            s.setblocking(False)
        relay.rz.data_conn(a_near, ta)
        assert relay.spawned == [] and not relay.rz.has_ticket(ta)  # the first one waits
        relay.rz.data_conn(b_near, tb)
        (bridge,) = relay.spawned
        relay.spawned.clear()
        task = asyncio.ensure_future(bridge)
        marker = M.encode(M.P2PJoined())
        for far in (a_far, b_far):
            got = b""
            while len(got) < len(marker):
                got += await asyncio.wait_for(loop.sock_recv(far, len(marker) - len(got)), 10)
            assert got == marker
        await loop.sock_sendall(a_far, b"from a")
        assert await asyncio.wait_for(loop.sock_recv(b_far, 100), 10) == b"from a"
        assert relay.rz.paths[TOKEN_A] == 1
        a_far.close()
        b_far.close()
        await asyncio.wait_for(task, 10)
        assert not relay.rz.paths

    asyncio.run(main())
    assert relay.stats["p2p_bridged"] == 1


def test_a_ticket_of_an_ended_pairing_is_refused(relay: Relay) -> None:
    a, b = Session(), Session()
    relay.join(a, "cam", "listen")
    _, tb = peer(relay.join(b, "cam", "connect"))
    a.read()
    relay.join(a, "cam", "listen")  # a fresh ticket for a: b's is still this pairing's
    assert relay.rz.has_ticket(tb)
    relay.leave(a, "cam")
    assert not relay.rz.has_ticket(tb)  # the pairing ended with it
    consistent(relay.rz)


# ---- agents sending anything ----------------------------------------------------------------

NAMES = st.sampled_from(["cam", "door", "x" * M.MAX_ROOM_NAME])
ACTIONS = st.lists(
    st.one_of(
        st.tuples(
            st.just("join"),
            st.integers(0, 2),
            NAMES,
            st.sampled_from(M.ROLES),
            st.sampled_from(["i1", "i2", ""]),
        ),
        st.tuples(st.just("signal"), st.integers(0, 2), NAMES, st.text(max_size=64)),
        st.tuples(st.just("leave"), st.integers(0, 2), NAMES),
        st.tuples(st.just("end"), st.integers(0, 2)),
        st.tuples(st.just("tick"), st.integers(0, 2)),
    ),
    max_size=30,
)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ACTIONS)
def test_fuzz_rooms_stay_consistent(clock: FakeClock, actions: list[tuple[Any, ...]]) -> None:
    relay = Relay(max_rooms=2)
    sessions = [Session() for _ in range(3)]
    for action, who, *args in actions:
        s = sessions[who]
        if action == "join":
            relay.rz.on_message(s, M.P2PJoin(name=args[0], role=args[1], instance=args[2]))
        elif action == "signal":
            relay.signal(s, args[0], args[1])
        elif action == "leave":
            relay.leave(s, args[0])
        elif action == "tick":
            clock.now += 0.5
        else:
            relay.rz.session_ended(s)
            sessions[who] = Session()
        for other in sessions:
            for msg in other.read():
                assert isinstance(msg, (M.P2PPeer, M.P2PSignal, M.P2PLeave, M.P2PError))
        consistent(relay.rz)
    for s in sessions:
        relay.rz.session_ended(s)
    assert not relay.rz.rooms and not relay.rz.tickets
    assert not relay.rz.joined and not relay.rz.buckets and not relay.rz.rooms_per_token
    assert not relay.spawned


# ---- the agent's side -------------------------------------------------------------------------


class Wire:
    def __init__(self) -> None:
        self.sent: list[M.Message] = []
        self.connected = True

    def __call__(self, msg: M.Message) -> bool:
        if self.connected:
            M.encode(msg)
            self.sent.append(msg)
        return self.connected


def client() -> tuple[RoomClient, Wire]:
    wire = Wire()
    return RoomClient(wire, ("192.0.2.1", 7835), "192.0.2.1:7835"), wire


def test_client_join_sends_a_typed_join_and_waits_for_the_answer() -> None:
    async def main() -> None:
        rz, wire = client()
        joining = asyncio.ensure_future(rz.join("cam", "listen", timeout=10))
        await asyncio.sleep(0)
        (join,) = wire.sent
        assert isinstance(join, M.P2PJoin) and (join.name, join.role) == ("cam", "listen")
        assert rz.handle(M.P2PPeer(name="cam", present=True, ticket="tkt")) is True
        room = await joining
        assert room.peer_present and room.ticket == "tkt"
        assert rz.handle(M.P2PSignal(name="cam", data="offer")) is True
        assert await room.recv_signal(10) == "offer"
        room.send_signal("answer")
        assert wire.sent[-1] == M.P2PSignal(name="cam", data="answer")
        room.leave()
        assert wire.sent[-1:] == [M.P2PLeave(name="cam")] and "cam" not in rz.rooms
        # Messages about a room we left are taken, and change nothing.
        assert rz.handle(M.P2PSignal(name="cam", data="late")) is True

    asyncio.run(main())


def test_client_leaves_other_messages_to_the_agent() -> None:
    rz, _ = client()
    for msg in (M.Error(code="x", message="m"), M.Ping(t=1), M.Opened(tunnel="t", public="p")):
        assert rz.handle(msg) is False


@pytest.mark.parametrize("code", ["busy", "limit"])
def test_client_a_refused_join_fails_and_closes_the_room(code: str) -> None:
    async def main() -> None:
        rz, _ = client()
        joining = asyncio.ensure_future(rz.join("cam", "listen", timeout=10))
        await asyncio.sleep(0)
        rz.handle(M.P2PError(name="cam", about="join", code=code, message="no room for you"))
        with pytest.raises(RendezvousError, match="refused room 'cam': no room for you") as info:
            await joining
        assert info.value.code == code and "cam" not in rz.rooms

    asyncio.run(main())


def test_client_a_rate_limited_rejoin_keeps_the_room() -> None:
    """After a reconnection the agent joins its rooms again; a ``rate`` refusal of that
    JOIN fails the wait but the room stays (busy or limit would close it)."""

    async def main() -> None:
        rz, wire = client()
        joining = asyncio.ensure_future(rz.join("cam", "listen", timeout=10))
        await asyncio.sleep(0)
        rz.handle(M.P2PPeer(name="cam", present=True, ticket="t1"))
        room = await joining
        again = asyncio.ensure_future(rz.join_again(room, timeout=10))
        await asyncio.sleep(0)
        assert isinstance(wire.sent[-1], M.P2PJoin) and len(wire.sent) == 2
        rz.handle(M.P2PError(name="cam", about="join", code="rate", message="later"))
        with pytest.raises(RendezvousError) as info:
            await again
        assert info.value.code == "rate"
        assert not room.closed and rz.rooms["cam"] is room
        rz.handle(M.P2PError(name="cam", about="join", code="busy", message="taken"))
        assert room.closed and "cam" not in rz.rooms

    asyncio.run(main())


def test_client_a_refused_signal_is_counted_as_dropped() -> None:
    async def main() -> None:
        rz, _ = client()
        joining = asyncio.ensure_future(rz.join("cam", "connect", timeout=10))
        await asyncio.sleep(0)
        rz.handle(M.P2PPeer(name="cam", present=False, ticket=""))
        room = await joining
        events: list[tuple[str, dict[str, Any]]] = []
        room.on_event(lambda event, info: events.append((event, info)))
        rz.handle(M.P2PError(name="cam", about="signal", code="rate", message="too fast"))
        assert room.signals_dropped == 1 and not room.closed
        assert events == [("signal_dropped", {"reason": "relay: too fast"})]
        rz.handle(M.P2PLeave(name="cam"))  # another connection of ours took it over
        assert room.closed and "cam" not in rz.rooms

    asyncio.run(main())


def test_client_signals_need_a_peer_and_a_connection() -> None:
    async def main() -> None:
        rz, wire = client()
        joining = asyncio.ensure_future(rz.join("cam", "listen", timeout=10))
        await asyncio.sleep(0)
        rz.handle(M.P2PPeer(name="cam", present=False, ticket=""))
        room = await joining
        with pytest.raises(RendezvousError) as info:
            room.send_signal("x")
        assert info.value.code == "absent"
        rz.handle(M.P2PPeer(name="cam", present=True, ticket="t"))
        with pytest.raises(RendezvousError) as info:
            room.send_signal("é" * (M.MAX_SIGNAL // 6 + 1))
        assert info.value.code == "too-large"
        wire.connected = False
        with pytest.raises(RendezvousError) as info:
            room.send_signal("x")
        assert info.value.code == "disconnected"
        rz.detach()
        assert not room.peer_present and room.ticket == ""

    asyncio.run(main())


@pytest.mark.parametrize(
    ("name", "role", "code"),
    [("", "listen", "name"), ("a\nb", "listen", "name"), ("cam", "server", "role")],
)
def test_client_refuses_bad_joins_before_sending(name: str, role: str, code: str) -> None:
    async def main() -> None:
        rz, wire = client()
        with pytest.raises(RendezvousError) as info:
            await rz.join(name, role, timeout=10)
        assert info.value.code == code and wire.sent == [] and not rz.rooms

    asyncio.run(main())
