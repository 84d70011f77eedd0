"""STUN (RFC 8489) Binding messages and RFC 5780 CHANGE-REQUEST, sans-I/O, on aioice's codec.

aioice's attribute table already knows everything natkit needs (XOR-MAPPED-ADDRESS,
MAPPED-ADDRESS, OTHER-ADDRESS, RESPONSE-ORIGIN, CHANGE-REQUEST, ERROR-CODE, SOFTWARE,
MESSAGE-INTEGRITY, FINGERPRINT), so it is used as is and never patched. Its parser trusts
more than natkit does, so :func:`decode` first checks the frame itself — size bound, the two
leading zero bits, magic cookie, length, every attribute inside the message, no duplicated
attribute — and turns whatever aioice still raises into :class:`StunDecodeError`.
"""

from __future__ import annotations

import dataclasses
import secrets
import struct

from aioice import stun

from natkit.stun.errors import StunDecodeError

Addr = tuple[str, int]

MAGIC_COOKIE = stun.COOKIE
HEADER_LEN = 20
TRANSACTION_ID_LEN = 12
# Binding answers are ~100 bytes and RFC 8489 6.1 keeps UDP messages under 576 bytes; the
# cap only has to bound what a hostile peer can make us parse.
MAX_MESSAGE = 2048
# CHANGE-REQUEST flags (RFC 5780 7.2).
CHANGE_IP = 0x4
CHANGE_PORT = 0x2
# Attribute types below this must be understood (RFC 8489 14).
COMPREHENSION_OPTIONAL = 0x8000
DEFAULT_PORT = 3478

_METHODS = frozenset(int(m) for m in stun.Method)
_DECODE_ERRORS = (ValueError, struct.error, IndexError, KeyError, TypeError, OverflowError)


@dataclasses.dataclass(frozen=True)
class Decoded:
    """A well-formed STUN message, and the comprehension-required attributes aioice skipped."""

    message: stun.Message
    unknown_required: tuple[int, ...] = ()

    @property
    def transaction_id(self) -> bytes:
        return self.message.transaction_id


@dataclasses.dataclass(frozen=True)
class BindingResponse:
    """What a Binding success or error response says."""

    transaction_id: bytes
    mapped: Addr | None  # XOR-MAPPED-ADDRESS (MAPPED-ADDRESS if the server sent only that)
    other_address: Addr | None  # RFC 5780: the server's alternate IP and port
    response_origin: Addr | None
    error_code: int | None = None
    error_reason: str = ""
    software: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_code is None


def new_transaction_id() -> bytes:
    # 96 random bits: the only thing that ties an answer to our request (RFC 8489 6).
    return secrets.token_bytes(TRANSACTION_ID_LEN)


def binding_request(
    *, change_ip: bool = False, change_port: bool = False, transaction_id: bytes | None = None
) -> stun.Message:
    """A Binding request; ``change_ip``/``change_port`` add RFC 5780's CHANGE-REQUEST."""
    tid = transaction_id if transaction_id is not None else new_transaction_id()
    if len(tid) != TRANSACTION_ID_LEN:
        raise ValueError("a STUN transaction id is 12 bytes")
    msg = stun.Message(stun.Method.BINDING, stun.Class.REQUEST, transaction_id=tid)
    if change_ip or change_port:
        msg.attributes["CHANGE-REQUEST"] = (CHANGE_IP if change_ip else 0) | (
            CHANGE_PORT if change_port else 0
        )
    return msg


def binding_success(request: stun.Message, mapped: Addr) -> bytes:
    """A server's answer to a Binding ``request``, sans-I/O: XOR-MAPPED-ADDRESS ``mapped``
    (the request's source as the server saw it) and FINGERPRINT, nothing else, so an answer
    is no bigger than it must be (40 bytes for IPv4, 52 for IPv6)."""
    if request.message_method != stun.Method.BINDING or request.message_class != stun.Class.REQUEST:
        raise ValueError("only a Binding request gets a Binding success response")
    response = stun.Message(
        stun.Method.BINDING, stun.Class.RESPONSE, transaction_id=request.transaction_id
    )
    response.attributes["XOR-MAPPED-ADDRESS"] = mapped
    return encode(response, fingerprint=True)


