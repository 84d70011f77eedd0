"""The capture store (ring buffer capped in bytes, subscriptions), the taps that fill it,
replay's request bytes, and the JSON in ngrok's shape. No network."""

from __future__ import annotations

import asyncio
import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natkit.inspect.exchange import RequestReader
from natkit.inspect.replay import Changes, ReplayError, request_bytes
from natkit.inspect.store import SUBSCRIBER_BACKLOG, CaptureStore, Record
from natkit.inspect.tap import ConnectionTap
from natkit.inspect.views import changes_from_json, record_json

REQ = b'POST /items?x=1 HTTP/1.1\r\nHost: demo.lab.test\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n{"a": 1}\n'
RESP = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


async def captured(store: CaptureStore, request: bytes = REQ, response: bytes = RESP,
                   visitor: str = "203.0.113.7:51000", tunnel: str = "demo") -> Record:  # fmt: skip
    """One exchange through a tap, as the data path would feed it."""
    tap = ConnectionTap(store, tunnel, visitor)
    tap.request(memoryview(request)[:10])
    tap.request(memoryview(request)[10:])
    tap.response(response)
    await asyncio.sleep(0)  # the tap parses from call_soon
    assert tap.first is not None
    return tap.first


async def test_a_tap_records_the_exchange_parsed_after_the_pump_returns() -> None:
    store = CaptureStore()
    tap = ConnectionTap(store, "demo", "203.0.113.7:51000")
    tap.request(REQ)
    assert store.list() == []  # nothing parsed on the pump's own call
    await asyncio.sleep(0)
    tap.response(RESP)
    await asyncio.sleep(0)
    (record,) = store.list()
    assert record.exchange.response is not None and record.duration is not None
    assert bytes(record.exchange.request.raw) == REQ and bytes(record.exchange.response.raw) == RESP
    assert record.visitor == "203.0.113.7:51000" and record.tunnel == "demo"


async def test_the_ring_buffer_drops_the_oldest_beyond_its_bytes() -> None:
    one = (await captured(CaptureStore())).size
    store = CaptureStore(max_bytes=one * 3 + 10)
    ids = [(await captured(store)).id for _ in range(5)]
    assert [r.id for r in store.list()] == ids[::-1][:3]
    assert store.bytes <= store.max_bytes and store.dropped == 2
    with pytest.raises(KeyError):
        store.get(ids[0])
    assert store.get(ids[4]).id == ids[4]


async def test_list_filters_and_limits_newest_first() -> None:
    store = CaptureStore()
    a = await captured(store, tunnel="a")
    b = await captured(store, tunnel="b")
    c = await captured(store, tunnel="a")
    assert [r.id for r in store.list()] == [c.id, b.id, a.id]
    assert [r.id for r in store.list(limit=1)] == [c.id]
    assert [r.id for r in store.list(tunnel="a")] == [c.id, a.id]
    store.clear()
    assert store.list() == [] and store.bytes == 0


async def test_subscribers_see_requests_responses_and_clears() -> None:
    store = CaptureStore()
    sub = store.subscribe()
    tap = ConnectionTap(store, "demo", "198.51.100.1:1")
    tap.request(REQ)
    await asyncio.sleep(0)
    kind, record = await sub.get()
    assert kind == "request" and record is not None and record.exchange.response is None
    tap.response(RESP)
    await asyncio.sleep(0)
    assert await sub.get() == ("response", record)
    store.clear()
    assert await sub.get() == ("clear", None)
    sub.close()
    with pytest.raises(EOFError):
        await sub.get()


