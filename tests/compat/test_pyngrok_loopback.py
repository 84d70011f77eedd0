"""The real pyngrok package driving natkit-ngrok against a natkit relay, all on 127.0.0.1
(rootless): ``ngrok.connect`` http and tcp, ``get_tunnels``, ``disconnect``, ``kill``, both
config versions, captured requests (with the visitor's address) and their replay
(``pyngrok.agent``), a service that is down, refused options, a refused token,
``set_auth_token``; and ``natkit.compat.ngrok`` in process."""

from __future__ import annotations

import asyncio
import base64
import os
import shlex
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from pyngrok import agent, conf, ngrok, process
from pyngrok.exception import PyngrokNgrokError, PyngrokNgrokHTTPError

from natkit.errors import NatkitError
from natkit.net.loops import new_event_loop
from natkit.relay.server import RelayConfig, RelayServer
from tests.compat.pyngrok_helpers import (
    Service,
    loopback_service,
    natkit_ngrok,
    ngrok_config,
    visit_url,
    wait_for,
)

TOKEN = "pyngrok-loopback-token-0123456789"
LOOPBACK = "127.0.0.1"


class RelayThread:
    """A natkit relay on loopback, in an event loop of its own thread."""

    def __init__(
        self, state: Path, ports: tuple[int, int] = (41600, 41649), listen_port: int = 0
    ) -> None:
        self.loop = new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        cfg = RelayConfig(listen_host=LOOPBACK, listen_port=listen_port, tokens={"a": TOKEN},
                          ports=ports, state_dir=state, stun=False, pool_size=2,
                          http_port=0, domain="lab.test")  # fmt: skip
        self.server = RelayServer(cfg)
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        self.address = f"{LOOPBACK}:{self.server.listen_port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayThread]:
    r = RelayThread(tmp_path_factory.mktemp("relay"))
    yield r
    r.close()


