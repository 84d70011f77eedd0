"""The relay's control protocol, sans-I/O.

A frame is a 1-byte type, a 3-byte big-endian length and a JSON object of that length
(at most 64 KiB). Each type has a schema: required fields and their JSON types. The
decoder accepts bytes in any chunking and yields validated messages; anything malformed
is a :class:`ProtocolError` and the peer is dropped.

Conversation (control connection, TLS)::

    agent  HELLO {version, agent}            relay  CHALLENGE {nonce}
    agent  AUTH {token_id, mac}              relay  WELCOME {session, data_key} | ERROR {code, message}
    agent  OPEN {tunnel, kind, name, port}   relay  OPENED {tunnel, public} | ERROR
                                             relay  TICKETS {tunnel, tickets}   (open data conns)
    agent  DIAL {id, host, port}             relay  DIALED {id, ok, error}
    either PING {t}                          other  PONG {t}

A data connection starts with DATA {ticket} and waits; when a visitor arrives the relay
sends START {tunnel, visitor} and then both ends pass raw bytes. Encrypted ones are sealed
with keys derived from ``data_key`` and their ticket (:mod:`natkit.relay.seal`).

Rendezvous for peer-to-peer (rooms keyed by token and name; see :mod:`natkit.relay.rooms`)::

    agent  P2P_JOIN {name, role, instance}   relay  P2P_PEER {name, present, ticket} | ERROR
    relay  P2P_PEER {name, present, ticket}  (whenever the other peer comes or goes)
    either P2P_SIGNAL {name, data}           (relayed verbatim to the other peer)
    agent  P2P_LEAVE {name}                  (relay → agent: another connection took over)

ERRORs about a room carry two extra fields: ``room`` (its name) and ``about`` (``join`` or
``signal``). A relay-fallback data connection (plain TCP) sends DATA {ticket} with a P2P
ticket and waits for the other peer's; the relay then sends P2P_JOINED {} on both and
joins them, or ERROR {code: timeout|gone|replaced|limit} and closes.
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
P2P_JOIN, P2P_PEER, P2P_SIGNAL, P2P_LEAVE, P2P_JOINED = 30, 31, 32, 33, 34

NAMES = {
    HELLO: "HELLO", CHALLENGE: "CHALLENGE", AUTH: "AUTH", WELCOME: "WELCOME", ERROR: "ERROR",
    OPEN: "OPEN", OPENED: "OPENED", CLOSE: "CLOSE", TICKETS: "TICKETS", DIAL: "DIAL",
    DIALED: "DIALED", PING: "PING", PONG: "PONG", DATA: "DATA", START: "START",
    P2P_JOIN: "P2P_JOIN", P2P_PEER: "P2P_PEER", P2P_SIGNAL: "P2P_SIGNAL",
    P2P_LEAVE: "P2P_LEAVE", P2P_JOINED: "P2P_JOINED",
}  # fmt: skip

# Required fields per type and their JSON types (bool is not accepted where int is).
SCHEMAS: dict[int, dict[str, type]] = {
    HELLO: {"version": int, "agent": str},
    CHALLENGE: {"nonce": str},
    AUTH: {"token_id": str, "mac": str},
    WELCOME: {"session": str, "data_key": str},
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
    P2P_JOIN: {"name": str, "role": str, "instance": str},
    P2P_PEER: {"name": str, "present": bool, "ticket": str},
    P2P_SIGNAL: {"name": str, "data": str},
    P2P_LEAVE: {"name": str},
    P2P_JOINED: {},
}
MAX_STRING = 512
MAX_TICKETS = 256
MAX_TICKET = 64
KINDS = ("tcp", "http", "tls")
ROLES = ("listen", "connect")
P2P_NAMED = (P2P_JOIN, P2P_PEER, P2P_SIGNAL, P2P_LEAVE)
P2P_AGENT_TYPES = (P2P_JOIN, P2P_SIGNAL, P2P_LEAVE)  # what an agent may send about rooms
MAX_ROOM_NAME = 128
# A signal is ICE candidates or a session description: a few KiB. The bound is on its JSON
# form (what the relay forwards), so any signal that passes fits a frame once re-encoded.
MAX_SIGNAL = 16 * 1024
# Fields allowed past MAX_STRING, with their own bound (checked below).
_LONG_FIELDS = {(P2P_SIGNAL, "data")}


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
        if (
            isinstance(value, str)
            and len(value) > MAX_STRING
            and (msg_type, key) not in _LONG_FIELDS
        ):
            raise ProtocolError(f"relay {NAMES[msg_type]}: field {key!r} too long")
        if kind is int and isinstance(value, int) and not 0 <= value <= 2**32:
            raise ProtocolError(f"relay {NAMES[msg_type]}: field {key!r} out of range")
    if msg_type == TICKETS:
        tickets = fields["tickets"]
        if len(tickets) > MAX_TICKETS or not all(
            isinstance(t, str) and len(t) <= MAX_TICKET for t in tickets
        ):
            raise ProtocolError("relay TICKETS: bad ticket list")
    if msg_type == OPEN and fields["kind"] not in KINDS:
        raise ProtocolError(f"relay OPEN: kind must be one of {', '.join(KINDS)}")
    if msg_type in P2P_NAMED:
        _validate_p2p(msg_type, fields)


def _validate_p2p(msg_type: int, fields: dict[str, Any]) -> None:
    what = NAMES[msg_type]
    problem = room_name_problem(fields["name"])
    if problem:
        raise ProtocolError(f"relay {what}: {problem}")
    if msg_type == P2P_JOIN and fields["role"] not in ROLES:
        raise ProtocolError(f"relay P2P_JOIN: role must be one of {', '.join(ROLES)}")
    if msg_type == P2P_PEER and len(fields["ticket"]) > MAX_TICKET:
        raise ProtocolError("relay P2P_PEER: ticket too long")
    if msg_type == P2P_SIGNAL and signal_size(fields["data"]) > MAX_SIGNAL:
        raise ProtocolError(f"relay P2P_SIGNAL: data over {MAX_SIGNAL} bytes once JSON-escaped")


def room_name_problem(name: str) -> str:
    """What is wrong with a room name ('' when nothing): 1 to 128 printable characters."""
    if not name:
        return "the room name is empty"
    if len(name) > MAX_ROOM_NAME:
        return f"the room name is longer than {MAX_ROOM_NAME} characters"
    if not name.isprintable():
        return "the room name has unprintable characters"
    return ""


def signal_size(data: str) -> int:
    """The size that counts against MAX_SIGNAL: ``data`` as JSON without its quotes (ASCII
    text counts one byte a character; escapes count in full)."""
    if len(data) > MAX_SIGNAL:
        return len(data)  # too long whatever its escapes: skip encoding a huge string
    return len(json.dumps(data)) - 2


def decode_header(head: bytes | bytearray) -> tuple[int, int]:
    """Type and body length from the start of ``head``; ProtocolError if not our framing."""
    word = HEADER.unpack_from(head)[0]
    msg_type, length = word >> 24, word & 0xFFFFFF
    if msg_type not in SCHEMAS:
        raise ProtocolError(f"unknown relay message type {msg_type}")
    if length > MAX_FRAME:
        raise ProtocolError(f"relay frame of {length} bytes exceeds {MAX_FRAME}")
    return msg_type, length


class Decoder:
    """Feed bytes, get messages. Holds at most one partial frame (bounded by MAX_FRAME)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= HEADER.size:
            msg_type, length = decode_header(self._buf)
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
