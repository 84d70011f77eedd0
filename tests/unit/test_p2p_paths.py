"""Datagram paths and the PathSwitch (natkit.p2p.paths), on loopback and with fake paths."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import cast

import aioice
import pytest
from hypothesis import given
from hypothesis import strategies as st

from natkit.errors import ProtocolError
from natkit.p2p.errors import P2PError
from natkit.p2p.paths import (
    DatagramPath,
    Deframer,
    IcePath,
    Liveness,
    PathEvent,
    PathSwitch,
    StreamPath,
    UdpPath,
    frame,
)
from natkit.p2p.udp_drain import GSO_MAX_BYTES, GSO_MAX_SEGMENTS, gso_groups, split_coalesced

# --------------------------------------------------------------------------- framing


def test_deframer_whole_split_and_many() -> None:
    datagrams = [b"a", b"", b"b" * 1500, b"\x00" * 3]
    stream = b"".join(frame(d) for d in datagrams)
    want = [d for d in datagrams if d]  # an empty frame carries nothing
    assert Deframer().feed(stream) == want
    d = Deframer()
    got = [x for i in range(len(stream)) for x in d.feed(stream[i : i + 1])]
    assert got == want


@given(st.lists(st.binary(max_size=1500), max_size=20), st.data())
def test_deframer_any_split(datagrams: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frame(d) for d in datagrams)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    d, got, last = Deframer(), [], 0
    for cut in [*cuts, len(stream)]:
        got += d.feed(stream[last:cut])
        last = cut
    assert got == [x for x in datagrams if x]


def test_deframer_refuses_oversize_frames() -> None:
    d = Deframer(max_size=1500)
    assert d.feed(frame(b"x" * 1500)) == [b"x" * 1500]
    with pytest.raises(ProtocolError, match="1501 bytes"):
        d.feed(b"\x05\xdd")  # only the length of a 1501-byte frame: refused at once
    with pytest.raises(ProtocolError):
        Deframer().feed(b"\xff\xff")


# --------------------------------------------------------------------------- real paths


class Inbox:
    def __init__(self) -> None:
        self.items: asyncio.Queue[bytes] = asyncio.Queue()
        self.lost: list[Exception | None] = []
        self.lost_event = asyncio.Event()

    def on_datagram(self, data: bytes) -> None:
        self.items.put_nowait(data)

    def on_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)
        self.lost_event.set()

    async def wait_lost(self) -> Exception | None:
        await asyncio.wait_for(self.lost_event.wait(), 5)  # a bound against hanging only
        return self.lost[0]

    async def get(self) -> bytes:
        return await asyncio.wait_for(self.items.get(), 5)


async def _stream_pair(**kwargs: int) -> tuple[StreamPath, StreamPath]:
    a, b = socket.socketpair()
    return await StreamPath.from_socket(a, **kwargs), await StreamPath.from_socket(b, **kwargs)


async def test_stream_path_round_trip() -> None:
    a, b = await _stream_pair()
    inbox = Inbox()
    b.set_receiver(inbox.on_datagram, inbox.on_lost)
    sizes = [1, 1200, 1500, 7]
    for n in sizes:
        a.send(bytes([n % 256]) * n)
    assert [len(await inbox.get()) for _ in sizes] == sizes
    assert a.kind == "relay" and a.sent == 4 and b.received == 4
    with pytest.raises(P2PError, match="1501 bytes"):
        a.send(b"x" * 1501)
    a.close()
    b.close()


async def test_stream_path_gives_up_on_a_peer_that_breaks_the_framing() -> None:
    ours, theirs = socket.socketpair()
    path = await StreamPath.from_socket(ours)
    inbox = Inbox()
    path.set_receiver(inbox.on_datagram, inbox.on_lost)
    theirs.sendall(frame(b"ok"))
    assert await inbox.get() == b"ok"
    theirs.sendall(b"\xff\xffjunk")
    assert isinstance(await inbox.wait_lost(), ProtocolError)
    assert not path.alive
    theirs.close()


async def test_stream_path_drops_rather_than_buffers_when_the_peer_stalls() -> None:
    ours, theirs = socket.socketpair()  # nobody reads `theirs`
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    path = await StreamPath.from_socket(ours, write_limit=64 * 1024)
    for _ in range(2000):  # 2.4 MB offered
        path.send(b"x" * 1200)
    assert path.dropped > 0
    transport = path._transport
    assert transport is not None and transport.get_write_buffer_size() <= 64 * 1024 + 1202
    path.close()
    theirs.close()


async def test_stream_path_reports_the_end_of_the_relay_connection() -> None:
    ours, theirs = socket.socketpair()
    path = await StreamPath.from_socket(ours)
    inbox = Inbox()
    path.set_receiver(inbox.on_datagram, inbox.on_lost)
    theirs.close()
    assert isinstance(await inbox.wait_lost(), P2PError)


async def _udp_pair() -> tuple[UdpPath, UdpPath]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
    socks[0].connect(socks[1].getsockname())
    socks[1].connect(socks[0].getsockname())
    return await UdpPath.from_socket(socks[0]), await UdpPath.from_socket(socks[1], "port-mapped")


async def test_udp_path_round_trip_and_early_datagrams() -> None:
    a, b = await _udp_pair()
    a.send(b"before anyone listens")
    await asyncio.sleep(0.05)  # let it arrive: it must be kept for the receiver
    inbox = Inbox()
    b.set_receiver(inbox.on_datagram, inbox.on_lost)
    assert await inbox.get() == b"before anyone listens"
    b.send(b"back")
    inbox_a = Inbox()
    a.set_receiver(inbox_a.on_datagram, inbox_a.on_lost)
    assert await inbox_a.get() == b"back"
    assert b.kind == "port-mapped"
    a.close()
    b.close()
    a.send(b"after close")
    assert a.dropped == 1


async def test_a_udp_path_sends_a_burst_in_order() -> None:
    """send_many: one segmented send per run of equal sizes where the kernel can (Linux),
    arriving as the datagrams they were, in order."""
    a, b = await _udp_pair()
    await asyncio.sleep(0)  # connection_made()
    # On Linux both ends do it with the kernel's help: a segmented send, a GRO read.
    on_linux = sys.platform == "linux"
    assert a._drainer is not None and a._drainer.segments == on_linux
    assert b._drainer is not None and b._drainer.reads_itself == on_linux
    inbox = Inbox()
    b.set_receiver(inbox.on_datagram, inbox.on_lost)
    burst = [bytes([i]) * 1200 for i in range(70)] + [b"short", b"x" * 900, b"y" * 900]
    a.send_many(burst)
    assert [await inbox.get() for _ in burst] == burst
    assert a.sent == len(burst) and a.dropped == 0
    a.close()
    b.close()


async def test_an_icmp_error_does_not_end_a_udp_path() -> None:
    """Reading the socket ourselves (GRO), a late ICMP error is reported, not fatal: the
    switch's probes judge the path."""
    a, b = await _udp_pair()
    inbox = Inbox()
    a.set_receiver(inbox.on_datagram, inbox.on_lost)
    b.close()
    await asyncio.sleep(0.05)
    for _ in range(3):
        a.send(b"to nobody")  # port unreachable comes back
        await asyncio.sleep(0.05)
    assert a.alive and not inbox.lost
    a.close()


