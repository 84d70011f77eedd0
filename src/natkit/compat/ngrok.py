"""pyngrok's module-level calls, in process, on a natkit relay: no agent process, no API.

    from natkit.compat import ngrok          # instead of: from pyngrok import ngrok
    tunnel = ngrok.connect(8000, "http")     # tunnel.public_url: http://NAME.DOMAIN[:PORT]
    ngrok.connect(22, "tcp")                 # tcp://RELAY:PORT
    ngrok.get_tunnels(); ngrok.disconnect(tunnel.public_url); ngrok.kill()

The relay and token are found as natkit-ngrok finds them: ``$NATKIT_RELAY`` and
``$NATKIT_TOKEN``, else ``connect_url``/``server_addr`` and ``authtoken`` in ngrok's
configuration file (``pyngrok_config.config_path``, else ngrok's default path);
``set_auth_token()`` or ``pyngrok_config.auth_token`` set the token. One relay session (a
background thread's event loop) carries every tunnel until :func:`kill`. The returned
:class:`NgrokTunnel` has pyngrok's attributes (``public_url``, ``name``, ``proto``,
``config``, ``uri``, ``data``…). Requests are not captured in process (``inspect`` is off);
natkit-ngrok captures them.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from natkit.api import _LoopThread
from natkit.compat.ngrok_agent import config as C
from natkit.compat.ngrok_agent.logs import LogWriter
from natkit.compat.ngrok_agent.session import Running, Session
from natkit.compat.ngrok_agent.shapes import tunnel_json, tunnel_request
from natkit.errors import NatkitError

__all__ = [
    "NgrokTunnel",
    "connect",
    "disconnect",
    "get_tunnels",
    "kill",
    "set_auth_token",
]


class NgrokTunnel:
    """A tunnel, with the attributes of pyngrok's ``NgrokTunnel``."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.id: str = data["id"]
        self.name: str = data["name"]
        self.proto: str = data["proto"]
        self.uri: str = data["uri"]
        self.public_url: str = data["public_url"]
        self.config: dict[str, Any] = data["config"]
        self.upstream: dict[str, Any] = data["upstream"]
        self.metrics: dict[str, Any] = data["metrics"]
        self.api_url = None  # no agent API in process

    def __repr__(self) -> str:
        return f'<NgrokTunnel: "{self.public_url}" -> "{self.config["addr"]}">'


_lock = threading.RLock()
_runner: _LoopThread | None = None
_session: Session | None = None
_auth_token = ""


def set_auth_token(token: str, pyngrok_config: Any = None) -> None:
    """The relay token for the next session (pyngrok writes it to the config file; natkit
    keeps it in memory)."""
    global _auth_token
    _auth_token = token


def _settings(pyngrok_config: Any) -> C.Settings:
    path = getattr(pyngrok_config, "config_path", None)
    token = getattr(pyngrok_config, "auth_token", None) or _auth_token
    return C.load([Path(path) if path else C.default_config_path()], authtoken=token or "")


def _live_session(pyngrok_config: Any) -> tuple[_LoopThread, Session]:
    global _runner, _session
    if _runner is not None and _session is not None:
        ended = _session.ended
        if ended is None or not ended.done():
            return _runner, _session
        _kill()  # the session ended (a revoked token…): start afresh
    runner = _LoopThread()
    try:
        settings = _settings(pyngrok_config)

        async def start() -> Session:
            session = Session(settings, LogWriter("false"))
            await session.start()
            return session

        _session = runner.run(start())
    except BaseException:
        runner.stop()
        raise
    _runner = runner
    return runner, _session


def _tunnel(running: Running) -> NgrokTunnel:
    return NgrokTunnel(
        tunnel_json(running.request, running.spec.id, running.url, "tunnels", running.metrics())
    )


def connect(
    addr: str | int | None = None,
    proto: str | None = None,
    name: str | None = None,
    pyngrok_config: Any = None,
    **options: Any,
) -> NgrokTunnel:
    """Open a tunnel to local ``addr`` (default 80) of ``proto`` (http, tcp or tls; default
    http); blocks until it is public. pyngrok's tunnel options (``subdomain``,
    ``hostname``, ``remote_addr``, ``bind_tls``…) are read; one natkit cannot honour (basic
    auth, OAuth…) is a NatkitError, the tunnel not opened."""
    body: dict[str, Any] = {**options, "addr": str(addr or 80), "proto": proto or "http"}
    if name:
        body["name"] = name
    if "bind_tls" in body:  # pyngrok's own translation of its older option
        bind_tls = str(body.pop("bind_tls")).lower()
        body["schemes"] = ["https"] if bind_tls == "true" else ["http"]
    body.setdefault("inspect", False)
    request = tunnel_request(body, v3=False)
    with _lock:
        runner, session = _live_session(pyngrok_config)
        return _tunnel(runner.run(session.open(request)))


def get_tunnels(pyngrok_config: Any = None) -> list[NgrokTunnel]:
    """The tunnels open in this process."""
    with _lock:
        if _session is None:
            return []
        return [_tunnel(r) for r in _session.tunnels.values()]


def disconnect(public_url: str, pyngrok_config: Any = None) -> None:
    """Close the tunnel with this public URL (nothing when there is none)."""
    with _lock:
        if _runner is None or _session is None:
            return
        for name, running in list(_session.tunnels.items()):
            if running.url == public_url:
                _runner.run(_session.close_tunnel(name))


def kill(pyngrok_config: Any = None) -> None:
    """Close every tunnel and the relay session."""
    with _lock:
        _kill()


def _kill() -> None:
    global _runner, _session
    runner, session = _runner, _session
    _runner = _session = None
    if runner is None:
        return
    try:
        if session is not None:
            runner.run(session.close())
    except NatkitError:
        pass
    finally:
        runner.stop()
