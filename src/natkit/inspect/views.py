"""Records as JSON, in ngrok's agent API shape (``/api/requests/http``), pure.

ngrok's fields: ``uri``, ``id``, ``tunnel_name``, ``remote_addr``, ``start`` (RFC 3339),
``duration`` (nanoseconds), ``request`` {``method``, ``proto``, ``headers`` (name → list
of values), ``uri``, ``raw`` (base64 of the bytes on the wire)} and ``response``
{``status``, ``status_code``, ``proto``, ``headers``, ``raw``}. natkit adds a ``natkit``
object: the visitor's port, the decoded bodies (base64), whether they were cut at the cap,
the record a replay replays, and why capture stopped early.
"""

from __future__ import annotations

import base64
import datetime
import json
from typing import Any

from natkit.inspect.exchange import Message
from natkit.inspect.records import Record, Refusal
from natkit.inspect.replay import Changes, ReplayError

API_REQUESTS = "/api/requests/http"


def _headers(msg: Message) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in msg.headers:
        out.setdefault(_canonical(name), []).append(value)
    return out


def _canonical(name: str) -> str:
    """Go's canonical header form, as ngrok shows names: ``content-type`` → ``Content-Type``."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def _b64(data: bytes | bytearray) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def iso_time(wall: float) -> str:
    return datetime.datetime.fromtimestamp(wall, datetime.timezone.utc).isoformat()


def record_json(record: Record) -> dict[str, Any]:
    """One record as ngrok's agent API shows a captured request, plus ``natkit``."""
    request = record.exchange.request
    response = record.exchange.response
    host = record.visitor.rpartition(":")[0]
    duration = record.duration
    out: dict[str, Any] = {
        "uri": f"{API_REQUESTS}/{record.id}",
        "id": record.id,
        "tunnel_name": record.tunnel,
        "remote_addr": host.strip("[]") if host else record.visitor,
        "start": iso_time(record.wall_start),
        "duration": round(duration * 1e9) if duration is not None else 0,
        "request": {
            "method": request.start[0],
            "proto": request.start[2],
            "headers": _headers(request),
            "uri": request.start[1],
            "raw": _b64(request.raw),
        },
        "response": None,
        "natkit": {
            "visitor": record.visitor,
            "request_body": _b64(request.body),
            "request_truncated": request.truncated,
            "request_complete": request.complete,
            "replay_of": record.replay_of,
            "note": record.note,
            "complete": duration is not None,
        },
    }
    if response is not None:
        version, status, reason = response.start
        out["response"] = {
            "status": f"{status} {reason}".strip(),
            "status_code": int(status),
            "proto": version,
            "headers": _headers(response),
            "raw": _b64(response.raw),
        }
        out["natkit"] |= {"response_body": _b64(response.body),
                          "response_truncated": response.truncated}  # fmt: skip
    return out


def summary_json(record: Record) -> dict[str, Any]:
    """What the page's list needs of a record (the live events carry this: no bytes)."""
    full = record_json(record)
    full["request"] = {k: full["request"][k] for k in ("method", "proto", "uri")}
    if full["response"] is not None:
        full["response"] = {k: full["response"][k] for k in ("status", "status_code", "proto")}
    keep = ("visitor", "replay_of", "note", "complete")
    full["natkit"] = {k: full["natkit"][k] for k in keep}
    return full


def refusal_json(refusal: Refusal) -> dict[str, Any]:
    """natkit's own: a visitor the relay refused (``GET /api/refused``, event ``refused``)."""
    return {"tunnel_name": refusal.tunnel, "remote_addr": refusal.visitor,
            "reason": refusal.reason, "time": iso_time(refusal.wall), "more": refusal.more}  # fmt: skip


def records_json(records: list[Record]) -> dict[str, Any]:
    return {"uri": API_REQUESTS, "requests": [record_json(r) for r in records]}


def changes_from_json(obj: Any) -> Changes:
    """A replay's changes from the page's JSON: ``method``, ``uri``, ``headers`` (a list of
    [name, value]), ``body`` (text) or ``body_base64``. Raises ReplayError when malformed."""
    if not isinstance(obj, dict):
        raise ReplayError("the changes must be a JSON object")
    changes = Changes()
    for key, attr in (("method", "method"), ("uri", "target")):
        value = obj.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise ReplayError(f"{key} must be a string")
            setattr(changes, attr, value)
    headers = obj.get("headers")
    if headers is not None:
        if not isinstance(headers, list) or not all(
            isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h)
            for h in headers
        ):
            raise ReplayError("headers must be a list of [name, value] strings")
        changes.headers = [(str(h[0]), str(h[1])) for h in headers]
    if obj.get("body_base64") is not None:
        try:
            changes.body = base64.b64decode(str(obj["body_base64"]), validate=True)
        except ValueError:
            raise ReplayError("body_base64 is not base64") from None
    elif obj.get("body") is not None:
        if not isinstance(obj["body"], str):
            raise ReplayError("body must be a string")
        changes.body = obj["body"].encode("utf-8")
    return changes


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")
