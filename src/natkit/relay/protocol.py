"""The relay's control protocol, sans-I/O.

A frame is a 1-byte type, a 3-byte big-endian length and a JSON object of that length
(at most 64 KiB). Each type has a schema: required fields and their JSON types. The
decoder accepts bytes in any chunking and yields validated messages; anything malformed
is a :class:`ProtocolError` and the peer is dropped.

Conversation (control connection, TLS)::

    agent  HELLO {version, agent}            relay  CHALLENGE {nonce}
    agent  AUTH {token_id, mac}              relay  WELCOME {session} | ERROR {code, message}
    agent  OPEN {tunnel, kind, name, port}   relay  OPENED {tunnel, public} | ERROR
                                             relay  TICKETS {tunnel, tickets}   (open data conns)
    agent  DIAL {id, host, port}             relay  DIALED {id, ok, error}
    either PING {t}                          other  PONG {t}

A data connection starts with DATA {ticket} and waits; when a visitor arrives the relay
sends START {tunnel, visitor} and then both ends pass raw bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import struct
from typing import Any

from natkit.errors import ProtocolError

VERSION = 1
MAX_FRAME = 64 * 1024
HEADER = struct.Struct("!I")  # type in the top byte, length in the low 24 bits

HELLO, CHALLENGE, AUTH, WELCOME, ERROR = 1, 2, 3, 4, 5
OPEN, OPENED, CLOSE, TICKETS = 6, 7, 8, 9
DIAL, DIALED, PING, PONG = 10, 11, 12, 13
DATA, START = 20, 21

# An encrypted data connection opens with this byte, then the TLS handshake: the relay
# picks its data path before the handshake (control connections start with TLS at once).
TLS_DATA_PREFIX = b"T"

NAMES = {
    HELLO: "HELLO", CHALLENGE: "CHALLENGE", AUTH: "AUTH", WELCOME: "WELCOME", ERROR: "ERROR",
    OPEN: "OPEN", OPENED: "OPENED", CLOSE: "CLOSE", TICKETS: "TICKETS", DIAL: "DIAL",
    DIALED: "DIALED", PING: "PING", PONG: "PONG", DATA: "DATA", START: "START",
}  # fmt: skip

# Required fields per type and their JSON types (bool is not accepted where int is).
SCHEMAS: dict[int, dict[str, type]] = {
    HELLO: {"version": int, "agent": str},
    CHALLENGE: {"nonce": str},
    AUTH: {"token_id": str, "mac": str},
    WELCOME: {"session": str},
    ERROR: {"code": str, "message": str},
    OPEN: {"tunnel": str, "kind": str, "name": str, "port": int},
    OPENED: {"tunnel": str, "public": str},
    CLOSE: {"tunnel": str},
    TICKETS: {"tunnel": str, "tickets": list},
    DIAL: {"id": int, "host": str, "port": int},
    DIALED: {"id": int, "ok": bool, "error": str},
    PING: {"t": float},
    PONG: {"t": float},
    DATA: {"ticket": str},
    START: {"tunnel": str, "visitor": str},
}
MAX_STRING = 512
MAX_TICKETS = 256
KINDS = ("tcp", "http", "tls")


@dataclasses.dataclass(frozen=True)
class Message:
    type: int
    fields: dict[str, Any]

    @property
    def name(self) -> str:
        return NAMES.get(self.type, str(self.type))

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]


def encode(msg_type: int, **fields: Any) -> bytes:
    """One frame. Our own messages are validated too, so a bug cannot put junk on the wire."""
    _validate(msg_type, fields)
    body = json.dumps(fields, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ValueError(f"{NAMES.get(msg_type)} frame too large ({len(body)} bytes)")
    return HEADER.pack(msg_type << 24 | len(body)) + body


def _validate(msg_type: int, fields: dict[str, Any]) -> None:
    schema = SCHEMAS.get(msg_type)
    if schema is None:
        raise ProtocolError(f"unknown relay message type {msg_type}")
    for key, kind in schema.items():
        value = fields.get(key)
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ProtocolError(
                f"relay {NAMES[msg_type]}: field {key!r} missing or not {kind.__name__}"
            )
        if isinstance(value, str) and len(value) > MAX_STRING:
            raise ProtocolError(f"relay {NAMES[msg_type]}: field {key!r} too long")
        if kind is int and isinstance(value, int) and not 0 <= value <= 2**32:
            raise ProtocolError(f"relay {NAMES[msg_type]}: field {key!r} out of range")
    if msg_type == TICKETS:
        tickets = fields["tickets"]
        if len(tickets) > MAX_TICKETS or not all(
            isinstance(t, str) and len(t) <= 64 for t in tickets
        ):
            raise ProtocolError("relay TICKETS: bad ticket list")
    if msg_type == OPEN and fields["kind"] not in KINDS:
        raise ProtocolError(f"relay OPEN: kind must be one of {', '.join(KINDS)}")


class Decoder:
    """Feed bytes, get messages. Holds at most one partial frame (bounded by MAX_FRAME)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= HEADER.size:
            word = HEADER.unpack_from(self._buf)[0]
            msg_type, length = word >> 24, word & 0xFFFFFF
            if msg_type not in SCHEMAS:
                raise ProtocolError(f"unknown relay message type {msg_type}")
            if length > MAX_FRAME:
                raise ProtocolError(f"relay frame of {length} bytes exceeds {MAX_FRAME}")
            if len(self._buf) < HEADER.size + length:
                break
            body = bytes(self._buf[HEADER.size : HEADER.size + length])
            del self._buf[: HEADER.size + length]
            out.append(decode_body(msg_type, body))
        return out

    @property
    def buffered(self) -> bytes:
        """Bytes received after the last complete frame (e.g. a visitor's first bytes)."""
        return bytes(self._buf)


def decode_body(msg_type: int, body: bytes) -> Message:
    try:
        fields = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(f"relay {NAMES.get(msg_type, msg_type)} frame is not JSON") from None
    if not isinstance(fields, dict):
        raise ProtocolError(f"relay {NAMES.get(msg_type, msg_type)} frame is not a JSON object")
    _validate(msg_type, fields)
    return Message(msg_type, fields)


# ---- authentication: the token never crosses the wire ------------------------------------


def token_id(token: str) -> str:
    """A public handle for a token (lets the relay find it without being sent it)."""
    return hashlib.sha256(b"natkit-token-id\x00" + token.encode()).hexdigest()[:32]


def auth_mac(token: str, nonce: str, relay_fingerprint: str) -> str:
    """The agent's proof: HMAC over the relay's fresh nonce and the certificate it saw, so a
    proof made for one relay (or a man in the middle) is worthless to another."""
    msg = f"natkit-auth-v{VERSION}\x00{nonce}\x00{relay_fingerprint}".encode()
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def check_mac(token: str, nonce: str, relay_fingerprint: str, mac: str) -> bool:
    # compare_digest refuses str with non-ASCII characters (TypeError): the MAC comes from
    # the wire, so compare bytes, and anything not ASCII is simply wrong.
    if not isinstance(mac, str) or not mac.isascii():
        return False
    return hmac.compare_digest(auth_mac(token, nonce, relay_fingerprint).encode(), mac.encode())
