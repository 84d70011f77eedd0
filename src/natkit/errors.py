"""natkit's exception types.

Every failure that a user can meet is one of these, with a message that says what
happened and, where there is one, what to do about it. Parsers of untrusted network
input raise only :class:`ProtocolError` (or a subclass).
"""

from __future__ import annotations

from typing import ClassVar

# Exit codes of the ``natkit`` command (documented in docs/cli.md):
EXIT_OK = 0
EXIT_ERROR = 1  # a natkit error of no more specific kind (a router refused, a peer misbehaved)
EXIT_USAGE = 2  # the command line is wrong (click's own code for usage errors)
EXIT_NO_ROUTE = 3  # no router, no mapping protocol, nothing reachable: see DiscoveryError
EXIT_RELAY = 4  # the relay cannot be reached, refused the token, or is not trusted
EXIT_LOCAL = 5  # this machine: a state directory, a permission, a missing package, the lab
EXIT_BUG = 70  # an unexpected failure inside natkit (EX_SOFTWARE): a bug to report
EXIT_INTERRUPTED = 130  # Ctrl-C


class NatkitError(Exception):
    """Base class of every error natkit raises on purpose. ``exit_code``: what the
    ``natkit`` command exits with when this error ends it."""

    exit_code: ClassVar[int] = EXIT_ERROR


class ProtocolError(NatkitError):
    """A peer sent something malformed, oversized, too slow or otherwise untrustworthy."""


class DiscoveryError(NatkitError):
    """No usable gateway (router) was found."""

    exit_code: ClassVar[int] = EXIT_NO_ROUTE


class NotPubliclyReachableError(NatkitError):
    """The router's external address is private or carrier-grade NAT (double NAT)."""

    exit_code: ClassVar[int] = EXIT_NO_ROUTE


class RelayError(NatkitError):
    """The relay cannot be reached or used (base of the relay's final errors)."""

    exit_code: ClassVar[int] = EXIT_RELAY


class StateError(NatkitError):
    """natkit's state directory (pins, mapping records) cannot be read or written."""

    exit_code: ClassVar[int] = EXIT_LOCAL


class UPnPError(NatkitError):
    """The IGD answered a SOAP action with a UPnP error code."""

    #: What to do about the well-known codes (UPnP IGD WANIPConnection:2, section 2.5).
    HINTS: ClassVar[dict[int, str]] = {
        401: "the router does not offer this action",
        402: "the router rejected an argument (some routers reject certain lease values)",
        501: "the router failed to perform the action; try again",
        606: (
            "the router refuses this action: enable 'allow applications to change port "
            "forwardings' (or turn off UPnP secure mode) in the router's settings"
        ),
        714: "no such mapping on the router",
        715: "the router does not support a wildcard remote host",
        716: "the router does not support a wildcard external port",
        718: "the external port is already mapped to another host; pick another port",
        724: "the router requires the internal and external ports to be equal",
        725: "the router only supports permanent leases",
        726: "the remote host must be a wildcard on this router",
        727: "the external port must not be a wildcard on this router",
        728: "the router has no free ports left for mappings",
        729: "this router reserves that port; pick another one (1024 or higher)",
        732: "the router requires ports of 1024 or higher",
    }

    def __init__(self, code: int, description: str, action: str = "") -> None:
        self.code = code
        self.description = description
        self.action = action
        hint = self.HINTS.get(code)
        where = f"{action}: " if action else ""
        text = f"{where}UPnP error {code} {description}".rstrip()
        if hint:
            text += f" — {hint}"
        super().__init__(text)


class MappingConflictError(UPnPError):
    """UPnP 718: the external port is mapped to someone else."""


class NotAuthorizedError(UPnPError):
    """UPnP 606: the router's settings forbid the action."""


class LabError(NatkitError):
    """The NAT lab cannot be built, found or used."""

    exit_code: ClassVar[int] = EXIT_LOCAL


class MissingPackageError(LabError):
    """A Debian package that the lab needs is not installed."""

    def __init__(self, packages: list[str]) -> None:
        self.packages = packages
        line = "apt-get update && apt-get install -y " + " ".join(packages)
        super().__init__(
            f"missing Debian package(s) {', '.join(packages)}; install them with: {line}"
        )


def upnp_error(code: int, description: str, action: str = "") -> UPnPError:
    """Build the most specific :class:`UPnPError` subclass for ``code``."""
    cls: type[UPnPError] = UPnPError
    if code == 718:
        cls = MappingConflictError
    elif code == 606:
        cls = NotAuthorizedError
    return cls(code, description, action)


class NatPmpError(NatkitError):
    """A NAT-PMP (RFC 6886) server answered with a non-zero result code."""

    NAMES: ClassVar[dict[int, tuple[str, str]]] = {
        1: ("UNSUPP_VERSION", "the router does not speak this NAT-PMP version"),
        2: (
            "NOT_AUTHORIZED",
            "the router refuses mappings (NAT-PMP may be disabled in its settings)",
        ),
        3: ("NETWORK_FAILURE", "the router has no external address yet (its WAN link may be down)"),
        4: ("OUT_OF_RESOURCES", "the router has no free ports or mapping slots left"),
        5: ("UNSUPP_OPCODE", "the router does not support this request"),
    }

    def __init__(self, code: int) -> None:
        self.code = code
        name, hint = self.NAMES.get(code, (f"result {code}", "unknown NAT-PMP result code"))
        self.name = name
        super().__init__(f"NAT-PMP error {code} {name} — {hint}")


class PcpError(NatkitError):
    """A PCP (RFC 6887) server answered with a non-zero result code."""

    NAMES: ClassVar[dict[int, tuple[str, str]]] = {
        1: ("UNSUPP_VERSION", "the router does not speak this PCP version"),
        2: (
            "NOT_AUTHORIZED",
            "the router refuses this mapping (PCP may be restricted in its settings)",
        ),
        3: ("MALFORMED_REQUEST", "the router could not parse the request"),
        4: ("UNSUPP_OPCODE", "the router does not support this request"),
        5: ("UNSUPP_OPTION", "the router does not support a mandatory option"),
        6: ("MALFORMED_OPTION", "the router could not parse an option"),
        7: ("NETWORK_FAILURE", "the router cannot map right now (its WAN link may be down)"),
        8: ("NO_RESOURCES", "the router has no free mapping slots left"),
        9: ("UNSUPP_PROTOCOL", "the router cannot map this transport protocol"),
        10: ("USER_EX_QUOTA", "this host has used up its mapping quota on the router"),
        11: (
            "CANNOT_PROVIDE_EXTERNAL",
            "the router cannot give the requested external port/address",
        ),
        12: (
            "ADDRESS_MISMATCH",
            "the router saw another source address than the one in the request",
        ),
        13: ("EXCESSIVE_REMOTE_PEERS", "too many remote peers"),
    }

    def __init__(self, code: int, lifetime: int = 0) -> None:
        self.code = code
        self.lifetime = lifetime  # for errors: how long the condition is expected to last
        name, hint = self.NAMES.get(code, (f"result {code}", "unknown PCP result code"))
        self.name = name
        super().__init__(f"PCP error {code} {name} — {hint}")
