"""ICE candidates as natkit signals them, and what kind of path a candidate pair is.

Sans-I/O. What one peer tells the other (:class:`IceDescription`) is a plain dict: the ICE
username fragment and password, and the candidates as aioice's SDP lines, each with a
``port_mapped`` flag. aioice knows the candidate types host, srflx, prflx and relay; a
candidate made from a router port mapping (UPnP, NAT-PMP, PCP) is signalled as ``srflx``
(its base is the host socket, as for a STUN-learned one) and the flag says what it really
is, so that both peers can call the path they end up on "port-mapped".

Everything in a peer's description is untrusted: :meth:`IceDescription.from_dict` checks
every field and raises :class:`~natkit.p2p.errors.IceDescriptionError`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Literal

from aioice import Candidate
from aioice.candidate import candidate_foundation, candidate_priority

from natkit.p2p.errors import IceDescriptionError

Addr = tuple[str, int]
CandidateType = Literal["host", "srflx", "prflx", "relay"]
PathKind = Literal["direct", "port-mapped", "turn"]

#: Candidates one peer may announce: every interface's host candidate, plus reflexive,
#: port-mapped and relayed ones; a real host has far fewer.
MAX_CANDIDATES = 32
MAX_SDP_LENGTH = 512
COMPONENT = 1  # natkit's ICE carries one datagram flow: one component

# ice-char is ALPHA / DIGIT / "+" / "/" (RFC 8839 section 5.4).
_UFRAG = re.compile(r"[A-Za-z0-9+/]{4,256}")
_PWD = re.compile(r"[A-Za-z0-9+/]{22,256}")
_FOUNDATION = re.compile(r"[A-Za-z0-9+/]{1,32}")
_TYPES: tuple[CandidateType, ...] = ("host", "srflx", "prflx", "relay")
_SIGNALLED_TYPES: tuple[CandidateType, ...] = ("host", "srflx", "relay")  # prflx is learned

# Local preferences (RFC 8445 section 5.1.2.1) among server-reflexive candidates: a port
# mapping lets any peer in, whereas a STUN-learned address may only admit the peers the
# NAT has seen us talk to, so the peer should try the port-mapped one first.
PORT_MAPPED_LOCAL_PREF = 65535
STUN_SRFLX_LOCAL_PREF = 32767


def _ip(text: str, what: str) -> str:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise IceDescriptionError(
            f"{what} {text[:64]!r} is not an IP address (natkit signals no host names)"
        ) from None
    if ip.is_multicast:
        raise IceDescriptionError(f"{what} {text} is a multicast address")
    return str(ip)


def _candidate_type(text: str) -> CandidateType:
    for kind in _TYPES:
        if text == kind:
            return kind
    raise IceDescriptionError(f"unknown ICE candidate type {text[:16]!r}")


def _int(text: str, what: str, low: int, high: int) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 10 or not low <= int(text) <= high:
        raise IceDescriptionError(f"{what} {text[:16]!r} is not a number from {low} to {high}")
    return int(text)


@dataclasses.dataclass(frozen=True)
class IceCandidate:
    """One ICE candidate (RFC 8445 section 5.1), with natkit's ``port_mapped`` mark."""

    foundation: str
    priority: int
    host: str
    port: int
    type: CandidateType
    related_address: str | None = None
    related_port: int | None = None
    port_mapped: bool = False
    component: int = COMPONENT

    @property
    def address(self) -> Addr:
        return (self.host, self.port)

    @property
    def label(self) -> str:
        """``srflx (port-mapped) 100.200.0.1:40000``, for logs and error messages."""
        kind = f"{self.type} (port-mapped)" if self.port_mapped else self.type
        return f"{kind} {self.host}:{self.port}"

    def to_aioice(self) -> Candidate:
        return Candidate(
            foundation=self.foundation,
            component=self.component,
            transport="udp",
            priority=self.priority,
            host=self.host,
            port=self.port,
            type=self.type,
            related_address=self.related_address,
            related_port=self.related_port,
        )

    @classmethod
    def from_aioice(cls, candidate: Candidate, *, port_mapped: bool = False) -> IceCandidate:
        return cls(
            foundation=candidate.foundation,
            priority=candidate.priority,
            host=candidate.host,
            port=candidate.port,
            type=_candidate_type(candidate.type),
            related_address=candidate.related_address,
            related_port=candidate.related_port,
            port_mapped=port_mapped,
            component=candidate.component,
        )

    def to_sdp(self) -> str:
        """The candidate attribute's value (RFC 8839), as aioice writes it."""
        return str(self.to_aioice().to_sdp())

    @classmethod
    def from_sdp(cls, sdp: str, *, port_mapped: bool = False) -> IceCandidate:
        """Parse and check one peer candidate (``candidate:`` prefix allowed)."""
        if len(sdp) > MAX_SDP_LENGTH:
            raise IceDescriptionError(f"an ICE candidate line of {len(sdp)} characters")
        text = sdp.strip()
        text = text.removeprefix("a=").removeprefix("candidate:")
        bits = text.split()
        if len(bits) < 8 or bits[6] != "typ":
            raise IceDescriptionError(f"not an ICE candidate line: {sdp[:80]!r}")
        if len(bits) % 2:
            raise IceDescriptionError(f"an ICE candidate line with a dangling field: {sdp[:80]!r}")
        if not _FOUNDATION.fullmatch(bits[0]):
            raise IceDescriptionError(f"bad ICE candidate foundation {bits[0][:40]!r}")
        component = _int(bits[1], "ICE candidate component", 1, 256)
        if component != COMPONENT:
            raise IceDescriptionError(f"ICE component {component}: natkit uses component 1 only")
        if bits[2].lower() != "udp":
            raise IceDescriptionError(f"ICE candidate transport {bits[2][:16]!r}: natkit uses UDP")
        kind = _candidate_type(bits[7])
        if kind not in _SIGNALLED_TYPES:
            raise IceDescriptionError(f"ICE candidate type {kind} is learned, not signalled")
        host = _ip(bits[4], "ICE candidate address")
        if ipaddress.ip_address(host).is_unspecified:
            raise IceDescriptionError(f"ICE candidate address {host} is unspecified")
        extra = dict(zip(bits[8::2], bits[9::2], strict=True))  # extension attributes are ignored
        raddr = _ip(extra["raddr"], "related address") if "raddr" in extra else None
        rport = _int(extra["rport"], "related port", 0, 65535) if "rport" in extra else None
        if port_mapped and kind != "srflx":
            raise IceDescriptionError(f"a {kind} candidate cannot be port-mapped (only srflx)")
        return cls(
            foundation=bits[0],
            priority=_int(bits[3], "ICE candidate priority", 1, 2**31 - 1),
            host=host,
            port=_int(bits[5], "ICE candidate port", 1, 65535),
            type=kind,
            related_address=raddr,
            related_port=rport,
            port_mapped=port_mapped,
        )

    def to_dict(self) -> dict[str, object]:
        return {"sdp": self.to_sdp(), "port_mapped": self.port_mapped}

    @classmethod
    def from_dict(cls, data: object) -> IceCandidate:
        if not isinstance(data, Mapping):
            raise IceDescriptionError("an ICE candidate must be an object with 'sdp'")
        sdp, port_mapped = data.get("sdp"), data.get("port_mapped", False)
        if not isinstance(sdp, str):
            raise IceDescriptionError("an ICE candidate's 'sdp' must be a string")
        if not isinstance(port_mapped, bool):
            raise IceDescriptionError("an ICE candidate's 'port_mapped' must be true or false")
        return cls.from_sdp(sdp, port_mapped=port_mapped)


