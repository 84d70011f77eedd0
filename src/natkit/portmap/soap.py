"""Sans-I/O SOAP 1.1 for UPnP control actions: build the POST, parse the answer.

Only the subset UPnP uses: one action element with flat string arguments out, a
``{action}Response`` element or a UPnPError fault back. The answer comes from the
router, so it is size-bounded, parsed with defusedxml and matched by local name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from xml.etree.ElementTree import Element

import defusedxml
import defusedxml.ElementTree

from natkit.errors import ProtocolError, upnp_error

MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = "natkit/0.1 UPnP/1.1"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Characters XML 1.0 cannot carry at all, not even as character references.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_LINE_BREAKS = re.compile(r"[\t\n\r]")
_CODE = re.compile(r"[0-9]{1,9}")
# Keep a bare CR: XML parsers would otherwise normalise it away.
_TEXT_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"}
_ATTR_ENTITIES = {**_TEXT_ENTITIES, '"': "&quot;", "'": "&apos;", "\n": "&#10;", "\t": "&#9;"}
_TEXT_SPECIAL = re.compile("[&<>\r]")
_ATTR_SPECIAL = re.compile("[&<>\r\"'\n\t]")
# Not xml.sax.saxutils.escape: that module imports urllib.request (~8 ms of every
# ``natkit map`` start).


def _escape_text(text: str) -> str:
    return _TEXT_SPECIAL.sub(lambda m: _TEXT_ENTITIES[m.group()], text)


def _escape_attribute(text: str) -> str:
    """For a double- or single-quoted attribute value."""
    return _ATTR_SPECIAL.sub(lambda m: _ATTR_ENTITIES[m.group()], text)


class RouterRefusal(ProtocolError):
    """The router answered, but with a refusal that carries no UPnP error code.

    It did answer, so this is a refusal, not silence: discovery keeps such a service."""


class HTTPStatusError(RouterRefusal):
    """The router answered with an HTTP error status and no UPnP fault (e.g. 401, 500)."""

    def __init__(self, status: int, action: str, router: str = "router") -> None:
        self.status = status
        self.action = action
        super().__init__(f"{router} answered HTTP {status} to {action}")


def build_request(
    service_type: str,
    action: str,
    args: Sequence[tuple[str, str | int]],
    *,
    host: str,
    port: int,
    path: str,
) -> tuple[list[tuple[str, str]], bytes]:
    """Return (headers, body) of the POST that invokes ``action`` on ``service_type``."""
    # service_type comes from a device description, and it goes into a header.
    if not service_type or _UNPRINTABLE.search(service_type) or '"' in service_type:
        raise ValueError(f"bad UPnP service type {service_type!r}")
    if not _NAME.fullmatch(action):
        raise ValueError(f"bad UPnP action name {action!r}")
    if not host or _UNPRINTABLE.search(host):
        raise ValueError(f"bad host {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"bad port {port!r}")
    if not path.startswith("/") or _UNPRINTABLE.search(path):
        raise ValueError(f"control path must start with '/' and be printable ASCII: {path!r}")

    parts: list[str] = []
    for name, value in args:
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad UPnP argument name {name!r}")
        if not isinstance(value, (str, int)):
            raise TypeError(f"argument {name} must be str or int, not {type(value).__name__}")
        text = str(int(value)) if isinstance(value, int) else value
        if _NOT_XML.search(text):
            raise ValueError(f"argument {name} has characters XML cannot carry: {text!r}")
        parts.append(f"<{name}>{_escape_text(text)}</{name}>")
    body = (
        '<?xml version="1.0"?>\r\n'
        '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">'
        f'<s:Body><u:{action} xmlns:u="{_escape_attribute(service_type)}">'
        f"{''.join(parts)}</u:{action}></s:Body></s:Envelope>\r\n"
    ).encode()

    authority = f"[{host}]" if ":" in host and not host.startswith("[") else host
    headers = [
        ("Host", f"{authority}:{port}"),
        ("Content-Type", 'text/xml; charset="utf-8"'),
        ("SOAPAction", f'"{service_type}#{action}"'),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        ("User-Agent", USER_AGENT),
    ]
    return headers, body


def parse_response(status: int, body: bytes, action: str) -> dict[str, str]:
    """Return the out-arguments of ``action``'s response, by local name.

    A SOAP fault carrying a UPnP error code raises the matching
    :class:`~natkit.errors.UPnPError`; anything else unusable raises :class:`ProtocolError`.
    """
    if len(body) > MAX_RESPONSE_BYTES:
        raise ProtocolError(
            f"{action} response is {len(body)} bytes, more than the {MAX_RESPONSE_BYTES} allowed"
        )
    root = _parse_xml(body, action)
    if root is None:
        if status != 200:  # an HTML error page, or nothing at all
            raise HTTPStatusError(status, action)
        raise ProtocolError(f"router's answer to {action} is not valid XML")

    fault = _find(root, "Fault")
    if fault is not None:
        _raise_fault(fault, action)
    if status != 200:
        raise HTTPStatusError(status, action)

    response = _find(root, f"{action}Response", ignore_case=True)
    if response is None:
        raise ProtocolError(f"router's answer to {action} has no {action}Response element")
    out: dict[str, str] = {}
    for child in response:
        # The first copy wins, so a duplicate cannot override a value already read.
        out.setdefault(_local(child), _text(child))
    out.pop("", None)
    return out


def _raise_fault(fault: Element, action: str) -> None:
    code_el = _find(fault, "errorCode")
    description = _text(_find(fault, "errorDescription"))
    code = _text(code_el)
    if _CODE.fullmatch(code):
        raise upnp_error(int(code), description, action)
    reason = _text(_find(fault, "faultstring")) or description or "no reason given"
    raise RouterRefusal(f"router refused {action} with a SOAP fault: {reason[:200]}")


def _parse_xml(body: bytes, action: str) -> Element | None:
    """The document's root; None if it is not XML. Hostile XML raises ProtocolError."""
    try:
        root = defusedxml.ElementTree.fromstring(
            body, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except defusedxml.DTDForbidden:
        raise ProtocolError(f"router's answer to {action} contains a DTD; refused") from None
    except defusedxml.DefusedXmlException as exc:
        raise ProtocolError(f"router's answer to {action} was refused: {exc}") from None
    except Exception:  # ParseError, and whatever else a malformed document provokes
        return None
    return root if isinstance(root, Element) else None


def _local(element: Element) -> str:
    tag = element.tag
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""


def _find(root: Element | None, name: str, *, ignore_case: bool = False) -> Element | None:
    """First element called ``name`` at or below ``root``, whatever its namespace."""
    if root is None:
        return None
    want = name.lower() if ignore_case else name
    for element in root.iter():
        local = _local(element)
        if (local.lower() if ignore_case else local) == want:
            return element
    return None


def _text(element: Element | None) -> str:
    if element is None:
        return ""
    text = _LINE_BREAKS.sub(" ", "".join(element.itertext())).strip()
    # Values reach logs and terminals: neutralise control characters.
    return _CONTROL.sub("\ufffd", text)
