"""The real pyngrok package on the lab's LAN host, with natkit-ngrok as its agent and a
natkit relay on the Internet host ``wan``; the public URLs are fetched from ``wan``. The
LAN's router offers no port mapping and drops unsolicited inbound: only the relay helps.

pyngrok is driven from a thread inside the LAN namespace, so that the agent it starts,
and the local API it calls, live there."""

from __future__ import annotations

import base64
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from pyngrok import agent, conf, ngrok

from natkit.lab import Lab, netns
from tests.compat.pyngrok_helpers import Service, natkit_ngrok, ngrok_config, visit_url, wait_for
from tests.lab.relay_helpers import RELAY_IP, VISITOR_IP, Relay, build_lab, start_relay

pytestmark = pytest.mark.lab
TOKEN = "pyngrok-lab-token-0123456789abcdef"
T = TypeVar("T")


@pytest.fixture(scope="module")
def nlab() -> Iterator[Lab]:
    the_lab = build_lab("ngrok")
    try:
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture(scope="module")
def relay(nlab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    r = start_relay(nlab, tmp_path_factory.mktemp("relay"), token=TOKEN, ports=(20300, 20349))
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def lan_service(nlab: Lab) -> Iterator[Service]:
    """A service on the LAN host's loopback, where ngrok users usually run theirs."""
    sock = netns.call_in(nlab.netns("lan"), lambda: socket.create_server(("127.0.0.1", 0)))
    service = Service(sock, "hello from the lan")
    try:
        yield service
    finally:
        service.close()


@pytest.fixture(autouse=True)
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relay: Relay) -> None:
    monkeypatch.setenv("NATKIT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("NATKIT_FINGERPRINT", relay.fingerprint)
    for name in ("NATKIT_RELAY", "NATKIT_TOKEN", "NGROK_AUTHTOKEN"):
        monkeypatch.delenv(name, raising=False)


def on_lan(lab: Lab, fn: Callable[[], T]) -> T:
    return netns.call_in(lab.netns("lan"), fn)


def from_wan(lab: Lab, public_url: str, path: str = "/", source: str = "") -> bytes:
    return netns.call_in(
        lab.netns("wan"), lambda: visit_url(public_url, RELAY_IP, path, source=source)
    )


def test_pyngrok_on_the_lan_publishes_through_the_relay(
    nlab: Lab, relay: Relay, lan_service: Service, tmp_path: Path
) -> None:
    cfg = conf.PyngrokConfig(
        ngrok_path=natkit_ngrok(tmp_path),
        config_path=str(ngrok_config(tmp_path / "ngrok.yml", relay.address, TOKEN)),
    )
    try:
        web = on_lan(nlab, lambda: ngrok.connect(lan_service.port, "http", pyngrok_config=cfg))
        raw = on_lan(nlab, lambda: ngrok.connect(lan_service.port, "tcp", pyngrok_config=cfg))
        assert web.public_url == f"http://{web.public_url[7:].split(':')[0]}:{relay.http_port}"
        assert web.public_url.split("://")[1].split(":")[0].endswith(".lab.test")
        assert raw.public_url is not None and raw.public_url.startswith(f"tcp://{RELAY_IP}:")

        answer = from_wan(nlab, web.public_url, "/from-wan", source=VISITOR_IP)
        assert answer.startswith(b"HTTP/1.0 200") and b"GET /from-wan HTTP/1.1" in answer
        assert b"hello from the lan GET / HTTP/1.1" in from_wan(nlab, raw.public_url)

        listed = on_lan(nlab, lambda: ngrok.get_tunnels(pyngrok_config=cfg))
        assert {t.public_url for t in listed} == {web.public_url, raw.public_url}
        captured = on_lan(
            nlab, lambda: agent.get_requests(tunnel_name=web.name, pyngrok_config=cfg)
        )
        assert [c.request["uri"] for c in captured] == ["/from-wan"]
        assert captured[0].remote_addr == VISITOR_IP  # the Internet visitor, through the relay
        assert base64.b64decode(captured[0].response["raw"]).startswith(b"HTTP/1.0 200 OK")

        on_lan(nlab, lambda: agent.replay_request(captured[0].id, pyngrok_config=cfg))
        wait_for(lambda: lan_service.seen.count("GET /from-wan HTTP/1.1") == 2, 5, "the replay")

        on_lan(nlab, lambda: ngrok.disconnect(web.public_url, pyngrok_config=cfg))
        assert b"GET /from-wan" not in from_wan(nlab, web.public_url, "/from-wan")
        assert b"hello from the lan" in from_wan(nlab, raw.public_url)  # the other goes on
    finally:
        on_lan(nlab, lambda: ngrok.kill(pyngrok_config=cfg))


def test_natkit_compat_ngrok_on_the_lan(
    nlab: Lab, relay: Relay, lan_service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    from natkit.compat import ngrok as in_process

    monkeypatch.setenv("NATKIT_RELAY", relay.address)
    monkeypatch.setenv("NATKIT_TOKEN", TOKEN)
    try:
        web = on_lan(nlab, lambda: in_process.connect(lan_service.port, "http"))
        raw = on_lan(nlab, lambda: in_process.connect(lan_service.port, "tcp"))
        assert b"GET /in-process HTTP/1.1" in from_wan(nlab, web.public_url, "/in-process")
        assert b"hello from the lan" in from_wan(nlab, raw.public_url)
        assert {t.public_url for t in in_process.get_tunnels()} == {web.public_url, raw.public_url}
    finally:
        in_process.kill()
