"""HTTP/1.1 exchanges from a connection's two byte streams, sans-I/O.

:class:`ExchangeParser` is fed what the visitor sent (``request_data``) and what the
service answered (``response_data``), in any pieces, and frames the messages byte-exactly
by RFC 9112 section 6: each :class:`Message` keeps its bytes as they were on the wire
(``raw``) and its body with any chunked coding removed (``body``). Requests and responses
are paired in order (HTTP/1.1 pipelining keeps order).

A connection stops being followed (``following`` turns False, ``stopped`` says why) when
its bytes are not HTTP/1.1, when it switches protocols (101, a CONNECT tunnel: the
exchange that switched is reported with its response head), or when a head or a body
exceeds the limits: what was complete before is kept, nothing after it is parsed.
Everything here is untrusted input and bounded.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable

MAX_HEAD = 64 * 1024  # a request or response head larger than this is not followed
MAX_BODY = 1024 * 1024  # a body captured beyond this ends the capture of the connection
MAX_WAITING = 256  # requests waiting for their responses (pipelined) before capture stops
_MAX_CHUNK_LINE = 4096
_TCHAR = r"!#$%&'*+\-.^_`|~0-9A-Za-z"  # RFC 9110 5.6.2 token characters
TOKEN_RE = re.compile(f"[{_TCHAR}]+")  # a method or a header name
_HEADERS_RE = re.compile(f"(?:[{_TCHAR}]+:[^\r\n]*\r\n)*")
_HEADER_RE = re.compile(f"([{_TCHAR}]+):[ \t]*([^\r\n]*?)[ \t]*\r\n")


class Framing(enum.Enum):
    NONE = "none"  # no body
    LENGTH = "length"  # Content-Length
    CHUNKED = "chunked"
    CLOSE = "close"  # a response that ends when the connection does


@dataclasses.dataclass
class Message:
    """One request or response: its start line, headers (in order, names as sent), the
    body as the application sees it, and the bytes on the wire."""

    start: tuple[str, str, str]  # (method, target, version) or (version, status, reason)
    headers: list[tuple[str, str]]
    raw: bytearray = dataclasses.field(default_factory=bytearray)
    body: bytearray = dataclasses.field(default_factory=bytearray)
    framing: Framing = Framing.NONE
    started: float = 0.0  # when its first byte was fed (the caller's clock)
    ended: float = 0.0  # when its last byte was fed
    complete: bool = False  # all its bytes were seen
    truncated: bool = False  # its body went beyond the limit: body and raw are cut

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), None when absent."""
        low = name.lower()
        return next((v for n, v in self.headers if n.lower() == low), None)


@dataclasses.dataclass
class Exchange:
    """A request and the response to it (None until it is complete)."""

    request: Message
    response: Message | None = None

    @property
    def method(self) -> str:
        return self.request.start[0]


class Stop(Exception):
    """The connection cannot be followed further (the reason is the message)."""


# Given a response's start line: the (method, target, version) of the request it answers;
# raises Stop when no request is waiting.
_RequestFor = Callable[[tuple[str, str, str]], tuple[str, str, str]]


