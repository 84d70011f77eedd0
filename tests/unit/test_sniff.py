"""Routing a visitor by its first bytes: the Host of an HTTP/1.x request head, the SNI of a
real TLS ClientHello (made by Python's own ssl module); garbage is a ProtocolError, never
another exception; incomplete input is None."""

from __future__ import annotations

import ssl
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natkit.errors import ProtocolError
from natkit.relay import sniff

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def client_hello(
    server_hostname: str | None,
    *,
    maximum: ssl.TLSVersion | None = None,
    alpn: list[str] | None = None,
) -> bytes:
    """The bytes a real TLS client sends first, captured with a MemoryBIO."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        ctx.maximum_version = maximum
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    data = outgoing.read()
    assert data[0] == 22 and data[5] == 1, "not a handshake record with a ClientHello"
    return data


def record(body: bytes, content_type: int = 22, version: int = 0x0301) -> bytes:
    return struct.pack("!BHH", content_type, version, len(body)) + body


def hello_body(extensions: bytes | None, *, session_id: bytes = b"", suites: bytes = b"\x13\x01") -> bytes:  # fmt: skip
    """A ClientHello handshake message built by hand (for the cases ssl will not make)."""
    msg = b"\x03\x03" + b"\x11" * 32
    msg += bytes([len(session_id)]) + session_id
    msg += struct.pack("!H", len(suites)) + suites
    msg += b"\x01\x00"  # compression: null
    if extensions is not None:
        msg += struct.pack("!H", len(extensions)) + extensions
    return b"\x01" + len(msg).to_bytes(3, "big") + msg


def ext(ext_type: int, data: bytes) -> bytes:
    return struct.pack("!HH", ext_type, len(data)) + data


def sni_ext(*names: tuple[int, bytes]) -> bytes:
    entries = b"".join(struct.pack("!BH", t, len(n)) + n for t, n in names)
    return ext(0, struct.pack("!H", len(entries)) + entries)


# ---- HTTP Host ----------------------------------------------------------------------------


def head(*lines: str | bytes) -> bytes:
    parts = [x.encode() if isinstance(x, str) else x for x in lines]
    return b"\r\n".join(parts) + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "host"),
    [
        (head("GET / HTTP/1.1", "Host: app.lab.test"), "app.lab.test"),
        (head("GET / HTTP/1.0", "Host: app.lab.test:8080"), "app.lab.test"),
        (head("GET / HTTP/1.1", "host: APP.Lab.TEST"), "app.lab.test"),
        (head("GET / HTTP/1.1", "HOST:app.lab.test"), "app.lab.test"),
        (head("GET / HTTP/1.1", "Host:   app.lab.test.  "), "app.lab.test"),
        (head("POST /x?y=1 HTTP/1.1", "User-Agent: t", "Accept: */*", "Host: a.b"), "a.b"),
        (head("GET http://other.example/ HTTP/1.1", "Host: app.lab.test"), "app.lab.test"),
        (
            head("GET / HTTP/1.1", "X-Forwarded-Host: evil.test", "Host: app.lab.test"),
            "app.lab.test",
        ),
        (head("GET / HTTP/1.1", "Host: 100.200.0.2:8080"), "100.200.0.2"),
        (head("GET / HTTP/1.1", "Host: localhost"), "localhost"),
    ],
)
def test_http_host(data: bytes, host: str) -> None:
    assert sniff.http_host(data) == host


def test_http_host_ignores_the_body_after_the_head() -> None:
    data = head("POST / HTTP/1.1", "Host: app.lab.test", "Content-Length: 5") + b"Host:"
    assert sniff.http_host(data) == "app.lab.test"
    assert sniff.http_host(data + b"\x00\xff" * 5000) == "app.lab.test"


def test_http_host_is_none_until_the_head_is_complete() -> None:
    data = head("GET / HTTP/1.1", "Host: app.lab.test", "Accept: */*")
    for i in range(len(data)):
        assert sniff.http_host(data[:i]) is None, data[:i]
    assert sniff.http_host(data) == "app.lab.test"


def test_http_host_refuses_two_host_headers() -> None:
    data = head("GET / HTTP/1.1", "Host: one.lab.test", "Host: two.lab.test")
    with pytest.raises(ProtocolError, match="several Host headers"):
        sniff.http_host(data)


def test_http_host_refuses_space_before_colon() -> None:
    with pytest.raises(ProtocolError, match="malformed HTTP header line"):
        sniff.http_host(head("GET / HTTP/1.1", "Host : one.lab.test"))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (head("GET / HTTP/1.1"), "no Host"),
        (head("GET / HTTP/1.0", "Accept: */*"), "no Host"),
        (head("GET / HTTP/1.1", "Hostname: app.lab.test"), "no Host"),
        (head("GET / HTTP/1.1", "Host:"), "invalid host"),
        (head("GET / HTTP/1.1", "Host: :8080"), "invalid host"),
        (head("GET / HTTP/1.1", "Host: [::1]:8080"), "invalid host"),
        (head("GET / HTTP/1.1", "Host: a b"), "invalid host"),
        (head("GET / HTTP/1.1", "Host: a..b"), "invalid host"),
        (head("GET / HTTP/1.1", "Host: -a.b"), "invalid host"),
        (head("GET / HTTP/1.1", "Host: a_b.test"), "invalid host"),
        (head("GET / HTTP/1.1", "Host: user@app.lab.test"), "invalid host"),
        (head("GET / HTTP/1.1", b"Host: caf\xc3\xa9.test"), "invalid host"),
        (head("GET / HTTP/1.1", "Host: " + "a" * 300), "invalid host"),
        (head("GET / HTTP/1.1", "Host: " + ".".join(["abcdefgh"] * 30)), "invalid host"),
        (head("GET / HTTP/1.1", "no colon here", "Host: a.b"), "malformed"),
        (head("GET / HTTP/1.1", " folded", "Host: a.b"), "malformed"),
        (head("GET /"), "not an HTTP/1.x"),
        (head("GET / HTTP/2.0", "Host: a.b"), "not an HTTP/1.x"),
        (head("PRI * HTTP/2.0", "", "SM"), "not an HTTP/1.x"),
        (head("GET  / HTTP/1.1", "Host: a.b"), "not an HTTP/1.x"),
        (head("GET / FTP/1.1", "Host: a.b"), "not an HTTP/1.x"),
        (b"\r\n\r\n", "not an HTTP/1.x"),
        (b"\x16\x03\x01\x02\x00\x01\r\n\r\n", "not an HTTP/1.x"),
    ],
)
def test_http_host_refuses(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        sniff.http_host(data)


def test_http_host_oversize_head() -> None:
    endless = b"GET / HTTP/1.1\r\nX: " + b"a" * sniff.MAX_HTTP_HEAD
    assert sniff.http_host(endless[: sniff.MAX_HTTP_HEAD]) is None  # may still complete
    with pytest.raises(ProtocolError, match="exceeds"):
        sniff.http_host(endless)
    huge = head("GET / HTTP/1.1", "X: " + "a" * sniff.MAX_HTTP_HEAD, "Host: a.b")
    with pytest.raises(ProtocolError, match="exceeds"):
        sniff.http_host(huge)
    fits = head("GET / HTTP/1.1", "Host: a.b", "X: " + "a" * (sniff.MAX_HTTP_HEAD - 100))
    assert sniff.http_host(fits) == "a.b"


def test_http_host_of_a_tls_hello_or_binary_is_an_error_once_complete() -> None:
    hello = client_hello("app.lab.test")
    assert b"\r\n\r\n" not in hello
    assert sniff.http_host(hello) is None  # looks incomplete: the relay's timeout ends it
    with pytest.raises(ProtocolError):
        sniff.http_host(hello + b"\r\n\r\n")


# ---- TLS SNI ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("app.lab.test", "app.lab.test"),
        ("App.Lab.TEST", "app.lab.test"),
        ("localhost", "localhost"),
        ("a.b", "a.b"),
        ("x" * 63 + ".lab.test", "x" * 63 + ".lab.test"),
        (".".join(["abcdefghi"] * 25), ".".join(["abcdefghi"] * 25)),  # 249 characters
    ],
)
def test_tls_sni_of_real_client_hellos(name: str, expected: str) -> None:
    assert sniff.tls_sni(client_hello(name)) == expected


@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_sni_with_tls_versions_and_alpn(maximum: ssl.TLSVersion) -> None:
    data = client_hello("app.lab.test", maximum=maximum, alpn=["h2", "http/1.1"])
    assert sniff.tls_sni(data) == "app.lab.test"


def test_tls_sni_is_none_until_the_record_is_complete() -> None:
    data = client_hello("app.lab.test")
    for i in range(len(data)):
        assert sniff.tls_sni(data[:i]) is None, i
    assert sniff.tls_sni(data) == "app.lab.test"


def test_tls_sni_ignores_what_follows_the_first_record() -> None:
    data = client_hello("app.lab.test")
    assert sniff.tls_sni(data + b"\x17\x03\x03\x00\x05hello") == "app.lab.test"
    assert sniff.tls_sni(data + b"garbage") == "app.lab.test"


@pytest.mark.parametrize("name", [None, "127.0.0.1", "::1"])
def test_tls_sni_without_a_server_name(name: str | None) -> None:
    """ssl sends no SNI for no name or an IP address."""
    with pytest.raises(ProtocolError, match="no server name"):
        sniff.tls_sni(client_hello(name))


def test_tls_sni_hand_made_hellos() -> None:
    good = sni_ext((0, b"app.lab.test"))
    assert sniff.tls_sni(record(hello_body(good))) == "app.lab.test"
    # The server name after other extensions, after a name of another type, with a session id.
    other = ext(10, b"\x00\x02\x00\x17") + ext(0xFF01, b"\x00")
    assert sniff.tls_sni(record(hello_body(other + good))) == "app.lab.test"
    assert sniff.tls_sni(record(hello_body(sni_ext((1, b"xx"), (0, b"b.test"))))) == "b.test"
    assert sniff.tls_sni(record(hello_body(good, session_id=b"s" * 32))) == "app.lab.test"
    # A record header claiming an SSL 3 / TLS 1.2 record version does not matter.
    assert sniff.tls_sni(record(hello_body(good), version=0x0303)) == "app.lab.test"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (record(hello_body(None)), "no extensions"),
        (record(hello_body(b"")), "no server name"),
        (record(hello_body(ext(10, b"\x00\x02\x00\x17"))), "no server name"),
        (record(hello_body(ext(0, b"\x00\x00"))), "no server name"),  # empty name list
        (record(hello_body(sni_ext((1, b"xx")))), "no server name"),
        (record(hello_body(sni_ext((0, b"")))), "invalid host"),
        (record(hello_body(sni_ext((0, b"bad name")))), "invalid host"),
        (record(hello_body(sni_ext((0, b"caf\xc3\xa9.test")))), "invalid host"),
        (record(hello_body(sni_ext((0, b"\x00\xff")))), "invalid host"),
        (record(hello_body(sni_ext((0, b"a" * 300)))), "invalid host"),
        (record(b"\x02" + hello_body(None)[1:]), "not a ClientHello"),  # a ServerHello
        (record(b""), "malformed"),
        (record(b"\x01"), "split over several records|malformed"),
        (record(hello_body(sni_ext((0, b"a.b")))[:-8]), "split over several records"),
        (record(b"anything", content_type=23), "not a TLS handshake"),
        (record(b"anything", content_type=21), "not a TLS handshake"),
        (b"GET / HTTP/1.1\r\n", "not a TLS handshake"),
        (b"\x16\x03\x01\xff\xff" + b"\x00" * 10, "too large"),
    ],
)
def test_tls_sni_refuses(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        sniff.tls_sni(data)


def test_tls_sni_extension_lengths_that_run_past_the_end() -> None:
    body = bytearray(hello_body(sni_ext((0, b"app.lab.test"))))
    ext_start = body.index(b"\x00\x00", 4 + 2 + 32 + 1 + 2 + 2 + 2 + 2)  # the SNI extension
    lying = bytearray(body)
    lying[ext_start + 2 : ext_start + 4] = b"\xff\xff"  # extension length
    with pytest.raises(ProtocolError, match="runs past its end"):
        sniff.tls_sni(record(bytes(lying)))
    lying = bytearray(body)
    total = 4 + 2 + 32 + 1 + 2 + 2 + 2  # where the extensions' total length sits
    lying[total : total + 2] = b"\xff\xff"
    with pytest.raises(ProtocolError, match="past its end"):
        sniff.tls_sni(record(bytes(lying)))
    lying = bytearray(body)
    lying[-len(b"app.lab.test") - 2 : -len(b"app.lab.test")] = b"\x00\xff"  # name length
    with pytest.raises(ProtocolError):
        sniff.tls_sni(record(bytes(lying)))


def test_tls_sni_truncated_real_hellos_are_none_or_errors() -> None:
    """Cut a real hello's record short but tell the truth about its length: an error."""
    data = client_hello("app.lab.test")
    for cut in range(5, len(data), 7):
        body = data[5:cut]
        try:
            result = sniff.tls_sni(record(body))
        except ProtocolError:
            continue
        raise AssertionError(f"cut at {cut} gave {result!r}")


