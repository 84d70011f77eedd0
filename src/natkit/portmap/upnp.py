"""Port mapping through a UPnP IGD, surviving the quirks of real routers.

AddPortMapping is retried the way field experience demands (see shared/lab-facts.md):
725 OnlyPermanentLeasesSupported and 402 on a lease value → another lease (a permanent one
is reported as such so the caller deletes it on exit); 718 ConflictInMappingEntry → our own
stale entry is replaced, someone else's makes us ask for AddAnyPortMapping (IGD2) or try
other ports; 724 SamePortValuesRequired → external port = internal port; an external port
below 1024 refused → a port of 1024 or higher. Every mapping made (or renewed) is read back
with GetSpecificPortMappingEntry, because some routers accept one and do not keep it.
"""

from __future__ import annotations

import random

from natkit.errors import MappingConflictError, NatkitError, ProtocolError, UPnPError
from natkit.portmap.discovery import discover_igd
from natkit.portmap.igd import Gateway, IGDClient, PortMappingEntry
from natkit.portmap.mapping import Method, PortMapping, normalize_protocol
from natkit.portmap.soap import RouterRefusal

MAX_LEASE = 604800  # IGD2 caps leases at a week; larger values get 402 from some routers
LEASE_FALLBACKS = (3600, 600)  # tried on 402 before accepting a permanent (tracked) lease
PORT_ATTEMPTS = 8
PRIVILEGED_PORTS = 1024
# Answers to a low external port that mean "not this port" (0: a refusal without a code).
LOW_PORT_REFUSALS = frozenset({0, 501, 606, 729, 732})
LOW_PORT_NOTE = (
    " (some routers, e.g. TP-Link ER605, refuse external ports below 1024: "
    "choose one of 1024 or higher)"
)


def _add_note(exc: NatkitError, note: str) -> None:
    exc.args = (f"{exc}{note}",)


