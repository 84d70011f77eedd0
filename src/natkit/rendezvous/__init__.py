"""Peer-to-peer rendezvous through the relay: rooms where two agents of one token meet,
exchange signals and, as a last resort, a relayed path (:mod:`.rooms` is the relay's side,
:mod:`.client` the agent's)."""