def test_normalize_hostname() -> None:
    assert sniff.normalize_hostname(" App.Lab.Test. ") == "app.lab.test"
    assert sniff.normalize_hostname("a-b.c-d") == "a-b.c-d"
    assert sniff.normalize_hostname("x" * 63) == "x" * 63
    for bad in ("", ".", "a.", "-a", "a-", "a..b", "a b", "a/b", "a:b", "ä.test", "a\nb"):
        if bad == "a.":
            assert sniff.normalize_hostname(bad) == "a"  # one trailing dot is the root
            continue
        with pytest.raises(ProtocolError):
            sniff.normalize_hostname(bad)
    with pytest.raises(ProtocolError):
        sniff.normalize_hostname("a." * 127 + "ab")  # 256 characters


def test_normalize_hostname_label_of_64_characters() -> None:
    with pytest.raises(ProtocolError):
        sniff.normalize_hostname("x" * 64 + ".lab.test")


# ---- fuzzing ------------------------------------------------------------------------------

HELLO = client_hello("app.lab.test")
HEAD = head("GET /index.html HTTP/1.1", "Host: app.lab.test:8080", "Accept: */*")


@st.composite
def mutated(draw: st.DrawFn, samples: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(samples)))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "flip", "set", "truncate", "dup"]))
        if kind == "insert":
            data[pos:pos] = draw(st.binary(max_size=16))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif kind == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and pos < len(data):
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 0x3A, 0x0D, 0x0A, 0x20]))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "dup":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))]
    return bytes(data)


