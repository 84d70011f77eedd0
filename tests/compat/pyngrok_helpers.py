"""Shared by the pyngrok tests (loopback and lab): a ``natkit-ngrok`` executable for
pyngrok's ``ngrok_path``, an ngrok configuration file naming a natkit relay, a recording
HTTP service, and raw HTTP/TCP visits."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from natkit.compat.ngrok_agent.launcher import natkit_ngrok_path


def natkit_ngrok(tmp: Path) -> str:
    """The installed console script, else a launcher of this tree's natkit-ngrok."""
    return natkit_ngrok_path(tmp)


def ngrok_config(path: Path, relay: str, token: str, *, version: str = "3") -> Path:
    """An ngrok configuration naming the natkit relay (web_addr on a free loopback port)."""
    if version == "3":
        text = (
            'version: "3"\nagent:\n'
            f"  connect_url: {relay}\n  authtoken: {token}\n  web_addr: 127.0.0.1:0\n"
        )
    else:
        text = f'version: "2"\nserver_addr: {relay}\nauthtoken: {token}\nweb_addr: 127.0.0.1:0\n'
    path.write_text(text)
    return path


class Service:
    """An HTTP/1.0 service on a socket the caller made (in a lab node, or on loopback):
    answers every request with ``text`` and the request line, and records request lines."""

    def __init__(self, sock: socket.socket, text: str) -> None:
        self.sock, self.text = sock, text
        self.port = int(sock.getsockname()[1])
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    line = data.split(b"\r\n", 1)[0].decode("latin-1")
                    self.seen.append(line)
                    body = f"{self.text} {line}".encode()
                    conn.sendall(
                        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                    )

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@contextlib.contextmanager
def loopback_service(text: str) -> Iterator[Service]:
    service = Service(socket.create_server(("127.0.0.1", 0)), text)
    try:
        yield service
    finally:
        service.close()


def http_get(
    ip: str, port: int, host: str, path: str = "/", timeout: float = 5.0, extra: str = "",
    source: str = "",
) -> bytes:  # fmt: skip
    """GET ``path`` from ``ip:port`` with ``Host: host`` (and ``extra`` header lines, each
    ending in CRLF), from address ``source`` when given; the whole answer (until close)."""
    bind = (source, 0) if source else None
    with socket.create_connection((ip, port), timeout=timeout, source_address=bind) as s:
        head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
        s.sendall(head.encode())
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def visit_url(
    public_url: str, ip: str, path: str = "/", extra: str = "", source: str = ""
) -> bytes:
    """Fetch ``public_url`` (http://NAME.DOMAIN:PORT or tcp://HOST:PORT) by connecting to
    ``ip`` (the relay: the lab has no DNS for NAME.DOMAIN), from ``source`` when given."""
    scheme, _, rest = public_url.partition("://")
    port = rest.rpartition(":")[2]
    if scheme == "http":
        return http_get(ip, int(port) if port else 80, rest, path, extra=extra, source=source)
    assert scheme == "tcp", public_url
    return http_get(ip, int(port), "tcp-visitor", path)


def wait_for(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
