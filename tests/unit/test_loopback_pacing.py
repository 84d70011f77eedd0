"""natkit's own loopback legs leave BBR's pacing off (natkit.net.sockets.unpaced_on_loopback).

Only sockets are made here, none sends: the decision is the socket's peer address and its
congestion control, both set up locally."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest

from natkit.net.sockets import unpaced_on_loopback
from tests.conftest import IN_CI

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
        if IN_CI:  # CI runs as root on Debian, whose kernel has both: a missing one fails
            pytest.fail(f"this kernel offers no {cc} to this process")
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


def test_a_loopback_listener_hands_reno_to_what_it_accepts() -> None:
    """Set on the listening socket, the choice is the accepted connection's from its start
    (a switch after BBR started would leave the socket paced)."""
    with _with("bbr") as listener:
        unpaced_on_loopback(listener, "127.0.0.1")
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()):
            accepted, _ = listener.accept()
            with accepted:
                assert _cc(accepted) == "reno"


def test_the_listeners_target_by_name_is_resolved_and_unpaced() -> None:
    """``p2p listen --to localhost:PORT``: the name is resolved first, so the leg to a
    loopback service is unpaced too (where the system's default is BBR)."""
    from natkit.p2p.forward import connect_target

    default = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()

    async def main() -> None:
        with socket.socket() as service:
            service.bind(("127.0.0.1", 0))
            service.listen()
            sock = await connect_target("localhost", service.getsockname()[1])
            assert sock is not None
            with sock:
                assert sock.getpeername()[0] == "127.0.0.1"
                assert _cc(sock) == ("reno" if default.startswith("bbr") else default)

    asyncio.run(main())
