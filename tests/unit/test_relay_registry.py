"""The relay's bookkeeping as plain objects with a fake clock: data-connection tickets bound
to their mode (natkit.relay.tickets), who holds which port and host name
(natkit.relay.names), per-address bounds on unauthenticated peers (natkit.relay.limits)
and the tokens file (natkit.relay.tenants)."""

from __future__ import annotations

import pytest

from natkit.errors import NatkitError
from natkit.relay.control import ticket_handle
from natkit.relay.limits import AddressLimits, address_key
from natkit.relay.names import Holder, NameRefused, TunnelNames, host_key, port_key
from natkit.relay.tenants import MIN_TOKEN, Quota, Tenant, TenantError, parse_tenants
from natkit.relay.tickets import TicketBook, TicketRefused


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---- tickets ----------------------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def book(clock: Clock) -> TicketBook[str]:
    return TicketBook(clock, ttl=10.0)


def test_issue_gives_distinct_url_safe_tickets(book: TicketBook[str]) -> None:
    tickets = book.issue("t1", 5, sealed=True) + book.issue("t2", 3, sealed=False)
    assert len(set(tickets)) == 8 == len(book)
    assert all(len(t) == 24 and t.replace("-", "").replace("_", "").isalnum() for t in tickets)
    assert book.outstanding("t1") == 5 and book.outstanding("t2") == 3
    assert book.outstanding("nobody") == 0
    assert book.issue("t3", 0, sealed=True) == []


def test_a_plain_ticket_is_taken_once_in_clear(book: TicketBook[str]) -> None:
    (ticket,) = book.issue("tunnel", 1, sealed=False)
    assert book.take_plain(ticket) == "tunnel"
    assert book.outstanding("tunnel") == 0 and len(book) == 0
    with pytest.raises(TicketRefused, match="a used ticket shown again") as info:
        book.take_plain(ticket)  # a replay: its tunnel is told
    assert info.value.owner == "tunnel"


def test_an_unknown_ticket_names_nobody(book: TicketBook[str]) -> None:
    book.issue("tunnel", 1, sealed=True)
    for shown in ("never-issued", ticket_handle("never-issued")):
        for take in (book.take_plain, book.take_sealed):
            with pytest.raises(TicketRefused, match="an unknown or used ticket") as info:
                take(shown)
            assert info.value.owner is None
    assert book.outstanding("tunnel") == 1


def test_a_sealed_ticket_is_taken_once_by_its_handle(book: TicketBook[str]) -> None:
    (ticket,) = book.issue("tunnel", 1, sealed=True)
    assert book.take_sealed(ticket_handle(ticket)) == (ticket, "tunnel")
    assert len(book) == 0 and book.outstanding("tunnel") == 0
    for replay in (book.take_sealed, book.take_plain):
        with pytest.raises(TicketRefused, match="used ticket shown again") as info:
            replay(ticket_handle(ticket))
        assert info.value.owner == "tunnel"
    with pytest.raises(TicketRefused, match="used ticket shown again"):
        book.take_plain(ticket)


def test_a_replay_is_reported_for_the_ttl_only(book: TicketBook[str], clock: Clock) -> None:
    (ticket,) = book.issue("tunnel", 1, sealed=False)
    book.take_plain(ticket)
    clock.advance(9.99)
    book.expire()
    with pytest.raises(TicketRefused) as info:
        book.take_plain(ticket)
    assert info.value.owner == "tunnel"
    clock.advance(0.01)
    book.expire()
    with pytest.raises(TicketRefused, match="an unknown or used ticket") as info:
        book.take_plain(ticket)
    assert info.value.owner is None


def test_a_sealed_ticket_is_not_found_by_the_ticket_itself(book: TicketBook[str]) -> None:
    (ticket,) = book.issue("tunnel", 1, sealed=True)
    with pytest.raises(TicketRefused):
        book.take_sealed(ticket)  # the opening carries the handle, never the ticket
    assert book.take_sealed(ticket_handle(ticket)) == (ticket, "tunnel")


