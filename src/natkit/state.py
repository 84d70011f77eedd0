"""natkit's own record of the mappings it made with one-shot commands (``natkit map add``).

NAT-PMP and PCP cannot list a router's mappings, and deleting one needs what created it
(the internal port; for PCP the nonce). So ``map add`` writes a record here, ``map delete``
and ``map list`` read it, and expired records are pruned. A permanent UPnP mapping is
recorded too, so that it is never forgotten.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from natkit.atomic import write_atomic
from natkit.errors import StateError
from natkit.portmap.mapping import PortMapping, normalize_protocol


def state_dir() -> Path:
    base = os.environ.get("NATKIT_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "natkit"
    )
    return Path(base)


def state_error(directory: Path, exc: OSError) -> StateError:
    why = exc.strerror or str(exc)
    return StateError(
        f"natkit cannot write its state directory {directory} ({why}); set NATKIT_STATE_DIR "
        "to a directory this user can write (a service user without a home needs one)"
    )


def writable_state_dir(directory: Path | None = None) -> Path:
    """``directory`` (default: :func:`state_dir`), made if missing and proven writable; a
    :class:`StateError` that names it and what to do otherwise. Called *before* anything is
    done on a router or a relay, so that nothing is left behind unrecorded."""
    d = state_dir() if directory is None else directory
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(d, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise state_error(d, exc) from None
    return d


@contextlib.contextmanager
def locked(stem: str = "mappings") -> Iterator[Path]:
    """``STATE_DIR/STEM.json``, held under an exclusive lock (other natkit processes wait)."""
    d = writable_state_dir()
    try:
        lock = open(d / f"{stem}.lock", "w")  # noqa: SIM115 (held for the with block below)
    except OSError as exc:
        raise state_error(d, exc) from None
    with lock:
        _lock(lock)
        yield d / f"{stem}.json"


def _lock(file: IO[str]) -> None:
    """An exclusive lock on ``file`` until it is closed: flock where there is fcntl, else
    (Windows) msvcrt's lock of its first byte, which retries for about 10 s."""
    try:
        import fcntl
    except ImportError:
        import msvcrt

        msvcrt.locking(file.fileno(), msvcrt.LK_LOCK, 1)  # type: ignore[attr-defined,unused-ignore]
        return
    fcntl.flock(file, fcntl.LOCK_EX)


def load_records(path: Path) -> list[dict[str, Any]]:
    """The records in ``path`` that have not expired (``expires`` 0: never)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    now = time.time()
    return [r for r in data if isinstance(r, dict) and (not r.get("expires") or r["expires"] > now)]


def save_records(path: Path, records: list[dict[str, Any]]) -> None:
    try:
        write_atomic(path, json.dumps(records, indent=1))
    except OSError as exc:
        raise state_error(path.parent, exc) from None


def _key(r: dict[str, Any]) -> tuple[str, str, int, str]:
    return (
        r.get("gateway", ""),
        r.get("method", ""),
        int(r.get("external_port", 0)),
        r.get("protocol", ""),
    )


def record(mapping: PortMapping, gateway: str) -> None:
    rec = mapping.to_json() | {"nonce": mapping.nonce, "gateway": gateway}
    rec["expires"] = time.time() + mapping.lease if mapping.lease else 0
    with locked() as path:
        records = [r for r in load_records(path) if _key(r) != _key(rec)]
        records.append(rec)
        save_records(path, records)


def find(gateway: str, method: str, external_port: int, protocol: str) -> PortMapping | None:
    with locked() as path:
        for r in load_records(path):
            if _key(r) == (gateway, method, external_port, normalize_protocol(protocol)):
                return _to_mapping(r)
    return None


def forget(gateway: str, method: str, external_port: int, protocol: str) -> None:
    key = (gateway, method, external_port, normalize_protocol(protocol))
    with locked() as path:
        save_records(path, [r for r in load_records(path) if _key(r) != key])


def listed(gateway: str, method: str | None = None) -> list[PortMapping]:
    with locked() as path:
        return [
            _to_mapping(r)
            for r in load_records(path)
            if r.get("gateway") == gateway and (method is None or r.get("method") == method)
        ]


def _to_mapping(r: dict[str, Any]) -> PortMapping:
    return PortMapping(
        r["method"],
        normalize_protocol(r["protocol"]),
        r["internal_ip"],
        int(r["internal_port"]),
        r["external_ip"],
        int(r["external_port"]),
        int(r["lease"]),
        r.get("description", ""),
        r.get("nonce", ""),
    )
