"""natkit's stream credit (natkit.p2p.credit): the record codec and both sides' accounting."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natkit.errors import ProtocolError
from natkit.p2p.credit import (
    DEFAULT_KEY,
    GrantReader,
    ReceiveCredit,
    SendQueue,
    encode_default,
    encode_grant,
)


def test_records_byte_for_byte() -> None:
    assert encode_grant(4, 0x0102030405060708) == bytes.fromhex("0000000000000004 0102030405060708")
    assert encode_default(1 << 20) == bytes.fromhex("ffffffffffffffff 0000000000100000")
    assert GrantReader().feed(encode_default(7) + encode_grant(8, 9)) == [(DEFAULT_KEY, 7), (8, 9)]


@given(st.lists(st.tuples(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1))), st.data())
def test_reader_any_split(records: list[tuple[int, int]], data: st.DataObject) -> None:
    stream = b"".join(encode_grant(k, v) for k, v in records)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reader, got, last = GrantReader(), [], 0
    for cut in [*cuts, len(stream)]:
        got += reader.feed(stream[last:cut])
        last = cut
    assert got == records


def test_receiver_grants_half_a_window_at_a_time_and_refuses_overruns() -> None:
    rc = ReceiveCredit(1000)
    assert rc.consumed(400) is None  # 600 still open: more than half a window
    assert rc.consumed(501) == 1501  # less than half left: a new limit, one window ahead
    assert rc.consumed(600) is None
    rc.check(4, 1501)  # up to the limit is fine
    with pytest.raises(ProtocolError, match="ignores natkit's stream credit"):
        rc.check(4, 1502)


def test_sender_holds_back_what_is_beyond_its_credit() -> None:
    q = SendQueue(None)  # the peer's first window has not come yet
    q.push(b"a" * 300, end=True)
    assert q.take() == (b"", False) and q.queued == 300
    q.learn_default(100)
    assert q.take() == (b"a" * 100, False)
    assert q.take() == (b"", False)
    q.grant(50)  # an old, smaller grant changes nothing
    q.grant(250)
    assert q.take() == (b"a" * 150, False) and q.queued == 50
    q.grant(300)
    assert q.take() == (b"a" * 50, True)  # the FIN goes with the last byte
    assert q.take() == (b"", False)  # and only once


@given(st.lists(st.integers(1, 5000), min_size=1, max_size=40), st.integers(100, 4000))
def test_sender_and_receiver_agree_nothing_is_lost_or_overrun(
    writes: list[int], window: int
) -> None:
    """A simulated stream: the sender never exceeds the credit, and everything arrives."""
    sq, rc = SendQueue(window), ReceiveCredit(window)
    delivered = settled = 0
    sent, got = bytearray(), bytearray()
    for i, n in enumerate(writes):
        data = bytes([i % 256]) * n
        sent += data
        sq.push(data, end=False)
        while True:
            chunk, _ = sq.take()
            got += chunk
            delivered += len(chunk)
            rc.check(0, delivered)  # never raises: the sender kept to its credit
            settled = delivered  # the reader reads everything at once
            limit = rc.consumed(settled)
            if limit is not None:
                sq.grant(limit)
            elif not chunk:
                break
    assert delivered == sum(writes) and sq.queued == 0
    assert got == sent  # in order, every byte once
