"""Sans-I/O parser for UPnP device descriptions (the XML behind an SSDP LOCATION).

Router firmware is careless with namespaces, so elements are matched by local name.
The document comes from an unauthenticated peer: it is size-bounded, parsed with
defusedxml (no DTDs, entities or external references) and its URLs are re-validated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urljoin
from xml.etree.ElementTree import Element

import defusedxml
import defusedxml.ElementTree

from natkit.errors import ProtocolError
from natkit.portmap.ssdp import parse_http_url

MAX_DESCRIPTION_BYTES = 256 * 1024
MAX_DEVICE_DEPTH = 16
# Recovery from a broken document (see _recover): how many <service> fragments, how big each.
MAX_RECOVERED_SERVICES = 64
MAX_FRAGMENT_BYTES = 16 * 1024

# Every WAN connection service a router may offer for port mapping, any version:
# WANIPConnection:1/2 (the standard ones), WANPPPConnection:1 and, on the Orange Livebox
# (Sagemcom), WANPPPConnection:2; TR-064 style routers (Huawei HG531, seen in miniupnp
# issue #273 and lab-facts) name them urn:dslforum-org:service:WANPPPConnection:1.
_WAN_TYPE = re.compile(
    r"urn:(schemas-upnp-org|dslforum-org):service:(WANIPConnection|WANPPPConnection):([1-9][0-9]{0,2})"
)

# Names end up on a terminal; C0/C1 controls could smuggle escape sequences there.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Service:
    """A service of some device in the tree, with its URLs made absolute."""

    service_type: str
    service_id: str
    control_url: str
    event_sub_url: str
    scpd_url: str
    device_type: str


@dataclass(frozen=True)
class DeviceDescription:
    """The root device and every service found anywhere below it."""

    device_type: str
    friendly_name: str
    manufacturer: str
    model_name: str
    udn: str
    services: tuple[Service, ...]

    # The parse error, when the document was not well-formed and its services were read
    # from its <service> fragments one by one (see _recover); "" for a sound document.
    repaired: str = ""

    def wan_services(self) -> list[Service]:
        """The WAN*Connection services, newest version first, then IP before PPP, then the
        UPnP forum's before dslforum's; document order within one type."""
        wan = [s for s in self.services if wan_service_type(s.service_type) is not None]
        return sorted(wan, key=wan_preference)


@dataclass(frozen=True)
class WanServiceType:
    """What a WAN connection service type says: who defined it, which kind, which version."""

    domain: str  # "schemas-upnp-org" | "dslforum-org"
    kind: str  # "WANIPConnection" | "WANPPPConnection"
    version: int


def wan_service_type(service_type: str) -> WanServiceType | None:
    """The parts of a WAN connection service type, or None for any other service."""
    match = _WAN_TYPE.fullmatch(service_type)
    if match is None:
        return None
    return WanServiceType(match.group(1), match.group(2), int(match.group(3)))


def wan_preference(service: Service) -> tuple[int, int, int]:
    """Sort key among WAN services (smaller is better); other services sort last."""
    parsed = wan_service_type(service.service_type)
    if parsed is None:
        return (1, 0, 0)
    return (
        -parsed.version,
        0 if parsed.kind == "WANIPConnection" else 1,
        0 if parsed.domain == "schemas-upnp-org" else 1,
    )


def parse_description(body: bytes, location: str) -> DeviceDescription:
    """Parse a device description fetched from ``location``; :class:`ProtocolError` if unusable.

    A document that is not well-formed (one broken tag, as some firmware serves) is not
    refused outright: its ``<service>`` fragments are parsed one by one (see _recover).
    """
    if len(body) > MAX_DESCRIPTION_BYTES:
        raise ProtocolError(
            f"device description from {location} is {len(body)} bytes, "
            f"more than the {MAX_DESCRIPTION_BYTES} allowed"
        )
    try:
        root = _parse_xml(body, location)
    except _NotWellFormed as broken:
        recovered = _recover(body, location, str(broken))
        if recovered is None:
            raise ProtocolError(str(broken)) from None
        return recovered
    device = root if _local(root) == "device" else _child(root, "device")
    if device is None:
        raise ProtocolError(f"device description from {location} has no root <device>")

    base = location
    url_base = _child(root, "URLBase")
    if url_base is not None:
        candidate = _text(url_base)
        if _valid_http(candidate):  # a bogus URLBase is ignored, as UPnP 1.1 dropped it
            base = candidate

    services: list[Service] = []
    _collect(device, base, services, depth=0, location=location)
    return DeviceDescription(
        device_type=_text(_child(device, "deviceType")),
        friendly_name=_text(_child(device, "friendlyName")),
        manufacturer=_text(_child(device, "manufacturer")),
        model_name=_text(_child(device, "modelName")),
        udn=_text(_child(device, "UDN")),
        services=tuple(services),
    )


class _NotWellFormed(Exception):
    """The document is not well-formed XML (but not hostile: no DTD, no entity games)."""


def _parse_xml(body: bytes, location: str) -> Element:
    try:
        root = defusedxml.ElementTree.fromstring(
            body, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except defusedxml.DTDForbidden:
        raise ProtocolError(f"device description from {location} contains a DTD; refused") from None
    except defusedxml.DefusedXmlException as exc:
        raise ProtocolError(f"device description from {location} was refused: {exc}") from None
    except Exception as exc:  # ParseError, and whatever else a hostile document provokes
        raise _NotWellFormed(
            f"device description from {location} is not valid XML: {exc}"
        ) from None
    if not isinstance(root, Element):
        raise _NotWellFormed(f"device description from {location} is not valid XML")
    return root


# Tolerant recovery, in the spirit of miniupnpc's parser (which maps through such documents),
# but never by parsing the broken document leniently: each <service>…</service> fragment is
# cut out and parsed on its own by defusedxml, with a cap on count and size. A document that
# mentions a DTD or an entity declaration anywhere is not recovered at all.
_OPEN_SERVICE = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?service[\s>]")
_CLOSE_SERVICE = re.compile(rb"</(?:[A-Za-z_][\w.-]*:)?service\s*>")
_TAG_PREFIX = re.compile(rb"<(/?)[A-Za-z_][\w.-]*:(?=[A-Za-z_])")
_DECLARATION = re.compile(rb"<!(?:DOCTYPE|ENTITY)", re.IGNORECASE)
_MAX_FIELD = 512


def _recover(body: bytes, location: str, error: str) -> DeviceDescription | None:
    if _DECLARATION.search(body):
        return None
    base = location
    url_base = _field(body, b"URLBase")
    if _valid_http(url_base):
        base = url_base
    services: list[Service] = []
    for fragment in _service_fragments(body):
        element = _parse_fragment(fragment)
        if element is None:
            continue
        control_url = _resolve(base, _text(_child(element, "controlURL")))
        if control_url:
            services.append(_service(element, base, control_url, device_type=""))
    if not services:
        return None
    return DeviceDescription(
        device_type=_field(body, b"deviceType"),  # the first one is the root device's
        friendly_name=_field(body, b"friendlyName"),
        manufacturer=_field(body, b"manufacturer"),
        model_name=_field(body, b"modelName"),
        udn=_field(body, b"UDN"),
        services=tuple(services),
        repaired=error,
    )


def _service_fragments(body: bytes) -> list[bytes]:
    """Each <service>…</service>, pairing every opening with the next closing (linear time)."""
    closes = [m.end() for m in _CLOSE_SERVICE.finditer(body)]
    fragments: list[bytes] = []
    i = 0
    for opening in _OPEN_SERVICE.finditer(body):
        start = opening.start()
        while i < len(closes) and closes[i] <= start:
            i += 1
        if i == len(closes) or len(fragments) >= MAX_RECOVERED_SERVICES:
            break
        if closes[i] - start <= MAX_FRAGMENT_BYTES:
            fragments.append(body[start : closes[i]])
    return fragments


def _parse_fragment(fragment: bytes) -> Element | None:
    # Prefixes are dropped: their xmlns declarations were on an ancestor left behind.
    try:
        element = defusedxml.ElementTree.fromstring(
            _TAG_PREFIX.sub(rb"<\1", fragment),
            forbid_dtd=True,
            forbid_entities=True,
            forbid_external=True,
        )
    except Exception:  # this fragment is broken too; the others may not be
        return None
    return element if isinstance(element, Element) else None


def _field(body: bytes, name: bytes) -> str:
    """The text of the first <name>…</name> in a broken document: "" if that one is the
    broken part (a later one would belong to another device)."""
    prefix = rb"(?:[A-Za-z_][\w.-]*:)?"
    opening = re.search(rb"<%s%s>" % (prefix, name), body)
    if opening is None:
        return ""
    whole = re.compile(rb"<%s%s>[^<]{0,%d}</%s%s\s*>" % (prefix, name, _MAX_FIELD, prefix, name))
    match = whole.match(body, opening.start())
    return _text(_parse_fragment(match.group(0))) if match else ""


def _collect(device: Element, base: str, out: list[Service], *, depth: int, location: str) -> None:
    if depth > MAX_DEVICE_DEPTH:
        raise ProtocolError(
            f"device description from {location} nests devices more than {MAX_DEVICE_DEPTH} deep"
        )
    device_type = _text(_child(device, "deviceType"))
    for service_list in _children(device, "serviceList"):
        for service in _children(service_list, "service"):
            control_url = _resolve(base, _text(_child(service, "controlURL")))
            if not control_url:
                continue  # nothing we could ever call; keep the rest of the document
            out.append(_service(service, base, control_url, device_type))
    for device_list in _children(device, "deviceList"):
        for child in _children(device_list, "device"):
            _collect(child, base, out, depth=depth + 1, location=location)


def _service(element: Element, base: str, control_url: str, device_type: str) -> Service:
    return Service(
        service_type=_text(_child(element, "serviceType")),
        service_id=_text(_child(element, "serviceId")),
        control_url=control_url,
        event_sub_url=_resolve(base, _text(_child(element, "eventSubURL"))),
        scpd_url=_resolve(base, _text(_child(element, "SCPDURL"))),
        device_type=device_type,
    )


def _resolve(base: str, ref: str) -> str:
    """Absolute http URL for ``ref``, or "" when there is none or it is unusable."""
    if not ref:
        return ""
    try:
        url = urljoin(base, ref)
    except ValueError:  # e.g. an unbalanced "[" in an IPv6 literal
        return ""
    return url if _valid_http(url) else ""


def _valid_http(url: str) -> bool:
    try:
        parse_http_url(url)
    except ProtocolError:
        return False
    return True


def _local(element: Element) -> str:
    tag = element.tag
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""


def _children(element: Element, name: str) -> list[Element]:
    return [child for child in element if _local(child) == name]


def _child(element: Element, name: str) -> Element | None:
    for child in element:
        if _local(child) == name:
            return child
    return None


def _text(element: Element | None) -> str:
    if element is None:
        return ""
    # Collapse whitespace first: routers pretty-print values across lines.
    return _CONTROL.sub("\ufffd", " ".join("".join(element.itertext()).split()))