@pytest.mark.parametrize("shown", ["ticket", "handle"])
def test_a_sealed_ticket_shown_in_clear_is_interference_and_revoked(
    book: TicketBook[str], shown: str
) -> None:
    """Someone on the path lifted it: refused, its tunnel named, and it is dead."""
    ticket, spare = book.issue("tunnel", 2, sealed=True)
    with pytest.raises(TicketRefused, match="sealed tunnel shown on a plaintext") as info:
        book.take_plain(ticket if shown == "ticket" else ticket_handle(ticket))
    assert info.value.owner == "tunnel"
    assert isinstance(info.value, NatkitError)
    with pytest.raises(TicketRefused, match="used ticket shown again") as info:
        book.take_sealed(ticket_handle(ticket))  # revoked: not even the agent may use it now
    assert info.value.owner == "tunnel"
    assert book.outstanding("tunnel") == 1  # the other ticket is untouched
    assert book.take_sealed(ticket_handle(spare)) == (spare, "tunnel")


def test_a_plain_ticket_cannot_be_taken_sealed(book: TicketBook[str]) -> None:
    (ticket,) = book.issue("tunnel", 1, sealed=False)
    with pytest.raises(TicketRefused) as info:
        book.take_sealed(ticket_handle(ticket))
    assert info.value.owner is None
    with pytest.raises(TicketRefused):
        book.take_sealed(ticket)
    assert book.take_plain(ticket) == "tunnel"  # still good for what it was issued for
    with pytest.raises(TicketRefused):
        book.take_plain(ticket_handle(ticket))  # a plain ticket's handle names nothing


def test_tickets_expire_after_the_ttl_and_say_whose(book: TicketBook[str], clock: Clock) -> None:
    old = book.issue("a", 2, sealed=True) + book.issue("b", 1, sealed=False)
    clock.advance(5)
    new = book.issue("c", 1, sealed=True)
    assert book.expire() == set()
    clock.advance(4.99)
    assert book.expire() == set() and len(book) == 4
    clock.advance(0.01)  # the first ones are exactly ttl old
    assert book.expire() == {"a", "b"}
    assert len(book) == 1 and book.outstanding("a") == book.outstanding("b") == 0
    with pytest.raises(TicketRefused):
        book.take_sealed(ticket_handle(old[0]))
    with pytest.raises(TicketRefused):
        book.take_plain(old[2])
    clock.advance(5)
    assert book.expire() == {"c"}
    with pytest.raises(TicketRefused):
        book.take_sealed(ticket_handle(new[0]))
    assert book.expire() == set()


def test_drop_forgets_a_tunnel_s_tickets(book: TicketBook[str]) -> None:
    mine = book.issue("gone", 2, sealed=True) + book.issue("gone", 1, sealed=False)
    (theirs,) = book.issue("kept", 1, sealed=True)
    book.drop("gone")
    book.drop("never-issued")
    assert len(book) == 1 and book.outstanding("gone") == 0
    for ticket in mine:
        with pytest.raises(TicketRefused):
            book.take_plain(ticket)
        with pytest.raises(TicketRefused):
            book.take_sealed(ticket_handle(ticket))
    assert book.take_sealed(ticket_handle(theirs)) == (theirs, "kept")


# ---- names ------------------------------------------------------------------------------------

A1, A2, B1 = Holder("alice", "a-one"), Holder("alice", "a-two"), Holder("bob", "b-one")
GRACE = 30.0


class Tun:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<Tun {self.name}>"


@pytest.fixture
def names(clock: Clock) -> TunnelNames[Tun]:
    return TunnelNames(clock, GRACE)


def test_a_free_name_is_claimed(names: TunnelNames[Tun]) -> None:
    t = Tun("t")
    key = host_key("app.example")
    assert names.problem(key, A1) == ""
    assert names.claim(key, A1, t) is None
    claim = names.get(key)
    assert claim is not None and claim.holder == A1 and claim.tunnel is t
    assert names.tunnel(key) is t and names.live() == 1
    assert names.count("alice", "host") == 1 and names.count("alice", "tcp") == 0
    assert (host_key("x"), port_key(20000)) == ("host:x", "tcp:20000")