@dataclasses.dataclass(frozen=True)
class IceDescription:
    """What one ICE agent tells its peer: credentials and candidates (all of them at once)."""

    ufrag: str
    pwd: str
    candidates: tuple[IceCandidate, ...]

    def find(self, address: Addr) -> IceCandidate | None:
        """The announced candidate at ``address`` (IP compared in canonical form)."""
        for c in self.candidates:
            if c.port == address[1] and _same_ip(c.host, address[0]):
                return c
        return None

    def to_dict(self) -> dict[str, object]:
        return {
            "ufrag": self.ufrag,
            "pwd": self.pwd,
            "candidates": [c.to_dict() for c in self.candidates],
        }

    @classmethod
    def from_dict(cls, data: object) -> IceDescription:
        """Parse and check a peer's description (unknown keys are ignored)."""
        if not isinstance(data, Mapping):
            raise IceDescriptionError("an ICE description must be an object")
        ufrag, pwd, items = data.get("ufrag"), data.get("pwd"), data.get("candidates")
        if not isinstance(ufrag, str) or not _UFRAG.fullmatch(ufrag):
            raise IceDescriptionError("the ICE username fragment must be 4-256 ice-chars")
        if not isinstance(pwd, str) or not _PWD.fullmatch(pwd):
            raise IceDescriptionError("the ICE password must be 22-256 ice-chars")
        if not isinstance(items, list):
            raise IceDescriptionError("an ICE description's 'candidates' must be a list")
        if len(items) > MAX_CANDIDATES:
            raise IceDescriptionError(
                f"{len(items)} ICE candidates (at most {MAX_CANDIDATES} are accepted)"
            )
        return cls(ufrag, pwd, tuple(IceCandidate.from_dict(c) for c in items))


