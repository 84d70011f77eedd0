"""The relay's messages and their framing, sans-I/O.

A frame is a 1-byte type, a 3-byte big-endian length and a JSON object of that length (at
most 64 KiB). Every message is a frozen dataclass; its fields are its schema: a frame is
accepted only when it has exactly the fields of its type, each of the declared JSON type
(``bool`` is not accepted for ``int``), strings at most :data:`MAX_STRING` characters, and
the message's own rules (:meth:`Message.check`) hold. Anything else is a
:class:`~natkit.errors.ProtocolError` and the peer is dropped.

Who may send which message when is the business of :mod:`natkit.relay.control`; this
module only says what a well-formed message is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from natkit.errors import ProtocolError
from natkit.relay.access import ACCESS_VERSION, AccessPolicy

VERSION = 2
MAX_FRAME = 64 * 1024
HEADER = struct.Struct("!I")  # type in the top byte, length in the low 24 bits
MAX_STRING = 512
MAX_TICKETS = 256
MAX_TICKET = 64
MAX_ROOM_NAME = 128
MAX_DIAL_HOST = 64  # an IP address literal, with room for an IPv6 scope
# A signal is ICE candidates or a session description: a few KiB. The bound is on its JSON
# form (what the relay forwards), so any signal that passes fits a frame once re-encoded.
MAX_SIGNAL = 16 * 1024
KINDS = ("tcp", "http", "tls")
ROLES = ("listen", "connect")


class Message:
    """Base of every relay message; ``TYPE`` is its number on the wire."""

    TYPE: ClassVar[int]
    LONG_FIELDS: ClassVar[frozenset[str]] = frozenset()  # strings allowed past MAX_STRING
    # Fields added after a message's first version: absent on the wire when None (so a
    # message that does not use them is the same bytes an older peer knows), and None
    # when absent.
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    def check(self) -> None:
        """The message's own rules beyond field types (raise ProtocolError)."""


_M = TypeVar("_M", bound="type[Message]")


def _message(type_number: int) -> Callable[[_M], _M]:
    def register(cls: _M) -> _M:
        cls.TYPE = type_number
        if type_number in BY_TYPE:
            raise RuntimeError(f"relay message type {type_number} defined twice")
        BY_TYPE[type_number] = cls
        return cls

    return register


BY_TYPE: dict[int, type[Message]] = {}


# ---- the control conversation (TLS) ---------------------------------------------------------


@_message(1)
@dataclasses.dataclass(frozen=True, slots=True)
class Hello(Message):
    version: int
    agent: str


@_message(2)
@dataclasses.dataclass(frozen=True, slots=True)
class Challenge(Message):
    nonce: str


@_message(3)
@dataclasses.dataclass(frozen=True, slots=True)
class Auth(Message):
    """The token proven by ``mac`` (see :func:`natkit.relay.control.auth_mac`), and this
    agent process's identity: ``instance`` names it, ``resume`` (a secret) proves a later
    connection is the same process coming back."""

    token_id: str
    mac: str
    instance: str
    resume: str

    def check(self) -> None:
        for name in ("instance", "resume"):
            value = getattr(self, name)
            if not 16 <= len(value) <= 64 or not value.isascii() or not value.isalnum():
                raise ProtocolError(f"relay AUTH: {name} must be 16 to 64 letters or digits")


@_message(4)
@dataclasses.dataclass(frozen=True, slots=True)
class Welcome(Message):
    """``data_key``: the session's secret for sealed data connections (hex); ``plaintext``:
    whether this relay allows plaintext data connections; ``cipher``: the AEAD the relay
    seals fastest with (the agent uses it when it is fast for the agent too)."""

    session: str
    data_key: str
    plaintext: bool
    cipher: str


@_message(5)
@dataclasses.dataclass(frozen=True, slots=True)
class Error(Message):
    code: str
    message: str