@pytest.mark.parametrize("key", [host_key("app.example"), port_key(20000)])
def test_another_tenant_is_refused_live_and_reserved(
    names: TunnelNames[Tun], clock: Clock, key: str
) -> None:
    t = Tun("alice's")
    names.claim(key, A1, t)
    what = "port 20000" if key.startswith("tcp") else "host name app.example"
    for takeover in (False, True):  # not even with takeover
        assert names.problem(key, B1, takeover=takeover) == (
            f"{what} is held by another tunnel (another token's)"
        )
        with pytest.raises(NameRefused, match="another token"):
            names.claim(key, B1, Tun("bob's"), takeover=takeover)
    names.release(key, t, keep=True)  # alice's agent went away: reserved for her
    assert names.tunnel(key) is None and names.get(key) is not None
    with pytest.raises(NameRefused, match="another token"):
        names.claim(key, B1, Tun("bob's"))
    clock.advance(GRACE - 0.001)
    with pytest.raises(NameRefused):
        names.claim(key, B1, Tun("bob's"))
    clock.advance(0.001)  # the grace is over: free
    assert names.get(key) is None
    assert names.claim(key, B1, Tun("bob's")) is None


def test_the_same_instance_coming_back_displaces_its_old_tunnel(names: TunnelNames[Tun]) -> None:
    old, new = Tun("old"), Tun("new")
    names.claim(port_key(20001), A1, old)
    assert names.claim(port_key(20001), A1, new) is old
    assert names.tunnel(port_key(20001)) is new and names.live() == 1
    names.release(port_key(20001), old, keep=True)  # the old tunnel's late goodbye: ignored
    assert names.tunnel(port_key(20001)) is new


def test_another_instance_of_the_tenant_needs_takeover(names: TunnelNames[Tun]) -> None:
    first, second = Tun("first"), Tun("second")
    names.claim(host_key("app.example"), A1, first)
    why = names.problem(host_key("app.example"), A2)
    assert "held by another live agent of this token" in why and "--takeover" in why
    with pytest.raises(NameRefused, match="take it over explicitly"):
        names.claim(host_key("app.example"), A2, second)
    assert names.tunnel(host_key("app.example")) is first
    assert names.claim(host_key("app.example"), A2, second, takeover=True) is first
    assert names.get(host_key("app.example")).holder == A2  # type: ignore[union-attr]


def test_a_reservation_is_for_any_instance_of_the_tenant(
    names: TunnelNames[Tun], clock: Clock
) -> None:
    """A restarted agent is a new process (a new instance): it gets its names back."""
    t = Tun("before")
    names.claim(host_key("app.example"), A1, t)
    names.release(host_key("app.example"), t, keep=True)
    assert names.reserved_for("alice", "host") == ["host:app.example"]
    assert names.live() == 0 and names.count("alice", "host") == 1  # a reservation counts
    clock.advance(GRACE / 2)
    assert names.problem(host_key("app.example"), A2) == ""
    after = Tun("after")
    assert names.claim(host_key("app.example"), A2, after) is None  # nothing live displaced
    assert names.tunnel(host_key("app.example")) is after
    assert names.reserved_for("alice", "host") == []
    clock.advance(GRACE)  # a live claim does not expire
    assert names.tunnel(host_key("app.example")) is after


def test_release_without_keep_or_without_grace_frees(clock: Clock) -> None:
    names: TunnelNames[Tun] = TunnelNames(clock, GRACE)
    t = Tun("t")
    names.claim(port_key(1), A1, t)
    names.release(port_key(1), t, keep=False)
    assert names.get(port_key(1)) is None and names.count("alice", "tcp") == 0
    no_grace: TunnelNames[Tun] = TunnelNames(clock, 0)
    no_grace.claim(port_key(1), A1, t)
    no_grace.release(port_key(1), t, keep=True)
    assert no_grace.get(port_key(1)) is None
    assert no_grace.claim(port_key(1), B1, Tun("bob")) is None
    no_grace.release(port_key(2), t, keep=True)  # never held: nothing happens


@pytest.mark.parametrize(
    ("held", "wanted"),
    [
        ("shop.example", "x.shop.example"),  # under another tenant's name
        ("x.shop.example", "shop.example"),  # above it
        ("shop.example", "a.b.shop.example"),
    ],
)
def test_host_names_nest_across_tenants(names: TunnelNames[Tun], held: str, wanted: str) -> None:
    t = Tun("alice")
    names.claim(host_key(held), A1, t)
    why = names.problem(host_key(wanted), B1)
    assert f"nests with {held}, which another token holds" in why
    with pytest.raises(NameRefused, match="nests with"):
        names.claim(host_key(wanted), B1, Tun("bob"))
    # Reserved names nest too.
    names.release(host_key(held), t, keep=True)
    with pytest.raises(NameRefused, match="nests with"):
        names.claim(host_key(wanted), B1, Tun("bob"))
    # The same tenant nests its own names freely.
    assert names.claim(host_key(wanted), A2, Tun("alice 2")) is None


