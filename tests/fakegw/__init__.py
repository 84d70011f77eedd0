"""Rootless fake gateways on loopback for tests (UPnP IGD, NAT-PMP, PCP)."""