@given(st.binary(max_size=5000), st.integers(0, 1500))
def test_split_coalesced_restores_the_datagrams(data: bytes, segment: int) -> None:
    parts = split_coalesced(data, segment)
    assert b"".join(parts) == data
    if segment:
        assert all(len(p) == segment for p in parts[:-1]) and len(parts[-1]) <= segment
    else:
        assert parts == [data]


@given(st.lists(st.integers(0, 3000), max_size=300))
def test_gso_groups_keep_order_and_the_kernel_limits(sizes: list[int]) -> None:
    datagrams = [bytes(n) for n in sizes]
    groups = gso_groups(datagrams)
    assert [d for g in groups for d in g] == datagrams
    for group in groups:
        size = len(group[0])
        assert all(len(d) == size for d in group[:-1]) and len(group[-1]) <= size
        assert len(group) <= GSO_MAX_SEGMENTS
        assert len(group) == 1 or (size * len(group) <= GSO_MAX_BYTES and len(group[-1]) > 0)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(P2PError, match="unknown path kind"):
        UdpPath("wormhole")


@pytest.fixture
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    # aioice leaves out 127.0.0.1 and would use the host's real interfaces: loopback only.
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


async def ice_pair() -> tuple[aioice.Connection, aioice.Connection]:
    a = aioice.Connection(ice_controlling=True, use_ipv6=False)
    b = aioice.Connection(ice_controlling=False, use_ipv6=False)
    await asyncio.gather(a.gather_candidates(), b.gather_candidates())
    for x, y in ((a, b), (b, a)):
        for c in y.local_candidates:
            await x.add_remote_candidate(c)
        await x.add_remote_candidate(None)
        x.remote_username, x.remote_password = y.local_username, y.local_password
    await asyncio.wait_for(asyncio.gather(a.connect(), b.connect()), 10)
    return a, b