@dataclasses.dataclass(frozen=True)
class SelectedPair:
    """The candidate pair ICE chose, and what kind of path it is."""

    local: IceCandidate  # our host or relayed candidate (the socket the path uses)
    remote: IceCandidate  # the peer's candidate as checked (prflx if learned from a check)
    seen_as: Addr | None  # our address as the peer sees it (from a check on this pair)
    path: PathKind

    def to_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "local": self.local.label,
            "remote": self.remote.label,
            "seen_as": f"{self.seen_as[0]}:{self.seen_as[1]}" if self.seen_as else None,
        }


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def classify_path(
    local: IceCandidate,
    remote: IceCandidate,
    seen_as: Addr | None,
    ours: IceDescription,
    theirs: IceDescription,
) -> PathKind:
    """Call a selected pair ``turn``, ``port-mapped`` or ``direct``.

    ``turn`` if either end is a relayed candidate. ``port-mapped`` if the peer's end is a
    candidate it announced as port-mapped, or the peer sees us at one of our port-mapped
    addresses (our end of a pair is always the host socket, the mapping's base, so only the
    peer can tell which public address our packets arrive from). Otherwise ``direct``.

    The peer's end is looked up by address in what it announced: a candidate that aioice
    learned as peer-reflexive may be one the peer announced (a relayed one, for instance).
    """
    announced = theirs.find(remote.address)
    remote_type = announced.type if announced is not None else remote.type
    if local.type == "relay" or remote_type == "relay":
        return "turn"
    if announced is not None and announced.port_mapped:
        return "port-mapped"
    if seen_as is not None:
        mine = ours.find(seen_as)
        if mine is not None and mine.port_mapped:
            return "port-mapped"
    return "direct"


def describe(candidates: Iterable[IceCandidate]) -> str:
    return ", ".join(c.label for c in candidates) or "none"


# ---- building local candidates (priorities and foundations, RFC 8445 section 5.1) -----------


def host_candidate(address: Addr) -> Candidate:
    return Candidate(
        foundation=candidate_foundation("host", "udp", address[0]),
        component=COMPONENT,
        transport="udp",
        priority=candidate_priority(COMPONENT, "host"),
        host=address[0],
        port=address[1],
        type="host",
    )


def srflx_candidate(mapped: Addr, base: Addr) -> Candidate:
    """A server-reflexive candidate learned from a STUN server."""
    return _reflexive("srflx", mapped, base, STUN_SRFLX_LOCAL_PREF)


