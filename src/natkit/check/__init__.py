"""``natkit check``: STUN, RFC 5780 behaviour, port mapping, double NAT, the relay."""
