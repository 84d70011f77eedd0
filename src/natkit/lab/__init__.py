"""``natkit lab``: a real NAT testbed from network namespaces, nftables and miniupnpd."""

from natkit.lab.config import LabConfig, parse_nat, parse_portmap
from natkit.lab.lab import Lab, check_host

__all__ = ["Lab", "LabConfig", "check_host", "parse_nat", "parse_portmap"]
