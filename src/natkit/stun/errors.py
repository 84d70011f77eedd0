"""Errors of the STUN layer (kept beside it; all are :class:`natkit.errors.NatkitError`)."""

from __future__ import annotations

from natkit.errors import NatkitError, ProtocolError


class StunDecodeError(ProtocolError):
    """Bytes that are not a well-formed STUN message (or not an answer we can use)."""


class StunTimeoutError(NatkitError):
    """A STUN server did not answer within the retransmission budget."""


class StunTransportError(NatkitError):
    """A STUN server could not be reached: name lookup, refused or reset connection, ..."""
