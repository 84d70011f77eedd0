"""The miniupnpc binding's argument forms, error strings and SOAP arguments, for natkit.compat.

The binding converts its arguments with CPython's argument parser: an integer where it
wants a port (anything with ``__index__``: a str raises TypeError), ``str`` where it wants
text (``str`` or ``None`` where ``None`` is allowed). It does not range-check ports and
leases (70000 silently becomes 4464): here a value out of range raises OverflowError,
as the binding's own check on DeletePortMappingRange's ``manage`` byte does.
"""

from __future__ import annotations

import ipaddress
import operator
import re

# What the binding's exceptions say (miniupnpc's strupnperror): the UPnP error name for a
# code the router answered, or the name of the client's own failure.
SUCCESS = "Success"
UNKNOWN_ERROR = "Miniupnpc Unknown Error"
INVALID_ARGS = "Miniupnpc Invalid Arguments"
INVALID_RESPONSE = "Miniupnpc Invalid response"
HTTP_ERROR = "Miniupnpc HTTP error"
NO_DEVICE = "No UPnP device discovered"
UPNP_ERROR_NAMES = {
    401: "Invalid Action", 402: "Invalid Args", 501: "Action Failed",
    600: "Argument Value Invalid", 601: "Argument Value Out of Range",
    602: "Optional Action Not Implemented", 603: "Out of Memory",
    604: "Human Intervention Required", 605: "String Argument Too Long",
    606: "Action not authorized", 701: "PinholeSpaceExhausted", 702: "FirewallDisabled",
    703: "InboundPinholeNotAllowed", 704: "NoSuchEntry", 705: "ProtocolNotSupported",
    706: "InternalPortWildcardingNotAllowed", 707: "ProtocolWildcardingNotAllowed",
    708: "InvalidLayer2Address", 709: "NoTrafficReceived", 713: "SpecifiedArrayIndexInvalid",
    714: "NoSuchEntryInArray", 715: "WildCardNotPermittedInSrcIP",
    716: "WildCardNotPermittedInExtPort", 718: "ConflictInMappingEntry",
    724: "SamePortValuesRequired", 725: "OnlyPermanentLeasesSupported",
    726: "RemoteHostOnlySupportsWildcard", 727: "ExternalPortOnlySupportsWildcard",
    728: "NoPortMapsAvailable", 729: "ConflictWithOtherMechanisms",
    730: "PortMappingNotFound", 731: "ReadOnly", 732: "WildCardNotPermittedInIntPort",
    733: "InconsistentParameters",
}  # fmt: skip

# The binding's counters answer this (UPNPCOMMAND_HTTP_ERROR, -3, as an unsigned int)
# when the router cannot be reached, and 0 when it refuses: they never raise.
COUNTER_UNREACHABLE = 2**32 - 3
SOCKET_ERROR = "Miniupnpc Socket error"
LEADING_DIGITS = re.compile(r"\s*([0-9]{1,20})")  # bounded: the text is the router's


def upnp_error_name(code: int) -> str:
    return UPNP_ERROR_NAMES.get(code, "UnknownError")


def integer(value: object, name: str, low: int, high: int) -> int:
    number = operator.index(value)  # type: ignore[arg-type]  # TypeError as the binding's
    if not low <= number <= high:
        raise OverflowError(f"{name} must be from {low} to {high}, not {number}")
    return number


def port(value: object, name: str) -> int:
    # 0 is passed on: it is the wildcard some routers accept (AddAnyPortMapping).
    return integer(value, name, 0, 65535)


def text(value: object, position: int, *, none_ok: bool = False) -> str | None:
    if value is None and none_ok:
        return None
    if not isinstance(value, str):
        kind = "str or None" if none_ok else "str"
        given = "None" if value is None else type(value).__name__
        raise TypeError(f"argument {position} must be {kind}, not {given}")
    if "\0" in value:
        raise ValueError("embedded null character")
    return value


def protocol(value: object, position: int) -> str:
    # Sent upper-case: some routers refuse "tcp" with 402 Invalid Args (lab-facts).
    proto = text(value, position)
    assert proto is not None
    return proto.upper()


def mapping_args(
    eport: object, proto: object, host: object, iport: object, desc: object, remote: object
) -> list[tuple[str, str | int]]:
    """AddPortMapping's arguments but the lease, in the binding's forms and order."""
    external = port(eport, "external port")
    proto_name = protocol(proto, 2)
    client = text(host, 3)
    internal = port(iport, "internal port")
    description = text(desc, 5, none_ok=True)
    remote_host = text(remote, 6, none_ok=True)
    assert client is not None
    return [
        ("NewRemoteHost", remote_host or ""),
        ("NewExternalPort", external),
        ("NewProtocol", proto_name),
        ("NewInternalPort", internal),
        ("NewInternalClient", client),
        ("NewEnabled", 1),
        ("NewPortMappingDescription", "libminiupnpc" if description is None else description),
    ]


def key_args(eport: object, proto: object, remote: object) -> list[tuple[str, str | int]]:
    remote_host = text(remote, 3, none_ok=True)
    return [
        ("NewRemoteHost", remote_host or ""),
        ("NewExternalPort", port(eport, "external port")),
        ("NewProtocol", protocol(proto, 2)),
    ]


def interface_address(interface: str) -> str:
    """An IPv4 address, or the first IPv4 address of the interface of that name."""
    try:
        return str(ipaddress.IPv4Address(interface))
    except ValueError:
        pass
    import ifaddr  # only here: a name is rare, and ifaddr is not needed otherwise

    for adapter in ifaddr.get_adapters():
        if interface in (adapter.name, adapter.nice_name):
            for ip in adapter.ips:
                if isinstance(ip.ip, str):  # IPv4 (IPv6 addresses come as tuples)
                    return ip.ip
    raise ValueError(
        f"multicastif {interface!r} is neither an IPv4 address nor an interface with one"
    )


def leading_int(value: str) -> int:
    """C's atoi: the leading decimal number, 0 if none (routers pad and suffix values)."""
    match = LEADING_DIGITS.match(value)
    return int(match.group(1)) if match else 0