class UPnPMapper:
    """Creates, renews, lists and deletes mappings on one discovered IGD."""

    method: Method = "upnp"

    def __init__(self, gateway: Gateway, *, timeout: float = 2.0) -> None:
        self.gateway = gateway
        self.client = IGDClient.for_gateway(gateway, timeout=timeout)

    @classmethod
    async def discover(
        cls,
        *,
        timeout: float = 2.0,
        gateway_ip: str | None = None,
        ssdp_target: tuple[str, int] | None = None,
    ) -> UPnPMapper:
        """Discover the IGD (see :func:`discover_igd`, also for ``ssdp_target``)."""
        gateway = await discover_igd(
            timeout=timeout, gateway_ip=gateway_ip, ssdp_target=ssdp_target
        )
        return cls(gateway, timeout=timeout)

    @property
    def internal_ip(self) -> str:
        return self.gateway.local_ip

    async def external_ip(self) -> str:
        return await self.client.get_external_ip()

    async def add(
        self,
        internal_port: int,
        *,
        external_port: int | None = None,
        protocol: str = "tcp",
        lease: int = 3600,
        description: str = "natkit",
    ) -> PortMapping:
        proto = normalize_protocol(protocol)
        if not 0 < internal_port < 65536 or (
            external_port is not None and not 0 < external_port < 65536
        ):
            raise ValueError("ports must be between 1 and 65535")
        explicit = external_port is not None
        port = external_port if external_port is not None else internal_port
        lease = min(max(lease, 0), MAX_LEASE)
        port, lease = await self._add(port, proto, internal_port, lease, description, explicit)
        port, lease = await self._verify(port, proto, internal_port, lease, description)
        try:
            ext_ip = self.gateway.external_ip or await self.client.get_external_ip()
        except NatkitError:
            ext_ip = ""  # the mapping stands; some routers refuse GetExternalIPAddress
        return PortMapping("upnp", proto, self.internal_ip, internal_port, ext_ip, port, lease,
                           description)  # fmt: skip

    async def _add(
        self, port: int, proto: str, internal_port: int, lease: int, description: str,
        explicit: bool,
    ) -> tuple[int, int]:  # fmt: skip
        """AddPortMapping with the retries real routers need; returns (external port, lease)."""
        lease_fallbacks = [x for x in LEASE_FALLBACKS if 0 < x < lease or lease == 0]
        replaced_own = tried_any = False
        tried_ports = {port}
        c, me = self.client, self.internal_ip
        for _ in range(PORT_ATTEMPTS + len(LEASE_FALLBACKS) + 4):
            try:
                await c.add_port_mapping(
                    port, proto, internal_port, me, description=description, lease=lease
                )
                return port, lease
            except (UPnPError, RouterRefusal) as exc:
                code = exc.code if isinstance(exc, UPnPError) else 0
                if code == 725 and lease != 0:
                    lease = 0  # the router only does permanent leases: tracked, deleted on exit
                    continue
                if code == 402 and lease != 0:
                    lease = lease_fallbacks.pop(0) if lease_fallbacks else 0
                    continue
                if code == 724 and port != internal_port and not explicit:
                    port = internal_port
                    continue
                if port < PRIVILEGED_PORTS and code in LOW_PORT_REFUSALS:
                    # TP-Link ER605 answers a bare HTTP 500 to any external port below 1024
                    # (tailscale issue #7377); others say 729/732 or 606.
                    if explicit:
                        _add_note(exc, LOW_PORT_NOTE)
                        raise
                    port = self._another_port(tried_ports)
                    continue
                if code != 718:
                    raise
                owner = await self._owner(port, proto)
                if owner and owner.internal_client == me and owner.internal_port == internal_port:
                    if replaced_own:
                        raise
                    replaced_own = True  # our own stale entry (e.g. from a crash): replace it
                    await c.delete_port_mapping(port, proto)
                    continue
                if explicit:
                    who = f" to {owner.internal_client}:{owner.internal_port}" if owner else ""
                    raise MappingConflictError(
                        718,
                        f"external port {port}/{proto} is already mapped{who}",
                        "AddPortMapping",
                    ) from None
                if c.is_igd2 and not tried_any:
                    tried_any = True
                    try:
                        any_port = await c.add_any_port_mapping(
                            port, proto, internal_port, me, description=description, lease=lease
                        )
                        return any_port, lease
                    except (UPnPError, RouterRefusal):
                        pass  # fall back to picking ports ourselves
                port = self._another_port(tried_ports)
        raise MappingConflictError(
            718, f"no free external port after {len(tried_ports)} tries", "AddPortMapping"
        )

    async def _verify(
        self, port: int, proto: str, internal_port: int, lease: int, description: str
    ) -> tuple[int, int]:
        """Read the entry back: some routers accept a mapping and do not keep it.

        DD-WRT drops a timed lease at once (its clock starts at the epoch), so a missing
        entry is added again as permanent (lease 0: natkit deletes it on exit). A router
        that rewrote the entry (another internal port or client after a renewal) gets it
        deleted and added once more. A router that cannot answer this is taken at its word.
        """
        for attempt in range(2):
            try:
                entry = await self.client.get_specific_port_mapping_entry(port, proto)
            except UPnPError as exc:
                if exc.code != 714:  # NoSuchEntryInArray; anything else: cannot verify
                    return port, lease
                entry = None
            except ProtocolError:
                return port, lease
            if entry is not None and self._is_ours(entry, internal_port):
                return port, lease
            if attempt == 1:
                break
            c, me = self.client, self.internal_ip
            if entry is None:
                lease = 0  # the timed lease vanished at once: ask for a permanent one
            else:
                await c.delete_port_mapping(port, proto)
            await c.add_port_mapping(
                port, proto, internal_port, me, description=description, lease=lease
            )
        found = (
            "does not list it"
            if entry is None
            else f"lists it for {entry.internal_client}:{entry.internal_port}"
        )
        raise ProtocolError(
            f"{self.gateway.router} accepted AddPortMapping of port {port}/{proto} to "
            f"{self.internal_ip}:{internal_port} but {found} — its UPnP port mapping does not "
            "work; try NAT-PMP/PCP (--via) or forward the port by hand in its settings"
        )

    def _is_ours(self, entry: PortMappingEntry, internal_port: int) -> bool:
        return entry.internal_client == self.internal_ip and entry.internal_port == internal_port

    async def renew(self, mapping: PortMapping) -> PortMapping:
        """Re-add the same mapping (same external port) to extend its lease."""
        return await self.add(
            mapping.internal_port,
            external_port=mapping.external_port,
            protocol=mapping.protocol,
            lease=mapping.lease or 3600,
            description=mapping.description,
        )

    async def remove(self, mapping: PortMapping) -> None:
        await self.delete(mapping.external_port, mapping.protocol)

    async def check(self, mapping: PortMapping) -> bool:
        """Is our mapping still on the router? (A reboot or purge loses it.)"""
        entry = await self._owner(mapping.external_port, mapping.protocol, quiet=False)
        return (
            entry is not None
            and entry.internal_client == mapping.internal_ip
            and entry.internal_port == mapping.internal_port
        )

    def close(self) -> None:
        pass

    async def delete(self, external_port: int, protocol: str = "tcp") -> None:
        await self.client.delete_port_mapping(external_port, normalize_protocol(protocol))

    async def get(self, external_port: int, protocol: str = "tcp") -> PortMapping | None:
        entry = await self._owner(external_port, normalize_protocol(protocol))
        if entry is None:
            return None
        return self._from_entry(entry, self.gateway.external_ip)

    async def list(self) -> list[PortMapping]:
        entries = await self.client.list_port_mappings()
        ext_ip = self.gateway.external_ip or await self.client.get_external_ip()
        return [self._from_entry(e, ext_ip) for e in entries]

    async def _owner(self, port: int, proto: str, *, quiet: bool = True) -> PortMappingEntry | None:
        try:
            return await self.client.get_specific_port_mapping_entry(port, proto)
        except UPnPError as exc:
            if exc.code in (714, 402):
                return None
            raise
        except ProtocolError:
            if quiet:
                return None
            raise  # the IGD stopped answering (rebooted, moved its SOAP port)

    @staticmethod
    def _another_port(tried: set[int]) -> int:
        while True:
            port = random.randint(20000, 60999)
            if port not in tried:
                tried.add(port)
                return port

    @staticmethod
    def _from_entry(e: PortMappingEntry, ext_ip: str) -> PortMapping:
        return PortMapping(
            "upnp",
            normalize_protocol(e.protocol),
            e.internal_client,
            e.internal_port,
            ext_ip,
            e.external_port,
            e.lease,
            e.description,
        )