async def test_a_subscriber_too_far_behind_is_closed_not_grown() -> None:
    store = CaptureStore()
    sub = store.subscribe()
    for _ in range(SUBSCRIBER_BACKLOG // 2 + 1):
        await captured(store)
    assert sub.closed
    while True:  # what it had is still readable, then the end
        try:
            await sub.get()
        except EOFError:
            break


async def test_a_connection_given_up_says_why_on_its_open_record() -> None:
    store = CaptureStore()
    tap = ConnectionTap(store, "demo", "198.51.100.1:1")
    tap.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    tap.response(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")  # not HTTP: the connection is given up
    await asyncio.sleep(0)
    (record,) = store.list()
    assert not tap.on and "no response captured" in record.note and "status line" in record.note
    tap.request(b"more")  # a given-up tap takes nothing
    assert tap._chunks == []


async def test_a_body_over_the_cap_is_recorded_cut() -> None:
    store = CaptureStore(max_body=100)
    body = b"z" * 1000
    record = await captured(store, b"PUT /f HTTP/1.1\r\nContent-Length: 1000\r\n\r\n" + body, b"")
    assert record.exchange.request.truncated and "over 100 bytes" in record.note
    assert len(record.exchange.request.body) == 100


# ---- replay's bytes ---------------------------------------------------------------------


async def test_replay_as_captured_sends_the_same_bytes() -> None:
    record = await captured(CaptureStore())
    assert request_bytes(record.exchange.request, None) == REQ
    assert request_bytes(record.exchange.request, Changes()) == REQ


async def test_replay_with_changes_sets_the_length_and_drops_chunking() -> None:
    chunked = (
        b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    record = await captured(CaptureStore(), chunked, b"")
    data = request_bytes(record.exchange.request, Changes(target="/d", body=b"hello world"))
    (msg,) = RequestReader().feed(data)
    assert msg.start == ("POST", "/d", "HTTP/1.1") and msg.body == b"hello world"
    assert msg.headers == [("Host", "h"), ("Content-Length", "11")]
    data = request_bytes(record.exchange.request, Changes(method="GET", body=b""))
    (msg,) = RequestReader().feed(data)
    assert msg.start[0] == "GET" and msg.header("content-length") is None


@pytest.mark.parametrize("changes", [
    Changes(target="/a HTTP/1.1\r\nX-Injected: 1"), Changes(method="GET /x"),
    Changes(headers=[("X", "a\r\nInjected: yes")]), Changes(headers=[("Bad\nName", "v")]),
    Changes(method=""), Changes(headers=[("X Y", "v")]), Changes(headers=[("A:B", "v")]),
    Changes(headers=[("X", "€")]), Changes(target="/a b"),
])  # fmt: skip
async def test_replay_refuses_changes_that_would_split_the_request(changes: Changes) -> None:
    record = await captured(CaptureStore())
    with pytest.raises(ReplayError):
        request_bytes(record.exchange.request, changes)


@settings(max_examples=200, deadline=None)
@given(method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"]),
       target=st.text(alphabet="abcdefghij/?=&%0123456789", min_size=1, max_size=20).map(lambda t: "/" + t),
       headers=st.lists(st.tuples(st.text(alphabet="abcdefXYZ-", min_size=1, max_size=8),
                                  st.text(alphabet="abc 123;=/", max_size=12).map(str.strip)), max_size=4),
       body=st.binary(max_size=200))  # fmt: skip
def test_changed_requests_parse_back_to_the_changes(method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> None:  # fmt: skip
    reader = RequestReader()
    (original,) = reader.feed(REQ)
    data = request_bytes(original, Changes(method, target, headers, body))
    (msg,) = RequestReader().feed(data)
    assert msg.start == (method, target, "HTTP/1.1") and msg.body == body
    kept = [(n, v) for n, v in headers if n.lower() not in ("content-length", "transfer-encoding")]
    assert [h for h in msg.headers if h[0] != "Content-Length"] == kept


# ---- the JSON ---------------------------------------------------------------------------


async def test_records_have_ngroks_fields() -> None:
    record = await captured(CaptureStore())
    obj = record_json(record)
    assert obj["uri"] == f"/api/requests/http/{record.id}" and obj["id"] == record.id
    assert obj["tunnel_name"] == "demo" and obj["remote_addr"] == "203.0.113.7"
    assert isinstance(obj["duration"], int) and obj["start"].endswith("+00:00")
    assert obj["request"]["method"] == "POST" and obj["request"]["uri"] == "/items?x=1"
    assert obj["request"]["proto"] == "HTTP/1.1"
    assert obj["request"]["headers"]["Content-Type"] == ["application/json"]
    assert base64.b64decode(obj["request"]["raw"]) == REQ
    assert obj["response"]["status"] == "201 Created" and obj["response"]["status_code"] == 201
    assert base64.b64decode(obj["response"]["raw"]) == RESP
    assert base64.b64decode(obj["natkit"]["request_body"]) == b'{"a": 1}\n'
    assert obj["natkit"]["visitor"] == "203.0.113.7:51000"


def test_changes_from_the_page() -> None:
    got = changes_from_json({"method": "PUT", "uri": "/x", "headers": [["A", "b"]], "body": "é"})
    assert got == Changes("PUT", "/x", [("A", "b")], "é".encode())
    assert changes_from_json({"body_base64": "AAE="}).body == b"\x00\x01"
    for bad in ([], {"method": 1}, {"headers": [["a"]]}, {"headers": "x"}, {"body_base64": "!"}):
        with pytest.raises(ReplayError):
            changes_from_json(bad)


# ---- capture pauses when nobody looks ------------------------------------------------------


async def test_capture_pauses_when_nobody_looks_and_resumes_at_a_look() -> None:
    from natkit.inspect.tap import tap_factory

    store = CaptureStore(idle=0.05)
    make = tap_factory(store, "demo")
    open_tap = make("198.51.100.1:1")  # a fresh store captures (a look is assumed at start)
    assert open_tap is not None and open_tap.on
    open_tap.request(REQ)
    await asyncio.sleep(0.1)
    assert make("198.51.100.1:2") is None  # nobody looked for 50 ms: no tap, no cost
    assert not store.capturing and store.paused[-1][1] is None
    assert not open_tap.on  # a connection open across the pause stops being copied
    (record,) = store.list()
    assert "capture paused" in record.note  # its request was whole; its answer never seen
    store.look()
    assert store.capturing and store.paused[-1][1] is not None
    assert make("198.51.100.1:3") is not None


async def test_an_open_subscription_keeps_capture_on() -> None:
    store = CaptureStore(idle=0.01)
    sub = store.subscribe()
    await asyncio.sleep(0.05)
    assert store.check_idle()
    sub.close()
    await asyncio.sleep(0.05)
    assert not store.check_idle()


def test_capture_without_idle_never_pauses() -> None:
    store = CaptureStore(idle=None)
    store._last_look -= 10**6
    assert store.check_idle() and store.paused == []


@pytest.mark.parametrize(
    ("host", "bound", "allowed"),
    [
        ("127.0.0.1:4040", "127.0.0.1", True),
        ("localhost:4040", "127.0.0.1", True),
        ("app.localhost", "127.0.0.1", True),
        ("[::1]:4040", "::1", True),
        ("127.9.9.9", "127.0.0.1", True),
        ("evil.example:4040", "127.0.0.1", False),
        ("evil.example", "::1", False),
        ("10.0.0.5:4040", "127.0.0.1", False),
        ("", "127.0.0.1", False),
        ("anything.example", "192.0.2.10", True),  # bound beyond loopback: the user's choice
    ],
)
def test_only_loopback_names_reach_a_loopback_inspector(host: str, bound: str, allowed: bool) -> None:  # fmt: skip
    from natkit.inspect.server import _host_allowed

    assert _host_allowed(host, (bound, 4040)) is allowed


async def test_refused_visitors_are_kept_bounded_and_told() -> None:
    from natkit.inspect.records import Refusal
    from natkit.inspect.store import MAX_REFUSALS
    from natkit.inspect.views import refusal_json

    store = CaptureStore()
    sub = store.subscribe()
    first = Refusal("web", "203.0.113.9:40000", "denied", 1_700_000_000.5, more=3)
    store.refused(first)
    assert await sub.get() == ("refused", first)
    assert refusal_json(first) == {"tunnel_name": "web", "remote_addr": "203.0.113.9:40000",
                                   "reason": "denied", "time": refusal_json(first)["time"],
                                   "more": 3}  # fmt: skip
    assert refusal_json(first)["time"].startswith("2023-11-14T22:13:20")
    for i in range(MAX_REFUSALS + 10):
        store.refused(Refusal("web", f"198.51.100.1:{i}", "rate-limited", 1.0))
    assert len(store.refusals) == MAX_REFUSALS
    assert store.refusals[-1].visitor == f"198.51.100.1:{MAX_REFUSALS + 9}"
    assert store.list() == []  # refusals are not captured requests
    sub.close()
