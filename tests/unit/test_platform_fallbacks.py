"""What natkit does where a Linux-only part is missing, one part at a time, in process:
the event loop (no uvloop; a default loop that cannot watch sockets, as Windows'
proactor; a loop without signal handlers, as Windows' selector loop), the Protocol bridge
that replaces splice, the descriptor limit without ``resource``, the mapping records'
lock without ``fcntl``, and check's IPv6 addresses without /proc. Nothing leaves
127.0.0.1."""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import builtins
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from natkit.errors import NatkitError
from natkit.net import fdlimit, loops


class ProactorLike(asyncio.selector_events.BaseSelectorEventLoop):
    """A loop that cannot watch sockets, like Windows' ProactorEventLoop."""

    def add_reader(self, *args: Any) -> None:
        raise NotImplementedError

    def add_writer(self, *args: Any) -> None:
        raise NotImplementedError


def windows_like(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio as on Windows: the default loop is proactor-like, and the selector loop
    has no signal handlers."""
    monkeypatch.setattr(asyncio, "new_event_loop", ProactorLike)
    monkeypatch.setattr(asyncio, "SelectorEventLoop", asyncio.selector_events.BaseSelectorEventLoop)


def test_a_loop_that_cannot_watch_sockets_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    proactor = ProactorLike()
    try:
        assert not loops.watches_sockets(proactor)
    finally:
        proactor.close()
    windows_like(monkeypatch)
    loop = loops.new_event_loop()
    try:
        assert type(loop) is asyncio.selector_events.BaseSelectorEventLoop
        assert loops.watches_sockets(loop)
        assert not loops._handles_signals(loop)
    finally:
        loop.close()


def test_run_without_signal_handlers_wakes_on_ctrl_c_and_cleans_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C on a loop without signal handlers: the wake-up socket is set while natkit
    runs (and put back after), and the command's cleanup runs before KeyboardInterrupt."""
    windows_like(monkeypatch)
    cleaned: list[str] = []
    seen: dict[str, int] = {}

    async def command() -> None:
        loop = asyncio.get_running_loop()
        fd = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(fd)
        seen["wakeup_fd"] = fd
        loop.call_later(0.05, os.kill, os.getpid(), signal.SIGINT)
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.append(type(loop).__name__)

    before = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(before)
    with pytest.raises(KeyboardInterrupt):
        loops.run(command())
    assert cleaned == ["BaseSelectorEventLoop"]
    assert seen["wakeup_fd"] not in (-1, before)
    after = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(after)
    assert after == before


def test_the_cli_runs_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    from natkit.cli.common import run_loop

    monkeypatch.delenv("NATKIT_EVENT_LOOP", raising=False)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import fails, as on Windows

    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run_loop(which()).startswith("asyncio")


def test_an_agent_with_a_tunnel_says_what_to_do_on_a_loop_that_cannot_watch_sockets(
    tmp_path: Path,
) -> None:
    from natkit.relay.agent import Agent, TunnelSpec

    async def start() -> None:
        agent = Agent("127.0.0.1:9", "t" * 32, [TunnelSpec(8080)],
                      known_relays=tmp_path / "known.json")  # fmt: skip
        await agent.run()

    loop = ProactorLike()
    try:
        with pytest.raises(NatkitError, match=r"watches sockets.*SelectorEventLoop"):
            loop.run_until_complete(start())
    finally:
        loop.close()


async def test_the_protocol_bridge_keeps_order_when_eof_comes_while_it_links() -> None:
    """The splice fallback: bytes that came before the second side connected, then an EOF
    that came after it connected but before the two were linked, reach the far side in
    that order (the EOF was passed on first, and the bytes written after it, failing)."""
    from natkit.relay.pump import bridge_protocols, link

    loop = asyncio.get_running_loop()
    a_near, a_far = socket.socketpair()
    b_near, b_far = socket.socketpair()
    ha, hb, fa, fb = bridge_protocols(loop)

    came, ended = asyncio.Event(), asyncio.Event()
    deliver, deliver_eof = ha.deliver, ha.deliver_eof
    ha.deliver = lambda data: (deliver(data), came.set())  # type: ignore[method-assign]
    ha.deliver_eof = lambda: (deliver_eof(), ended.set())  # type: ignore[method-assign]
    try:
        await loop.connect_accepted_socket(lambda: ha, a_near)
        a_far.sendall(b"early bytes")
        await asyncio.wait_for(came.wait(), 5)
        assert ha.pending  # queued: the other side is not connected yet
        await loop.connect_accepted_socket(lambda: hb, b_near)
        a_far.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(ended.wait(), 5)
        link(ha, hb)
        b_far.setblocking(False)
        got = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(b_far, 1024), 5):
            got += chunk
        assert got == b"early bytes"  # and then the EOF
        b_far.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(asyncio.gather(fa, fb), 5)
    finally:
        for s in (a_near, a_far, b_near, b_far):
            s.close()


