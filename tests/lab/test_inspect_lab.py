"""The inspector in the NAT lab: ``natkit relay serve`` on the Internet host (wan),
``natkit expose --http`` on the LAN host behind the router's NAT with its inspector on the
LAN host's loopback, a visitor on the Internet host. The inspector shows the visitor's
request with the visitor's own address (as the relay saw it, across the NAT), byte for
byte, and a replay from its API reaches the LAN service again."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from natkit.lab import Lab
from natkit.lab import config as C
from tests.conftest import call_in_node
from tests.lab.helpers import tcp_server_in
from tests.lab.test_relay_control import DOMAIN, HTTP_PORT, RELAY_IP, Procs
from tests.lab.test_relay_control import procs as procs

pytestmark = pytest.mark.lab


@contextlib.contextmanager
def recording_server(lab: Lab) -> Iterator[tuple[int, list[bytes]]]:
    """An HTTP/1.0 service on the LAN host that keeps every request it got, raw."""
    srv = tcp_server_in(lab, "lan", C.LAN_IP, 0)
    got: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            with conn, contextlib.suppress(OSError):
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data and (chunk := conn.recv(4096)):
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
                while len(body) < length and (chunk := conn.recv(4096)):
                    body += chunk
                got.append(head + b"\r\n\r\n" + body)
                answer = b'{"seen": %d}' % len(got)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer))  # fmt: skip

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1], got
    finally:
        stop.set()
        thread.join(timeout=5)
        srv.close()


def inspector_api(lab: Lab, url: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    """The inspector's API, asked from the LAN host (its loopback)."""

    def go() -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as resp:  # the lab's loopback only
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None

    return call_in_node(lab, "lan", go)


def test_the_inspector_shows_a_visitor_from_the_internet_and_replays_it(lab: Lab, procs: Procs) -> None:  # fmt: skip
    with recording_server(lab) as (port, got):
        procs.relay()
        agent = procs.agent(port, "--http", "--hostname", "insp", "--inspect", "127.0.0.1:0")
        ready = agent.next_event(20)
        assert ready["public_address"] == f"http://insp.{DOMAIN}:{HTTP_PORT}", ready
        inspector = agent.next_event(20)  # right after ready
        assert inspector["event"] == "inspector", (inspector, agent.why())
        assert inspector["url"].startswith("http://127.0.0.1:")
        request = (f"POST /hook?from=internet HTTP/1.1\r\nHost: insp.{DOMAIN}\r\n"
                   "Content-Type: application/json\r\nContent-Length: 12\r\n"
                   "Connection: close\r\n\r\n{\"ok\": true}").encode()  # fmt: skip

        def visitor() -> tuple[str, bytes]:
            with socket.create_connection((RELAY_IP, HTTP_PORT), timeout=10) as s:
                s.sendall(request)
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
                return s.getsockname()[0], answer

        visitor_ip, answer = call_in_node(lab, "wan", visitor)
        assert answer.endswith(b'{"seen": 1}') and got == [request]
        url = inspector["url"] + "/api/requests/http"
        status, listing = inspector_api(lab, url)
        (record,) = listing["requests"]
        assert record["remote_addr"] == visitor_ip  # the Internet host, not the router
        assert record["request"]["uri"] == "/hook?from=internet"
        assert record["response"]["status_code"] == 200
        assert base64.b64decode(record["request"]["raw"]) == request
        status, _ = inspector_api(lab, url, "POST", {"id": record["id"], "tunnel_name": "insp"})
        assert status == 204  # at once, as ngrok's; the replay goes on
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [request, request]
        status, made = inspector_api(lab, f"{url}/{record['id']}/replay", "POST",
                                     {"uri": "/hook?from=replay", "body": "{}"})  # fmt: skip
        assert status == 201 and made["natkit"]["replay_of"] == record["id"]
        assert got[2].startswith(b"POST /hook?from=replay HTTP/1.1\r\n") and got[2].endswith(
            b"\r\n\r\n{}"
        )
        assert agent.stop() == 0, agent.why()
