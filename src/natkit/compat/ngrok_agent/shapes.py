"""The ngrok agent API's tunnel requests and answers, translated to and from natkit's tunnels.

pyngrok posts v2 definitions to ``/api/tunnels`` (``addr``, ``proto``, ``subdomain`` …) and
v3 ones to ``/api/endpoints`` (``upstream: {url}``, ``url: tcp://``); both are read here,
checked, and turned into a :class:`TunnelRequest`. An option natkit cannot honour is
refused with a message, never dropped: a tunnel asked to be protected (basic auth, OAuth,
IP restrictions, a traffic policy) must not open unprotected. Basic auth and IP
restrictions are natkit's own access control (:mod:`natkit.relay.access`), enforced by the
relay before a visitor reaches this agent. Pure code, no I/O.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any
from urllib.parse import quote

from natkit.errors import NatkitError
from natkit.relay.access import AccessPolicy, from_pyngrok_options

PROTOS = ("http", "tcp", "tls")
# Options that would protect or change the tunnel: refused until natkit's relay enforces them.
UNSUPPORTED = {
    "oauth": "OAuth",
    "oidc": "OpenID Connect",
    "ip_restrictions": "IP restrictions in this form (use ip_restriction)",
    "mutual_tls_cas": "mutual TLS",
    "webhook_verification": "webhook verification",
    "traffic_policy": "traffic policies",
    "policy": "traffic policies",
    "request_header": "request header rewriting",
    "response_header": "response header rewriting",
    "circuit_breaker": "circuit breakers",
    "compression": "compression",
    "crt": "TLS termination with your certificate",
    "key": "TLS termination with your certificate",
    "terminate_at": "TLS termination",
    "proxy_proto": "the PROXY protocol",
    "user_agent_filter": "user agent filters",
    "websocket_tcp_converter": "the WebSocket to TCP converter",
    "labels": "labeled tunnels",
}
# Options read, or harmless to take as they are.
KNOWN = {"name", "addr", "proto", "upstream", "url", "inspect", "schemes", "subdomain",
         "hostname", "domain", "remote_addr", "metadata", "description", "pooling_enabled",
         "bindings", "host_header"}  # fmt: skip
# Access control, enforced by the natkit relay (natkit.relay.access.from_pyngrok_options).
ACCESS = {"auth", "basic_auth", "ip_restriction"}


class BadTunnel(NatkitError):
    """A tunnel request natkit-ngrok cannot honour (HTTP 400 from the local API)."""


@dataclasses.dataclass
class TunnelRequest:
    name: str
    proto: str  # http | tcp | tls
    upstream_host: str
    upstream_port: int
    upstream_url: str  # as the answer shows it: http://localhost:8000, localhost:22
    hostname: str = ""  # the host name wanted at the relay ("" for a random one)
    port: int = 0  # the public port wanted for tcp (0: any)
    inspect: bool = True
    metadata: str = ""
    access: AccessPolicy | None = None  # basic auth, IP rules: enforced at the relay


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise BadTunnel(f"{what}: {text!r} is not a port from 1 to 65535")
    return int(text)


def parse_upstream(addr: object, proto: str) -> tuple[str, int, str]:
    """``8000``, ``"localhost:8000"``, ``"http://localhost:8000"`` → (host, port, url shown)."""
    text = str(addr).strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    scheme = scheme.lower()
    if scheme == "file":
        raise BadTunnel("natkit-ngrok serves no files (file://): run a web server and tunnel to it")
    if scheme == "https" and proto == "http":
        raise BadTunnel(
            "natkit-ngrok connects to the service in plain HTTP: give its http:// address, "
            "or use proto 'tls' for a service that terminates TLS itself"
        )
    if scheme not in ("", "http", "https", "tcp", "tls"):
        raise BadTunnel(f"upstream {text!r}: unknown scheme {scheme!r}")
    rest = rest.split("/", 1)[0]
    host, sep, port_text = rest.rpartition(":")
    if not sep:
        if rest.isdigit():
            host, port_text = "localhost", rest
        elif scheme in ("http", "https"):
            host, port_text = rest, "80" if scheme == "http" else "443"
        else:
            raise BadTunnel(f"upstream {text!r} has no port")
    host = host.strip("[]") or "localhost"
    port = _port(port_text, f"upstream {text!r}")
    shown = f"{host}:{port}" if proto in ("tcp", "tls") else f"http://{host}:{port}"
    return host, port, shown


def _public_wanted(url: str, proto: str) -> tuple[str, str, int]:
    """A v3 ``url`` (``tcp://``, ``tcp://HOST:PORT``, ``http://NAME.DOMAIN``) → (proto,
    host name, port)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = proto, url
    scheme = scheme.lower()
    rest = rest.split("/", 1)[0]
    if scheme == "https":
        raise BadTunnel(
            "the natkit relay does not terminate TLS: ask for an http:// URL, or use a "
            "tls:// URL with a service that speaks TLS itself"
        )
    if scheme == "tcp":
        _, sep, port = rest.rpartition(":")
        return "tcp", "", _port(port, f"url {url!r}") if sep and port else 0
    if scheme in ("http", "tls"):
        return scheme, rest.rsplit(":", 1)[0] if ":" in rest else rest, 0
    raise BadTunnel(f"url {url!r}: natkit-ngrok serves http://, tls:// and tcp:// URLs")