@_message(6)
@dataclasses.dataclass(frozen=True, slots=True)
class Open(Message):
    """Open tunnel ``tunnel`` (the agent's own name for it). ``port`` (tcp): 0 for any;
    with ``exact`` that port or a refusal, without it a preference. ``plaintext``: data
    connections in clear (spliced) instead of sealed. ``takeover``: take a name another
    live agent of the same token holds. ``access`` (optional): who may reach the tunnel
    (:mod:`natkit.relay.access`), a versioned JSON object of its own."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"access"})
    tunnel: str
    kind: str
    name: str
    port: int
    exact: bool
    plaintext: bool
    takeover: bool
    access: AccessPolicy | None = None

    def check(self) -> None:
        if self.kind not in KINDS:
            raise ProtocolError(f"relay OPEN: kind must be one of {', '.join(KINDS)}")
        if self.port > 65535:
            raise ProtocolError("relay OPEN: port out of range")
        if self.access is not None and self.access.version == ACCESS_VERSION:
            problem = self.access.problem(self.kind)
            if problem:
                raise ProtocolError(f"relay OPEN: access: {problem}")


@_message(7)
@dataclasses.dataclass(frozen=True, slots=True)
class Opened(Message):
    tunnel: str
    public: str


@_message(8)
@dataclasses.dataclass(frozen=True, slots=True)
class Close(Message):
    tunnel: str


@_message(9)
@dataclasses.dataclass(frozen=True, slots=True)
class Tickets(Message):
    tunnel: str
    tickets: tuple[str, ...]

    def check(self) -> None:
        if len(self.tickets) > MAX_TICKETS or not all(
            0 < len(t) <= MAX_TICKET and t.isascii() for t in self.tickets
        ):
            raise ProtocolError("relay TICKETS: bad ticket list")


@_message(10)
@dataclasses.dataclass(frozen=True, slots=True)
class Dial(Message):
    id: int
    host: str
    port: int

    def check(self) -> None:
        if len(self.host) > MAX_DIAL_HOST:
            raise ProtocolError(f"relay DIAL: host longer than {MAX_DIAL_HOST} characters")


@_message(11)
@dataclasses.dataclass(frozen=True, slots=True)
class Dialed(Message):
    id: int
    ok: bool
    error: str


@_message(12)
@dataclasses.dataclass(frozen=True, slots=True)
class Ping(Message):
    t: float


@_message(13)
@dataclasses.dataclass(frozen=True, slots=True)
class Pong(Message):
    t: float


@_message(14)
@dataclasses.dataclass(frozen=True, slots=True)
class Closed(Message):
    """The relay closed one of the agent's tunnels (``code``: taken-over, ...)."""

    tunnel: str
    code: str
    message: str


@_message(15)
@dataclasses.dataclass(frozen=True, slots=True)
class Notice(Message):
    """Something the agent should know and report (``code``: interference, ...)."""

    code: str
    message: str


@_message(16)
@dataclasses.dataclass(frozen=True, slots=True)
class Refused(Message):
    """The relay refused a visitor to ``tunnel`` by its access policy: ``visitor``
    (address:port), ``reason`` (see :data:`natkit.relay.gate.REASONS`), ``at`` (the
    relay's Unix time), ``more``: refusals not reported since the last one (the relay
    reports a few a second per tunnel). Sent only for tunnels opened with a policy, so an
    agent that predates it never gets one."""

    tunnel: str
    visitor: str
    reason: str
    at: float
    more: int

    def check(self) -> None:
        if not 0 < len(self.reason) <= 32 or len(self.visitor) > MAX_DIAL_HOST + 8:
            raise ProtocolError("relay REFUSED: bad reason or visitor")


# ---- data connections ------------------------------------------------------------------------


@_message(20)
@dataclasses.dataclass(frozen=True, slots=True)
class Data(Message):
    """The first frame of a data connection (plain: in clear; sealed: its first record)."""

    ticket: str

    def check(self) -> None:
        if not 0 < len(self.ticket) <= MAX_TICKET:
            raise ProtocolError("relay DATA: bad ticket")


@_message(21)
@dataclasses.dataclass(frozen=True, slots=True)
class Start(Message):
    tunnel: str
    visitor: str


# ---- peer-to-peer rendezvous -------------------------------------------------------------------


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


class _RoomMessage(Message):
    name: str

    def check(self) -> None:
        problem = room_name_problem(self.name)
        if problem:
            raise ProtocolError(f"relay {type(self).__name__}: {problem}")


@_message(30)
@dataclasses.dataclass(frozen=True, slots=True)
class P2PJoin(_RoomMessage):
    name: str
    role: str
    instance: str

    def check(self) -> None:
        _RoomMessage.check(self)  # (no zero-argument super() in a slots dataclass)
        if self.role not in ROLES:
            raise ProtocolError(f"relay P2PJoin: role must be one of {', '.join(ROLES)}")


@_message(31)
@dataclasses.dataclass(frozen=True, slots=True)
class P2PPeer(_RoomMessage):
    name: str
    present: bool
    ticket: str

    def check(self) -> None:
        _RoomMessage.check(self)  # (no zero-argument super() in a slots dataclass)
        if len(self.ticket) > MAX_TICKET:
            raise ProtocolError("relay P2PPeer: ticket too long")


@_message(32)
@dataclasses.dataclass(frozen=True, slots=True)
class P2PSignal(_RoomMessage):
    LONG_FIELDS: ClassVar[frozenset[str]] = frozenset({"data"})
    name: str
    data: str

    def check(self) -> None:
        _RoomMessage.check(self)  # (no zero-argument super() in a slots dataclass)
        if signal_size(self.data) > MAX_SIGNAL:
            raise ProtocolError(f"relay P2PSignal: data over {MAX_SIGNAL} bytes once JSON-escaped")


@_message(33)
@dataclasses.dataclass(frozen=True, slots=True)
class P2PLeave(_RoomMessage):
    name: str


@_message(34)
@dataclasses.dataclass(frozen=True, slots=True)
class P2PJoined(Message):
    """On a relay-fallback path: the other peer's path is here, bytes follow."""


