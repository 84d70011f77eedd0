"""Peer-to-peer connections: ICE (direct, TURN) or the relay, then QUIC on the chosen path."""
