"""natkit: make a service behind NAT reachable from the Internet.

>>> import natkit
>>> with natkit.open_port(8080) as port:      # UPnP IGD on the LAN's router
...     print(port.public_address)            # e.g. 203.0.113.7:8080
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from natkit.api import OpenPort, Port, open_port, open_port_async
    from natkit.errors import (
        DiscoveryError,
        MappingConflictError,
        NatkitError,
        NotAuthorizedError,
        NotPubliclyReachableError,
        ProtocolError,
        UPnPError,
    )
    from natkit.portmap.mapping import PortMapping
    from natkit.relay.api import (
        RelayTunnel,
        Tunnel,
        connect,
        connect_async,
        disconnect,
        get_tunnels,
    )

# Loaded on first use (PEP 562): a relay or an agent process imports only what it runs
# (the port-mapping stack and its XML/HTTP modules cost ~8 MB of memory per process).
_LAZY = {
    "OpenPort": "natkit.api", "Port": "natkit.api", "open_port": "natkit.api",
    "open_port_async": "natkit.api", "PortMapping": "natkit.portmap.mapping",
    "DiscoveryError": "natkit.errors", "MappingConflictError": "natkit.errors",
    "NatkitError": "natkit.errors", "NotAuthorizedError": "natkit.errors",
    "NotPubliclyReachableError": "natkit.errors", "ProtocolError": "natkit.errors",
    "UPnPError": "natkit.errors", "RelayTunnel": "natkit.relay.api",
    "Tunnel": "natkit.relay.api", "connect": "natkit.relay.api",
    "connect_async": "natkit.relay.api", "disconnect": "natkit.relay.api",
    "get_tunnels": "natkit.relay.api",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'natkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "DiscoveryError",
    "MappingConflictError",
    "NatkitError",
    "NotAuthorizedError",
    "NotPubliclyReachableError",
    "OpenPort",
    "Port",
    "PortMapping",
    "ProtocolError",
    "RelayTunnel",
    "Tunnel",
    "UPnPError",
    "connect",
    "connect_async",
    "disconnect",
    "get_tunnels",
    "open_port",
    "open_port_async",
]
