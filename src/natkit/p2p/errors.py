"""The peer-to-peer layer's exceptions (all :class:`~natkit.errors.NatkitError`)."""

from __future__ import annotations

from natkit.errors import NatkitError, ProtocolError


class P2PError(NatkitError):
    """A peer-to-peer session or path failed."""


class P2PAuthError(P2PError):
    """The peer could not be authenticated, or did not authenticate us: a different shared
    secret, a certificate that is not the one announced through signalling, a bad proof."""


class P2PClosedError(P2PError):
    """The session (or the stream) is closed; ``code`` is the QUIC error code when the
    connection ended with one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class P2PStreamError(P2PError):
    """A stream was reset or stopped by the peer; ``code`` is the peer's error code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class P2PTimeoutError(P2PError):
    """A wait on the peer (the handshake, authentication) took longer than allowed."""


class IceDescriptionError(P2PError, ProtocolError):
    """The peer's ICE description (credentials, candidates) is malformed or too large."""
