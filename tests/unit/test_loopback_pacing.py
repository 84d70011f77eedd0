"""natkit's own loopback legs leave BBR's pacing off (natkit.net.sockets.unpaced_on_loopback).

Only sockets are made here, none sends: the decision is the socket's peer address and its
congestion control, both set up locally."""

from __future__ import annotations

import socket
import sys

import pytest

from natkit.net.sockets import unpaced_on_loopback

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="TCP_CONGESTION is Linux's")


def _cc(sock: socket.socket) -> str:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    return raw.split(b"\0", 1)[0].decode()


def _with(cc: str) -> socket.socket:
    sock = socket.socket()
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
    except OSError:
        sock.close()
        pytest.skip(f"this kernel offers no {cc} to this process")
    return sock


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"])
def test_bbr_to_a_loopback_peer_becomes_reno(host: str) -> None:
    with _with("bbr") as sock:
        unpaced_on_loopback(sock, host)
        assert _cc(sock) == "reno"


@pytest.mark.parametrize(
    "host", ["192.0.2.7", "2001:db8::7", "10.0.0.1", "::ffff:192.0.2.7", "not an address"]
)
def test_other_peers_keep_the_systems_choice(host: str) -> None:
    with _with("bbr") as sock:
        unpaced_on_loopback(sock, host)
        assert _cc(sock) == "bbr"


def test_an_unpaced_algorithm_is_left_alone() -> None:
    with _with("cubic") as sock:
        unpaced_on_loopback(sock, "127.0.0.1")
        assert _cc(sock) == "cubic"


def test_a_udp_socket_is_no_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        unpaced_on_loopback(sock, "127.0.0.1")  # TCP_CONGESTION is TCP's: nothing to do
