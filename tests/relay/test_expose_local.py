"""expose's checks of the local side, on loopback: a port something listens on, one nothing
does, this machine's addresses and another's."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import click
import pytest

from natkit.cli.expose_local import (
    is_this_machine,
    local_problem,
    nothing_bound,
    resolve_local_host,
)


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens there now


async def test_a_listening_port_is_found(listening: int) -> None:
    assert await local_problem("127.0.0.1", listening) == ""
    assert not nothing_bound(listening)  # bound on loopback alone counts


async def test_a_port_nothing_listens_on_is_told() -> None:
    port = _free_port()
    assert await local_problem("127.0.0.1", port) == "nothing listens there"
    assert nothing_bound(port)


def test_this_machine_and_another() -> None:
    assert is_this_machine("127.0.0.1") and is_this_machine("::1")
    assert not is_this_machine("192.0.2.1")  # TEST-NET-1: no host has it


@pytest.mark.parametrize("bad", ["", " ", "999.1.1.1", "1.2.3", "a..b", ".x", "x" * 64 + ".y"])
def test_bad_local_hosts_are_refused_without_a_lookup(bad: str) -> None:
    with pytest.raises(click.BadParameter):
        resolve_local_host(bad)


def test_addresses_pass_as_they_are() -> None:
    assert resolve_local_host("127.0.0.1") == "127.0.0.1"
    assert resolve_local_host("::1") == "::1"


async def test_a_service_on_this_machine_is_not_connected_to() -> None:
    # A probe connection would count as a visitor (an echo service's tally, a one-shot
    # service's only client): on this machine the check binds instead.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        s.setblocking(False)
        port = int(s.getsockname()[1])
        assert await local_problem("127.0.0.1", port) == ""
        with pytest.raises(BlockingIOError):
            s.accept()  # nobody connected