def port_mapped_candidate(public: Addr, base: Addr) -> Candidate:
    """A candidate for a router port mapping of ``base`` (signalled as srflx).

    Its own foundation: it comes from another "server" (the router) than the STUN-learned
    one, and its checks succeed or fail independently (RFC 8445 section 5.1.1.3).
    """
    return _reflexive("portmap", public, base, PORT_MAPPED_LOCAL_PREF)


def _reflexive(source: str, public: Addr, base: Addr, local_pref: int) -> Candidate:
    return Candidate(
        foundation=candidate_foundation(source, "udp", base[0]),
        component=COMPONENT,
        transport="udp",
        priority=candidate_priority(COMPONENT, "srflx", local_pref),
        host=public[0],
        port=public[1],
        type="srflx",
        related_address=base[0],
        related_port=base[1],
    )


def relay_candidate(relayed: Addr, mapped: Addr) -> Candidate:
    return Candidate(
        foundation=candidate_foundation("relay", "udp", relayed[0]),
        component=COMPONENT,
        transport="udp",
        priority=candidate_priority(COMPONENT, "relay"),
        host=relayed[0],
        port=relayed[1],
        type="relay",
        related_address=mapped[0],
        related_port=mapped[1],
    )


def without_redundant(
    hosts: list[Candidate], srflx: list[Candidate], mapped: list[Candidate]
) -> tuple[list[Candidate], list[Candidate]]:
    """Drop reflexive candidates that repeat another's address (RFC 8445 section 5.1.3).

    A STUN-learned address equal to a host address (no NAT) or to a port-mapped one (a
    port-keeping NAT that mapped the same port) goes: the peer would ignore the repeat
    anyway, and the port-mapped one says more. A port mapping equal to a host address
    (the router is this host) goes too. Returns the remaining (srflx, port-mapped).
    """
    taken = {(c.host, c.port) for c in hosts}
    kept_mapped = [c for c in mapped if (c.host, c.port) not in taken]
    taken |= {(c.host, c.port) for c in kept_mapped}
    kept_srflx: list[Candidate] = []
    for c in srflx:
        if (c.host, c.port) not in taken:
            kept_srflx.append(c)
            taken.add((c.host, c.port))
    return kept_srflx, kept_mapped


def address_scope(host: str) -> str:
    """Where an address can be reached from: ``machine`` (this host only), ``link``,
    ``private`` (a private network) or ``global``."""
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified or ip == ipaddress.IPv4Address("255.255.255.255"):
        return "machine"
    if ip.is_link_local:
        return "link"
    if ip in _DOCUMENTATION6:
        # Python counts 2001:db8::/32 private; it is routed nowhere, so no peer can aim us
        # at a real network with it, and natkit's lab uses it as its public IPv6.
        return "global"
    return "private" if ip.is_private else "global"


_DOCUMENTATION6 = ipaddress.IPv6Network("2001:db8::/32")


def reachable_remote(
    remote: Iterable[IceCandidate], local: Iterable[IceCandidate]
) -> tuple[list[IceCandidate], list[str]]:
    """The peer's announced candidates we may check, and why each of the others was dropped.

    The rule: an address that is only reachable within a scope (this machine: loopback,
    unspecified, broadcast; a link: link-local; a private network: RFC 1918, ULA) can only
    be the peer's when we ourselves have a host candidate in that scope. Otherwise a peer
    (or whoever altered its description) could make us send checks to our own services or
    our network's private hosts. Peers on one machine (gathering on loopback) keep theirs.
    """
    scopes = {address_scope(c.host) for c in local if c.type == "host"}
    kept: list[IceCandidate] = []
    dropped: list[str] = []
    for candidate in remote:
        scope = address_scope(candidate.host)
        if scope == "global" or scope in scopes:
            kept.append(candidate)
        else:
            dropped.append(f"{candidate.label} ({scope} scope; we have no {scope} address)")
    return kept, dropped
