"""Where HTTP/1.x messages begin and end in a byte stream, without touching the stream.

The capture proxy passes every byte through unchanged and feeds a copy here, one splitter
per direction: it only finds each message's head and body (Content-Length, chunked, or
until close for a response) so that requests and responses can be recorded. Sans-I/O.
Bytes from a visitor are untrusted: a head is bounded, a body is recorded only up to
``body_limit`` (counted whole, kept in part), and anything that is not HTTP/1.x stops the
splitting (the bytes still flow; that connection is simply not recorded further).
"""

from __future__ import annotations

import dataclasses
import re

MAX_HEAD = 64 * 1024
_CHUNK_LINE_MAX = 1024
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclasses.dataclass
class Message:
    """One HTTP message as it crossed the wire: ``head`` (start line and headers, as sent),
    ``body`` (as sent, chunk framing included; at most the splitter's body limit) and
    ``body_size`` (the whole body's size on the wire)."""

    start_line: str
    headers: list[tuple[str, str]]
    head: bytes
    body: bytes = b""
    body_size: int = 0

    @property
    def complete(self) -> bool:
        """All of the body was kept (a replay sends exactly what was received)."""
        return len(self.body) == self.body_size

    @property
    def raw(self) -> bytes:
        return self.head + self.body

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class NotHTTP(Exception):
    """The stream is not (or no longer) HTTP/1.x that can be split."""


def parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """The start line and headers of a head ending in CRLF CRLF (NotHTTP when malformed)."""
    lines = head[:-4].split(b"\r\n")
    try:
        start = lines[0].decode("ascii")
    except UnicodeDecodeError:
        raise NotHTTP("start line is not ASCII") from None
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise NotHTTP(f"bad header line {line[:40]!r}")
        headers.append((name.decode("ascii"), value.strip().decode("latin-1")))
    return start, headers