@_message(35)
@dataclasses.dataclass(frozen=True, slots=True)
class P2PError(_RoomMessage):
    """A refusal about room ``name``: of a JOIN or of a signal (``about``)."""

    name: str
    about: str
    code: str
    message: str

    def check(self) -> None:
        _RoomMessage.check(self)  # (no zero-argument super() in a slots dataclass)
        if self.about not in ("join", "signal"):
            raise ProtocolError("relay P2PError: about must be join or signal")


# ---- the codec ---------------------------------------------------------------------------------

_FIELDS: dict[type[Message], tuple[tuple[str, str], ...]] = {
    cls: tuple((f.name, str(f.type)) for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    for cls in BY_TYPE.values()
}
_NAMES = {cls: frozenset(name for name, _ in fields) for cls, fields in _FIELDS.items()}


def encode(msg: Message) -> bytes:
    """One frame. Our own messages are checked too, so a bug cannot put junk on the wire."""
    cls = type(msg)
    fields = {name: getattr(msg, name) for name, _ in _FIELDS[cls]}
    if cls.OPTIONAL:
        fields = {k: _to_json(v) for k, v in fields.items()
                  if not (v is None and k in cls.OPTIONAL)}  # fmt: skip
    _check_fields(cls, fields)
    msg.check()
    try:
        body = json.dumps(
            {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
            separators=(",", ":"),
            allow_nan=False,
        ).encode()
    except ValueError:  # NaN or infinity: not JSON
        raise ProtocolError(f"relay {cls.__name__}: a number that is not finite") from None
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"relay {cls.__name__} frame too large ({len(body)} bytes)")
    return HEADER.pack(cls.TYPE << 24 | len(body)) + body


def _to_json(value: Any) -> Any:
    return value.to_wire() if isinstance(value, AccessPolicy) else value


def _check_fields(cls: type[Message], fields: dict[str, Any]) -> None:
    what = cls.__name__
    expected = _FIELDS[cls]
    optional = cls.OPTIONAL
    if not len(expected) - len(optional) <= len(fields) <= len(expected):
        names = ", ".join(n for n, _ in expected) or "none"
        raise ProtocolError(f"relay {what}: fields must be exactly: {names}")
    for name, kind in expected:
        if name not in fields:
            if name in optional:
                continue
            raise ProtocolError(f"relay {what}: field {name!r} missing")
        value = fields[name]
        if kind == "str":
            ok = isinstance(value, str)
            if ok and len(value) > MAX_STRING and name not in cls.LONG_FIELDS:
                raise ProtocolError(f"relay {what}: field {name!r} too long")
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
            if ok and not 0 <= value <= 2**32:
                raise ProtocolError(f"relay {what}: field {name!r} out of range")
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok and not math.isfinite(value):
                raise ProtocolError(f"relay {what}: field {name!r} is not a finite number")
        elif kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "tuple[str, ...]":
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        elif kind == "AccessPolicy | None":  # its JSON form; read by AccessPolicy.from_wire
            ok = isinstance(value, dict)
        else:  # pragma: no cover - a message defined with a field type the codec lacks
            raise RuntimeError(f"relay {what}: no codec for field type {kind}")
        if not ok:
            raise ProtocolError(f"relay {what}: field {name!r} is not {kind}")
    if optional and not fields.keys() <= _NAMES[cls]:  # an optional one absent, another there
        names = ", ".join(n for n, _ in expected)
        raise ProtocolError(f"relay {what}: fields must be exactly: {names}")


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_header(head: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Type and body length from the start of ``head``; ProtocolError if not our framing."""
    word = HEADER.unpack_from(head)[0]
    msg_type, length = word >> 24, word & 0xFFFFFF
    if msg_type not in BY_TYPE:
        raise ProtocolError(f"unknown relay message type {msg_type}")
    if length > MAX_FRAME:
        raise ProtocolError(f"relay frame of {length} bytes exceeds {MAX_FRAME}")
    return msg_type, length


def decode_body(msg_type: int, body: bytes | bytearray | memoryview) -> Message:
    cls = BY_TYPE[msg_type]
    try:
        fields = json.loads(bytes(body).decode("utf-8"), parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(f"relay {cls.__name__} frame is not JSON") from None
    if not isinstance(fields, dict):
        raise ProtocolError(f"relay {cls.__name__} frame is not a JSON object")
    _check_fields(cls, fields)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    if "access" in values and cls.OPTIONAL:
        values["access"] = AccessPolicy.from_wire(values["access"])
    msg = cls(**values)
    msg.check()
    return msg


class FrameDecoder:
    """Feed bytes in any chunking, get messages. Holds at most one partial frame (bounded
    by MAX_FRAME) beyond what it was fed last."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def next(self) -> Message | None:
        """The next whole message, or None until more bytes come."""
        if len(self._buf) < HEADER.size:
            return None
        msg_type, length = decode_header(self._buf)
        end = HEADER.size + length
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[HEADER.size : end])
        del self._buf[:end]
        return decode_body(msg_type, body)

    def messages(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Feed ``data`` and take every whole message."""
        self.feed(data)
        out: list[Message] = []
        while (msg := self.next()) is not None:
            out.append(msg)
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)

    @property
    def buffered(self) -> bytes:
        """Bytes received after the last complete frame."""
        return bytes(self._buf)