def test_no_resource_module_leaves_the_descriptor_limit_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fdlimit, "resource", None)
    assert fdlimit.raise_fd_limit() == -1


def test_the_mapping_records_lock_needs_fcntl_or_msvcrt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without fcntl, the lock is msvcrt's (Windows); here neither exists, so the import
    of msvcrt is what fails: proof that the fcntl path was not taken."""
    from natkit import state

    monkeypatch.setenv("NATKIT_STATE_DIR", str(tmp_path))
    assert state.listed("192.0.2.1") == []  # with fcntl
    monkeypatch.setitem(sys.modules, "fcntl", None)
    with pytest.raises(ImportError, match="msvcrt"):
        state.listed("192.0.2.1")


def test_check_finds_global_ipv6_without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where /proc/net/if_inet6 cannot be read, the interfaces' own list is used (ifaddr:
    getifaddrs here, GetAdaptersAddresses on Windows); both agree on this machine."""
    from natkit.check import run

    from_proc = run._global_ipv6()
    real_open = builtins.open

    def no_proc(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file).startswith("/proc"):
            raise FileNotFoundError(2, "no /proc here", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    from_interfaces = run._global_ipv6()
    assert sorted(from_interfaces) == sorted(from_proc)
    for address in from_interfaces:
        assert not address.startswith("fe80")


def test_global_ipv6_of_interfaces_leaves_out_local_scopes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ifaddr

    from natkit.check import run

    adapters = [
        ifaddr.Adapter("lo0", "lo0", [ifaddr.IP(("::1", 0, 0), 128, "lo0")]),
        ifaddr.Adapter(
            "en0",
            "Wi-Fi",
            [
                ifaddr.IP("192.168.1.37", 24, "en0"),
                ifaddr.IP(("fe80::1c2b:3a4d:5e6f:7a8b%en0", 0, 4), 64, "en0"),
                ifaddr.IP(("2001:db8:1:2::37", 0, 0), 64, "en0"),
                ifaddr.IP(("fd12:3456::37", 0, 0), 64, "en0"),  # ULA: global scope
            ],
        ),
    ]
    monkeypatch.setattr(ifaddr, "get_adapters", lambda: adapters)
    assert run._global_ipv6_of_interfaces() == ["2001:db8:1:2::37", "fd12:3456::37"]


async def test_the_blocking_relay_api_runs_its_agent_on_a_loop_that_watches_sockets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``natkit.connect`` (its own thread and loop) where asyncio's default loop cannot
    watch sockets: the agent runs on the selector loop instead, and carries a visitor.
    The relay and the service run in this test's loop, on 127.0.0.1."""
    import natkit
    from natkit.relay.server import RelayConfig, RelayServer

    token = "platform-api-token-0123456789abc"
    server = RelayServer(RelayConfig(listen_host="127.0.0.1", listen_port=0,
                                     tokens={"a": token}, ports=(41150, 41159),
                                     state_dir=tmp_path / "relay", stun=False))  # fmt: skip
    await server.start()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"served: " + await reader.read())
        writer.close()

    service = await asyncio.start_server(serve, "127.0.0.1", 0)
    windows_like(monkeypatch)  # (this test's own loop exists already)
    try:
        tunnel = await asyncio.to_thread(
            natkit.connect, service.sockets[0].getsockname()[1],
            relay=f"127.0.0.1:{server.listen_port}", token=token,
            known_relays=tmp_path / "known.json", timeout=10,
        )  # fmt: skip
        try:
            assert type(tunnel._runner.loop) is asyncio.selector_events.BaseSelectorEventLoop
            host, port = tunnel.public_url.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"hello")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 10) == b"served: hello"
            writer.close()
        finally:
            await asyncio.to_thread(tunnel.close)
    finally:
        service.close()
        await server.close()