def _only_protocol_errors(fn: object, data: bytes) -> str | None:
    try:
        result = fn(data)  # type: ignore[operator]
    except ProtocolError:
        return None
    assert result is None or isinstance(result, str)
    if result is not None:
        assert result == sniff.normalize_hostname(result)  # only normalized names come out
    return result


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_http_host_random(data: bytes) -> None:
    _only_protocol_errors(sniff.http_host, data)


@FUZZ
@given(mutated([HEAD, HEAD + b"body", head("GET / HTTP/1.0", "Host: [::1]:80")]))
def test_fuzz_http_host_mutated(data: bytes) -> None:
    _only_protocol_errors(sniff.http_host, data)


@FUZZ
@given(
    st.lists(
        st.sampled_from(
            ["GET", "/", " ", "HTTP/1.1", "\r\n", ":", "Host", "a.b", "\t", "é", "[", "]"]
        ),
        max_size=40,
    )
)
def test_fuzz_http_host_tokens(parts: list[str]) -> None:
    _only_protocol_errors(sniff.http_host, "".join(parts).encode() + b"\r\n\r\n")


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_tls_sni_random(data: bytes) -> None:
    _only_protocol_errors(sniff.tls_sni, data)


@FUZZ
@given(st.binary(max_size=1024))
def test_fuzz_tls_sni_random_handshake_record(body: bytes) -> None:
    """Past the record header: random bytes inside a well-formed handshake record."""
    _only_protocol_errors(sniff.tls_sni, record(b"\x01" + body))


@FUZZ
@given(mutated([HELLO, record(hello_body(sni_ext((1, b"x"), (0, b"a.b")))), client_hello(None)]))
def test_fuzz_tls_sni_mutated(data: bytes) -> None:
    _only_protocol_errors(sniff.tls_sni, data)


@FUZZ
@given(mutated([HELLO[5:]]))
def test_fuzz_tls_sni_mutated_body_with_true_length(body: bytes) -> None:
    """A mutated ClientHello in a record whose length is right: the parser itself is hit."""
    _only_protocol_errors(sniff.tls_sni, record(body[: sniff.MAX_CLIENT_HELLO - 5]))
