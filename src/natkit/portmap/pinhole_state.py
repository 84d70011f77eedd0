"""natkit's record of the pinholes ``natkit map add --ipv6`` left open, so that ``natkit map
delete --ipv6`` can remove them: UPnP deletes by the router's UniqueID, PCP by the nonce
that made the pinhole, and neither can be asked of the router afterwards."""

from __future__ import annotations

import time
from typing import Any

from natkit.portmap.mapping import normalize_protocol
from natkit.portmap.pinhole_mappers import Pinhole, PinholeMethod
from natkit.state import load_records, locked, save_records

STEM = "pinholes"  # STATE_DIR/pinholes.json


def _same(r: dict[str, Any], port: int, protocol: str) -> bool:
    return r.get("port") == port and r.get("protocol") == protocol


def record(pinhole: Pinhole) -> None:
    rec = pinhole.to_json() | {"nonce": pinhole.nonce, "expires": time.time() + pinhole.lease}
    with locked(STEM) as path:
        kept = [r for r in load_records(path) if not _same(r, pinhole.port, pinhole.protocol)]
        save_records(path, [*kept, rec])


def take(port: int, protocol: str) -> Pinhole | None:
    """The recorded pinhole of ``port``/``protocol`` (forgotten here), if one is still open."""
    proto = normalize_protocol(protocol)
    with locked(STEM) as path:
        records = load_records(path)
        found = next((r for r in records if _same(r, port, proto)), None)
        if found is None:
            return None
        save_records(path, [r for r in records if r is not found])
    method: PinholeMethod = "upnp" if found.get("method") == "upnp" else "pcp"
    return Pinhole(
        method, proto, str(found["address"]), port, int(found["lease"]), str(found["gateway"]),
        int(found.get("unique_id", -1)), str(found.get("nonce", "")),
    )  # fmt: skip