async def test_ice_path_round_trip_and_loss(loopback_ice: None) -> None:
    ca, cb = await ice_pair()
    a, b = IcePath(ca), IcePath(cb, "turn")
    inbox_a, inbox_b = Inbox(), Inbox()
    a.set_receiver(inbox_a.on_datagram, inbox_a.on_lost)
    b.set_receiver(inbox_b.on_datagram, inbox_b.on_lost)
    for i in range(10):
        a.send(b"ping %d" % i)
    assert [await inbox_b.get() for _ in range(10)] == [b"ping %d" % i for i in range(10)]
    b.send(b"pong")
    assert await inbox_a.get() == b"pong"
    await cb.close()  # the far end's connection goes away under b
    await inbox_b.wait_lost()
    assert not b.alive
    a.close()
    await a.wait_closed()
    b.close()
    await b.wait_closed()


# --------------------------------------------------------------------------- the switch


class FakePath:
    """A path whose far end (a fake session) answers the switch's probes while ``peer_up``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.peer_up = True
        self.sent: list[bytes] = []
        self.probes: list[bytes] = []  # tokens the switch asked the session to send here
        self.closed = False
        self._rx: Callable[[bytes], None] | None = None
        self._lost: Callable[[Exception | None], None] | None = None

    @property
    def alive(self) -> bool:
        return not self.closed

    def set_receiver(
        self, on_datagram: Callable[[bytes], None], on_lost: Callable[[Exception | None], None]
    ) -> None:
        self._rx, self._lost = on_datagram, on_lost

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def send_many(self, datagrams: Sequence[bytes]) -> None:
        self.sent.extend(datagrams)

    def inject(self, data: bytes) -> None:
        assert self._rx is not None
        self._rx(data)

    def fail(self) -> None:
        self.closed = True
        assert self._lost is not None
        self._lost(ConnectionResetError("gone"))

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        return None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Iterator[Clock]:
    yield Clock()


LV = Liveness(probe_after=1.0, dead_after=5.0, standby_interval=10.0)
Got = list[tuple[str, bytes]]


async def make_switch(clock: Clock, *paths: FakePath) -> tuple[PathSwitch, list[PathEvent], Got]:
    switch = PathSwitch(paths[0], paths[1:], liveness=LV, clock=clock)
    events: list[PathEvent] = []
    got: Got = []
    switch.on_event(events.append)
    switch.set_receiver(lambda path, data: got.append((path.kind, data)))

    def prober(path: DatagramPath, token: bytes) -> bool:
        # What the session does: the token goes inside QUIC; the peer's authenticated
        # answer comes back through confirm().
        fake = cast(FakePath, path)
        fake.probes.append(token)
        if fake.peer_up:
            switch.confirm(path, token)
        return True

    switch.set_prober(prober)
    switch.check()  # the standbys' first probes (the switch's own tick does this too)
    return switch, events, got


def brief(events: list[PathEvent]) -> list[tuple[str, str, str]]:
    return [(e.type, e.path.kind, e.reason) for e in events]


async def test_sends_on_active_and_takes_datagrams_from_every_path(clock: Clock) -> None:
    direct, relay = FakePath("direct"), FakePath("relay")
    switch, events, got = await make_switch(clock, direct, relay)
    switch.send(b"\x40quic")
    direct.inject(b"\x40from direct")
    relay.inject(b"\x40from relay")  # the peer may still be on another path
    assert direct.sent == [b"\x40quic"] and relay.sent == []
    assert got == [("direct", b"\x40from direct"), ("relay", b"\x40from relay")]
    assert switch.kind == "direct" and events == []


async def test_datagrams_prove_nothing_only_confirmations_do(clock: Clock) -> None:
    """A forger's datagrams neither keep a dead path alive nor draw the switch away."""
    direct, relay = FakePath("direct"), FakePath("relay")
    switch, events, got = await make_switch(clock, direct, relay)
    relay.peer_up = False
    clock.now += LV.standby_interval
    switch.check()  # relay probed, no answer
    for _ in range(10):
        clock.now += 1.0
        relay.inject(b"\x40forged")  # what an on-path forger can send
        switch.check()
    assert brief(events) == [("dead", "relay", "")] and not switch.is_live(relay)
    # The active path goes quiet; forged traffic on the standby does not move the session.
    direct.peer_up = False
    switch.send(b"\x40data")
    clock.now += LV.probe_after
    relay.inject(b"\x40forged")
    assert switch.active is direct
    assert len(got) == 11  # all delivered to the session, which drops what fails to decrypt


