"""The relay's STUN responder, sans network: ``codec.binding_success`` byte for byte (RFC
5769's address and transaction), what is answered and what is dropped, the answers decoding
with natkit's own client codec, no amplification, and the rate limiter."""

from __future__ import annotations

import struct
import zlib

import pytest
from aioice import stun as aioice_stun
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natkit.stun import codec
from natkit.stun import server as stunserver

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# RFC 5769 2.2: transaction b7e7a701bc34d686fa87dfae, 192.0.2.1:32853.
TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
XOR_MAPPED_V4 = bytes.fromhex("0020 0008 0001 a147 e112a643")
XOR_MAPPED_V6 = bytes.fromhex("0020 0014 0002 a147 0113a9fa a5d3f179 bc25f4b5 bed2b9d9")
V6 = "2001:db8:1234:5678:11:2233:4455:6677"


def fingerprinted(head_and_body: bytes) -> bytes:
    """Append FINGERPRINT by hand: CRC-32 of everything before it, XOR 0x5354554e, with
    the length already counting it (RFC 8489 14.7)."""
    length = len(head_and_body) - 20 + 8
    data = head_and_body[:2] + struct.pack("!H", length) + head_and_body[4:]
    crc = (zlib.crc32(data) ^ 0x5354554E) & 0xFFFFFFFF
    return data + struct.pack("!HHI", 0x8028, 4, crc)


def request(**attributes: object) -> bytes:
    msg = codec.binding_request(transaction_id=TID)
    msg.attributes.update(attributes)
    return codec.encode(msg, fingerprint=True)


def test_binding_success_bytes_ipv4() -> None:
    data = codec.binding_success(codec.binding_request(transaction_id=TID), ("192.0.2.1", 32853))
    header = bytes.fromhex("0101 0000 2112a442") + TID
    assert data == fingerprinted(header + XOR_MAPPED_V4)
    assert len(data) == 40


def test_binding_success_bytes_ipv6() -> None:
    data = codec.binding_success(codec.binding_request(transaction_id=TID), (V6, 32853))
    assert data == fingerprinted(bytes.fromhex("0101 0000 2112a442") + TID + XOR_MAPPED_V6)
    assert len(data) == 52


def test_binding_success_answers_only_binding_requests() -> None:
    indication = aioice_stun.Message(
        aioice_stun.Method.BINDING, aioice_stun.Class.INDICATION, transaction_id=TID
    )
    with pytest.raises(ValueError, match="only a Binding request"):
        codec.binding_success(indication, ("192.0.2.1", 1))


@pytest.mark.parametrize("source", [("192.0.2.1", 32853), (V6, 1), ("::ffff:192.0.2.1", 32853)])
def test_the_answer_decodes_with_natkits_client_codec(source: tuple[str, int]) -> None:
    data = request(SOFTWARE="some client")
    answer = stunserver.answer(data, source)
    assert answer is not None and len(answer) <= 52
    parsed = codec.parse_binding_response(answer, TID)
    assert parsed.ok and parsed.mapped == stunserver.client_address(source)
    assert parsed.other_address is None and parsed.software is None
    assert set(codec.decode(answer).message.attributes) == {"XOR-MAPPED-ADDRESS", "FINGERPRINT"}


def test_an_ipv4_client_on_a_dual_stack_socket_learns_its_ipv4_address() -> None:
    assert stunserver.client_address(("::ffff:100.200.0.1", 5, 0, 0)) == ("100.200.0.1", 5)
    assert stunserver.client_address(("fe80::1%eth0", 5, 0, 2)) == ("fe80::1", 5)
    assert stunserver.client_address(("127.0.0.1", 5)) == ("127.0.0.1", 5)


def test_a_request_without_fingerprint_or_with_change_request_zero_is_answered() -> None:
    plain = codec.encode(codec.binding_request(transaction_id=TID))
    assert len(plain) == 20
    assert stunserver.answer(plain, ("192.0.2.1", 32853)) is not None
    assert stunserver.answer(request(**{"CHANGE-REQUEST": 0}), ("192.0.2.1", 1)) is not None


def _with_unknown_required(data: bytes) -> bytes:
    extra = struct.pack("!HH", 0x7FFF, 4) + b"\x00" * 4
    return data[:2] + struct.pack("!H", len(data) - 20 + len(extra)) + data[4:] + extra


