"""natkit: make a service behind NAT reachable from the Internet.

>>> import natkit
>>> with natkit.open_port(8080) as port:      # UPnP IGD on the LAN's router
...     print(port.public_address)            # e.g. 203.0.113.7:8080
"""

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
from natkit.relay.api import RelayTunnel, Tunnel, connect, connect_async, disconnect, get_tunnels

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
