"""The network guard itself must catch what it is there to catch."""

from __future__ import annotations

import socket
from pathlib import Path

import natkit_netguard as guard
import pytest


def test_allowed_addresses() -> None:
    assert guard.allowed("127.0.0.1", in_host_netns=True)
    assert guard.allowed("::1", in_host_netns=True)
    for ip in ("192.168.77.1", "100.200.0.2", "8.8.8.8", "10.0.0.1", "239.255.255.250"):
        assert not guard.allowed(ip, in_host_netns=True), ip
    for ip in ("192.168.77.1", "100.200.0.2", "239.255.255.250", "127.0.0.1"):
        assert guard.allowed(ip, in_host_netns=False), ip
    for ip in ("8.8.8.8", "10.0.0.1", "192.168.1.1", "172.17.0.1", "1.1.1.1"):
        assert not guard.allowed(ip, in_host_netns=False), ip


def test_guard_blocks_and_records_udp_and_tcp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "guard.log"
    monkeypatch.setattr(guard, "LOG", str(log))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(PermissionError):
        s.sendto(b"x", ("192.0.2.1", 9))  # documentation address: never reached
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(PermissionError):
        s.connect(("192.0.2.1", 9))
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("example.com", 80)
    text = log.read_text()
    assert text.count("network guard") == 3 and "example.com" in text


def test_loopback_is_fine() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx.bind(("127.0.0.1", 0))
        tx.sendto(b"hi", rx.getsockname())
        assert rx.recv(10) == b"hi"


def test_guard_covers_uvloop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """natkit's relay and agent commands run on uvloop, which connects, sends and resolves
    in C: the guard must stop those too (and let loopback through)."""
    import asyncio

    import uvloop

    log = tmp_path / "guard.log"
    monkeypatch.setattr(guard, "LOG", str(log))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert type(loop).__module__.startswith("uvloop")
        with pytest.raises(PermissionError):
            await asyncio.open_connection("192.0.2.1", 9)
        with pytest.raises(socket.gaierror):
            await asyncio.open_connection("example.com", 80)
        with pytest.raises(socket.gaierror):
            await loop.getaddrinfo("example.com", 80)
        with pytest.raises(PermissionError):
            await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, remote_addr=("192.0.2.1", 9)
            )
        got: asyncio.Future[bytes] = loop.create_future()

        class Rx(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: object) -> None:
                got.set_result(data)

        rx, _ = await loop.create_datagram_endpoint(Rx, local_addr=("127.0.0.1", 0))
        tx, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
        )
        with pytest.raises(PermissionError):
            tx.sendto(b"x", ("192.0.2.1", 9))
        tx.sendto(b"hi", rx.get_extra_info("sockname"))  # loopback is fine
        assert await asyncio.wait_for(got, 5) == b"hi"
        rx.close()
        tx.close()
        with socket.socket() as s:
            s.setblocking(False)
            with pytest.raises(PermissionError):
                await loop.sock_connect(s, ("192.0.2.1", 9))

    uvloop.run(main())
    text = log.read_text()
    assert text.count("network guard") == 6, text
