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

WAN_SERVICE_TYPES: tuple[str, ...] = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
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

    def wan_services(self) -> list[Service]:
        """The WAN*Connection services, most capable first (stable within a type)."""
        wan = [s for s in self.services if s.service_type in WAN_SERVICE_TYPES]
        return sorted(wan, key=lambda s: WAN_SERVICE_TYPES.index(s.service_type))


def parse_description(body: bytes, location: str) -> DeviceDescription:
    """Parse a device description fetched from ``location``; :class:`ProtocolError` if unusable."""
    if len(body) > MAX_DESCRIPTION_BYTES:
        raise ProtocolError(
            f"device description from {location} is {len(body)} bytes, "
            f"more than the {MAX_DESCRIPTION_BYTES} allowed"
        )
    root = _parse_xml(body, location)
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
        raise ProtocolError(f"device description from {location} is not valid XML: {exc}") from None
    if not isinstance(root, Element):
        raise ProtocolError(f"device description from {location} is not valid XML")
    return root


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
            out.append(
                Service(
                    service_type=_text(_child(service, "serviceType")),
                    service_id=_text(_child(service, "serviceId")),
                    control_url=control_url,
                    event_sub_url=_resolve(base, _text(_child(service, "eventSubURL"))),
                    scpd_url=_resolve(base, _text(_child(service, "SCPDURL"))),
                    device_type=device_type,
                )
            )
    for device_list in _children(device, "deviceList"):
        for child in _children(device_list, "device"):
            _collect(child, base, out, depth=depth + 1, location=location)


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
