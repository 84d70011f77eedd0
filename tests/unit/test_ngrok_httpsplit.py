"""natkit-ngrok's HTTP splitter: where messages begin and end in a byte stream (heads,
Content-Length, chunked, HEAD/204/304, 1xx, upgrades), fed in any pieces; bodies kept up to
a limit; anything not HTTP/1.x stops the splitting without an exception."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from natkit.compat.ngrok_agent.httpsplit import MAX_HEAD, Splitter

REQUESTS = (
    b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    b"PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n"
    b"HEAD /d HTTP/1.1\r\nHost: x\r\n\r\n"
)
RESPONSES = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nmade\r\n0\r\n\r\n"
    b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"  # a reply to HEAD: no body
)
METHODS = ("GET", "POST", "PUT", "HEAD")


def _split(role: str, data: bytes, cuts: list[int], body_limit: int = 1 << 20) -> Splitter:
    s = Splitter(role, body_limit)
    if role == "response":
        for m in METHODS:
            s.expect(m)
    last = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        s.feed(data[last:cut])
        last = cut
    return s


def test_requests_are_split_with_their_bodies_as_sent() -> None:
    s = _split("request", REQUESTS, [])
    assert [m.start_line for m in s.messages] == [
        "GET /a HTTP/1.1", "POST /b HTTP/1.1", "PUT /c HTTP/1.1", "HEAD /d HTTP/1.1"
    ]  # fmt: skip
    get, post, put, head = s.messages
    assert get.body == b"" and post.body == b"hello" and head.body == b""
    assert put.body == b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n"
    assert put.complete and put.header("transfer-encoding") == "chunked"
    assert b"".join(m.raw for m in s.messages) == REQUESTS  # nothing lost or added
    assert not s.failed


def test_responses_follow_their_requests_methods_and_skip_1xx() -> None:
    s = _split("response", RESPONSES, [])
    assert [m.start_line for m in s.messages] == [
        "HTTP/1.1 200 OK", "HTTP/1.1 201 Created", "HTTP/1.1 204 No Content", "HTTP/1.1 200 OK"
    ]  # fmt: skip
    assert [m.body for m in s.messages] == [b"ok", b"4\r\nmade\r\n0\r\n\r\n", b"", b""]


@given(st.lists(st.integers(min_value=0, max_value=len(REQUESTS)), max_size=20))
def test_any_cutting_of_the_request_stream_gives_the_same_messages(cuts: list[int]) -> None:
    whole = _split("request", REQUESTS, [])
    assert _split("request", REQUESTS, cuts).messages == whole.messages


@given(st.lists(st.integers(min_value=0, max_value=len(RESPONSES)), max_size=20))
def test_any_cutting_of_the_response_stream_gives_the_same_messages(cuts: list[int]) -> None:
    assert (
        _split("response", RESPONSES, cuts).messages == _split("response", RESPONSES, []).messages
    )


def test_a_response_without_length_ends_with_the_stream() -> None:
    s = Splitter("response")
    s.feed(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\npart one ")
    s.feed(b"part two")
    assert s.messages == []
    s.close()
    (m,) = s.messages
    assert m.body == b"part one part two" and m.complete


def test_a_body_past_the_limit_is_counted_not_kept() -> None:
    s = Splitter("request", body_limit=4)
    s.feed(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789GET / HTTP/1.1\r\n\r\n")
    big, after = s.messages
    assert big.body == b"0123" and big.body_size == 10 and not big.complete
    assert after.start_line == "GET / HTTP/1.1"


def test_an_upgrade_ends_the_splitting_but_not_the_stream() -> None:
    s = Splitter("response")
    s.expect("GET")
    s.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello")
    assert [m.start_line for m in s.messages] == ["HTTP/1.1 101 Switching Protocols"]
    assert s.upgraded and not s.failed


def test_what_is_not_http_stops_the_splitting_quietly() -> None:
    for data in (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\r\n\r\n",  # a TLS ClientHello
        b"GET / SPDY/3\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
        b"POST / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * MAX_HEAD,
    ):
        s = Splitter("request")
        s.feed(data)
        assert s.failed and s.messages == [], data[:30]
        s.feed(b"GET / HTTP/1.1\r\n\r\n")  # nothing more is split on that connection
        assert s.messages == []


@given(st.binary(max_size=512))
def test_random_bytes_never_raise(data: bytes) -> None:
    for role in ("request", "response"):
        s = Splitter(role, body_limit=64)
        s.feed(data)
        s.close()
        for m in s.messages:
            assert len(m.body) <= 64