class _Reader:
    """One direction's messages, framed as the bytes come."""

    def __init__(self, is_response: bool, max_head: int, max_body: int) -> None:
        self.is_response = is_response
        self.max_head, self.max_body = max_head, max_body
        self.buf = bytearray()
        self.msg: Message | None = None  # the message being read (its head is done)
        self.remaining = 0  # bytes of the body (or of the current chunk) still to come
        self.head_at = 0.0  # when the first byte of the head being read came
        self.step = "head"  # head | length | chunk-size | chunk-data | chunk-end | trailer | close

    def feed(self, data: bytes, now: float, request_for: _RequestFor) -> list[Message]:
        """The messages ``data`` completed, in order. Raises :class:`Stop`."""
        self.add(data, now)
        done: list[Message] = []
        while (msg := self.next_message(now, request_for)) is not None:
            done.append(msg)
        return done

    def add(self, data: bytes, now: float) -> None:
        if not self.buf and self.msg is None:
            self.head_at = now  # a message's time is that of its first byte
        self.buf += data

    def next_message(self, now: float, request_for: _RequestFor) -> Message | None:
        """The next message the bytes fed so far complete, None when more are needed (one
        at a time: a response's framing depends on the request it answers)."""
        while self.buf:
            msg = self.msg
            if msg is None:
                msg = self._head(now, request_for)
                if msg is None:
                    return None
            elif self.step == "length":
                self._body(msg, self.remaining)
                if not self.remaining:
                    self._finish(msg, now)
            elif self.step == "chunk-data":
                self._body(msg, self.remaining)
                if not self.remaining:
                    self.step = "chunk-end"
            elif self.step == "close":
                self._body(msg, len(self.buf))
            elif not self._chunk_line(msg, now):
                return None
            if msg.complete:
                self.msg = None
                return msg
        return None

    def eof(self, now: float) -> Message | None:
        """The connection ended: a response read until close is complete now."""
        msg = self.msg
        if msg is not None and self.step == "close":
            self._finish(msg, now)
            self.msg = None
            return msg
        return None

    # -- the head -----------------------------------------------------------------------
    def _head(self, now: float, request_for: _RequestFor) -> Message | None:
        if not self.is_response:  # RFC 9112 2.2: empty lines before a request are ignored
            while self.buf[:2] == b"\r\n":
                del self.buf[:2]
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > self.max_head:
                raise Stop(f"a message head longer than {self.max_head} bytes")
            return None
        if end + 4 > self.max_head:
            raise Stop(f"a message head longer than {self.max_head} bytes")
        head = bytes(self.buf[: end + 4])
        del self.buf[: end + 4]
        start, headers = _parse_head(head[:end], self.is_response)
        msg = Message(start, headers, raw=bytearray(head), started=self.head_at)
        coding, lengths = _body_headers(headers)
        if self.is_response:
            request = request_for(start)
            msg.framing = _response_framing(request, int(start[1]), coding, lengths)
        else:
            msg.framing = _request_framing(coding, lengths)
        self.msg = msg
        if msg.framing is Framing.NONE:
            self._finish(msg, now)
        elif msg.framing is Framing.LENGTH:
            self.remaining = _content_length(lengths)
            self.step = "length"
            if not self.remaining:
                self._finish(msg, now)
        elif msg.framing is Framing.CHUNKED:
            self.step = "chunk-size"
        else:
            self.step = "close"
        return msg

    def _finish(self, msg: Message, now: float) -> None:
        msg.complete, msg.ended = True, now
        self.step, self.remaining = "head", 0
        self.head_at = now  # for bytes of the next message that came with this one's last

    # -- bodies -------------------------------------------------------------------------
    def _body(self, msg: Message, n: int) -> None:
        take = bytes(self.buf[:n])
        del self.buf[: len(take)]
        if self.step != "close":
            self.remaining -= len(take)
        msg.raw += take
        msg.body += take
        if len(msg.body) > self.max_body:
            msg.truncated = True
            cut = len(msg.body) - self.max_body
            del msg.body[self.max_body :]
            del msg.raw[len(msg.raw) - cut :]
            raise Stop(f"a body larger than {self.max_body} bytes")

    def _chunk_line(self, msg: Message, now: float) -> bool:
        """A chunk's size line, the CRLF after its data, or a trailer line; False when more
        bytes are needed."""
        if self.step == "chunk-end":
            if len(self.buf) < 2:
                return False
            if self.buf[:2] != b"\r\n":
                raise Stop("a chunk not followed by CRLF")
            msg.raw += b"\r\n"
            del self.buf[:2]
            self.step = "chunk-size"
            return True
        end = self.buf.find(b"\r\n")
        if end < 0:
            if len(self.buf) > _MAX_CHUNK_LINE:
                raise Stop("a chunk size or trailer line too long")
            return False
        if end > _MAX_CHUNK_LINE:
            raise Stop("a chunk size or trailer line too long")
        line = bytes(self.buf[:end])
        msg.raw += self.buf[: end + 2]
        del self.buf[: end + 2]
        if self.step == "trailer":
            if not line:
                self._finish(msg, now)
            elif len(msg.raw) > self.max_head + self.max_body:
                raise Stop("trailers too long")
            return True
        size_text = line.split(b";", 1)[0].strip(b" \t")
        if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
            raise Stop(f"a bad chunk size line {line[:40]!r}")
        if len(size_text) > 8:
            raise Stop("a chunk size over 4 GiB")
        size = int(size_text, 16)
        if size:
            self.remaining, self.step = size, "chunk-data"
        else:
            self.step = "trailer"
        return True