class Splitter:
    """Feed one direction's bytes; take whole messages out of :attr:`messages`.

    ``role`` is ``request`` or ``response``. A response splitter must be told each
    request's method (:meth:`expect`): a reply to HEAD has no body whatever it says.
    """

    def __init__(self, role: str, body_limit: int = 1 << 20) -> None:
        assert role in ("request", "response")
        self.role, self.body_limit = role, body_limit
        self.messages: list[Message] = []
        self.failed = ""  # why splitting stopped ("" while it goes on)
        self.upgraded = False  # after 101 Switching Protocols / CONNECT: bytes, not HTTP
        self._buf = bytearray()
        self._current: Message | None = None
        self._left = 0  # body bytes still due (length mode) or in this chunk
        self._mode = ""  # "", "length", "chunked", "close"
        self._chunk_state = "size"  # size | data | data-crlf | trailer
        self._methods: list[str] = []  # request methods still waiting for their response

    def expect(self, method: str) -> None:
        self._methods.append(method.upper())

    def feed(self, data: bytes) -> None:
        if self.failed or self.upgraded or not data:
            return
        if not self._buf and self._current is not None and self._mode in ("length", "close"):
            # The common bulk case (a download): count the body straight from ``data``,
            # copying only what is kept, never the whole stream through the buffer.
            n = len(data) if self._mode == "close" else min(self._left, len(data))
            self._count(data, n)
            if self._mode == "length":
                self._left -= n
                if self._left == 0:
                    self._finish()
            data = data[n:]
            if not data:
                return
        self._buf += data
        try:
            while self._buf and not self.upgraded:
                if self._current is None:
                    if not self._start_message():
                        return
                elif not self._take_body():
                    return
        except NotHTTP as exc:
            self.failed = str(exc) or "not HTTP"
            self._buf.clear()

    def close(self) -> None:
        """The stream ended: a response read until close is whole now."""
        if self._current is not None and self._mode == "close":
            self._finish()

    # -- heads ------------------------------------------------------------------------------
    def _start_message(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                raise NotHTTP(f"head longer than {MAX_HEAD} bytes")
            return False
        head = bytes(self._buf[: end + 4])
        del self._buf[: end + 4]
        start, headers = parse_head(head)
        msg = Message(start, headers, head)
        self._current = msg
        self._mode, self._left = self._framing(msg)
        if self._mode == "skip":
            self._current, self._mode = None, ""
        elif self._mode == "":
            self._finish()
        return True

    def _framing(self, msg: Message) -> tuple[str, int]:
        parts = msg.start_line.split(" ", 2)
        if self.role == "request":
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                raise NotHTTP(f"not an HTTP/1.x request line: {msg.start_line[:60]!r}")
            if parts[0].upper() == "CONNECT":
                self.upgraded = True
        else:
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise NotHTTP(f"not an HTTP/1.x status line: {msg.start_line[:60]!r}")
            status = int(parts[1])
            if 100 <= status < 200:
                if status == 101:
                    self.upgraded = True
                    return "", 0  # the last HTTP message on this connection
                return "skip", 0  # 100 Continue, 103…: the real response follows
            method = self._methods.pop(0) if self._methods else "GET"
            if method == "HEAD" or status in (204, 304):
                return "", 0
        coding = (msg.header("transfer-encoding") or "").lower()
        if coding:
            if coding.split(",")[-1].strip() != "chunked":
                if self.role == "request":
                    raise NotHTTP("a request body of unknown length")
                return "close", 0
            self._chunk_state = "size"
            return "chunked", 0
        length = msg.header("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise NotHTTP(f"bad Content-Length {length!r}")
            size = int(length)
            return ("length", size) if size else ("", 0)
        return ("close", 0) if self.role == "response" else ("", 0)

    # -- bodies -----------------------------------------------------------------------------
    def _count(self, data: bytes | bytearray, n: int) -> None:
        """``n`` body bytes from the front of ``data``: counted, kept within the limit."""
        msg = self._current
        assert msg is not None
        room = self.body_limit - len(msg.body)
        if room > 0:
            msg.body += bytes(data[: min(n, room)])
        msg.body_size += n

    def _keep(self, data: bytes) -> None:
        self._count(data, len(data))

    def _take_body(self) -> bool:
        if self._mode == "length":
            n = min(self._left, len(self._buf))
            self._count(self._buf, n)
            del self._buf[:n]
            self._left -= n
            if self._left == 0:
                self._finish()
                return True
            return False
        if self._mode == "close":
            self._count(self._buf, len(self._buf))
            self._buf.clear()
            return False
        return self._take_chunked()

    def _take_chunked(self) -> bool:
        while self._buf:
            if self._chunk_state == "data":
                n = min(self._left, len(self._buf))
                self._count(self._buf, n)
                del self._buf[:n]
                self._left -= n
                if self._left:
                    return False
                self._chunk_state = "data-crlf"
                continue
            end = self._buf.find(b"\r\n")
            if end < 0:
                if len(self._buf) > _CHUNK_LINE_MAX:
                    raise NotHTTP("chunk line too long")
                return False
            line = bytes(self._buf[: end + 2])
            del self._buf[: end + 2]
            self._keep(line)
            if self._chunk_state == "data-crlf":
                if line != b"\r\n":
                    raise NotHTTP("chunk data not followed by CRLF")
                self._chunk_state = "size"
            elif self._chunk_state == "size":
                size_text = line[:-2].split(b";", 1)[0].strip()
                try:
                    self._left = int(size_text, 16)
                except ValueError:
                    raise NotHTTP(f"bad chunk size {size_text[:20]!r}") from None
                self._chunk_state = "data" if self._left else "trailer"
            elif line == b"\r\n":  # the end of the trailer: the message is whole
                self._finish()
                return True
        return False

    def _finish(self) -> None:
        assert self._current is not None
        self.messages.append(self._current)
        self._current, self._mode, self._left = None, "", 0
