"""Reading just enough of a visitor's first bytes to route it, sans-I/O.

``http_host`` finds the Host of an HTTP/1.x request head; ``tls_sni`` finds the server name
in a TLS ClientHello (the relay passes TLS through untouched and never holds keys). Both
return None while more bytes are needed and raise :class:`ProtocolError` on garbage.
"""

from __future__ import annotations

import re
import struct

from natkit.errors import ProtocolError

MAX_HTTP_HEAD = 16 * 1024
MAX_CLIENT_HELLO = 16 * 1024 + 5
_HOSTNAME = re.compile(
    r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)


def normalize_hostname(name: str) -> str:
    name = name.strip().lower().rstrip(".")
    if len(name) > 253 or not _HOSTNAME.fullmatch(name):  # not match: $ allows a "\n"
        raise ProtocolError(f"invalid host name {name[:80]!r}")
    return name


def http_host(head: bytes) -> str | None:
    """The Host header's name (without port) once the request head is complete."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        if len(head) > MAX_HTTP_HEAD:
            raise ProtocolError(f"HTTP request head exceeds {MAX_HTTP_HEAD} bytes")
        return None
    if end > MAX_HTTP_HEAD:
        raise ProtocolError(f"HTTP request head exceeds {MAX_HTTP_HEAD} bytes")
    lines = head[:end].split(b"\r\n")
    if len(lines[0].split(b" ")) != 3 or not lines[0].split(b" ")[2].startswith(b"HTTP/1."):
        raise ProtocolError("not an HTTP/1.x request")
    hosts: list[bytes] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or name != name.strip() or not name:
            # RFC 9112 5.1: no whitespace between a field name and the colon.
            raise ProtocolError("malformed HTTP header line")
        if name.lower() == b"host":
            hosts.append(value)
    if len(hosts) != 1:
        # RFC 9112 3.2: exactly one Host; two could route one way and be served another.
        raise ProtocolError(
            "HTTP request has no Host header"
            if not hosts
            else "HTTP request has several Host headers"
        )
    text = hosts[0].strip().decode("ascii", errors="replace")
    host = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    return normalize_hostname(host)


def tls_sni(data: bytes) -> str | None:
    """The SNI host name of a TLS ClientHello, once the whole first record has arrived."""
    if len(data) < 5:
        return None
    content_type, _version, length = struct.unpack_from("!BHH", data)
    if content_type != 22:
        raise ProtocolError("not a TLS handshake")
    if length > MAX_CLIENT_HELLO - 5:
        raise ProtocolError("TLS ClientHello record too large")
    if len(data) < 5 + length:
        return None
    body = data[5 : 5 + length]
    try:
        return _parse_client_hello(body)
    except (struct.error, IndexError):
        raise ProtocolError("malformed TLS ClientHello") from None


def _parse_client_hello(b: bytes) -> str:
    if b[0] != 1:
        raise ProtocolError("first TLS handshake message is not a ClientHello")
    hs_len = int.from_bytes(b[1:4], "big")
    if hs_len + 4 > len(b):
        raise ProtocolError("ClientHello split over several records; not supported")
    p = 4 + 2 + 32  # version, random
    p += 1 + b[p]  # session id
    p += 2 + struct.unpack_from("!H", b, p)[0]  # cipher suites
    p += 1 + b[p]  # compression methods
    if p + 2 > 4 + hs_len:
        raise ProtocolError("ClientHello has no extensions (no SNI)")
    end = p + 2 + struct.unpack_from("!H", b, p)[0]
    p += 2
    if end > 4 + hs_len:
        raise ProtocolError("ClientHello extensions run past its end")
    while p + 4 <= end:
        ext_type, ext_len = struct.unpack_from("!HH", b, p)
        p += 4
        if p + ext_len > end:
            raise ProtocolError("ClientHello extension runs past its end")
        if ext_type == 0:  # server_name
            q = p + 2
            list_end = p + 2 + struct.unpack_from("!H", b, p)[0]
            while q + 3 <= min(list_end, p + ext_len):
                name_type, name_len = b[q], struct.unpack_from("!H", b, q + 1)[0]
                q += 3
                if name_type == 0:
                    raw = b[q : q + name_len]
                    if len(raw) != name_len:
                        raise ProtocolError("SNI name truncated")
                    return normalize_hostname(raw.decode("ascii", errors="replace"))
                q += name_len
        p += ext_len
    raise ProtocolError("ClientHello has no server name (SNI)")
