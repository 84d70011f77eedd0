"""Port mapping on home routers: UPnP IGD, NAT-PMP and PCP."""
