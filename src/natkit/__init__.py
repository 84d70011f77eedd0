"""natkit: make a service behind NAT reachable from the Internet.

>>> import natkit
>>> with natkit.open_port(8080) as port:      # UPnP IGD on the LAN's router
...     print(port.public_address)            # e.g. 203.0.113.7:8080
>>> with natkit.expose(8080) as e:            # a proven mapping, else the relay ($NATKIT_RELAY)
...     print(e.public_address, e.method)
"""

from __future__ import annotations

import importlib

# Not ``from typing import TYPE_CHECKING``: importing typing costs ~6 ms, most of what
# ``import natkit`` would cost (type checkers know this constant by its name).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from natkit import events, p2p
    from natkit.api import OpenPort, Port, open_port, open_port_async
    from natkit.errors import (
        DiscoveryError,
        MappingConflictError,
        NatkitError,
        NotAuthorizedError,
        NotPubliclyReachableError,
        ProtocolError,
        RelayError,
        UPnPError,
    )
    from natkit.exposure import Exposed, Exposure, expose, expose_async
    from natkit.mappings import (
        delete_mapping,
        delete_mapping_async,
        list_mappings,
        list_mappings_async,
    )
    from natkit.net.certs import RelayTrustError
    from natkit.portmap.mapping import PortMapping
    from natkit.relay.agent import RelayAuthError, TunnelRefusedError
    from natkit.relay.api import (
        RelayTimeoutError,
        RelayTunnel,
        Tunnel,
        connect,
        connect_async,
        disconnect,
        get_tunnels,
    )

# Loaded on first use (PEP 562): a relay or an agent process imports only what it runs
# (the port-mapping stack and its XML/HTTP modules cost ~8 MB of memory per process), and
# ``import natkit`` stays a few milliseconds. Subpackages too: ``natkit.p2p.connect`` works
# after a bare ``import natkit``.
_SUBMODULES = {"events", "p2p"}
_LAZY = {
    "OpenPort": "natkit.api", "Port": "natkit.api", "open_port": "natkit.api",
    "open_port_async": "natkit.api", "PortMapping": "natkit.portmap.mapping",
    "DiscoveryError": "natkit.errors", "MappingConflictError": "natkit.errors",
    "NatkitError": "natkit.errors", "NotAuthorizedError": "natkit.errors",
    "NotPubliclyReachableError": "natkit.errors", "ProtocolError": "natkit.errors",
    "RelayError": "natkit.errors",
    "UPnPError": "natkit.errors", "RelayTunnel": "natkit.relay.api",
    "RelayTrustError": "natkit.net.certs", "RelayAuthError": "natkit.relay.agent",
    "TunnelRefusedError": "natkit.relay.agent", "RelayTimeoutError": "natkit.relay.api",
    "Tunnel": "natkit.relay.api", "connect": "natkit.relay.api",
    "connect_async": "natkit.relay.api", "disconnect": "natkit.relay.api",
    "get_tunnels": "natkit.relay.api", "Exposed": "natkit.exposure", "Exposure": "natkit.exposure",
    "expose": "natkit.exposure", "expose_async": "natkit.exposure",
    "list_mappings": "natkit.mappings", "list_mappings_async": "natkit.mappings",
    "delete_mapping": "natkit.mappings", "delete_mapping_async": "natkit.mappings",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value: Any = importlib.import_module(f"natkit.{name}")
    else:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'natkit' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


__version__ = "0.1.0"

__all__ = [
    "DiscoveryError",
    "Exposed",
    "Exposure",
    "MappingConflictError",
    "NatkitError",
    "NotAuthorizedError",
    "NotPubliclyReachableError",
    "OpenPort",
    "Port",
    "PortMapping",
    "ProtocolError",
    "RelayAuthError",
    "RelayError",
    "RelayTimeoutError",
    "RelayTrustError",
    "RelayTunnel",
    "Tunnel",
    "TunnelRefusedError",
    "UPnPError",
    "connect",
    "connect_async",
    "delete_mapping",
    "delete_mapping_async",
    "disconnect",
    "events",
    "expose",
    "expose_async",
    "get_tunnels",
    "list_mappings",
    "list_mappings_async",
    "open_port",
    "open_port_async",
    "p2p",
]