def _attribute(name: str, value: object, transaction_id: bytes, padding: bytes) -> bytes:
    attr_type, _, pack, _ = stun.ATTRIBUTES_BY_NAME[name]
    body = pack(value, transaction_id) if pack is stun.pack_xor_address else pack(value)
    return (
        struct.pack("!HH", attr_type, len(body)) + body + padding * stun.padding_length(len(body))
    )


def encode(
    message: stun.Message,
    *,
    integrity_key: bytes | None = None,
    fingerprint: bool = False,
    padding: bytes = b"\x00",
) -> bytes:
    """Serialize ``message``; with ``integrity_key`` add a fresh MESSAGE-INTEGRITY, with
    ``fingerprint`` a fresh FINGERPRINT (both last, as RFC 8489 14.5/14.7 require).

    Without them, attributes are written in their order, stored MESSAGE-INTEGRITY and
    FINGERPRINT values included. ``padding`` is the byte that fills attributes to a 4-byte
    boundary: RFC 8489 14 lets it be anything, and RFC 5769's test vectors use spaces.
    """
    if len(padding) != 1:
        raise ValueError("padding is one byte")
    skip = set()
    if integrity_key is not None:
        skip |= {"MESSAGE-INTEGRITY", "FINGERPRINT"}
    if fingerprint:
        skip.add("FINGERPRINT")
    tid = message.transaction_id
    body = b"".join(
        _attribute(name, value, tid, padding)
        for name, value in message.attributes.items()
        if name not in skip
    )
    msg_type = message.message_method | message.message_class
    data = struct.pack("!HHI12s", msg_type, len(body), MAGIC_COOKIE, tid) + body
    if integrity_key is not None:
        # aioice's helper computes the HMAC with the length field already covering it.
        mac = stun.message_integrity(data, integrity_key)
        data = _append(data, _attribute("MESSAGE-INTEGRITY", mac, tid, padding))
    if fingerprint:
        data = _append(
            data, _attribute("FINGERPRINT", stun.message_fingerprint(data), tid, padding)
        )
    return data


def _append(data: bytes, attribute: bytes) -> bytes:
    out = data + attribute
    return out[:2] + struct.pack("!H", len(out) - HEADER_LEN) + out[4:]


def frame_length(header: bytes, *, max_size: int = MAX_MESSAGE) -> int:
    """The whole length of the message that starts with this 20-byte header (TCP framing,
    RFC 8489 6.2.2); raises :class:`StunDecodeError` unless it is a plausible STUN header."""
    if len(header) < HEADER_LEN:
        raise StunDecodeError(f"STUN header of {len(header)} bytes is truncated (20 needed)")
    msg_type, length, cookie = struct.unpack_from("!HHI", header)
    if msg_type & 0xC000:
        raise StunDecodeError("not a STUN message: the first two bits must be zero")
    if cookie != MAGIC_COOKIE:
        raise StunDecodeError(
            f"not an RFC 5389/8489 STUN message: magic cookie {cookie:#010x} "
            f"instead of {MAGIC_COOKIE:#010x} (an RFC 3489-only server?)"
        )
    if length % 4:
        raise StunDecodeError(f"STUN message length {length} is not a multiple of 4")
    if HEADER_LEN + length > max_size:
        raise StunDecodeError(
            f"STUN message of {HEADER_LEN + length} bytes exceeds the {max_size}-byte limit"
        )
    return HEADER_LEN + int(length)