def test_only_whole_labels_nest(names: TunnelNames[Tun]) -> None:
    names.claim(host_key("shop.example"), A1, Tun("alice"))
    for other in ("myshop.example", "shop.example.org", "hop.example", "example.shop"):
        assert names.problem(host_key(other), B1) == "", other
    # Ports never nest with host names.
    names.claim(port_key(20000), A1, Tun("alice port"))
    assert names.problem(port_key(20001), B1) == ""


def test_reserved_hosts_are_one_tenant_s_with_every_name_under_them(clock: Clock) -> None:
    names: TunnelNames[Tun] = TunnelNames(clock, GRACE, {"shop.example": "alice"})
    for host in ("shop.example", "www.shop.example", "a.b.shop.example", "example"):
        why = names.problem(host_key(host), B1)
        assert why == f"host name {host} is reserved on this relay for another token", host
        with pytest.raises(NameRefused, match="reserved on this relay"):
            names.claim(host_key(host), B1, Tun("bob"), takeover=True)
    assert names.problem(host_key("other.example"), B1) == ""
    assert names.claim(host_key("www.shop.example"), A1, Tun("alice")) is None
    assert names.claim(host_key("shop.example"), A2, Tun("alice 2")) is None


def test_count_live_and_evict_oldest_reservation(names: TunnelNames[Tun], clock: Clock) -> None:
    tunnels = {p: Tun(str(p)) for p in (1, 2, 3)}
    for port, t in tunnels.items():
        names.claim(port_key(port), A1, t)
    names.claim(host_key("app.example"), A1, Tun("host"))
    names.claim(port_key(9), B1, Tun("bob"))
    assert names.count("alice", "tcp") == 3 and names.count("alice", "host") == 1
    assert names.count("bob", "tcp") == 1 and names.live() == 5
    assert not names.evict_oldest_reservation("alice", "tcp")  # none reserved: nothing to free
    names.release(port_key(2), tunnels[2], keep=True)
    clock.advance(1)
    names.release(port_key(1), tunnels[1], keep=True)
    assert names.count("alice", "tcp") == 3 and names.live() == 3
    assert sorted(names.reserved_for("alice", "tcp")) == ["tcp:1", "tcp:2"]
    assert names.evict_oldest_reservation("alice", "tcp")  # port 2 ends first
    assert names.get(port_key(2)) is None and names.get(port_key(1)) is not None
    assert not names.evict_oldest_reservation("alice", "host")
    assert not names.evict_oldest_reservation("bob", "tcp")
    assert names.evict_oldest_reservation("alice", "tcp")
    assert names.count("alice", "tcp") == 1 and names.tunnel(port_key(3)) is tunnels[3]


def test_expire_forgets_ended_reservations(names: TunnelNames[Tun], clock: Clock) -> None:
    t = Tun("t")
    names.claim(port_key(1), A1, t)
    names.release(port_key(1), t, keep=True)
    clock.advance(GRACE)
    names.expire()
    assert names.reserved_for("alice", "tcp") == [] and names.count("alice", "tcp") == 0


# ---- per-address limits ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_address_key(ip: str, key: str) -> None:
    assert address_key(ip) == key


def test_per_address_cap_and_done(clock: Clock) -> None:
    limits = AddressLimits(clock, per_address=2, total=100)
    assert limits.admit("192.0.2.1") == limits.admit("192.0.2.1") == ""
    assert limits.admit("192.0.2.1") == "over 2 unauthenticated connections from one address"
    assert limits.admit("192.0.2.2") == ""  # another address has its own
    assert limits.unauthenticated == 3
    limits.done("192.0.2.1")
    assert limits.unauthenticated == 2
    assert limits.admit("192.0.2.1") == ""
    for _ in range(2):
        limits.done("192.0.2.1")
    limits.done("192.0.2.2")
    assert limits.unauthenticated == 0 and not limits.pending
    limits.done("192.0.2.9")  # never admitted: harmless
    assert limits.unauthenticated == 0 and not limits.pending


def test_total_cap(clock: Clock) -> None:
    limits = AddressLimits(clock, per_address=10, total=3)
    for i in range(3):
        assert limits.admit(f"192.0.2.{i}") == ""
    assert limits.admit("192.0.2.99") == "over 3 unauthenticated connections in all"
    limits.done("192.0.2.0")
    assert limits.admit("192.0.2.99") == ""