async def test_dead_active_path_fails_over_to_the_best_live_standby(clock: Clock) -> None:
    direct, relay, turn = FakePath("direct"), FakePath("relay"), FakePath("turn")
    switch, events, _ = await make_switch(clock, direct, relay, turn)
    direct.peer_up = False
    probes = len(direct.probes)
    switch.send(b"\x40data")  # now an answer is expected
    clock.now += 1.0
    switch.check()
    assert len(direct.probes) == probes + 1  # silent for probe_after: probed
    clock.now += 3.9
    switch.check()
    assert events == [] and switch.active is direct
    clock.now += 0.1
    switch.check()
    assert brief(events) == [("dead", "direct", ""), ("switched", "turn", "dead")]
    assert events[1].previous is direct and switch.active is turn and not switch.is_live(direct)


async def test_a_dead_path_that_answers_again_is_announced_and_can_be_switched_back(
    clock: Clock,
) -> None:
    direct, relay = FakePath("direct"), FakePath("relay")
    switch, events, _ = await make_switch(clock, direct, relay)
    direct.peer_up = False
    switch.send(b"\x40data")
    clock.now += 5.0
    switch.check()
    assert switch.active is relay
    direct.peer_up = True
    clock.now += LV.standby_interval  # standbys are probed this often
    switch.check()
    assert brief(events)[-1] == ("alive", "direct", "")
    assert switch.is_live(direct)
    switch.switch(direct)
    assert brief(events)[-1] == ("switched", "direct", "owner") and switch.kind == "direct"


async def test_a_lost_active_path_fails_over_at_once(clock: Clock) -> None:
    direct, relay = FakePath("direct"), FakePath("relay")
    switch, events, _ = await make_switch(clock, direct, relay)
    direct.fail()
    assert brief(events) == [("lost", "direct", "gone"), ("switched", "relay", "lost")]
    switch.send(b"\x40after")
    assert relay.sent == [b"\x40after"]


