"""Sans-I/O SSDP: build M-SEARCH requests and parse the answers gateways send back.

Answers are unauthenticated UDP from anyone on the LAN, so the parser is strict about
the one thing we act on (LOCATION, which we will connect to) and lenient about the
rest, because real routers are sloppy about case, line endings and reason phrases.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from natkit.errors import ProtocolError

SSDP_GROUP = "239.255.255.250"
SSDP_PORT = 1900
MAX_DATAGRAM = 8192

IGD1_SEARCH_TARGET = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
IGD_SEARCH_TARGETS: tuple[str, ...] = (
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
    IGD1_SEARCH_TARGET,
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
ALL_TARGET = "ssdp:all"

USER_AGENT = "natkit/0.1 UPnP/1.1"

# Anything outside printable ASCII has no business in a request line or a URL.
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")
# C0, DEL and C1 (latin-1 maps bytes 0x80-0x9f to them): terminal escapes in disguise.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_STATUS_LINE = re.compile(r"HTTP/1\.[01][ \t]+200(?:[ \t].*)?", re.IGNORECASE)
_NOTIFY_LINE = re.compile(r"NOTIFY[ \t]+\*[ \t]+HTTP/1\.[01]", re.IGNORECASE)
_MAX_AGE = re.compile(r"(?:^|[,;\s])max-age\s*=\s*\"?([0-9]{1,10})\"?", re.IGNORECASE)
_REG_NAME = re.compile(r"[A-Za-z0-9._~-]+")
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class SsdpResponse:
    """One gateway's answer to M-SEARCH (or its ``ssdp:alive`` announcement)."""

    location: str
    st: str
    usn: str
    server: str
    max_age: int | None


def build_msearch(st: str, *, mx: int = 1, host: str = f"{SSDP_GROUP}:{SSDP_PORT}") -> bytes:
    """Return an M-SEARCH datagram asking for devices or services of type ``st``."""
    for name, value in (("st", st), ("host", host)):
        if not value or _UNPRINTABLE.search(value):
            raise ValueError(f"SSDP {name} must be non-empty printable ASCII: {value!r}")
    # UPnP 1.1 wants 1..5 and devices clamp larger values; refuse only nonsense.
    if isinstance(mx, bool) or not isinstance(mx, int) or not 1 <= mx <= 120:
        raise ValueError(f"SSDP MX must be an integer from 1 to 120, not {mx!r}")
    return (
        "M-SEARCH * HTTP/1.1\r\n"
        f"HOST: {host}\r\n"
        'MAN: "ssdp:discover"\r\n'
        f"MX: {mx}\r\n"
        f"ST: {st}\r\n"
        f"USER-AGENT: {USER_AGENT}\r\n"
        "\r\n"
    ).encode("ascii")


def parse_response(data: bytes) -> SsdpResponse:
    """Parse an M-SEARCH answer or a NOTIFY ``ssdp:alive``; :class:`ProtocolError` otherwise."""
    if len(data) > MAX_DATAGRAM:
        raise ProtocolError(f"SSDP datagram of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    # latin-1 maps every byte, so decoding cannot fail and header bytes survive as-is.
    lines = data.decode("latin-1").split("\n")
    start = lines[0].strip()
    if _STATUS_LINE.fullmatch(start):
        notify = False
    elif _NOTIFY_LINE.fullmatch(start):
        notify = True
    else:
        raise ProtocolError(f"not an SSDP response or NOTIFY: {_clean(start)[:80]!r}")

    headers: dict[str, str] = {}
    for line in lines[1:]:
        line = line.rstrip("\r")
        if not line.strip():
            break
        name, colon, value = line.partition(":")
        if not colon:
            continue  # junk line: skip it rather than lose the whole answer
        # The first copy of a header wins, so a later duplicate cannot override it.
        headers.setdefault(name.strip().upper(), value.strip())

    if notify:
        nts = headers.get("NTS", "")
        if nts.lower() != "ssdp:alive":
            raise ProtocolError(f"ignoring SSDP NOTIFY with NTS {_clean(nts)[:40]!r}")
        st = headers.get("NT", "")
    else:
        st = headers.get("ST", "")

    location = headers.get("LOCATION")
    if not location:
        raise ProtocolError("SSDP answer has no LOCATION header")
    parse_http_url(location)  # we will connect there, so it must be sane

    max_age = None
    match = _MAX_AGE.search(headers.get("CACHE-CONTROL", ""))
    if match:
        max_age = int(match.group(1))

    return SsdpResponse(
        location=location,
        st=_clean(st),
        usn=_clean(headers.get("USN", "")),
        server=_clean(headers.get("SERVER", "")),
        max_age=max_age,
    )


def parse_http_url(url: str) -> tuple[str, int, str]:
    """Split an ``http://`` URL into (host, port, path-with-query).

    Hand-rolled rather than urllib.parse, which accepts a lot we do not want (userinfo,
    whitespace, odd ports) and raises ValueError on other inputs.
    """
    if _UNPRINTABLE.search(url):
        raise ProtocolError(f"URL has whitespace, control or non-ASCII characters: {_clean(url)!r}")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "http":
        raise ProtocolError(f"not an http:// URL: {url!r}")
    rest = rest.partition("#")[0]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if "@" in authority:
        raise ProtocolError(f"URL must not contain user information: {url!r}")

    if authority.startswith("["):
        literal, bracket, after = authority[1:].partition("]")
        literal = literal.replace("%25", "%", 1)  # zone ID, RFC 6874
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise ProtocolError(f"bad IPv6 address in URL: {url!r}") from None
        if not bracket or (after and not after.startswith(":")):
            raise ProtocolError(f"bad IPv6 address in URL: {url!r}")
        host, port_text = literal, after[1:]
    else:
        host, _, port_text = authority.partition(":")
        if not _REG_NAME.fullmatch(host):
            raise ProtocolError(f"bad or empty host in URL: {url!r}")

    port = 80
    if port_text:  # an empty port after ':' means the default (RFC 3986 §3.2.3)
        if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
            raise ProtocolError(f"bad port in URL: {url!r}")
        port = int(port_text)

    if not path:
        path = "/"
    elif path.startswith("?"):
        path = "/" + path
    return host, port, path


def _clean(text: str) -> str:
    return _CONTROL.sub("\ufffd", text)
