"""NAT-PMP and PCP replies that must not be trusted, from a scripted responder on the LAN.

The responder plays the gateway on the lab's ``dev`` host (192.168.77.20:5351); natkit runs
on ``lan`` with ``gateway_ip`` pointing at it. For every request it first sends bad replies
(wrong nonce, truncated, wrong version, wrong opcode, wrong port or protocol, a reply from
another source port and one from another address) and then, in one variant, the valid
reply. natkit must return exactly the valid reply's values, or fail with a natkit error in
bounded time when no valid reply comes; it must never return a bad reply's values.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from natkit.errors import DiscoveryError, NatkitError, NatPmpError, PcpError
from natkit.lab import Lab, netns
from natkit.lab import config as C
from natkit.portmap.manager import probe
from natkit.portmap.mapping import PortMapping
from natkit.portmap.pmp_client import NotOfferedError
from natkit.portmap.pmp_mappers import NatPmpMapper, PcpMapper
from tests.conftest import run_in_node

GATEWAY = C.DEV_IP  # the scripted responder, not the lab's router
GOOD_IP, GOOD_PORT, GOOD_LIFETIME = "100.200.0.77", 40123, 77
BAD_IP, BAD_PORT, BAD_LIFETIME = "100.200.0.66", 666, 666
EPOCH = 5000
PCP_OPTION = struct.pack("!BBH", 0x7F, 0, 0)  # an optional option of length 0

Reply = tuple[str, bytes]  # (which socket sends it: main | port | addr, datagram)


# ---- building replies -----------------------------------------------------------------------


def v4(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed


def v4mapped(ip: str) -> bytes:
    return b"\x00" * 10 + b"\xff\xff" + v4(ip)


def pmp_address_reply(ip: str, *, version: int = 0, op: int = 128, result: int = 0) -> bytes:
    return struct.pack("!BBHI", version, op, result, EPOCH) + v4(ip)


def pmp_map_reply(
    request: bytes,
    ext: int,
    lifetime: int,
    *,
    version: int = 0,
    op: int | None = None,
    internal: int | None = None,
    result: int = 0,
) -> bytes:
    _, req_op, _, req_internal = struct.unpack_from("!BBHH", request)
    return struct.pack(
        "!BBHIHHI",
        version,
        128 + req_op if op is None else op,
        result,
        EPOCH,
        req_internal if internal is None else internal,
        ext,
        lifetime,
    )


def pcp_header(op: int, result: int, lifetime: int, *, version: int = 2) -> bytes:
    return struct.pack("!BBBBII", version, op, 0, result, lifetime, EPOCH) + b"\x00" * 12


def pcp_map_reply(
    request: bytes,
    ext: int,
    ip: str,
    lifetime: int,
    *,
    version: int = 2,
    op: int = 0x81,
    result: int = 0,
    nonce: bytes | None = None,
    proto: int | None = None,
    internal: int | None = None,
) -> bytes:
    req_nonce = request[24:36]
    req_proto, req_internal = struct.unpack_from("!B3xH", request, 36)
    payload = (
        (req_nonce if nonce is None else nonce)
        + struct.pack(
            "!B3xHH",
            req_proto if proto is None else proto,
            req_internal if internal is None else internal,
            ext,
        )
        + v4mapped(ip)
    )
    return pcp_header(op, result, lifetime, version=version) + payload


def flip(b: bytes) -> bytes:
    return bytes(x ^ 0x5A for x in b)


def bad_pmp_address_replies() -> list[Reply]:
    good = pmp_address_reply(BAD_IP)
    return [
        ("main", good[:6]),  # truncated below a header
        ("main", good[:10]),  # truncated address
        ("main", good + b"\x00\x00\x00\x00"),  # too long
        ("main", pmp_address_reply(BAD_IP, version=1)),
        ("main", pmp_address_reply(BAD_IP, version=2)),
        ("main", pmp_address_reply(BAD_IP, op=129)),  # a mapping reply's opcode
        ("main", pmp_address_reply(BAD_IP, op=0)),  # no response bit: a reflected request
        ("port", good),  # right content, wrong source port
        ("addr", good),  # right content, wrong source address
    ]


def bad_pmp_map_replies(req: bytes) -> list[Reply]:
    good = pmp_map_reply(req, BAD_PORT, BAD_LIFETIME)
    internal = struct.unpack_from("!H", req, 4)[0]
    return [
        ("main", good[:7]),
        ("main", good[:12]),
        ("main", good + b"\x00\x00\x00\x00"),
        ("main", pmp_map_reply(req, BAD_PORT, BAD_LIFETIME, version=1)),
        ("main", pmp_map_reply(req, BAD_PORT, BAD_LIFETIME, version=2)),
        ("main", pmp_map_reply(req, BAD_PORT, BAD_LIFETIME, op=128 + (3 - req[1]))),  # udp/tcp
        ("main", pmp_map_reply(req, BAD_PORT, BAD_LIFETIME, op=128)),
        ("main", req),  # the request itself, reflected
        ("main", pmp_map_reply(req, BAD_PORT, BAD_LIFETIME, internal=internal ^ 1)),
        ("main", pmp_map_reply(req, 0, BAD_LIFETIME)),  # a lifetime but no external port
        ("port", good),
        ("addr", good),
    ]


def bad_pcp_map_replies(req: bytes) -> list[Reply]:
    good = pcp_map_reply(req, BAD_PORT, BAD_IP, BAD_LIFETIME)
    nonce = req[24:36]
    proto, internal = struct.unpack_from("!B3xH", req, 36)
    other = flip(nonce)
    return [
        ("main", good[:3]),
        ("main", good[:22]),  # not a multiple of 4
        ("main", good[:40]),  # a header and part of the MAP payload
        ("main", pcp_map_reply(req, BAD_PORT, BAD_IP, BAD_LIFETIME, nonce=other)),
        # An error for someone else's request (another nonce) is no answer to ours either.
        ("main", pcp_map_reply(req, 0, "0.0.0.0", 30, result=8, nonce=other)),
        ("main", pcp_map_reply(req, BAD_PORT, BAD_IP, BAD_LIFETIME, version=1)),
        ("main", pmp_map_reply(req[:12], BAD_PORT, BAD_LIFETIME)),  # NAT-PMP-shaped success
        ("main", pcp_map_reply(req, BAD_PORT, BAD_IP, BAD_LIFETIME, op=0x80)),  # ANNOUNCE
        ("main", pcp_map_reply(req, BAD_PORT, BAD_IP, BAD_LIFETIME, op=0x82)),  # PEER
        ("main", req),  # the request itself, reflected (no response bit)
        ("main", pcp_map_reply(req, BAD_PORT, BAD_IP, BAD_LIFETIME, internal=internal ^ 1)),
        ("main", pcp_map_reply(req, BAD_PORT, BAD_IP, BAD_LIFETIME, proto=23 - proto)),
        ("main", pcp_map_reply(req, 0, BAD_IP, BAD_LIFETIME)),  # a lifetime, no port
        ("main", good + struct.pack("!BBH", 0x7F, 0, 8)),  # an option past the end
        ("main", good + b"\x00" * 1100),  # longer than PCP allows
        ("port", good),
        ("addr", good),
    ]


def bad_pcp_announce_replies(req: bytes) -> list[Reply]:
    good = pcp_header(0x80, 0, 0)
    return [
        ("main", good[:20]),
        ("main", pcp_header(0x80, 0, 0, version=1)),
        ("main", pcp_header(0x81, 0, 0)),
        ("main", req),
        ("port", good),
        ("addr", good),
    ]


# ---- the scripted responder -----------------------------------------------------------------


@dataclass
class Responder:
    """Answers each request on dev:5351 with ``script(request)``: (socket, datagram) pairs."""

    script: Callable[[bytes], list[Reply]]
    socks: dict[str, socket.socket] = field(default_factory=dict)
    requests: list[bytes] = field(default_factory=list)
    send_errors: list[OSError] = field(default_factory=list)

    def serve(self, stop: threading.Event) -> None:
        main = self.socks["main"]
        while not stop.is_set():
            try:
                req, peer = main.recvfrom(2048)
            except (TimeoutError, OSError):
                continue
            self.requests.append(req)
            for which, data in self.script(req):
                try:
                    self.socks[which].sendto(data, peer)
                except OSError as exc:
                    self.send_errors.append(exc)


def _udp(lab: Lab, node: str, ip: str, port: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((ip, port))
        return s

    return netns.call_in(lab.netns(node), make)


@contextlib.contextmanager
def responder(lab: Lab, script: Callable[[bytes], list[Reply]]) -> Iterator[Responder]:
    r = Responder(script)
    try:
        r.socks["main"] = _udp(lab, "dev", C.DEV_IP, 5351)
        r.socks["port"] = _udp(lab, "dev", C.DEV_IP, 5352)  # another source port
        # Another source address with the right port: the router's LAN side (nothing else
        # listens there in this lab: it offers no port mapping of its own).
        r.socks["addr"] = _udp(lab, "rtr", C.RTR_LAN_IP, 5351)
        r.socks["main"].settimeout(0.1)
        stop = threading.Event()
        t = threading.Thread(target=r.serve, args=(stop,), daemon=True)
        t.start()
        try:
            yield r
        finally:
            stop.set()
            t.join(timeout=5)
        assert not r.send_errors, f"the responder could not send: {r.send_errors}"
    finally:
        for s in r.socks.values():
            s.close()


def script(*, final: str = "valid", pcp: str = "serve") -> Callable[[bytes], list[Reply]]:
    """NAT-PMP and PCP on one port, as on a real gateway. After the bad replies, ``final``:
    valid | error (a well-formed refusal that matches the request) | none.
    ``pcp``: serve | unsupported (a NAT-PMP-only gateway)."""

    def answer(req: bytes) -> list[Reply]:
        if len(req) < 2:
            return []
        if req[0] == 0 and req[1] == 0 and len(req) == 2:
            good = pmp_address_reply(GOOD_IP)
            refusal = pmp_address_reply("0.0.0.0", result=3)  # NETWORK_FAILURE
            return bad_pmp_address_replies() + _final(final, good, refusal)
        if req[0] == 0 and req[1] in (1, 2) and len(req) == 12:
            lifetime = struct.unpack_from("!I", req, 8)[0]
            good = pmp_map_reply(
                req, GOOD_PORT if lifetime else 0, GOOD_LIFETIME if lifetime else 0
            )
            refusal = pmp_map_reply(req, 0, 0, result=2)  # NOT_AUTHORIZED
            return bad_pmp_map_replies(req) + _final(final, good, refusal)
        if req[0] == 2 and pcp == "unsupported":
            # A NAT-PMP-only gateway (RFC 6887 section 9): version 0, UNSUPP_VERSION.
            return [("main", struct.pack("!BBHI", 0, 128 + req[1], 1, EPOCH))]
        if req[0] == 2 and req[1] == 0 and len(req) == 24:
            refusal = pcp_header(0x80, 7, 30)  # NETWORK_FAILURE
            return bad_pcp_announce_replies(req) + _final(final, pcp_header(0x80, 0, 0), refusal)
        if req[0] == 2 and req[1] == 1 and len(req) >= 60:
            lifetime = struct.unpack_from("!I", req, 4)[0]
            good = pcp_map_reply(
                req, GOOD_PORT if lifetime else 0, GOOD_IP, GOOD_LIFETIME if lifetime else 0
            )
            refusal = pcp_map_reply(req, 0, "0.0.0.0", 600, result=2)  # NOT_AUTHORIZED
            return bad_pcp_map_replies(req) + _final(final, good, refusal)
        return []

    return answer


def _final(final: str, good: bytes, refusal: bytes) -> list[Reply]:
    return {"valid": [("main", good)], "error": [("main", refusal)], "none": []}[final]


def main_bad(replies: list[Reply]) -> int:
    return sum(1 for which, _ in replies if which == "main")


def ignored(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "ignored a reply" in r.getMessage()]


@pytest.fixture
def quiet_lab(make_lab: Callable[..., Lab]) -> Lab:
    """A lab whose router offers no port mapping: dev plays the gateway, rtr a stranger."""
    return make_lab("pmpbad", portmap=frozenset())


@pytest.fixture(autouse=True)
def _log_ignored(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="natkit.portmap")


# ---- a valid reply after the bad ones -------------------------------------------------------


def test_natpmp_takes_only_the_valid_reply(
    quiet_lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    with responder(quiet_lab, script()) as r:

        async def run() -> tuple[str, PortMapping]:
            mapper = await NatPmpMapper.open(GATEWAY)
            try:
                ip = await mapper.external_ip()
                m = await mapper.add(4242, lease=120)
                await mapper.remove(m)
                return ip, m
            finally:
                mapper.close()

        ip, m = run_in_node(quiet_lab, "lan", run)
    assert ip == GOOD_IP
    assert (m.method, m.internal_ip, m.internal_port) == ("natpmp", C.LAN_IP, 4242)
    assert (m.external_ip, m.external_port, m.lease) == (GOOD_IP, GOOD_PORT, GOOD_LIFETIME)
    # natkit really saw (and dropped) every bad reply from the gateway's own address.
    map_req = next(q for q in r.requests if len(q) == 12)
    expected = main_bad(bad_pmp_address_replies()) + main_bad(bad_pmp_map_replies(map_req))
    assert len(ignored(caplog)) >= expected, ignored(caplog)
    # The delete (lifetime 0) went out for the right port.
    last = r.requests[-1]
    assert struct.unpack("!BBHHHI", last) == (0, 2, 0, 4242, 0, 0)


def test_pcp_takes_only_the_valid_reply(quiet_lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    with responder(quiet_lab, script()) as r:

        async def run() -> PortMapping:
            mapper = await PcpMapper.open(GATEWAY)
            try:
                await mapper.client.announce()
                m = await mapper.add(4343, protocol="udp", lease=120)
                await mapper.remove(m)
                return m
            finally:
                mapper.close()

        m = run_in_node(quiet_lab, "lan", run)
    assert (m.method, m.protocol, m.internal_ip, m.internal_port) == ("pcp", "udp", C.LAN_IP, 4343)
    assert (m.external_ip, m.external_port, m.lease) == (GOOD_IP, GOOD_PORT, GOOD_LIFETIME)
    maps = [q for q in r.requests if q[0] == 2 and q[1] == 1]
    assert len(maps) == 2, "one MAP to create, one to delete"
    assert maps[0][24:36].hex() == m.nonce == maps[1][24:36].hex()
    assert struct.unpack_from("!I", maps[1], 4)[0] == 0  # the delete: lifetime 0, same nonce
    announce = next(q for q in r.requests if q[1] == 0)
    expected = main_bad(bad_pcp_announce_replies(announce)) + 2 * main_bad(
        bad_pcp_map_replies(maps[0])
    )
    assert len(ignored(caplog)) >= expected, ignored(caplog)


# ---- a refusal after the bad ones: reported, promptly --------------------------------------


@pytest.mark.parametrize("method", ["natpmp", "pcp"])
def test_a_matching_refusal_is_reported(quiet_lab: Lab, method: str) -> None:
    with responder(quiet_lab, script(final="error")):

        async def run() -> BaseException | PortMapping:
            mapper: NatPmpMapper | PcpMapper = (
                await NatPmpMapper.open(GATEWAY)
                if method == "natpmp"
                else await PcpMapper.open(GATEWAY)
            )
            try:
                return await mapper.add(4646, lease=120)
            except NatkitError as exc:
                return exc
            finally:
                mapper.close()

        outcome = run_in_node(quiet_lab, "lan", run)
    # Taken at the first matching reply: a timeout would be a NotOfferedError instead.
    assert isinstance(outcome, (NatPmpError, PcpError)), repr(outcome)
    assert isinstance(outcome, NatPmpError if method == "natpmp" else PcpError)
    assert outcome.code == 2 and "NOT_AUTHORIZED" in str(outcome)


# ---- bad replies only -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["natpmp", "pcp"])
def test_only_bad_replies_is_an_error_in_bounded_time(
    quiet_lab: Lab, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    with responder(quiet_lab, script(final="none")) as r:

        async def run() -> tuple[BaseException | PortMapping, float]:
            t0 = time.monotonic()
            mapper: NatPmpMapper | PcpMapper = (
                await NatPmpMapper.open(GATEWAY)
                if method == "natpmp"
                else await PcpMapper.open(GATEWAY)
            )
            try:
                return await mapper.add(4444, lease=120), time.monotonic() - t0
            except NatkitError as exc:
                return exc, time.monotonic() - t0
            finally:
                mapper.close()

        outcome, elapsed = run_in_node(quiet_lab, "lan", run)
    assert not isinstance(outcome, PortMapping), f"a bad reply was trusted: {outcome}"
    assert isinstance(outcome, NotOfferedError), repr(outcome)
    assert "invalid replies ignored" in str(outcome)
    assert elapsed < 8, f"gave up only after {elapsed:.1f} s"
    # NAT-PMP retransmits after 250 ms (RFC 6886 3.1); PCP's first interval (3 s, RFC 6887
    # 8.1.1) is longer than natkit's 2 s timeout.
    assert len(r.requests) >= (2 if method == "natpmp" else 1)
    assert ignored(caplog)


@pytest.mark.parametrize("via", ["natpmp", "pcp", "auto"])
def test_probe_with_only_bad_replies_finds_nothing(quiet_lab: Lab, via: str) -> None:
    with responder(quiet_lab, script(final="none")):

        async def run() -> tuple[BaseException | None, float]:
            t0 = time.monotonic()
            try:
                result = await probe(via=via, gateway_ip=GATEWAY)
            except DiscoveryError as exc:
                return exc, time.monotonic() - t0
            result.chosen.close()
            return None, time.monotonic() - t0

        exc, elapsed = run_in_node(quiet_lab, "lan", run)
    assert exc is not None, "probe chose a gateway that only sent bad replies"
    assert "offers no port mapping" in str(exc)
    assert elapsed < 8


# ---- version negotiation with a NAT-PMP-only gateway ----------------------------------------


def test_pcp_to_a_natpmp_only_gateway(quiet_lab: Lab) -> None:
    with responder(quiet_lab, script(pcp="unsupported")):

        async def pcp_map() -> None:
            mapper = await PcpMapper.open(GATEWAY)
            try:
                await mapper.add(4545, lease=120)
            finally:
                mapper.close()

        with pytest.raises(PcpError) as info:
            run_in_node(quiet_lab, "lan", pcp_map)
        assert info.value.code == 1 and info.value.name == "UNSUPP_VERSION"

        async def auto() -> tuple[str, dict[str, str], PortMapping]:
            result = await probe(via="auto", gateway_ip=GATEWAY)
            try:
                m = await result.chosen.add(4545, lease=120)
            finally:
                result.chosen.close()
            return result.chosen.method, result.refused, m

        method, refused, m = run_in_node(quiet_lab, "lan", auto)
    assert method == "natpmp"
    assert "UNSUPP_VERSION" in refused["pcp"], refused
    assert (m.external_ip, m.external_port, m.lease) == (GOOD_IP, GOOD_PORT, GOOD_LIFETIME)
