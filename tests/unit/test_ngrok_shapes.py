"""natkit-ngrok's translation of ngrok tunnel definitions (v2 and v3, as pyngrok posts
them) to natkit tunnels, its refusals, the answers' shapes, the configuration file and the
log lines pyngrok parses (with pyngrok's own parser when it is installed)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from natkit.compat.ngrok_agent import config as C
from natkit.compat.ngrok_agent.logs import format_line
from natkit.compat.ngrok_agent.shapes import (
    BadTunnel,
    public_url,
    tunnel_json,
    tunnel_request,
)


def test_pyngrok_v3_http_and_tcp_bodies() -> None:
    http = tunnel_request(
        {"name": "http-8000-x", "upstream": {"url": "http://localhost:8000"}}, v3=True
    )
    assert (http.proto, http.upstream_host, http.upstream_port, http.inspect) == (
        "http", "localhost", 8000, True
    )  # fmt: skip
    tcp = tunnel_request(
        {"name": "t", "upstream": {"url": "localhost:22"}, "url": "tcp://", "inspect": False},
        v3=True,
    )
    assert (tcp.proto, tcp.upstream_port, tcp.port, tcp.inspect, tcp.upstream_url) == (
        "tcp", 22, 0, False, "localhost:22"
    )  # fmt: skip
    named = tunnel_request(
        {"name": "n", "upstream": {"url": "8080"}, "url": "http://app.lab.test"}, v3=True
    )
    assert named.hostname == "app.lab.test" and named.upstream_url == "http://localhost:8080"
    fixed = tunnel_request(
        {"name": "n", "upstream": {"url": "22"}, "url": "tcp://1.2.3.4:20005"}, v3=True
    )
    assert (fixed.proto, fixed.port) == ("tcp", 20005)


def test_pyngrok_v2_bodies() -> None:
    r = tunnel_request(
        {"name": "a", "addr": "192.168.1.5:3000", "proto": "http", "subdomain": "web"}, v3=False
    )
    assert (r.upstream_host, r.upstream_port, r.hostname) == ("192.168.1.5", 3000, "web")
    r = tunnel_request(
        {"name": "b", "addr": 22, "proto": "tcp", "remote_addr": "relay:20001"}, v3=False
    )
    assert (r.proto, r.port, r.inspect) == ("tcp", 20001, False)
    r = tunnel_request({"addr": "8443", "proto": "tls", "hostname": "secure.lab.test"}, v3=False)
    assert r.proto == "tls" and r.hostname == "secure.lab.test" and r.name.startswith("tls-8443-")
    assert tunnel_request({}, v3=False).upstream_port == 80  # ngrok's default addr


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"addr": "80", "basic_auth": "u"}, "USER:PASS"),
        ({"addr": "80", "ip_restriction": {"allow_cidrs": "10.0.0.0/8"}}, "list of CIDRs"),
        ({"addr": "80", "proto": "tcp", "auth": "u:p"}, "HTTP"),
        ({"addr": "80", "oauth": {"provider": "google"}}, "OAuth"),
        ({"addr": "80", "traffic_policy": {}}, "traffic policies"),
        ({"addr": "80", "url": "https://x.lab.test"}, "does not terminate TLS"),
        ({"addr": "80", "schemes": ["https"]}, "does not terminate TLS"),
        ({"addr": "https://localhost:443"}, "plain HTTP"),
        ({"addr": "file:///tmp"}, "no files"),
        ({"addr": "80", "proto": "udp"}, "http, tcp and tls"),
        ({"addr": "80", "bindings": ["internal"]}, "public"),
        ({"addr": "80", "host_header": "rewrite"}, "Host header is kept"),
        ({"addr": "80", "surprise": 1}, "does not know the tunnel option 'surprise'"),
        ({"addr": "99999"}, "not a port"),
        ({"addr": "80", "proto": "tcp", "remote_addr": "relay:x"}, "not a port"),
    ],
)
def test_what_cannot_be_honoured_is_refused_with_a_reason(
    body: dict[str, object], words: str
) -> None:
    with pytest.raises(BadTunnel, match=words):
        tunnel_request(body, v3=False)


def test_answers_carry_both_versions_fields() -> None:
    r = tunnel_request({"name": "web", "addr": "8000", "proto": "http"}, v3=False)
    data = tunnel_json(r, "t1", "http://web.lab.test:8080", "endpoints", {})
    assert data["public_url"] == data["url"] == "http://web.lab.test:8080"
    assert data["uri"] == "/api/endpoints/web" and data["proto"] == "http"
    assert data["config"] == {"addr": "http://localhost:8000", "inspect": True}
    assert data["upstream"]["url"] == "http://localhost:8000"
    assert public_url("tcp", "100.200.0.2:20000") == "tcp://100.200.0.2:20000"
    assert public_url("tls", "https://s.lab.test:8443") == "tls://s.lab.test:8443"
    odd = tunnel_request({"name": "a b/c", "addr": "1"}, v3=False)
    assert tunnel_json(odd, "t2", "http://x", "tunnels", {})["uri"] == "/api/tunnels/a%20b%2Fc"


def test_config_v3_v2_environment_and_flags(tmp_path: Path) -> None:
    v3 = tmp_path / "v3.yml"
    v3.write_text('version: "3"\nagent:\n  connect_url: tls://relay.example:7835\n'
                  "  authtoken: from-file\n  web_addr: 127.0.0.1:4141\n  root_cas: /ca.pem\n")  # fmt: skip
    s = C.load([v3], env={})
    assert (s.relay, s.token, s.web_addr, s.web_addr_given) == (
        "relay.example:7835", "from-file", "127.0.0.1:4141", True
    )  # fmt: skip
    assert s.cafile == Path("/ca.pem")
    s = C.load([v3], env={"NATKIT_RELAY": "other:1", "NATKIT_TOKEN": "from-env"})
    assert (s.relay, s.token) == ("other:1", "from-env")
    assert C.load([v3], authtoken="from-flag", env={"NATKIT_TOKEN": "e"}).token == "from-flag"
    v2 = tmp_path / "v2.yml"
    v2.write_text(
        "server_addr: r2:7835\nauthtoken: t2\ntunnels:\n  web:\n    addr: 80\n    proto: http\n"
    )
    s = C.load([v2], env={})
    assert (s.relay, s.token, s.web_addr_given, s.tunnels) == (
        "r2:7835", "t2", False, {"web": {"addr": 80, "proto": "http"}}
    )  # fmt: skip
    assert C.load([tmp_path / "missing.yml"], env={}).relay == ""
    bad = tmp_path / "bad.yml"
    bad.write_text("version: '3'\nagent:\n  web_addr: false\n")
    with pytest.raises(C.ConfigError, match="web_addr"):
        C.load([bad], env={})
    bad.write_text("- a list\n")
    with pytest.raises(C.ConfigError, match="mapping"):
        C.load([bad], env={})


def test_set_key_keeps_the_other_keys(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ngrok.yml"
    C.set_key(path, "authtoken", "tok")  # a new file is a v3 one
    assert C.load([path], env={}).token == "tok"
    path.write_text("version: '2'\nserver_addr: r:1\n")
    C.set_key(path, "authtoken", "tok2")
    s = C.load([path], env={})
    assert (s.relay, s.token) == ("r:1", "tok2")


def test_log_lines_parse_as_pyngrok_parses_them() -> None:
    line = format_line("info", "starting web service", obj="web", addr="127.0.0.1:4040")
    fields = dict(part.split("=", 1) for part in shlex.split(line))
    assert (fields["msg"], fields["addr"], fields["lvl"]) == (
        "starting web service", "127.0.0.1:4040", "info"
    )  # fmt: skip
    err = format_line("eror", "session closing", err='relay "r" said: no\nsecond line')
    assert (
        dict(p.split("=", 1) for p in shlex.split(err))["err"] == 'relay "r" said: no second line'
    )
    from pyngrok import log

    parsed = log.NgrokLog(err)
    assert parsed.lvl == "ERROR" and parsed.err == 'relay "r" said: no second line'
    assert log.NgrokLog(line).addr == "127.0.0.1:4040"


def test_basic_auth_and_ip_restrictions_become_the_relays_access_policy() -> None:
    r = tunnel_request({"addr": "80", "auth": "ada:correct-horse"}, v3=False)
    assert r.access is not None and len(r.access.credentials) == 1
    r = tunnel_request({"addr": "22", "proto": "tcp",
                        "ip_restriction": {"allow_cidrs": ["10.0.0.0/8"],
                                           "deny_cidrs": ["10.9.0.0/16"]}}, v3=False)  # fmt: skip
    assert r.access is not None and r.access.allow and r.access.deny
    assert tunnel_request({"addr": "80"}, v3=False).access is None
