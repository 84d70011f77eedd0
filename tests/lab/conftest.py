"""Fixtures shared by the lab tests (the lab fixtures themselves are in tests/conftest.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Sockets a test opens; closed after it."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()
