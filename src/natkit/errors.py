"""natkit's exception types.

Every failure that a user can meet is one of these, with a message that says what
happened and, where there is one, what to do about it. Parsers of untrusted network
input raise only :class:`ProtocolError` (or a subclass).
"""

from __future__ import annotations


class NatkitError(Exception):
    """Base class of every error natkit raises on purpose."""


class ProtocolError(NatkitError):
    """A peer sent something malformed, oversized, too slow or otherwise untrustworthy."""


class DiscoveryError(NatkitError):
    """No usable gateway (router) was found."""


class NotPubliclyReachableError(NatkitError):
    """The router's external address is private or carrier-grade NAT (double NAT)."""


class UPnPError(NatkitError):
    """The IGD answered a SOAP action with a UPnP error code."""

    #: What to do about the well-known codes (UPnP IGD WANIPConnection:2, section 2.5).
    HINTS: dict[int, str] = {
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


class MissingPackageError(LabError):
    """A Debian package that the lab needs is not installed."""

    def __init__(self, packages: list[str]) -> None:
        self.packages = packages
        line = "apt-get update && apt-get install -y " + " ".join(packages)
        super().__init__(f"missing Debian package(s) {', '.join(packages)}; install them with: {line}")


def upnp_error(code: int, description: str, action: str = "") -> UPnPError:
    """Build the most specific :class:`UPnPError` subclass for ``code``."""
    cls: type[UPnPError] = UPnPError
    if code == 718:
        cls = MappingConflictError
    elif code == 606:
        cls = NotAuthorizedError
    return cls(code, description, action)
