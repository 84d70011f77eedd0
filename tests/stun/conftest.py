"""A real coturn (Debian ``coturn``) on loopback, started and stopped by each test's fixture.

coturn offers RFC 5780 only with two listening IPs (the alternate port is the listening
port + 1); with one, it answers CHANGE-REQUEST with 420. Loopback has 127.0.0.0/8, so two
IPs need no setup. Nothing here leaves loopback.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from natkit.stun import codec
from natkit.stun.errors import StunDecodeError

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
STARTUP_TIMEOUT = 10.0


@dataclass
class Coturn:
    ips: tuple[str, ...]
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def primary(self) -> tuple[str, int]:
        return self.ips[0], self.port

    @property
    def spec(self) -> str:
        return f"{self.ips[0]}:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def turnserver_binary() -> str:
    found = shutil.which("turnserver") or (
        "/usr/bin/turnserver" if os.path.exists("/usr/bin/turnserver") else None
    )
    if found is None:
        why = "coturn is not installed: apt-get update && apt-get install -y coturn"
        # In CI (and as root, where it can be installed) a missing server fails, never skips.
        if IN_CI or os.geteuid() == 0:
            pytest.fail(why)
        pytest.skip(why)
    return found


def _port_free(ip: str, port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((ip, port))
            except OSError:
                return False
    return True


def free_port_pair(ips: tuple[str, ...]) -> int:
    """A port P with P and P+1 free for UDP and TCP on every IP (coturn's alternate port)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((ips[0], 0))
            port = int(s.getsockname()[1])
        if port < 65535 and all(_port_free(ip, p) for ip in ips for p in (port, port + 1)):
            return port
    raise RuntimeError("no free pair of ports on loopback")


def _answers(ip: str, port: int) -> bool:
    """One Binding request over UDP; True once coturn answers it."""
    request = codec.binding_request()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        try:
            s.sendto(codec.encode(request), (ip, port))
            data = s.recv(2048)
            codec.parse_binding_response(data, request.transaction_id)
        except (OSError, StunDecodeError):
            return False
    return True


def _wait_tcp(ip: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((ip, port), timeout=0.2):
        return True
    return False


def start_coturn(ips: tuple[str, ...], workdir: Path) -> Coturn:
    binary = turnserver_binary()
    for _ in range(3):  # a port taken between the check and coturn's bind: retry
        port = free_port_pair(ips)
        log = workdir / f"coturn-{port}.log"
        user = f"natkit:{secrets.token_hex(8)}"  # no open relay, even on loopback
        args = [
            binary,
            "-n",  # no config file: Debian's sets no-rfc5780
            *(f"--listening-ip={ip}" for ip in ips),
            f"--listening-port={port}",
            f"--alt-listening-port={port + 1}",
            f"--relay-ip={ips[0]}",
            "--min-port=49160",
            "--max-port=49200",
            "--lt-cred-mech",
            f"--user={user}",
            "--realm=natkit.test",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            f"--db={workdir / f'turndb-{port}'}",
            f"--pidfile={workdir / f'turnserver-{port}.pid'}",
            "--log-file=stdout",
            "--simple-log",
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        server = Coturn(ips, port, proc, log)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(ips[0], port) and _wait_tcp(ips[0], port):
                return server
            time.sleep(0.05)
        stop_coturn(server)
    pytest.fail(f"coturn did not start ({' '.join(args)}):\n{server.log_text()}")


def stop_coturn(server: Coturn) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()  # our own child, by its pid
        try:
            server.proc.wait(5)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(5)


@pytest.fixture
def coturn_factory(tmp_path: Path) -> Iterator[Callable[..., Coturn]]:
    """``coturn_factory("127.0.0.1", "127.0.0.2")`` starts a coturn on those IPs."""
    started: list[Coturn] = []

    def start(*ips: str) -> Coturn:
        started.append(start_coturn(ips, tmp_path))
        return started[-1]

    yield start
    for server in started:
        stop_coturn(server)


@pytest.fixture
def coturn5780(coturn_factory: Callable[..., Coturn]) -> Coturn:
    """coturn with RFC 5780: two listening IPs."""
    return coturn_factory("127.0.0.1", "127.0.0.2")


@pytest.fixture
def coturn_one_ip(coturn_factory: Callable[..., Coturn]) -> Coturn:
    """coturn without RFC 5780: one listening IP, CHANGE-REQUEST answered with 420."""
    return coturn_factory("127.0.0.1")