def test_ipv6_counts_by_64_and_v4_mapped_as_v4(clock: Clock) -> None:
    limits = AddressLimits(clock, per_address=2, total=100)
    assert limits.admit("2001:db8:1:2::1") == ""
    assert limits.admit("2001:db8:1:2:ffff:ffff:ffff:ffff") == ""
    assert "from one address" in limits.admit("2001:db8:1:2::99")  # the same /64
    assert limits.admit("2001:db8:1:3::1") == ""  # the next /64
    assert limits.admit("192.0.2.7") == ""
    assert limits.admit("::ffff:192.0.2.7") == ""
    assert "from one address" in limits.admit("192.0.2.7")
    limits.done("::ffff:192.0.2.7")
    assert limits.admit("192.0.2.7") == ""
    assert limits.pending["2001:db8:1:2::/64"] == 2


def test_failed_logins_log_once_per_burst_then_block(clock: Clock) -> None:
    limits = AddressLimits(clock, failures=4, window=60, block=30)
    ip = "192.0.2.5"
    assert limits.login_failed(ip) == f"agent {ip} failed authentication"
    assert limits.login_failed(ip) == ""
    assert limits.login_failed(ip) == ""
    assert not limits.blocked(ip) and limits.admit(ip) == ""
    limits.done(ip)
    line = limits.login_failed(ip)
    assert line == ("4 failed logins from 192.0.2.5 within 60 s: refusing its connections for 30 s")
    assert limits.blocked(ip)
    assert limits.admit(ip) == "too many failed logins"
    assert limits.unauthenticated == 0  # a refused connection holds nothing
    assert not limits.blocked("192.0.2.6") and limits.admit("192.0.2.6") == ""
    clock.advance(29.9)
    assert limits.blocked(ip)
    clock.advance(0.1)  # the block is over
    assert not limits.blocked(ip) and limits.admit(ip) == ""


def test_failed_logins_count_per_64(clock: Clock) -> None:
    limits = AddressLimits(clock, failures=3, window=60, block=30)
    assert limits.login_failed("2001:db8::1") == "agent 2001:db8::1 failed authentication"
    assert limits.login_failed("2001:db8::2") == ""
    assert "from 2001:db8::/64" in limits.login_failed("2001:db8::3")
    assert limits.blocked("2001:db8::ffff") and not limits.blocked("2001:db8:0:1::1")


def test_failures_spread_out_past_the_window_do_not_block(clock: Clock) -> None:
    limits = AddressLimits(clock, failures=3, window=60, block=30)
    ip = "192.0.2.5"
    for _ in range(5):
        assert limits.login_failed(ip).startswith("agent ")  # each one a new burst
        limits.login_failed(ip)
        clock.advance(61)
    assert not limits.blocked(ip)


def test_expire_forgets_old_failures_but_not_blocks(clock: Clock) -> None:
    limits = AddressLimits(clock, failures=2, window=10, block=100)
    limits.login_failed("192.0.2.1")
    limits.login_failed("192.0.2.2")
    limits.login_failed("192.0.2.2")  # blocked for 100 s
    clock.advance(11)
    limits.expire()
    # (the failure table is private; what it holds is the point of expire)
    assert set(limits._failed) == {"192.0.2.2"}
    assert limits.blocked("192.0.2.2")
    clock.advance(100)
    limits.expire()
    assert limits._failed == {} and not limits.blocked("192.0.2.2")


# ---- tenants --------------------------------------------------------------------------------

TOKEN = "0123456789abcdef"  # MIN_TOKEN characters


def test_tokens_file_lines() -> None:
    lines = [
        "# LABEL:TOKEN [quotas] [reserve=...]",
        "",
        f"alice:{TOKEN}a tunnels=4 ports=2 reserve=Shop.Example.,blog",
        "   ",
        f"bob:{TOKEN}b sessions=1 hostnames=0",
        f"  {TOKEN}c  ",  # no label: named after its line
        "   # an indented comment",
    ]
    alice, bob, anon = parse_tenants(lines)
    assert alice == Tenant(
        "alice", TOKEN + "a", Quota(tunnels=4, ports=2), ("shop.example", "blog")
    )
    assert bob == Tenant("bob", TOKEN + "b", Quota(sessions=1, hostnames=0))
    assert anon == Tenant("token6", TOKEN + "c", Quota(), ())
    assert Quota() == Quota(sessions=8, tunnels=16, ports=16, hostnames=16)
    assert parse_tenants([]) == [] and parse_tenants(["# only", ""]) == []


