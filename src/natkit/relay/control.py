"""The control conversation between an agent and the relay, as one state machine both
sides share (sans-I/O, in the manner of h11 and aioquic)::

    agent  Hello {version, agent}                       relay  Challenge {nonce}
    agent  Auth {token_id, mac, instance, resume}       relay  Welcome {...} | Error
    then, either way until the connection ends:
    agent  Open / Close / Dial / Ping / Pong / P2PJoin / P2PSignal / P2PLeave
    relay  Opened / Closed / Tickets / Dialed / Notice / Refused / Error / Ping / Pong /
           P2PPeer / P2PSignal / P2PLeave / P2PError

Feed what the peer sent to :meth:`ControlConnection.receive_data`, take messages with
:meth:`~ControlConnection.next_event`, and turn our own into bytes with
:meth:`~ControlConnection.send`. Each message is checked against the conversation's
state once, here, for both directions: a peer that speaks out of turn is a
:class:`~natkit.errors.ProtocolError`, and so is our own code trying to.

The token never crosses the wire: the agent proves it with an HMAC over the relay's fresh
nonce, the certificate it saw, and its instance identity (:func:`auth_mac`).
"""

from __future__ import annotations

import enum
import hashlib
import hmac

from natkit.errors import ProtocolError
from natkit.relay import messages as M


class Side(enum.Enum):
    AGENT = "agent"
    RELAY = "relay"


class Phase(enum.Enum):
    HELLO = "waiting for the agent's Hello"
    CHALLENGE = "waiting for the relay's Challenge"
    AUTH = "waiting for the agent's Auth"
    WELCOME = "waiting for the relay's Welcome"
    READY = "established"
    CLOSED = "closed"


_AGENT_READY: frozenset[type[M.Message]] = frozenset(
    {M.Open, M.Close, M.Dial, M.Ping, M.Pong, M.P2PJoin, M.P2PSignal, M.P2PLeave}
)
_RELAY_READY: frozenset[type[M.Message]] = frozenset(
    {M.Opened, M.Closed, M.Tickets, M.Dialed, M.Notice, M.Refused, M.Error, M.Ping, M.Pong,
     M.P2PPeer, M.P2PSignal, M.P2PLeave, M.P2PError}
)  # fmt: skip

# Who may send what in which phase, and where the handshake goes next.
LEGAL: dict[tuple[Phase, Side], frozenset[type[M.Message]]] = {
    (Phase.HELLO, Side.AGENT): frozenset({M.Hello}),
    (Phase.CHALLENGE, Side.RELAY): frozenset({M.Challenge, M.Error}),
    (Phase.AUTH, Side.AGENT): frozenset({M.Auth}),
    (Phase.WELCOME, Side.RELAY): frozenset({M.Welcome, M.Error}),
    (Phase.READY, Side.AGENT): _AGENT_READY,
    (Phase.READY, Side.RELAY): _RELAY_READY,
}
_NEXT: dict[type[M.Message], Phase] = {
    M.Hello: Phase.CHALLENGE,
    M.Challenge: Phase.AUTH,
    M.Auth: Phase.WELCOME,
    M.Welcome: Phase.READY,
}
MAX_PENDING = 4 * 1024 * 1024  # received and not yet taken by next_event (reads included)


class ControlConnection:
    """One control connection seen from ``side``: bytes in, messages out, and back."""

    def __init__(self, side: Side) -> None:
        self.side = side
        self.peer = Side.RELAY if side is Side.AGENT else Side.AGENT
        self.phase = Phase.HELLO
        self._decoder = M.FrameDecoder()

    # -- what we send ------------------------------------------------------------------------
    def send(self, msg: M.Message) -> bytes:
        """The bytes of ``msg``, if it is ours to send now (else ProtocolError)."""
        self._advance(self.side, msg)
        return M.encode(msg)

    # -- what the peer sent ------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.phase is Phase.CLOSED:
            return  # the conversation is over: what still comes is ignored
        self._decoder.feed(data)
        if self._decoder.pending > MAX_PENDING:
            self.phase = Phase.CLOSED
            raise ProtocolError("relay control connection: too much data not yet read")

    def next_event(self) -> M.Message | None:
        """The peer's next message, checked against the conversation; None until more
        bytes come. A malformed or out-of-turn message closes the conversation and raises
        ProtocolError."""
        if self.phase is Phase.CLOSED:
            return None
        try:
            msg = self._decoder.next()
            if msg is not None:
                self._advance(self.peer, msg)
        except ProtocolError:
            self.phase = Phase.CLOSED
            raise
        return msg

    def end(self, error: M.Error) -> bytes:
        """The relay's last word, in any phase (the agent spoke out of turn, failed to
        log in, or is dropped): the bytes of ``error``, and the conversation is over."""
        if self.side is not Side.RELAY:
            raise ProtocolError("relay control: only the relay ends a conversation with an Error")
        self.phase = Phase.CLOSED
        return M.encode(error)

    def close(self) -> None:
        self.phase = Phase.CLOSED

    # -- the rules -------------------------------------------------------------------------------
    def _advance(self, who: Side, msg: M.Message) -> None:
        allowed = LEGAL.get((self.phase, who), frozenset())
        if type(msg) not in allowed:
            raise ProtocolError(
                f"relay control: {who.value} may not send {type(msg).__name__} "
                f"while {self.phase.value}"
            )
        if self.phase is not Phase.READY:
            if isinstance(msg, M.Error):
                self.phase = Phase.CLOSED
            else:
                self.phase = _NEXT[type(msg)]


# ---- authentication ---------------------------------------------------------------------------


def token_id(token: str) -> str:
    """A public handle for a token (lets the relay find it without being sent it)."""
    return hashlib.sha256(b"natkit-token-id\x00" + token.encode()).hexdigest()[:32]


def auth_mac(token: str, nonce: str, relay_fingerprint: str, instance: str, resume: str) -> str:
    """The agent's proof: HMAC over the relay's fresh nonce, the certificate it saw and its
    identity, so a proof made for one relay (or a man in the middle) is worthless to
    another, and an instance cannot be claimed without the token."""
    msg = f"natkit-auth-v{M.VERSION}\x00{nonce}\x00{relay_fingerprint}\x00{instance}\x00{resume}"
    return hmac.new(token.encode(), msg.encode(), hashlib.sha256).hexdigest()


def check_mac(
    token: str, nonce: str, relay_fingerprint: str, instance: str, resume: str, mac: str
) -> bool:
    # compare_digest refuses str with non-ASCII characters (TypeError): the MAC comes from
    # the wire, so compare bytes, and anything not ASCII is simply wrong.
    if not mac.isascii():
        return False
    expected = auth_mac(token, nonce, relay_fingerprint, instance, resume)
    return hmac.compare_digest(expected.encode(), mac.encode())


def resume_digest(resume: str) -> str:
    """What the relay keeps of an agent's resumption secret."""
    return hashlib.sha256(b"natkit-resume\x00" + resume.encode()).hexdigest()


def ticket_handle(ticket: str) -> str:
    """The public name of a data-connection ticket: what a sealed opening carries in
    clear. It finds the ticket at the relay and reveals nothing of it (the ticket keys
    the connection's encryption), so a ticket lifted from the wire cannot be presented
    on a plaintext data connection."""
    return hashlib.sha256(b"natkit-ticket\x00" + ticket.encode()).hexdigest()[:32]
