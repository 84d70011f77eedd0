"""The inspector's sans-I/O HTTP/1.1 exchange parser: byte-exact framing (RFC 9112
section 6), any split of the streams, pairing, limits; fuzzed with hypothesis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natkit.inspect.exchange import Exchange, ExchangeParser, Framing, RequestReader, Stop


def feed_split(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    """``data`` cut at ``cuts`` (positions, any order, may repeat)."""
    last = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        yield data[last:cut]
        last = cut
    yield data[last:]


def run(requests: bytes, responses: bytes, cuts: list[int] | None = None, *, close: bool = True,
        max_body: int = 1 << 20) -> tuple[ExchangeParser, list[tuple[str, Exchange]]]:  # fmt: skip
    p = ExchangeParser(max_body=max_body)
    for piece in feed_split(requests, cuts or []):
        p.request_data(piece, 1.0)
    for piece in feed_split(responses, cuts or []):
        p.response_data(piece, 2.0)
    if close:
        p.closed(3.0)
    return p, p.events()


def answered(events: list[tuple[str, Exchange]]) -> list[Exchange]:
    return [ex for kind, ex in events if kind == "response"]


# ---- byte-for-byte on hand-made wire examples ---------------------------------------------

GET = b"GET /a?b=1 HTTP/1.1\r\nHost: demo.lab.test\r\nAccept: */*\r\n\r\n"
POST_CHUNKED = (b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                b"5;ext=1\r\nhello\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: t\r\n\r\n")  # fmt: skip
HEAD = b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n"
OK_LEN = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"
CONTINUE_THEN_CHUNKED = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")  # fmt: skip
HEAD_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\n\r\n"  # no body follows a HEAD
UNTIL_CLOSE = b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"a": 1}'


def test_pipelined_exchanges_are_framed_byte_for_byte_at_every_split() -> None:
    requests = GET + POST_CHUNKED + HEAD + GET
    responses = OK_LEN + CONTINUE_THEN_CHUNKED + HEAD_ANSWER + UNTIL_CLOSE
    for cut in range(len(requests) + len(responses)):  # every one-cut split of each stream
        _, events = run(requests, responses, [cut, cut * 7])
        done = answered(events)
        assert [ex.request.start[0] for ex in done] == ["GET", "POST", "HEAD", "GET"]
        assert b"".join(bytes(ex.request.raw) for ex in done) == requests
        assert b"".join(bytes(ex.response.raw) for ex in done if ex.response) == responses
        get, post, head, last = done
        assert post.request.body == b"helloabcdefghijklmnopqrstuvwxyz"
        assert post.request.framing is Framing.CHUNKED
        assert post.response is not None and post.response.body == b"abc"
        assert post.response.start == ("HTTP/1.1", "201", "Created")
        assert head.response is not None and head.response.body == b""
        assert last.response is not None and last.response.framing is Framing.CLOSE
        assert last.response.body == b'{"a": 1}'
        assert get.request.headers == [("Host", "demo.lab.test"), ("Accept", "*/*")]
        assert get.request.start == ("GET", "/a?b=1", "HTTP/1.1")


def test_requests_are_told_before_their_responses_and_timed() -> None:
    p = ExchangeParser()
    p.request_data(GET, 10.0)
    (kind, ex), = p.events()  # fmt: skip
    assert kind == "request" and ex.response is None and ex.request.started == 10.0
    p.response_data(OK_LEN[:20], 10.5)
    assert p.events() == []
    p.response_data(OK_LEN[20:], 11.25)
    (kind, ex2), = p.events()  # fmt: skip
    assert kind == "response" and ex2 is ex
    assert ex.response is not None and ex.response.started == 10.5 and ex.response.ended == 11.25


def test_204_and_304_have_no_body_and_the_next_response_follows() -> None:
    responses = (b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"
                 + OK_LEN)  # fmt: skip
    _, events = run(GET * 3, responses)
    done = answered(events)
    assert [ex.response.start[1] for ex in done if ex.response] == ["204", "304", "200"]
    assert done[2].response is not None and done[2].response.body == b"hello"


def test_a_response_cut_by_the_close_is_given_up() -> None:
    p, events = run(GET, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert answered(events) == [] and not p.following and "closed" in p.stopped


# ---- what stops the capture of a connection -----------------------------------------------


@pytest.mark.parametrize(
    ("requests", "responses", "why"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\r\n\r\n", b"", "request line"),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", b"", "header line"),
        (b"GET / HTTP/1.1\r\n folded\r\n\r\n", b"", "header line"),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", b"", "Content-Length"),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", b"", "Content-Length"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", b"", "transfer coding"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", b"", "chunk size"),
        (b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched"),
        (b"CONNECT a:443 HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n", "switched"),
        (b"", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "no request"),
        (GET, b"SSH-2.0-OpenSSH\r\n\r\n", "status line"),
    ],
)  # fmt: skip
def test_what_is_not_followed_stops_the_capture(
    requests: bytes, responses: bytes, why: str
) -> None:
    p = ExchangeParser()
    p.request_data(requests, 1.0)
    p.response_data(responses, 2.0)
    assert not p.following and why in p.stopped, p.stopped
    before = p.events()
    p.request_data(GET, 3.0)  # nothing is parsed any more
    assert p.events() == []
    # A switch is reported with its response head; the other stops answered nothing.
    assert [kind for kind, _ in before].count("response") == (why == "switched")


def test_a_switch_is_captured_up_to_its_response_head() -> None:
    upgrade = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
    frames = b"\x81\x05hello" + OK_LEN  # another protocol's bytes, HTTP-like or not
    for cut in range(len(head) + len(frames) + 1):
        p = ExchangeParser()
        p.request_data(upgrade, 1.0)
        p.response_data((head + frames)[:cut], 2.0)
        p.response_data((head + frames)[cut:], 2.5)
        p.request_data(frames, 3.0)
        (switched,) = answered(p.events())
        assert switched.response is not None and bytes(switched.response.raw) == head
        assert switched.response.body == b"" and "switched" in p.stopped


def test_a_head_over_the_limit_stops_without_waiting_for_its_end() -> None:
    p = ExchangeParser(max_head=1024)
    p.request_data(b"GET / HTTP/1.1\r\nX: " + b"a" * 2000, 1.0)
    assert not p.following and "head longer" in p.stopped


def test_a_body_over_the_cap_is_kept_cut_and_ends_the_capture() -> None:
    body = b"x" * 5000
    request = b"POST /big HTTP/1.1\r\nContent-Length: 5000\r\n\r\n" + body
    p, events = run(request, b"", [100, 2000, 4000], close=False, max_body=1000)
    (kind, ex), = events  # fmt: skip
    assert kind == "request" and ex.request.truncated and not p.following
    assert ex.request.body == body[:1000]
    assert bytes(ex.request.raw) == request[: len(request) - 4000]  # the head and 1,000 bytes


def test_a_response_body_over_the_cap_is_reported_cut() -> None:
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 4000\r\n\r\n" + b"y" * 4000
    p, events = run(GET, response, [50, 3000], close=False, max_body=1000)
    (ex,) = answered(events)
    assert ex.response is not None and ex.response.truncated and ex.response.body == b"y" * 1000
    assert not p.following and "body larger" in p.stopped


def test_request_reader_reads_a_server_side_stream() -> None:
    reader = RequestReader()
    got = reader.feed(GET[:10]) + reader.feed(GET[10:] + b"\r\n" + POST_CHUNKED)
    assert [m.start[1] for m in got] == ["/a?b=1", "/up"]
    with pytest.raises(Stop):
        reader.feed(b"NOT HTTP\r\n\r\n")


# ---- generated exchanges ------------------------------------------------------------------

_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=12)  # fmt: skip
_value = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)
_headers = st.lists(
    st.tuples(_token.filter(lambda n: n.lower() not in ("content-length", "transfer-encoding")),
              _value), max_size=5)  # fmt: skip
_body = st.binary(max_size=300)
_chunk_sizes = st.lists(st.integers(1, 50), max_size=6)


@st.composite
def messages(draw: st.DrawFn, is_response: bool) -> tuple[bytes, bytes, str, str]:
    """(wire bytes, body, start token, framing) of a random message."""
    headers = draw(_headers)
    body = draw(_body)
    framing = draw(st.sampled_from(["length", "chunked"] + (["none"] if not is_response else [])))
    if framing == "none":
        body = b""
    if is_response:
        status = draw(st.sampled_from(["200", "201", "404", "500"]))
        start, token = f"HTTP/1.1 {status} Some Reason", status
    else:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"]))
        target = "/" + draw(_token)
        start, token = f"{method} {target} HTTP/1.1", method
    lines = [start] + [f"{n}: {v}" for n, v in headers]
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    elif framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        payload, rest = b"", body
        for size in draw(_chunk_sizes):
            if not rest:
                break
            piece, rest = rest[:size], rest[size:]
            payload += b"%x\r\n%s\r\n" % (len(piece), piece)
        if rest:
            payload += b"%X\r\n%s\r\n" % (len(rest), rest)
        payload += b"0\r\n\r\n"
    else:
        payload = b""
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + payload, body, token, framing


@settings(max_examples=300, deadline=None)
@given(
    pairs=st.lists(st.tuples(messages(False), messages(True)), min_size=1, max_size=5),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
def test_generated_exchanges_round_trip_byte_for_byte(
    pairs: list[tuple[tuple[bytes, bytes, str, str], tuple[bytes, bytes, str, str]]],
    cuts: list[int],
) -> None:
    requests = b"".join(req[0] for req, _ in pairs)
    responses = b"".join(resp[0] for _, resp in pairs)
    p, events = run(requests, responses, cuts, close=False)
    done = answered(events)
    assert p.following, p.stopped
    assert len(done) == len(pairs)
    for ex, (req, resp) in zip(done, pairs, strict=True):
        assert bytes(ex.request.raw) == req[0] and bytes(ex.request.body) == req[1]
        assert ex.request.start[0] == req[2]
        assert ex.response is not None
        assert bytes(ex.response.raw) == resp[0] and bytes(ex.response.body) == resp[1]
        assert ex.response.start[1] == resp[2]


@settings(max_examples=500, deadline=None)
@given(requests=st.binary(max_size=400), responses=st.binary(max_size=400),
       cuts=st.lists(st.integers(0, 1000), max_size=5))  # fmt: skip
def test_garbage_never_escapes_and_stays_bounded(requests: bytes, responses: bytes, cuts: list[int]) -> None:  # fmt: skip
    p = ExchangeParser(max_head=256, max_body=128)
    for piece in feed_split(requests, cuts):
        p.request_data(piece, 1.0)
        p.response_data(b"", 1.0)
    for piece in feed_split(responses, cuts):
        p.response_data(piece, 2.0)
    p.closed(3.0)
    for _, ex in p.events():
        assert len(ex.request.body) <= 128 and len(ex.request.raw) <= 256 + 128 + 4096
    assert not p.following


@settings(max_examples=200, deadline=None)
@given(prefix=st.sampled_from([GET, POST_CHUNKED, HEAD]), tail=st.binary(max_size=200))
def test_garbage_after_good_requests_keeps_what_was_whole(prefix: bytes, tail: bytes) -> None:
    p = ExchangeParser()
    p.request_data(prefix + tail, 1.0)
    events = p.events()
    assert events and bytes(events[0][1].request.raw) == prefix


def test_requests_piling_up_unanswered_stop_the_capture() -> None:
    from natkit.inspect.exchange import MAX_WAITING

    p = ExchangeParser()
    p.request_data(GET * MAX_WAITING, 1.0)
    assert p.following
    p.request_data(GET, 2.0)
    assert not p.following and "waiting for responses" in p.stopped
    assert len(p.events()) == MAX_WAITING + 1  # all told; none will be answered