def test_a_default_quota_applies_where_a_line_sets_none() -> None:
    default = Quota(sessions=1, tunnels=2, ports=3, hostnames=4)
    (t,) = parse_tenants([f"a:{TOKEN} ports=9"], default)
    assert t.quota == Quota(sessions=1, tunnels=2, ports=9, hostnames=4)


def test_reserve_skips_empty_names_and_normalises() -> None:
    (t,) = parse_tenants([f"a:{TOKEN} reserve=,x,,Y.Example.,"])
    assert t.reserve == ("x", "y.example")
    with pytest.raises(TenantError, match=r"'y\.example' is not KEY=VALUE"):
        parse_tenants([f"a:{TOKEN} reserve=x, y.example"])  # a space ends the setting


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("alice:short", "token 'alice' is too short: use at least 16 random characters"),
        ("0123456789abcde", "token '0123456789abcde' (15 characters) is too short"),
        (f"alice:{TOKEN} tunnels", "token 'alice': 'tunnels' is not KEY=VALUE"),
        (f"alice:{TOKEN} tunnel=3", "token 'alice': unknown setting 'tunnel' (known: sessions, "
         "tunnels, ports, hostnames, reserve)"),
        (f"alice:{TOKEN} ports=-1", "token 'alice': ports must be a whole number, not '-1'"),
        (f"alice:{TOKEN} ports=two", "ports must be a whole number, not 'two'"),
        (f"alice:{TOKEN} ports=", "ports must be a whole number, not ''"),
        (f"alice:{TOKEN} ports=1.5", "ports must be a whole number"),
        (f"alice:{TOKEN} # comment", "'#' is not KEY=VALUE"),
    ],
)  # fmt: skip
def test_bad_lines_are_refused_with_a_clear_message(line: str, message: str) -> None:
    with pytest.raises(TenantError) as info:
        parse_tenants([line])
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)
    assert MIN_TOKEN == 16


def test_a_label_twice_is_refused() -> None:
    with pytest.raises(TenantError, match="token label 'alice' appears twice"):
        parse_tenants([f"alice:{TOKEN}1", f"alice:{TOKEN}2"])


# ---- review fixes ------------------------------------------------------------------------------


def test_an_expired_ticket_coming_late_is_no_alarm(book: TicketBook[str], clock: Clock) -> None:
    (ticket,) = book.issue("t0", 1, sealed=True)
    clock.now += 11
    assert book.expire() == {"t0"}
    with pytest.raises(TicketRefused) as caught:
        book.take_sealed(ticket_handle(ticket))
    assert caught.value.owner is None  # late, not replayed


def test_an_address_is_blocked_again_after_its_block_ends(clock: Clock) -> None:
    limits = AddressLimits(clock, failures=3, window=60, block=10)
    for _ in range(3):
        limits.login_failed("192.0.2.1")
    assert limits.blocked("192.0.2.1")
    clock.now += 11
    assert not limits.blocked("192.0.2.1")
    lines = [limits.login_failed("192.0.2.1") for _ in range(3)]
    assert limits.blocked("192.0.2.1")
    assert lines[0] and "refusing" in lines[2], lines


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("alice:0123456789abcdef tunnels=²", "whole number"),
        (":0123456789abcdef", "label"),
    ],
)
def test_tokens_file_mistakes_are_tenant_errors(line: str, why: str) -> None:
    with pytest.raises(TenantError, match=why):
        parse_tenants([line])


def test_one_token_under_two_labels_is_refused() -> None:
    with pytest.raises(TenantError, match="same token"):
        parse_tenants(["a:0123456789abcdef", "b:0123456789abcdef"])


def test_logged_in_agents_widen_their_address_once_and_skip_the_shared_bound(clock: Clock) -> None:
    limits = AddressLimits(clock, per_address=2, total=3, per_agent=5)
    for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        assert limits.admit(ip) == ""
    assert "in all" in limits.admit("198.51.100.1")  # strangers filled the shared bound
    limits.vouch("198.51.100.1")
    limits.vouch("198.51.100.1")  # a second agent there adds nothing more
    admitted = sum(limits.admit("198.51.100.1") == "" for _ in range(20))
    assert admitted == 2 + 5