async def test_follows_the_peer_to_a_standby_when_the_active_path_goes_quiet(clock: Clock) -> None:
    direct, relay = FakePath("direct"), FakePath("relay")
    switch, events, got = await make_switch(clock, direct, relay)
    direct.peer_up = False
    switch.send(b"\x40data")
    probes = len(relay.probes)
    relay.inject(b"\x40early")  # not yet suspicious: the active path was silent < probe_after
    assert switch.active is direct and len(relay.probes) == probes
    clock.now += LV.probe_after
    relay.inject(b"\x40peer moved")  # traffic on the standby: probed at once ...
    assert len(relay.probes) == probes + 1
    assert brief(events) == [("switched", "relay", "peer")]  # ... and its answer moves us
    assert got == [("relay", b"\x40early"), ("relay", b"\x40peer moved")]


async def test_without_a_standby_a_dead_path_is_reported_and_kept(clock: Clock) -> None:
    direct = FakePath("direct")
    switch, events, _ = await make_switch(clock, direct)
    direct.peer_up = False
    switch.send(b"\x40data")
    for _ in range(10):
        clock.now += 1.0
        switch.check()
    assert brief(events) == [("dead", "direct", "")]  # once, not on every check
    assert switch.active is direct


async def test_an_unsolicited_or_replayed_probe_answer_proves_nothing(clock: Clock) -> None:
    direct, relay = FakePath("direct"), FakePath("relay")
    switch, events, _ = await make_switch(clock, direct, relay)
    answered = relay.probes[-1]  # answered at the first check
    relay.peer_up = False
    clock.now += LV.standby_interval
    switch.check()
    clock.now += LV.dead_after
    switch.check()
    assert brief(events) == [("dead", "relay", "")]
    switch.confirm(relay, b"forged!!")
    switch.confirm(relay, answered)  # an old answer, replayed: each counts once
    switch.confirm(direct, relay.probes[-1])  # a token of the relay's, on another path
    assert not switch.is_live(relay)
    switch.confirm(relay, relay.probes[-1])  # the real answer, late
    assert switch.is_live(relay)


async def test_an_idle_path_is_not_declared_dead(clock: Clock) -> None:
    direct, relay = FakePath("direct"), FakePath("relay")
    switch, events, _ = await make_switch(clock, direct, relay)
    direct.peer_up = False  # nothing is sent, so nothing is expected on the active path
    for _ in range(100):
        clock.now += 1.0
        switch.check()
    assert events == [] and switch.active is direct
    assert len(relay.probes) >= 10  # standbys are kept warm (NAT bindings) all the same


async def test_close_closes_every_path(clock: Clock) -> None:
    direct, relay = FakePath("direct"), FakePath("relay")
    switch, _, _ = await make_switch(clock, direct, relay)
    switch.close()
    await switch.wait_closed()
    assert direct.closed and relay.closed


async def test_a_udp_path_reads_what_waits_in_one_go() -> None:
    """asyncio reads one datagram per loop iteration; the path drains the rest at once, so
    the session gets a batch (and QUIC one receive_many_datagrams call)."""
    a, b = (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
    )
    for s in (a, b):
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
    a.connect(b.getsockname())
    b.connect(a.getsockname())
    path = await UdpPath.from_socket(b)
    got: list[bytes] = []
    first = asyncio.Event()
    path.set_receiver(lambda d: (got.append(d), first.set())[0], lambda exc: None)
    for i in range(20):
        a.send(b"%02d" % i)  # all queued in the kernel before the loop looks
    await asyncio.wait_for(first.wait(), 5)  # a bound against hanging only
    # One wake-up of asyncio's reader delivered them all (without draining: one).
    assert got == [b"%02d" % i for i in range(20)]
    path.close()
    a.close()