@pytest.fixture(autouse=True)
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relay: RelayThread) -> None:
    monkeypatch.setenv("NATKIT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("NATKIT_FINGERPRINT", relay.server.fingerprint)  # nothing pinned
    for name in ("NATKIT_RELAY", "NATKIT_TOKEN", "NGROK_AUTHTOKEN", "NGROK_API_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def service() -> Iterator[Service]:
    with loopback_service("hello from the service") as s:
        yield s


@pytest.fixture
def cfg(tmp_path: Path, relay: RelayThread) -> Iterator[conf.PyngrokConfig]:
    config = conf.PyngrokConfig(
        ngrok_path=natkit_ngrok(tmp_path),
        config_path=str(ngrok_config(tmp_path / "ngrok.yml", relay.address, TOKEN)),
    )
    yield config
    ngrok.kill(pyngrok_config=config)


def test_http_and_tcp_tunnels_get_tunnels_disconnect_and_kill(
    cfg: conf.PyngrokConfig, service: Service
) -> None:
    web = ngrok.connect(service.port, "http", pyngrok_config=cfg)
    assert web.public_url and web.public_url.startswith("http://")
    assert web.public_url.split("://")[1].split(":")[0].endswith(".lab.test")
    assert web.proto == "http" and web.uri == f"/api/endpoints/{web.name}"
    answer = visit_url(web.public_url, LOOPBACK, "/through-http")
    assert answer.startswith(b"HTTP/1.0 200") and b"GET /through-http HTTP/1.1" in answer

    raw = ngrok.connect(service.port, "tcp", pyngrok_config=cfg)
    assert raw.public_url and raw.public_url.startswith(f"tcp://{LOOPBACK}:")
    assert b"hello from the service GET / HTTP/1.1" in visit_url(raw.public_url, LOOPBACK)

    listed = {t.public_url: t for t in ngrok.get_tunnels(pyngrok_config=cfg)}
    assert set(listed) == {web.public_url, raw.public_url}
    assert listed[raw.public_url].upstream == {"url": f"localhost:{service.port}"}

    ngrok.disconnect(web.public_url, pyngrok_config=cfg)
    assert [t.public_url for t in ngrok.get_tunnels(pyngrok_config=cfg)] == [raw.public_url]
    assert b" 200 " not in visit_url(web.public_url, LOOPBACK).split(b"\r\n")[0]

    proc = ngrok.get_ngrok_process(pyngrok_config=cfg).proc
    ngrok.kill(pyngrok_config=cfg)
    assert proc.poll() is not None
    assert not process.is_process_running(cfg.ngrok_path)


def test_config_v2_uses_api_tunnels_and_the_subdomain(
    tmp_path: Path, relay: RelayThread, service: Service
) -> None:
    cfg = conf.PyngrokConfig(
        ngrok_path=natkit_ngrok(tmp_path),
        config_path=str(ngrok_config(tmp_path / "v2.yml", relay.address, TOKEN, version="2")),
        config_version="2",
    )
    try:
        t = ngrok.connect(str(service.port), "http", subdomain="myapp", pyngrok_config=cfg)
        assert t.public_url == f"http://myapp.lab.test:{relay.server.http_port}"
        assert t.uri == f"/api/tunnels/{t.name}"
        assert t.config == {"addr": f"http://localhost:{service.port}", "inspect": True}
        assert b"GET /v2 HTTP/1.1" in visit_url(t.public_url, LOOPBACK, "/v2")
        assert [x.public_url for x in ngrok.get_tunnels(pyngrok_config=cfg)] == [t.public_url]
        ngrok.disconnect(t.public_url, pyngrok_config=cfg)
        assert ngrok.get_tunnels(pyngrok_config=cfg) == []
    finally:
        ngrok.kill(pyngrok_config=cfg)


def test_captured_requests_get_replay_and_delete(cfg: conf.PyngrokConfig, service: Service) -> None:
    t = ngrok.connect(service.port, "http", pyngrok_config=cfg)
    visit_url(t.public_url, LOOPBACK, "/hook?n=1")
    wait_for(lambda: len(agent.get_requests(pyngrok_config=cfg)) == 1, 5, "one captured request")
    (captured,) = agent.get_requests(tunnel_name=t.name, pyngrok_config=cfg)
    assert captured.tunnel_name == t.name and captured.duration is not None
    assert captured.remote_addr == LOOPBACK  # the visitor, as the relay saw it
    assert captured.request["method"] == "GET" and captured.request["uri"] == "/hook?n=1"
    assert base64.b64decode(captured.request["raw"]).startswith(b"GET /hook?n=1 HTTP/1.1\r\n")
    assert captured.response["status_code"] == 200
    assert b"hello from the service" in base64.b64decode(captured.response["raw"])
    assert agent.get_request(captured.id, pyngrok_config=cfg).data == captured.data
    assert agent.get_requests(tunnel_name="another", pyngrok_config=cfg) == []

    agent.replay_request(captured.id, pyngrok_config=cfg)  # answered at once, sent after
    wait_for(lambda: len(service.seen) == 2, 5, "the replay at the service")
    assert service.seen == ["GET /hook?n=1 HTTP/1.1"] * 2  # the service got it again
    wait_for(lambda: len(agent.get_requests(pyngrok_config=cfg)) == 2, 5, "the replay captured")
    again = agent.get_requests(pyngrok_config=cfg)
    assert again[0].id != captured.id and again[0].data["natkit"]["replay_of"] == captured.id
    assert again[0].response is not None and again[0].response["status_code"] == 200

    agent.delete_requests(pyngrok_config=cfg)
    assert agent.get_requests(pyngrok_config=cfg) == []
    status = agent.get_agent_status(pyngrok_config=cfg)
    assert status.status == "online" and status.uri == "/api/status"


def test_an_option_natkit_cannot_honour_opens_nothing(
    cfg: conf.PyngrokConfig, service: Service
) -> None:
    with pytest.raises(PyngrokNgrokHTTPError, match="OAuth") as caught:
        ngrok.connect(service.port, "http", pyngrok_config=cfg, oauth={"provider": "google"})
    assert caught.value.status_code == 400
    with pytest.raises(PyngrokNgrokHTTPError, match="does not terminate TLS"):
        ngrok.connect(service.port, "http", pyngrok_config=cfg, url="https://x.lab.test")
    assert ngrok.get_tunnels(pyngrok_config=cfg) == []
    t = ngrok.connect(service.port, "http", name="one", pyngrok_config=cfg)
    with pytest.raises(PyngrokNgrokHTTPError, match="open already") as dup:
        ngrok.connect(service.port, "http", name="one", pyngrok_config=cfg)
    assert dup.value.status_code == 409
    assert [x.public_url for x in ngrok.get_tunnels(pyngrok_config=cfg)] == [t.public_url]


def _basic(credentials: str) -> str:
    return f"Authorization: Basic {base64.b64encode(credentials.encode()).decode()}\r\n"


def test_pyngrok_basic_auth_and_ip_restriction_are_enforced_at_the_relay(
    cfg: conf.PyngrokConfig, service: Service
) -> None:
    """pyngrok's own tunnel options become natkit's access policy (docs/relay-access.md):
    the relay answers 401 without the password and resets a denied address, before a byte
    reaches natkit-ngrok or the service."""
    web = ngrok.connect(service.port, "http", pyngrok_config=cfg, auth="ada:correct-horse")
    missing = visit_url(web.public_url, LOOPBACK, "/private")
    assert missing.startswith(b"HTTP/1.1 401") and b"WWW-Authenticate: Basic" in missing
    wrong = visit_url(web.public_url, LOOPBACK, "/private", extra=_basic("ada:wrong"))
    assert wrong.startswith(b"HTTP/1.1 401"), wrong
    assert service.seen == []  # neither reached the service
    right = visit_url(web.public_url, LOOPBACK, "/private", extra=_basic("ada:correct-horse"))
    assert right.startswith(b"HTTP/1.0 200") and service.seen == ["GET /private HTTP/1.1"]

    raw = ngrok.connect(service.port, "tcp", pyngrok_config=cfg,
                        ip_restriction={"deny_cidrs": ["127.0.0.0/8"]})  # fmt: skip
    try:
        answer = visit_url(raw.public_url, LOOPBACK)
    except ConnectionResetError:
        answer = b""
    assert b"hello from the service" not in answer
    assert service.seen == ["GET /private HTTP/1.1"]

    with pytest.raises(PyngrokNgrokHTTPError, match=r"CIDR|network") as bad:
        ngrok.connect(service.port, "tcp", pyngrok_config=cfg,
                      ip_restriction={"allow_cidrs": ["not-a-network"]})  # fmt: skip
    assert bad.value.status_code == 400


def test_a_refused_token_fails_the_start_with_the_relays_words(
    tmp_path: Path, relay: RelayThread
) -> None:
    wrong = ngrok_config(tmp_path / "wrong.yml", relay.address, "not-the-token-0123456789abc")
    cfg = conf.PyngrokConfig(ngrok_path=natkit_ngrok(tmp_path), config_path=str(wrong))
    with pytest.raises(PyngrokNgrokError, match="rejected the token"):
        ngrok.connect(8080, "http", pyngrok_config=cfg)
    assert not process.is_process_running(cfg.ngrok_path)


def test_set_auth_token_writes_the_config_natkit_ngrok_reads(
    tmp_path: Path, relay: RelayThread, service: Service
) -> None:
    path = tmp_path / "no-token.yml"
    path.write_text(
        f'version: "3"\nagent:\n  connect_url: {relay.address}\n  web_addr: 127.0.0.1:0\n'
    )
    cfg = conf.PyngrokConfig(ngrok_path=natkit_ngrok(tmp_path), config_path=str(path))
    try:
        ngrok.set_auth_token(TOKEN, pyngrok_config=cfg)
        assert f"authtoken: {TOKEN}" in path.read_text()
        t = ngrok.connect(service.port, "tcp", pyngrok_config=cfg)
        assert b"hello from the service" in visit_url(str(t.public_url), LOOPBACK)
    finally:
        ngrok.kill(pyngrok_config=cfg)


def test_natkit_compat_ngrok_in_process(
    relay: RelayThread, service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    from natkit.compat import ngrok as natkit_ngrok_module

    monkeypatch.setenv("NATKIT_RELAY", relay.address)
    monkeypatch.setenv("NATKIT_TOKEN", TOKEN)
    try:
        web = natkit_ngrok_module.connect(service.port, "http")
        raw = natkit_ngrok_module.connect(str(service.port), "tcp", name="ssh")
        assert web.proto == "http" and web.config["addr"] == f"http://localhost:{service.port}"
        assert raw.name == "ssh" and raw.public_url.startswith("tcp://")
        assert b"GET /in-process HTTP/1.1" in visit_url(web.public_url, LOOPBACK, "/in-process")
        assert b"hello from the service" in visit_url(raw.public_url, LOOPBACK)
        urls = {t.public_url for t in natkit_ngrok_module.get_tunnels()}
        assert urls == {web.public_url, raw.public_url}
        natkit_ngrok_module.disconnect(web.public_url)
        assert [t.public_url for t in natkit_ngrok_module.get_tunnels()] == [raw.public_url]
    finally:
        natkit_ngrok_module.kill()
    assert natkit_ngrok_module.get_tunnels() == []


def test_a_name_the_relay_refuses_fails_alone(cfg: conf.PyngrokConfig, service: Service) -> None:
    first = ngrok.connect(service.port, "http", name="a", subdomain="same", pyngrok_config=cfg)
    with pytest.raises(PyngrokNgrokHTTPError, match="refused the tunnel") as caught:
        ngrok.connect(service.port, "http", name="b", subdomain="same", pyngrok_config=cfg)
    assert caught.value.status_code == 502
    # The session and the first tunnel go on; the refused one left nothing behind.
    assert [t.public_url for t in ngrok.get_tunnels(pyngrok_config=cfg)] == [first.public_url]
    assert b"GET /still HTTP/1.1" in visit_url(str(first.public_url), LOOPBACK, "/still")
    second = ngrok.connect(service.port, "http", name="b", pyngrok_config=cfg)
    assert b"GET /b HTTP/1.1" in visit_url(str(second.public_url), LOOPBACK, "/b")


def _agent(argv: list[str], tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([natkit_ngrok(tmp_path), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})  # fmt: skip


def _line_with(stream: IO[str], words: str) -> str:
    for line in stream:  # the agent prints it within a second or two; the test times out
        if words in line:
            return line
    raise AssertionError(f"the agent ended without a line saying {words!r}")


def test_natkit_ngrok_http_port_like_ngrok_http_and_sigterm(
    tmp_path: Path, relay: RelayThread, service: Service
) -> None:
    env = {"NATKIT_RELAY": relay.address, "NATKIT_TOKEN": TOKEN}
    proc = _agent(["http", str(service.port), "--log", "stdout", "--config",
                   str(tmp_path / "none.yml")], tmp_path, env)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        started = _line_with(proc.stdout, "started tunnel")
        url = dict(p.split("=", 1) for p in shlex.split(started))["url"]
        assert f"Forwarding {url} -> http://localhost:{service.port}" in proc.stderr.readline()
        assert b"GET /cli HTTP/1.1" in visit_url(url, LOOPBACK, "/cli")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_start_names_tunnels_of_the_config(
    tmp_path: Path, relay: RelayThread, service: Service
) -> None:
    path = ngrok_config(tmp_path / "v2.yml", relay.address, TOKEN, version="2")
    path.write_text(path.read_text() + f"tunnels:\n  web:\n    proto: http\n    addr: {service.port}\n"
                    f"    subdomain: named\n  other:\n    proto: tcp\n    addr: 1\n")  # fmt: skip
    proc = _agent(["start", "web", "--log", "stdout", "--config", str(path)], tmp_path, {})
    try:
        assert proc.stdout is not None
        line = _line_with(proc.stdout, "started tunnel")
        assert f"url=http://named.lab.test:{relay.server.http_port}" in line and "name=web" in line
        proc.terminate()
        assert proc.wait(10) == 0
        missing = _agent(["start", "nope", "--config", str(path)], tmp_path, {})
        _, err = missing.communicate(timeout=10)
        assert missing.returncode == 1 and "no tunnel named nope" in err
    finally:
        proc.kill()
        proc.wait()


def test_the_small_commands(tmp_path: Path) -> None:
    exe = natkit_ngrok(tmp_path)
    path = tmp_path / "cfg" / "ngrok.yml"

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *argv], capture_output=True, text=True, timeout=20)

    assert run("--version").stdout.startswith("natkit-ngrok version ")
    saved = run("config", "add-authtoken", "tok-123", "--log", "stdout", "--config", str(path))
    assert (
        saved.returncode == 0 and f"Authtoken saved to configuration file: {path}" in saved.stdout
    )
    assert "authtoken: tok-123" in path.read_text()
    assert run("config", "check", "--config", str(path)).returncode == 0
    assert "pip install -U natkit" in run("update").stdout
    api = run("api", "endpoints", "list")
    assert api.returncode == 1 and "own natkit relay" in api.stderr
    no_relay = run("start", "--none", "--log", "stdout", "--config", str(path))
    assert no_relay.returncode == 4 and "lvl=eror" in no_relay.stdout  # a RelayError
    assert "connect_url" in no_relay.stdout  # what to set, in the line pyngrok shows


def test_after_a_relay_restart_the_tunnels_come_back_and_the_api_tells_their_urls(
    tmp_path: Path, service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = RelayThread(tmp_path / "restarting", ports=(41650, 41699))
    cfg = conf.PyngrokConfig(
        ngrok_path=natkit_ngrok(tmp_path),
        config_path=str(ngrok_config(tmp_path / "r.yml", first.address, TOKEN)),
    )
    monkeypatch.setenv("NATKIT_FINGERPRINT", first.server.fingerprint)  # kept on restart
    second: RelayThread | None = None
    try:
        web = ngrok.connect(service.port, "http", pyngrok_config=cfg)
        port = first.server.listen_port
        first.close()
        # Back on the same address, with another HTTP port: the http tunnel's URL changes.
        second = RelayThread(tmp_path / "restarting", ports=(41650, 41699), listen_port=port)

        def moved() -> bool:
            urls = [t.public_url for t in ngrok.get_tunnels(pyngrok_config=cfg)]
            return urls != [web.public_url] and len(urls) == 1

        wait_for(moved, 20, "the tunnel back on the restarted relay")
        (now,) = ngrok.get_tunnels(pyngrok_config=cfg)
        assert now.public_url.endswith(f":{second.server.http_port}") and now.name == web.name
        assert b"GET /again HTTP/1.1" in visit_url(str(now.public_url), LOOPBACK, "/again")
    finally:
        ngrok.kill(pyngrok_config=cfg)
        (second or first).close()


def test_an_agent_nobody_reads_any_more_goes_on(
    tmp_path: Path, relay: RelayThread, service: Service
) -> None:
    """pyngrok with monitor_thread=False stops reading the agent's log after the start:
    thousands of log lines later (one per request) the agent still serves."""
    cfg = conf.PyngrokConfig(
        ngrok_path=natkit_ngrok(tmp_path), monitor_thread=False,
        config_path=str(ngrok_config(tmp_path / "quiet.yml", relay.address, TOKEN)),
    )  # fmt: skip
    try:
        t = ngrok.connect(service.port, "http", pyngrok_config=cfg)
        for n in range(600):  # ~150 bytes of log each: past a 64 KiB pipe
            assert b" 200 OK" in visit_url(str(t.public_url), LOOPBACK, f"/{n}")
        assert len(agent.get_requests(pyngrok_config=cfg)) == 600
        assert ngrok.get_tunnels(pyngrok_config=cfg)[0].public_url == t.public_url
    finally:
        ngrok.kill(pyngrok_config=cfg)


def test_definitions_in_the_config_by_name_and_connect_all(
    tmp_path: Path, relay: RelayThread, service: Service
) -> None:
    path = ngrok_config(tmp_path / "defs.yml", relay.address, TOKEN)
    path.write_text(
        path.read_text()
        + "endpoints:\n"
        + f"  - name: site\n    url: http://defined.lab.test\n    upstream:\n      url: {service.port}\n"
        + f"  - name: shell\n    url: tcp://\n    upstream:\n      url: {service.port}\n"
    )
    cfg = conf.PyngrokConfig(ngrok_path=natkit_ngrok(tmp_path), config_path=str(path))
    try:
        site = ngrok.connect(name="site", pyngrok_config=cfg)  # pyngrok posts it as "site-api"
        assert site.name == "site-api"
        assert site.public_url == f"http://defined.lab.test:{relay.server.http_port}"
        ngrok.disconnect(site.public_url, pyngrok_config=cfg)
        both = ngrok.connect_all(pyngrok_config=cfg)
        assert sorted(str(t.public_url).split("://")[0] for t in both) == ["http", "tcp"]
        for t in both:
            assert b"hello from the service" in visit_url(str(t.public_url), LOOPBACK)
    finally:
        ngrok.kill(pyngrok_config=cfg)


def test_natkit_compat_ngrok_reads_pyngrok_config_and_starts_afresh_after_kill(
    tmp_path: Path, relay: RelayThread, service: Service
) -> None:
    from natkit.compat import ngrok as in_process

    path = tmp_path / "compat.yml"
    path.write_text(f'version: "3"\nagent:\n  connect_url: {relay.address}\n')  # no token
    cfg = conf.PyngrokConfig(ngrok_path=str(tmp_path / "unused"), config_path=str(path))
    try:
        with pytest.raises(NatkitError, match="no relay token"):
            in_process.connect(service.port, "tcp", pyngrok_config=cfg)
        in_process.set_auth_token(TOKEN)
        first = in_process.connect(service.port, "tcp", pyngrok_config=cfg)
        assert b"hello from the service" in visit_url(first.public_url, LOOPBACK)
        in_process.kill()
        assert in_process.get_tunnels() == []
        again = in_process.connect(service.port, "http", pyngrok_config=cfg)  # a new session
        assert b"GET /again HTTP/1.1" in visit_url(again.public_url, LOOPBACK, "/again")
    finally:
        in_process.kill()
        in_process.set_auth_token("")


def test_a_service_that_is_down_resets_the_visitor_and_captures_nothing(
    cfg: conf.PyngrokConfig, service: Service
) -> None:
    with socket.create_server((LOOPBACK, 0)) as gone:
        down = int(gone.getsockname()[1])  # closed again: nothing listens there
    t = ngrok.connect(down, "http", pyngrok_config=cfg)
    with pytest.raises(ConnectionResetError):  # as the service's own refusal would be
        visit_url(t.public_url, LOOPBACK, "/nobody")
    assert agent.get_requests(pyngrok_config=cfg) == []  # a tap comes once the service answers
    ok = ngrok.connect(service.port, "http", pyngrok_config=cfg)  # the agent goes on
    assert b"GET /up HTTP/1.1" in visit_url(ok.public_url, LOOPBACK, "/up")