def tunnel_request(body: dict[str, Any], *, v3: bool) -> TunnelRequest:
    """Check and translate one tunnel or endpoint definition (the POST body)."""
    for key in body:
        if key in UNSUPPORTED:
            raise BadTunnel(
                f"natkit-ngrok does not support {UNSUPPORTED[key]} ('{key}') yet: the tunnel "
                "was not opened, rather than opened without it"
            )
        if key not in KNOWN | ACCESS:
            raise BadTunnel(f"natkit-ngrok does not know the tunnel option '{key}'")
    url = str(body.get("url") or "")
    proto = str(body.get("proto") or "").lower()
    if url:
        proto, hostname, port = _public_wanted(url, proto or "http")
    else:
        proto, hostname, port = proto or "http", "", 0
    if proto not in PROTOS:
        raise BadTunnel(f"proto {proto!r}: natkit-ngrok serves http, tcp and tls tunnels")
    schemes = body.get("schemes")
    if proto == "http" and schemes is not None and "http" not in [str(s) for s in schemes]:
        raise BadTunnel(
            "the natkit relay does not terminate TLS: its http tunnels have http:// URLs "
            "(drop schemes/bind_tls, or use proto 'tls' with a TLS service)"
        )
    bindings = body.get("bindings")
    if bindings not in (None, [], ["public"], "public"):
        raise BadTunnel(f"bindings {bindings!r}: natkit relay tunnels are public")
    if str(body.get("host_header") or "preserve") != "preserve":
        raise BadTunnel("host_header rewriting is not supported: the Host header is kept")
    hostname = str(body.get("hostname") or body.get("domain") or body.get("subdomain") or hostname)
    if proto == "tcp" and body.get("remote_addr"):
        _, _, port_text = str(body["remote_addr"]).rpartition(":")
        port = _port(port_text, f"remote_addr {body['remote_addr']!r}")
    upstream = body.get("upstream")
    if isinstance(upstream, dict) and upstream.get("url"):
        target: object = upstream["url"]
    elif upstream is not None and not isinstance(upstream, dict):
        raise BadTunnel("upstream must be a mapping with a url")
    else:
        target = body.get("addr") or "80"
    host, upstream_port, shown = parse_upstream(target, proto)
    name = str(body.get("name") or f"{proto}-{upstream_port}-{uuid.uuid4()}")
    inspect = body.get("inspect", proto == "http")
    try:
        access = from_pyngrok_options(body, kind=proto)
    except ValueError as exc:
        raise BadTunnel(str(exc)) from None
    return TunnelRequest(
        name=name, proto=proto, upstream_host=host, upstream_port=upstream_port,
        upstream_url=shown, hostname=hostname, port=port,
        inspect=proto == "http" and str(inspect).lower() not in ("false", "0"),
        metadata=str(body.get("metadata") or ""), access=access,
    )  # fmt: skip


def public_url(proto: str, natkit_public: str) -> str:
    """natkit's public address as ngrok writes it: tcp://HOST:PORT, tls://HOST[:PORT]."""
    if proto == "tcp":
        return f"tcp://{natkit_public}"
    if proto == "tls":
        return "tls://" + natkit_public.split("://", 1)[-1]
    return natkit_public


def tunnel_json(
    req: TunnelRequest, tunnel_id: str, url: str, collection: str, metrics: dict[str, Any]
) -> dict[str, Any]:
    """One tunnel in the shape of the agent API: the v2 fields (``public_url``, ``config``)
    and the v3 ones (``url``, ``upstream``) together; ``uri`` under ``collection``
    (``tunnels`` or ``endpoints``), where pyngrok deletes it."""
    return {
        "ID": tunnel_id,
        "id": tunnel_id,
        "name": req.name,
        "uri": f"/api/{collection}/{quote(req.name, safe='')}",
        "public_url": url,
        "url": url,
        "proto": url.split("://", 1)[0],
        "config": {"addr": req.upstream_url, "inspect": req.inspect},
        "upstream": {"url": req.upstream_url, "protocol": "http1"}
        if req.proto == "http"
        else {"url": req.upstream_url},
        "metadata": req.metadata,
        "metrics": metrics,
    }