def _parse_head(
    head: bytes, is_response: bool
) -> tuple[tuple[str, str, str], list[tuple[str, str]]]:
    """The start line and the headers of a head (without its final CRLF CRLF). Regular
    expressions do the per-byte work: this runs for every captured message."""
    text = head.decode("latin-1")  # (one byte, one character: raw stays the truth)
    first_end = text.find("\r\n")
    first = text if first_end < 0 else text[:first_end]
    if is_response:
        version, _, rest = first.partition(" ")
        status, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or len(status) != 3 or not status.isdigit():
            raise Stop(f"not an HTTP/1.x status line: {first[:60]!r}")
        start = (version, status, reason)
    else:
        parts = first.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1]:
            raise Stop(f"not an HTTP/1.x request line: {first[:60]!r}")
        if not TOKEN_RE.fullmatch(parts[0]):
            raise Stop(f"not an HTTP method: {parts[0][:30]!r}")
        start = (parts[0], parts[1], parts[2])
    if first_end < 0:
        return start, []
    block = text[first_end + 2 :] + "\r\n"
    if not _HEADERS_RE.fullmatch(block):
        # RFC 9112 5.1/5.2: no space before the colon, no obsolete line folding.
        bad = next(line for line in block.split("\r\n") if not _HEADERS_RE.fullmatch(line + "\r\n"))
        raise Stop(f"a malformed header line: {bad[:60]!r}")
    return start, _HEADER_RE.findall(block)


def _body_headers(headers: list[tuple[str, str]]) -> tuple[str | None, list[str]]:
    """The last transfer coding (None: none) and the Content-Length values, in one pass
    (names are compared only when their length could match: this runs per message)."""
    coding: str | None = None
    lengths: list[str] = []
    for name, value in headers:
        size = len(name)
        if size == 14 and name.lower() == "content-length":
            lengths.append(value)
        elif size == 17 and name.lower() == "transfer-encoding":
            for part in value.split(","):
                part = part.strip().lower()
                if part:
                    coding = part
    return coding, lengths


def _content_length(values: list[str]) -> int:
    found = {part.strip() for v in values for part in v.split(",")}
    if len(found) != 1:
        raise Stop("conflicting Content-Length headers")
    (text,) = found
    if not text.isdigit() or len(text) > 15:
        raise Stop(f"a bad Content-Length {text[:20]!r}")
    return int(text)


def _request_framing(coding: str | None, lengths: list[str]) -> Framing:
    if coding is not None:  # RFC 9112 6.3 (3, 4): chunked last, else the request is bad
        if coding != "chunked":
            raise Stop(f"a request body in transfer coding {coding!r}")
        return Framing.CHUNKED
    return Framing.LENGTH if lengths else Framing.NONE


def _response_framing(
    request: tuple[str, str, str], status: int, coding: str | None, lengths: list[str]
) -> Framing:
    if request[0] == "HEAD" or status < 200 or status in (204, 304) or _switches(request, status):
        # A switch's response is its head: what follows is another protocol's.
        return Framing.NONE
    if coding is not None:
        return Framing.CHUNKED if coding == "chunked" else Framing.CLOSE
    return Framing.LENGTH if lengths else Framing.CLOSE


def _switches(request: tuple[str, str, str], status: int) -> bool:
    """Does this response end HTTP on the connection (RFC 9110 15.2.2, 9.3.6)?"""
    return status == 101 or (request[0] == "CONNECT" and 200 <= status < 300)


