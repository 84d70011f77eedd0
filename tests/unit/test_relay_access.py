"""Access control on relay tunnels, sans-I/O: parsing the agent's options (CIDRs IPv4 and
IPv6, rate limits, basic auth), the policy's wire form inside OPEN (byte for byte, bounded,
versioned, fuzzed), the relay's gate (deny wins, allow lists, token buckets on a fake
clock, basic auth right/wrong/missing/malformed) and pyngrok's options mapped."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natkit.errors import ProtocolError
from natkit.relay import access as A
from natkit.relay import gate as G
from natkit.relay import messages as M
from tests.unit.access_samples import policies

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def head(*headers: str) -> bytes:
    lines = ["GET / HTTP/1.1", "Host: app.lab.test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def basic(user_pass: bytes) -> str:
    return "Authorization: Basic " + base64.b64encode(user_pass).decode()


# ---- CIDRs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("100.200.0.3", "100.200.0.3/32"),
        (" 192.168.1.0/24 ", "192.168.1.0/24"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("2001:DB8:0:0::/64", "2001:db8::/64"),
        ("2001:db8:201::3", "2001:db8:201::3/128"),
        ("::/0", "::/0"),
        ("::ffff:0:0/96", "::ffff:0:0/96"),
        ("fe80::/10", "fe80::/10"),
    ],
)
def test_cidrs_ipv4_and_ipv6_in_normal_form(text: str, normal: str) -> None:
    assert str(A.parse_cidr(text)) == normal


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.5/8", "did you mean 10.0.0.0/8"),
        ("2001:db8::1/32", "did you mean 2001:db8::/32"),
        ("fe80::/64%eth0", "zone"),
        ("fe80::%eth0/64", "zone"),
        ("10.0.0.0/33", "not an IPv4 or IPv6 network"),
        ("2001:db8::/129", "not an IPv4 or IPv6 network"),
        ("example.com", "not an IPv4 or IPv6 network"),
        ("", "not an IPv4 or IPv6 network"),
        ("1" * 100, "not an IPv4 or IPv6 network"),
        ("10.0.0.0/8,10.1.0.0/16", "not an IPv4 or IPv6 network"),
    ],
)
def test_bad_cidrs_say_what_to_write(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        A.parse_cidr(text)


# ---- the gate: addresses -----------------------------------------------------------------------


def gate(clock: Clock | None = None, **options: Any) -> G.Gate:
    policy = A.build_policy(**options)
    assert policy is not None
    return G.Gate(policy, clock or Clock())


def test_deny_wins_over_allow() -> None:
    g = gate(allow=["100.200.0.0/24"], deny=["100.200.0.2"])
    assert g.check("100.200.0.3") == ""
    assert g.check("100.200.0.2") == G.DENIED
    assert g.check("100.201.0.1") == G.NOT_ALLOWED


def test_an_allow_list_admits_only_its_networks_of_both_families() -> None:
    g = gate(allow=["100.200.0.3/32", "2001:db8:201::/48"])
    assert g.check("100.200.0.3") == ""
    assert g.check("2001:db8:201:ffff::1") == ""
    assert g.check("100.200.0.2") == G.NOT_ALLOWED
    assert g.check("2001:db8:202::1") == G.NOT_ALLOWED
    assert g.check("::1") == G.NOT_ALLOWED


def test_deny_only_admits_everyone_else() -> None:
    g = gate(deny=["2001:db8::/32", "10.0.0.0/8"])
    assert g.check("2001:db8:1::5") == G.DENIED
    assert g.check("10.9.8.7") == G.DENIED
    assert g.check("2001:db9::1") == ""
    assert g.check("11.0.0.1") == ""


def test_a_dual_stack_listeners_view_of_an_ipv4_visitor_is_its_ipv4_address() -> None:
    g = gate(allow=["100.200.0.3/32"])
    assert g.check("::ffff:100.200.0.3") == ""
    assert g.check("::ffff:100.200.0.2") == G.NOT_ALLOWED
    assert G.visitor_ip("::ffff:1.2.3.4") == G.visitor_ip("1.2.3.4")


def test_a_link_local_visitor_with_a_zone_matches_without_it() -> None:
    g = gate(allow=["fe80::/10"], deny=["fe80::bad/128"])
    assert g.check("fe80::1%eth0") == ""
    assert g.check("fe80::bad%eth0") == G.DENIED


def test_a_visitor_that_is_not_an_ip_is_refused_when_rules_exist() -> None:
    assert gate(allow=["10.0.0.0/8"]).check("") == G.NOT_ALLOWED
    assert gate(deny=["10.0.0.0/8"]).check("?") == G.DENIED


# ---- the gate: rate ------------------------------------------------------------------------------


def test_rate_limit_is_a_token_bucket_per_address() -> None:
    clock = Clock()
    g = gate(clock, rate_limit="3/s")
    assert [g.check("100.200.0.3") for _ in range(4)] == ["", "", "", G.RATE_LIMITED]
    assert g.check("100.200.0.2") == ""  # another address has its own bucket
    clock.now += 1 / 3  # one token back
    assert g.check("100.200.0.3") == ""
    assert g.check("100.200.0.3") == G.RATE_LIMITED
    clock.now += 100  # full again, never more than the burst
    assert [g.check("100.200.0.3") for _ in range(4)] == ["", "", "", G.RATE_LIMITED]


def test_ipv6_visitors_share_a_bucket_per_64() -> None:
    g = gate(rate_limit="2/min")
    assert g.check("2001:db8:1:2::1") == ""
    assert g.check("2001:db8:1:2::ffff") == ""  # same /64: same host, as far as we know
    assert g.check("2001:db8:1:2:abcd::1") == G.RATE_LIMITED
    assert g.check("2001:db8:1:3::1") == ""  # another /64


def test_a_denied_address_spends_no_tokens() -> None:
    g = gate(deny=["100.200.0.2"], rate_limit="1/h")
    for _ in range(5):
        assert g.check("100.200.0.2") == G.DENIED
    assert g.rate is not None and not g.rate.buckets


def test_the_buckets_remember_a_bounded_number_of_addresses() -> None:
    clock = Clock()
    buckets = G.TokenBuckets(1, 60.0, clock, limit=100)
    for i in range(1000):
        assert buckets.take(G.visitor_ip(f"10.0.{i // 256}.{i % 256}"))  # type: ignore[arg-type]
    assert len(buckets.buckets) == 100
    # The most recent are remembered (and refused), the oldest forgotten (a fresh bucket).
    assert not buckets.take(G.visitor_ip("10.0.3.231"))  # type: ignore[arg-type]
    assert buckets.take(G.visitor_ip("10.0.0.0"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "count", "per"),
    [("10/s", 10, 1.0), ("600/min", 600, 60.0), ("5/m", 5, 60.0), ("100/h", 100, 3600.0),
     ("7", 7, 1.0), (" 3 / s ", 3, 1.0), ("2/SEC", 2, 1.0)],
)  # fmt: skip
def test_rate_limit_forms(text: str, count: int, per: float) -> None:
    assert A.RateLimit.parse(text) == A.RateLimit(count, per)


@pytest.mark.parametrize("text", ["", "0/s", "-1/s", "1.5/s", "10/day", "10/", "ten/s", "1e9/s"])
def test_bad_rate_limits(text: str) -> None:
    with pytest.raises(ValueError, match="rate limit"):
        A.RateLimit.parse(text)


# ---- the gate: basic auth ------------------------------------------------------------------------


def test_basic_auth_right_wrong_missing() -> None:
    g = gate(basic_auth="alice:s3cret:with:colons", kind="http")
    assert g.needs_head
    assert g.check("100.200.0.3", head(basic(b"alice:s3cret:with:colons"))) == ""
    assert g.check("100.200.0.3", head(basic(b"alice:wrong"))) == G.AUTH_WRONG
    assert g.check("100.200.0.3", head(basic(b"bob:s3cret:with:colons"))) == G.AUTH_WRONG
    assert g.check("100.200.0.3", head()) == G.AUTH_MISSING
    assert g.check("100.200.0.3", head("Authorization: Bearer abc")) == G.AUTH_MISSING
    assert g.check("100.200.0.3", None) == G.AUTH_MISSING


def test_any_of_several_credentials_admits() -> None:
    g = gate(basic_auth=["alice:one", "bob:two"], kind="http")
    assert g.check("1.2.3.4", head(basic(b"bob:two"))) == ""
    assert g.check("1.2.3.4", head(basic(b"alice:one"))) == ""
    assert g.check("1.2.3.4", head(basic(b"alice:two"))) == G.AUTH_WRONG


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ((basic(b"u:p"),), b"u:p"),
        (("authorization: basic " + base64.b64encode(b"u:p").decode(),), b"u:p"),
        (("Authorization:   Basic   " + base64.b64encode(b"u:p").decode() + "  ",), b"u:p"),
        ((), None),
        (("Authorization: Digest username=u",), None),
        (("Authorization: Basic",), b""),
        (("Authorization: Basic !!!!",), b""),
        (("Authorization: Basic dTp",), b""),  # bad padding
        (("Authorization: Basic " + base64.b64encode(b"no-colon").decode(),), b""),
        ((basic(b"u:p"), basic(b"u:p")), b""),  # two: ambiguous, refused
        (("X-Authorization: " + basic(b"u:p"),), None),
    ],
)
def test_basic_credentials_from_a_request_head(headers: tuple[str, ...], expected: Any) -> None:
    assert G.basic_credentials(head(*headers)) == expected


def test_the_relay_gets_a_salted_hmac_never_the_password() -> None:
    policy = A.build_policy(basic_auth="alice:correct horse battery", kind="http")
    assert policy is not None
    wire = json.dumps(policy.to_wire())
    assert "correct horse" not in wire and "alice" not in wire
    cred = policy.credentials[0]
    salt = bytes.fromhex(cred.salt)
    assert len(salt) == A.SALT_BYTES
    expected = hmac.new(salt, b"alice:correct horse battery", hashlib.sha256).hexdigest()
    assert cred.digest == expected
    # Two policies with the same password: different salts, different digests.
    again = A.build_policy(basic_auth="alice:correct horse battery", kind="http")
    assert again is not None and again.credentials[0].digest != cred.digest
    assert "correct horse" not in policy.describe()


@pytest.mark.parametrize(
    ("auth", "message"),
    [("nocolon", "USER:PASS"), (":pass", "USER:PASS"), ("user:", "USER:PASS"),
     ("u" * 200 + ":p", "basic-auth user"), ("u:" + "p" * 300, "basic-auth password")],
)  # fmt: skip
def test_bad_basic_auth(auth: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        A.build_policy(basic_auth=auth, kind="http")


@pytest.mark.parametrize("kind", ["tcp", "tls"])
def test_basic_auth_needs_an_http_tunnel(kind: str) -> None:
    with pytest.raises(ValueError, match="basic auth needs an HTTP tunnel"):
        A.build_policy(basic_auth="u:p", kind=kind)


def test_checks_stop_at_the_first_refusal_cheapest_first() -> None:
    clock = Clock()
    g = gate(clock, allow=["10.0.0.0/8"], rate_limit="1/h", basic_auth="u:p", kind="http")
    assert g.check("11.0.0.1", head(basic(b"u:p"))) == G.NOT_ALLOWED
    assert g.check("10.0.0.1", head()) == G.AUTH_MISSING  # spent its one token
    assert g.check("10.0.0.1", head(basic(b"u:p"))) == G.RATE_LIMITED  # guesses slowed too


# ---- building policies -----------------------------------------------------------------------------


def test_no_options_no_policy() -> None:
    assert A.build_policy() is None
    assert A.build_policy(allow=[], deny=(), basic_auth=None, rate_limit=None) is None


def test_options_are_normalised_and_deduplicated() -> None:
    policy = A.build_policy(allow=["10.0.0.0/8", " 10.0.0.0/8", "2001:DB8::/32"])
    assert policy is not None and policy.allow == ("10.0.0.0/8", "2001:db8::/32")


def test_a_string_is_not_a_list_of_networks() -> None:
    with pytest.raises(ValueError, match="list of networks"):
        A.build_policy(allow="10.0.0.0/8")


def test_at_most_max_cidrs() -> None:
    many = [f"10.0.{i}.0/24" for i in range(A.MAX_CIDRS + 1)]
    with pytest.raises(ValueError, match=f"at most {A.MAX_CIDRS}"):
        A.build_policy(deny=many)


# ---- the wire form inside OPEN -------------------------------------------------------------------

# What OPEN encoded to before access control (natkit main at a978797, same fields).
OPEN_V2 = (
    b'\x06\x00\x00\x60{"tunnel":"t0","kind":"tcp","name":"","port":0,"exact":false,'
    b'"plaintext":false,"takeover":false}'
)


def open_msg(access: A.AccessPolicy | None, kind: str = "tcp") -> M.Open:
    return M.Open(tunnel="t0", kind=kind, name="", port=0, exact=False, plaintext=False,
                  takeover=False, access=access)  # fmt: skip


def test_open_without_a_policy_is_the_same_bytes_as_before() -> None:
    """An agent that sets no policy talks to relays that predate access control."""
    assert M.encode(open_msg(None)) == OPEN_V2
    assert M.FrameDecoder().messages(OPEN_V2) == [open_msg(None)]


def test_open_with_a_policy_byte_for_byte() -> None:
    policy = A.AccessPolicy(
        allow=("100.200.0.3/32", "2001:db8::/32"),
        deny=("100.200.0.2/32",),
        credentials=(A.Credential("00" * 16, "ab" * 32),),
        realm="lab",
        rate=A.RateLimit(5, 1.0),
    )
    body = (
        b'{"tunnel":"t0","kind":"http","name":"","port":0,"exact":false,"plaintext":false,'
        b'"takeover":false,"access":{"v":1,"allow":["100.200.0.3/32","2001:db8::/32"],'
        b'"deny":["100.200.0.2/32"],"auth":[{"salt":"' + b"00" * 16 + b'","sha256":"'
        + b"ab" * 32 + b'"}],"realm":"lab","rate":{"count":5,"per":1.0}}}'
    )  # fmt: skip
    frame = bytes([M.Open.TYPE]) + len(body).to_bytes(3, "big") + body
    assert M.encode(open_msg(policy, "http")) == frame
    assert M.FrameDecoder().messages(frame) == [open_msg(policy, "http")]


def test_basic_auth_on_a_tcp_open_is_refused_both_ways() -> None:
    policy = A.AccessPolicy(credentials=(A.Credential("00" * 16, "ab" * 32),))
    with pytest.raises(ProtocolError, match="basic auth needs an HTTP tunnel"):
        M.encode(open_msg(policy, "tcp"))
    body = json.dumps({**json.loads(OPEN_V2[4:]), "access": policy.to_wire()}).encode()
    with pytest.raises(ProtocolError, match="basic auth needs an HTTP tunnel"):
        M.FrameDecoder().messages(bytes([6]) + len(body).to_bytes(3, "big") + body)


def test_an_unknown_policy_version_is_kept_for_the_relay_to_refuse() -> None:
    body = json.loads(OPEN_V2[4:])
    body["access"] = {"v": 2, "geo": ["FR"], "whatever": {"nested": True}}
    raw = json.dumps(body).encode()
    (msg,) = M.FrameDecoder().messages(bytes([6]) + len(raw).to_bytes(3, "big") + raw)
    assert isinstance(msg, M.Open) and msg.access == A.AccessPolicy(version=2)


BAD_ACCESS: list[Any] = [
    None, [], "v1", {}, {"v": "1"}, {"v": True}, {"v": 0}, {"v": 1},
    {"v": 1, "allow": [], "deny": [], "auth": [], "realm": "r", "rate": None, "extra": 1},
    {"v": 1, "allow": ["10.0.0.1/8"], "deny": [], "auth": [], "realm": "r", "rate": None},
    {"v": 1, "allow": ["10.0.0.0/08"], "deny": [], "auth": [], "realm": "r", "rate": None},
    {"v": 1, "allow": [f"10.{i}.0.0/16" for i in range(65)], "deny": [], "auth": [],
     "realm": "r", "rate": None},
    {"v": 1, "allow": [1], "deny": [], "auth": [], "realm": "r", "rate": None},
    {"v": 1, "allow": [], "deny": [], "auth": [{"salt": "00", "sha256": "ab" * 32}],
     "realm": "r", "rate": None},
    {"v": 1, "allow": [], "deny": [], "auth": [{"salt": "00" * 16}], "realm": "r", "rate": None},
    {"v": 1, "allow": [], "deny": [], "auth": [{"salt": "00" * 16, "sha256": "AB" * 32}],
     "realm": "r", "rate": None},
    {"v": 1, "allow": [], "deny": [], "auth": [], "realm": 'a"b', "rate": None},
    {"v": 1, "allow": [], "deny": [], "auth": [], "realm": "", "rate": None},
    {"v": 1, "allow": [], "deny": [], "auth": [], "realm": "r" * 65, "rate": None},
    {"v": 1, "allow": [], "deny": [], "auth": [], "realm": "r", "rate": {"count": 0, "per": 1}},
    {"v": 1, "allow": [], "deny": [], "auth": [], "realm": "r", "rate": {"count": 1}},
    {"v": 1, "allow": [], "deny": [], "auth": [], "realm": "r",
     "rate": {"count": True, "per": 1}},
    {"v": 1, "allow": [], "deny": [], "auth": [], "realm": "r", "rate": {"count": 1, "per": 0}},
]  # fmt: skip


@pytest.mark.parametrize("access", BAD_ACCESS)
def test_malformed_policies_are_protocol_errors(access: Any) -> None:
    body = json.dumps({**json.loads(OPEN_V2[4:]), "access": access}).encode()
    with pytest.raises(ProtocolError):
        M.FrameDecoder().messages(bytes([6]) + len(body).to_bytes(3, "big") + body)


@FUZZ
@given(policies())
def test_fuzz_policy_round_trip(policy: A.AccessPolicy) -> None:
    assert A.AccessPolicy.from_wire(json.loads(json.dumps(policy.to_wire()))) == policy
    kind = "http" if policy.credentials else "tcp"
    frame = M.encode(open_msg(policy, kind))
    assert len(frame) <= M.HEADER.size + M.MAX_FRAME  # the bounds keep it in one frame
    assert M.FrameDecoder().messages(frame) == [open_msg(policy, kind)]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=60) | st.sampled_from(["10.0.0.0/8", "::/0", "00" * 16]),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
        st.sampled_from(["v", "allow", "deny", "auth", "realm", "rate", "salt", "sha256",
                         "count", "per", "x"]), inner, max_size=7),
    max_leaves=30,
)  # fmt: skip


@FUZZ
@given(JSON, st.integers(1, 2))
def test_fuzz_any_json_is_a_policy_or_a_protocol_error(obj: Any, version: int) -> None:
    if isinstance(obj, dict) and "v" not in obj:
        obj = {**obj, "v": version}
    try:
        policy = A.AccessPolicy.from_wire(obj)
    except ProtocolError:
        return
    assert policy.version != 1 or policy.problem() == ""


# ---- refusal reports to the agent ------------------------------------------------------------------


def test_refusal_reports_are_rate_limited_and_count_what_they_held() -> None:
    clock = Clock()
    reports = G.RefusalReports(clock, rate=5.0, burst=3)
    assert [reports.report() for _ in range(3)] == [0, 0, 0]
    assert [reports.report() for _ in range(10)] == [None] * 10
    clock.now += 0.2  # one report's worth
    assert reports.report() == 10  # this one, and the ten held back since the last
    assert reports.report() is None


# ---- pyngrok's options ----------------------------------------------------------------------------


def test_pyngrok_auth_and_basic_auth_map_to_credentials() -> None:
    policy = A.from_pyngrok_options({"auth": "u:p", "basic_auth": ["a:b", "c:d"]}, kind="http")
    assert policy is not None and len(policy.credentials) == 3
    g = G.Gate(policy, Clock())
    for user_pass in (b"u:p", b"a:b", b"c:d"):
        assert g.check("1.2.3.4", head(basic(user_pass))) == ""
    assert g.check("1.2.3.4", head(basic(b"u:b"))) == G.AUTH_WRONG
    # pyngrok accepts a list under "auth" too (and makes it basic_auth for ngrok v3).
    listed = A.from_pyngrok_options({"auth": ["x:y"]}, kind="http")
    assert listed is not None and len(listed.credentials) == 1


def test_pyngrok_ip_restriction_maps_to_allow_and_deny() -> None:
    options = {"ip_restriction": {"allow_cidrs": ["100.200.0.0/24"], "deny_cidrs": ["100.200.0.2/32"]},
               "proto": "tcp", "addr": "22"}  # fmt: skip
    policy = A.from_pyngrok_options(options, kind="tcp")
    assert policy is not None
    assert (policy.allow, policy.deny) == (("100.200.0.0/24",), ("100.200.0.2/32",))


def test_pyngrok_options_without_access_control_give_no_policy() -> None:
    assert A.from_pyngrok_options({"proto": "http", "addr": "8080", "inspect": False}) is None


@pytest.mark.parametrize(
    "options",
    [{"auth": 5}, {"basic_auth": [1]}, {"basic_auth": "nocolon"}, {"ip_restriction": ["x"]},
     {"ip_restriction": {"allow_cidrs": "10.0.0.0/8"}}],
)  # fmt: skip
def test_bad_pyngrok_options(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        A.from_pyngrok_options(options, kind="http")


def test_pyngrok_basic_auth_on_a_tcp_tunnel_is_refused() -> None:
    with pytest.raises(ValueError, match="HTTP tunnel"):
        A.from_pyngrok_options({"basic_auth": ["u:p"]}, kind="tcp")