def _attribute_types(data: bytes) -> list[int]:
    """Walk the attributes: each must lie inside the message, padding included."""
    types: list[int] = []
    pos = HEADER_LEN
    while pos < len(data):
        if pos + 4 > len(data):
            raise StunDecodeError(f"STUN attribute header at byte {pos} is truncated")
        attr_type, attr_len = struct.unpack_from("!HH", data, pos)
        end = pos + 4 + attr_len + stun.padding_length(attr_len)
        if end > len(data):
            raise StunDecodeError(
                f"STUN attribute {attr_type:#06x} of {attr_len} bytes runs past the message end"
            )
        if attr_type in stun.ATTRIBUTES_BY_TYPE and attr_type in types:
            # RFC 8489 14: only the first counts; aioice would keep the last, so refuse.
            name = stun.ATTRIBUTES_BY_TYPE[attr_type][1]
            raise StunDecodeError(f"STUN message carries {name} twice")
        types.append(attr_type)
        pos = end
    return types


def decode(data: bytes, *, max_size: int = MAX_MESSAGE) -> Decoded:
    """Parse one STUN message; anything malformed raises :class:`StunDecodeError`."""
    data = bytes(data)
    if len(data) > max_size:
        raise StunDecodeError(
            f"STUN message of {len(data)} bytes exceeds the {max_size}-byte limit"
        )
    total = frame_length(data, max_size=max_size)
    if total != len(data):
        raise StunDecodeError(
            f"STUN header announces {total} bytes but the message has {len(data)}"
        )
    types = _attribute_types(data)
    method = struct.unpack_from("!H", data)[0] & 0x3EEF  # the class bits masked out
    if method not in _METHODS:
        raise StunDecodeError(f"unknown STUN method {method:#06x}")
    try:
        message = stun.parse_message(data)
    except _DECODE_ERRORS as exc:
        raise StunDecodeError(f"malformed STUN message: {exc}") from None
    unknown = tuple(
        t for t in types if t < COMPREHENSION_OPTIONAL and t not in stun.ATTRIBUTES_BY_TYPE
    )
    return Decoded(message, unknown)


def binding_response(decoded: Decoded) -> BindingResponse:
    """Read a Binding success or error response; anything else raises StunDecodeError."""
    msg = decoded.message
    if msg.message_method != stun.Method.BINDING:
        raise StunDecodeError(f"STUN {msg.message_method.name} message where a Binding was due")
    attrs = msg.attributes
    common = BindingResponse(
        transaction_id=msg.transaction_id,
        mapped=None,
        other_address=attrs.get("OTHER-ADDRESS"),
        response_origin=attrs.get("RESPONSE-ORIGIN"),
        software=attrs.get("SOFTWARE"),
    )
    if msg.message_class == stun.Class.RESPONSE:
        if decoded.unknown_required:
            # RFC 8489 6.3.3: such a success response fails the transaction.
            names = ", ".join(f"{t:#06x}" for t in decoded.unknown_required)
            raise StunDecodeError(
                f"Binding response carries unknown comprehension-required attribute(s) {names}"
            )
        mapped = attrs.get("XOR-MAPPED-ADDRESS") or attrs.get("MAPPED-ADDRESS")
        if mapped is None:
            raise StunDecodeError("Binding success response without XOR-MAPPED-ADDRESS")
        return dataclasses.replace(common, mapped=mapped)
    if msg.message_class == stun.Class.ERROR:
        error = attrs.get("ERROR-CODE")
        if error is None:
            raise StunDecodeError("Binding error response without ERROR-CODE")
        code, reason = error
        if not 300 <= code <= 699:  # RFC 8489 14.8: class 3 to 6
            raise StunDecodeError(f"Binding error response with invalid code {code}")
        # Some servers (coturn) count NUL padding into the reason phrase.
        return dataclasses.replace(
            common, error_code=code, error_reason=reason.rstrip("\x00").strip()
        )
    raise StunDecodeError(f"STUN Binding {msg.message_class.name} where a response was due")


def parse_binding_response(
    data: bytes, transaction_id: bytes, *, max_size: int = MAX_MESSAGE
) -> BindingResponse:
    """Decode ``data`` as the answer to the request ``transaction_id``."""
    decoded = decode(data, max_size=max_size)
    if decoded.transaction_id != transaction_id:
        raise StunDecodeError("STUN response is for another transaction")
    return binding_response(decoded)