class ExchangeParser:
    """One connection's exchanges. Feed both directions; take what completed with
    :meth:`events`: ``("request", exchange)`` when a request is whole, ``("response",
    exchange)`` when its response is. ``following`` is False once the connection cannot be
    followed; ``stopped`` says why (and exchanges still open are given up)."""

    def __init__(self, max_head: int = MAX_HEAD, max_body: int = MAX_BODY) -> None:
        self._requests = _Reader(False, max_head, max_body)
        self._responses = _Reader(True, max_head, max_body)
        self._waiting: list[Exchange] = []  # requests seen, no response yet (in order)
        self._events: list[tuple[str, Exchange]] = []
        self._informational = bytearray()  # 1xx responses' bytes, until the final response
        self.following = True
        self.stopped = ""

    def request_data(self, data: bytes, now: float) -> None:
        if not self.following:
            return
        try:
            for msg in self._requests.feed(data, now, _no_request):
                ex = Exchange(msg)
                self._waiting.append(ex)
                self._events.append(("request", ex))
                if len(self._waiting) > MAX_WAITING:
                    raise Stop(f"more than {MAX_WAITING} requests waiting for responses")
        except Stop as stop:
            self._stop(str(stop), self._requests.msg)

    def response_data(self, data: bytes, now: float) -> None:
        if not self.following:
            return
        reader = self._responses
        reader.add(data, now)
        try:
            while (msg := reader.next_message(now, self._request_for)) is not None:
                self._answered(msg)
        except Stop as stop:
            self._stop(str(stop), self._responses.msg)

    def closed(self, now: float) -> None:
        """The connection ended (either way): a response read until close completes."""
        if not self.following:
            return
        msg = self._responses.eof(now)
        if msg is not None:
            self._answered(msg)
        self._stop("the connection closed", None)

    def events(self) -> list[tuple[str, Exchange]]:
        """What completed since the last call, in order."""
        out, self._events = self._events, []
        return out

    def _answered(self, msg: Message) -> None:
        switched = _switches(self._waiting[0].request.start, int(msg.start[1]))
        if int(msg.start[1]) < 200 and not switched:
            self._informational += msg.raw  # 100 Continue: its bytes go with the answer
            return
        if self._informational:
            msg.raw[:0], self._informational = self._informational, bytearray()
        ex = self._waiting.pop(0)
        ex.response = msg
        self._events.append(("response", ex))
        if switched:
            raise Stop("the connection switched protocols")

    def _request_for(self, start: tuple[str, str, str]) -> tuple[str, str, str]:
        if not self._waiting:
            raise Stop("a response to no request")
        return self._waiting[0].request.start

    def _stop(self, why: str, partial: Message | None) -> None:
        """Stop following; a message cut off by a limit is still reported (truncated)."""
        self.following, self.stopped = False, why
        if partial is not None and partial.truncated:
            if partial is self._responses.msg and self._waiting:
                ex = self._waiting.pop(0)
                ex.response = partial
                self._events.append(("response", ex))
            elif partial is self._requests.msg:
                self._events.append(("request", Exchange(partial)))
        self._requests.buf.clear()
        self._responses.buf.clear()


def _no_request(start: tuple[str, str, str]) -> tuple[str, str, str]:
    raise AssertionError("requests need no request")  # pragma: no cover


class RequestReader:
    """Requests from one byte stream (a server's side): :meth:`feed` returns the requests
    the bytes completed and raises :class:`Stop` on what is not HTTP/1.1 or over the
    limits."""

    def __init__(self, max_head: int = MAX_HEAD, max_body: int = MAX_BODY) -> None:
        self._reader = _Reader(False, max_head, max_body)

    def feed(self, data: bytes, now: float = 0.0) -> list[Message]:
        return self._reader.feed(data, now, _no_request)


__all__ = [
    "MAX_BODY",
    "MAX_HEAD",
    "Exchange",
    "ExchangeParser",
    "Framing",
    "Message",
    "RequestReader",
    "Stop",
]
