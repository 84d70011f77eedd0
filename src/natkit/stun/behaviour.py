"""NAT behaviour (RFC 4787 terms) from STUN observations, per RFC 5780 4.3-4.6; pure.

Every function answers ``None`` when the observations cannot tell: a report says
"unknown" rather than guess.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from itertools import combinations
from typing import Literal

Addr = tuple[str, int]
Behaviour = Literal["endpoint-independent", "address-dependent", "address-and-port-dependent"]

ENDPOINT_INDEPENDENT: Behaviour = "endpoint-independent"
ADDRESS_DEPENDENT: Behaviour = "address-dependent"
ADDRESS_AND_PORT_DEPENDENT: Behaviour = "address-and-port-dependent"


def same_ip(a: str, b: str) -> bool:
    """Equal addresses whatever their spelling (``::1`` and ``0::1``)."""
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def same_addr(a: Addr, b: Addr) -> bool:
    return a[1] == b[1] and same_ip(a[0], b[0])


def classify_mapping(x1: Addr, x2: Addr | None, x3: Addr | None) -> Behaviour | None:
    """RFC 5780 4.3 from the mapped addresses of test I (primary IP and port), test II
    (alternate IP, primary port) and test III (alternate IP and port); ``None`` = no answer."""
    if x2 is None:
        return None
    if same_addr(x1, x2):
        return ENDPOINT_INDEPENDENT
    if x3 is None:
        return None
    return ADDRESS_DEPENDENT if same_addr(x2, x3) else ADDRESS_AND_PORT_DEPENDENT


def classify_mapping_across(observations: Sequence[tuple[Addr, Addr]]) -> Behaviour | None:
    """Mapping behaviour from Binding answers of several servers (``(server, mapped)``
    pairs, all from one local socket): the fallback when no server offers RFC 5780.

    - the mapping changed between two ports of one IP: address-and-port-dependent;
    - it changed between two IPs, but held between two ports of one IP: address-dependent;
    - it held between two IPs (and everywhere else): endpoint-independent;
    - otherwise it cannot be told (e.g. it changed between two IPs, and no two servers share
      an IP to show whether the port alone changes it; or it held between some IPs only).
    """
    distinct: list[tuple[Addr, Addr]] = []
    for server, mapped in observations:
        if not any(same_addr(server, s) for s, _ in distinct):
            distinct.append((server, mapped))
    port_only_held = ip_changed = ip_held = False
    for (s1, x1), (s2, x2) in combinations(distinct, 2):
        held = same_addr(x1, x2)
        if same_ip(s1[0], s2[0]):
            if not held:
                return ADDRESS_AND_PORT_DEPENDENT
            port_only_held = True
        elif held:
            ip_held = True
        else:
            ip_changed = True
    if ip_changed:
        # Held between some IPs but not others: no consistent behaviour to report.
        return ADDRESS_DEPENDENT if port_only_held and not ip_held else None
    return ENDPOINT_INDEPENDENT if ip_held else None


def classify_filtering(
    change_ip_and_port: bool | None, change_port: bool | None
) -> Behaviour | None:
    """RFC 5780 4.4: did the answer to CHANGE-REQUEST (IP and port) arrive, and the one to
    CHANGE-REQUEST (port)? ``None`` means the test could not be made (error 420, a server
    that answered from the wrong address, no test)."""
    if change_ip_and_port is None:
        return None
    if change_ip_and_port:
        return ENDPOINT_INDEPENDENT
    if change_port is None:
        return None
    return ADDRESS_DEPENDENT if change_port else ADDRESS_AND_PORT_DEPENDENT


def changed_as_asked(primary: Addr, source: Addr, *, change_ip: bool, change_port: bool) -> bool:
    """Did the answer to a CHANGE-REQUEST come from where it asked? A server that ignores
    the flags answers from the primary address, which would fake open filtering."""
    return (not same_ip(primary[0], source[0])) == change_ip and (
        primary[1] != source[1]
    ) == change_port


def port_preserving(local: Addr, mapped: Addr | None) -> bool | None:
    """RFC 5780 4.6: does the NAT keep the local port as the mapped port?"""
    return None if mapped is None else local[1] == mapped[1]


def behind_nat(local: Addr, mapped: Addr | None) -> bool | None:
    """RFC 5780 4.3: a mapped address equal to the local one means no NAT on the path."""
    return None if mapped is None else not same_addr(local, mapped)