DROPPED = {
    "empty": b"",
    "garbage": b"GET / HTTP/1.1\r\n\r\n",
    "a response": codec.binding_success(codec.binding_request(transaction_id=TID), ("1.2.3.4", 5)),
    "an indication": codec.encode(
        aioice_stun.Message(aioice_stun.Method.BINDING, aioice_stun.Class.INDICATION, TID)
    ),
    "another method": codec.encode(
        aioice_stun.Message(aioice_stun.Method.ALLOCATE, aioice_stun.Class.REQUEST, TID)
    ),
    "RFC 3489 (no magic cookie)": b"\x00\x01\x00\x00" + b"\x00" * 16,
    "CHANGE-REQUEST": request(**{"CHANGE-REQUEST": codec.CHANGE_IP | codec.CHANGE_PORT}),
    "change port only": request(**{"CHANGE-REQUEST": codec.CHANGE_PORT}),
    "an ICE check (USERNAME)": request(USERNAME="a:b"),
    "MESSAGE-INTEGRITY": codec.encode(
        codec.binding_request(transaction_id=TID), integrity_key=b"k", fingerprint=True
    ),
    "unknown comprehension-required": _with_unknown_required(
        codec.encode(codec.binding_request(transaction_id=TID))
    ),
    "bad fingerprint": request()[:-1] + bytes([request()[-1] ^ 1]),
    "too big": request(SOFTWARE="x" * 600),
    "truncated": request()[:-4],
}


@pytest.mark.parametrize("data", DROPPED.values(), ids=DROPPED.keys())
def test_everything_else_is_dropped(data: bytes) -> None:
    assert stunserver.answer(data, ("192.0.2.1", 32853)) is None


@FUZZ
@given(st.binary(max_size=700))
def test_fuzz_random_datagrams_are_dropped_or_answered_small(data: bytes) -> None:
    answer = stunserver.answer(data, ("192.0.2.1", 32853))
    assert answer is None or len(answer) == 40


@FUZZ
@given(st.integers(0, 27), st.integers(0, 255), st.sampled_from(["flip", "set", "cut"]))
def test_fuzz_mutated_requests_never_raise(pos: int, value: int, how: str) -> None:
    data = bytearray(request())
    if how == "flip":
        data[pos] ^= 1 << (value % 8)
    elif how == "set":
        data[pos] = value
    else:
        del data[pos:]
    answer = stunserver.answer(bytes(data), ("192.0.2.1", 32853))
    if answer is not None:  # still a Binding request (e.g. the id changed): a valid answer
        assert len(answer) == 40
        assert codec.decode(answer).message.message_class == aioice_stun.Class.RESPONSE


def test_no_amplification_beyond_the_header_and_one_address() -> None:
    """The smallest request is 20 bytes, the answer 40 (IPv4) or 52 (IPv6): what RFC 8489
    needs, no SOFTWARE, no RFC 5780 addresses, whatever the request carried."""
    for data in (request(), request(SOFTWARE="x" * 400), request(PRIORITY=1)):
        for source in (("192.0.2.1", 1), (V6, 1)):
            answer = stunserver.answer(data, source)
            assert answer is not None and len(answer) <= 52


# ---- the rate limiter ---------------------------------------------------------------------


def test_a_source_gets_its_burst_then_its_rate() -> None:
    lim = stunserver.Limiter(now=0.0)
    burst = int(stunserver.PER_SOURCE_BURST)
    assert all(lim.allow("192.0.2.1", 0.0) for _ in range(burst))
    assert not lim.allow("192.0.2.1", 0.0)
    assert lim.allow("192.0.2.2", 0.0)  # others are not affected
    assert lim.allow("192.0.2.1", 1 / stunserver.PER_SOURCE_RATE)  # one more after a tick
    assert not lim.allow("192.0.2.1", 1 / stunserver.PER_SOURCE_RATE)


def test_all_sources_together_are_capped() -> None:
    lim = stunserver.Limiter(now=0.0)
    allowed = sum(lim.allow(f"10.0.{i // 256}.{i % 256}", 0.0) for i in range(5000))
    assert allowed == int(stunserver.TOTAL_BURST)
    assert lim.allow("10.99.0.1", 1.0)  # the total refills too


def test_the_table_of_sources_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stunserver, "MAX_SOURCES", 4)
    lim = stunserver.Limiter(now=0.0)
    assert all(lim.allow(f"10.0.0.{i}", 0.0) for i in range(4))
    assert not lim.allow("10.0.0.9", 0.0)  # full, nobody idle: refused, not remembered
    assert len(lim.sources) == 4
    idle = stunserver.PER_SOURCE_BURST / stunserver.PER_SOURCE_RATE
    assert lim.allow("10.0.0.9", idle + 1)  # the idle ones are forgotten
    assert len(lim.sources) == 1
