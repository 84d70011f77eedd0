"""A working session ends when a *new* process of the peer says hello (it restarted), and not
when someone who sees the room's signals (the relay) replays one of the peer's old hellos:
each hello carries when its process said it, sealed, and only a later one counts."""

from __future__ import annotations

from natkit.p2p import auth
from natkit.p2p.peer import HELLO, _Signals

SECRET = "a-secret-of-the-two-peers-0123"


def _hello(nonce: str, at: float | None) -> str:
    body: dict[str, object] = {"t": "hello", "n": nonce}
    if at is not None:
        body["at"] = at
    sealed = auth.seal(SECRET, body, session=_Signals.HELLO_SESSION, sender="listen")
    return HELLO + sealed


def _connector_in_session(peer_at: float) -> _Signals:
    signals = _Signals(None, "room", SECRET, "connect")
    signals._nonces = {"ours", "theirs"}
    signals.peer_hello_at = peer_at
    return signals


def test_an_old_hello_replayed_does_not_end_the_session() -> None:
    signals = _connector_in_session(peer_at=1_000.0)
    signals._hello_later(_hello("from-an-earlier-run", 900.0)[len(HELLO) :])
    signals._hello_later(_hello("no-time-at-all", None)[len(HELLO) :])
    assert not signals.new_peer.is_set()


def test_a_hello_of_a_restarted_peer_does() -> None:
    signals = _connector_in_session(peer_at=1_000.0)
    signals._hello_later(_hello("theirs", 2_000.0)[len(HELLO) :])  # our peer's own, repeated
    assert not signals.new_peer.is_set()
    signals._hello_later(_hello("a-new-process", 1_000.5)[len(HELLO) :])
    assert signals.new_peer.is_set()
