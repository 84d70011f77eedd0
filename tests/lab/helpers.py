"""Small servers and clients for lab tests: sockets are created inside a node's namespace
(a socket belongs to the namespace it was created in) and then served from plain threads."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

from natkit.lab import Lab, netns


def tcp_server_in(lab: Lab, node: str, ip: str, port: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return netns.call_in(
        lab.netns(node), lambda: socket.create_server((ip, port), family=family, backlog=64)
    )


@contextlib.contextmanager
def http_server(lab: Lab, node: str, ip: str, port: int = 0, text: str = "") -> Iterator[int]:
    """An HTTP server on ``node`` answering every request with ``text``; yields its port."""
    srv = tcp_server_in(lab, node, ip, port)
    port = srv.getsockname()[1]
    body = (text or f"hello from {node} {ip}:{port}").encode()
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(2)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(
                        b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                    )

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield port
    finally:
        stop.set()
        t.join()
        srv.close()


@contextlib.contextmanager
def udp_echo(lab: Lab, node: str, ip: str) -> Iterator[int]:
    sock = netns.call_in(lab.netns(node), lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    sock.bind((ip, 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(2048)
            except (TimeoutError, OSError):
                continue
            sock.sendto(b"echo:" + data, addr)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        t.join()
        sock.close()


def http_get(lab: Lab, node: str, ip: str, port: int, timeout: float = 2.0) -> str:
    """GET / from ``node``; returns the body. Raises OSError if unreachable."""

    def get() -> str:
        with socket.create_connection((ip, port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            chunks = []
            while data := s.recv(65536):
                chunks.append(data)
        return b"".join(chunks).partition(b"\r\n\r\n")[2].decode()

    return netns.call_in(lab.netns(node), get)


def reachable(lab: Lab, node: str, ip: str, port: int) -> bool:
    try:
        http_get(lab, node, ip, port, timeout=1.0)
        return True
    except OSError:
        return False


def udp_ask(
    lab: Lab, node: str, ip: str, port: int, payload: bytes, timeout: float = 1.0
) -> bytes | None:
    def ask() -> bytes | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(payload, (ip, port))
            try:
                return s.recvfrom(2048)[0]
            except TimeoutError:
                return None

    return netns.call_in(lab.netns(node), ask)


def wait_for(cond: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {text}")
        time.sleep(0.05)


def wait_router_uptime(lab: Lab, seconds: float = 3.0) -> None:
    """NAT-PMP/PCP clients spot a reboot by the epoch going backwards by more than the
    2 s slack of RFC 6886 3.6 / RFC 6887 8.5: a router rebooted within 2 s of its previous
    start is indistinguishable from one that was not. Real routers are up far longer."""
    wait_for(lambda: lab.router_uptime() >= seconds, seconds + 5, "the router's uptime")
