"""Peer-to-peer connections: ICE (direct, TURN) or the relay, then QUIC on the chosen path.

secret = natkit.p2p.new_secret()          # on one side; give it to the other peer
conn = await natkit.p2p.connect("room", relay="relay.example:7835", token=T, secret=secret)
stream = await conn.open_stream()        # reliable, ordered, half-closable
conn.send_datagram(b"hi")                # unreliable, for apps that want them
conn.path                                # "direct", "port-mapped", "turn" or "relay"
"""

from __future__ import annotations

import os
from typing import Any

from natkit.api import relay_settings
from natkit.p2p.auth import MIN_SECRET_LENGTH, new_secret
from natkit.p2p.errors import P2PAuthError, P2PClosedError, P2PError, P2PTimeoutError
from natkit.p2p.ice import TurnServer
from natkit.p2p.peer import P2PConnection, P2POptions, Role, connect_peer


def _options(relay: str | None, token: str | None, options: dict[str, Any]) -> P2POptions:
    relay, token = relay_settings(relay, token, "peers meet through a relay: give")
    # The peers' own secret: never the relay token (whoever holds that would be a peer).
    secret = options.pop("secret", None) or os.environ.get("NATKIT_P2P_SECRET", "")
    return P2POptions(relay=relay, token=token, secret=secret, **options)


async def connect(
    name: str, *, relay: str | None = None, token: str | None = None, **options: Any
) -> P2PConnection:
    r"""Meet the peer that ``listen``\ s under ``name`` and open a session (the client).
    ``options``: the fields of :class:`P2POptions`; ``secret`` (else ``$NATKIT_P2P_SECRET``)
    is required: the same one on both sides, at least 16 characters (:func:`new_secret`)."""
    return await connect_peer(name, "connect", _options(relay, token, options))


async def listen(
    name: str, *, relay: str | None = None, token: str | None = None, **options: Any
) -> P2PConnection:
    r"""Wait for the peer that ``connect``\ s under ``name`` and open a session."""
    return await connect_peer(name, "listen", _options(relay, token, options))


__all__ = [
    "MIN_SECRET_LENGTH",
    "P2PAuthError",
    "P2PClosedError",
    "P2PConnection",
    "P2PError",
    "P2POptions",
    "P2PTimeoutError",
    "Role",
    "TurnServer",
    "connect",
    "connect_peer",
    "listen",
    "new_secret",
]
