"""ngrok's agent configuration file, as far as a natkit relay needs it.

Both layouts are read: version 2 (keys at the top) and version 3 (under ``agent:``). The
relay is ``connect_url`` (v3) or ``server_addr`` (v2), the token ``authtoken``; the
environment's ``NATKIT_RELAY``/``NATKIT_TOKEN`` come before the file, a command-line
``--authtoken`` before both. ``root_cas`` naming a file is the CA that vouches for the relay
(else the relay's certificate is pinned on first use, or given by ``NATKIT_FINGERPRINT``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from natkit.atomic import write_atomic
from natkit.errors import NatkitError

DEFAULT_WEB_ADDR = "127.0.0.1:4040"


class ConfigError(NatkitError):
    """The ngrok configuration cannot be read or used."""


def default_config_path() -> Path:
    """Where ngrok (and pyngrok) keep the file when no ``--config`` is given."""
    home = Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "ngrok" / "ngrok.yml"
    if sys.platform == "win32":
        return home / "AppData" / "Local" / "ngrok" / "ngrok.yml"
    base = os.environ.get("XDG_CONFIG_HOME") or str(home / ".config")
    return Path(base) / "ngrok" / "ngrok.yml"


@dataclasses.dataclass
class Settings:
    """What natkit-ngrok takes from the configuration files, the environment and flags."""

    relay: str = ""
    token: str = ""
    web_addr: str = DEFAULT_WEB_ADDR
    web_addr_given: bool = False  # a taken default address moves on; a chosen one is final
    cafile: Path | None = None
    fingerprint: str | None = None
    version: str = "3"
    tunnels: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    endpoints: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:  # pyngrok depends on PyYAML; natkit alone does not
        raise ConfigError(
            "natkit-ngrok reads ngrok's YAML configuration: pip install PyYAML (pyngrok brings it)"
        ) from None
    return yaml


def read_file(path: Path) -> dict[str, Any]:
    """One configuration file as a dict ({} for an empty or missing file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read the ngrok configuration {path}: {exc}") from None
    yaml = _yaml()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"the ngrok configuration {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"the ngrok configuration {path} is not a mapping of keys")
    return data


def _agent_part(data: dict[str, Any]) -> dict[str, Any]:
    """v3 keeps the agent's keys under ``agent:``; v2 at the top."""
    if str(data.get("version", "2")) == "3":
        part = data.get("agent") or {}
        if not isinstance(part, dict):
            raise ConfigError("the ngrok configuration's 'agent' is not a mapping of keys")
        return part
    return data


def strip_scheme(addr: str) -> str:
    """``tls://relay:7835`` → ``relay:7835`` (ngrok's connect_url may carry a scheme)."""
    return addr.split("://", 1)[-1].rstrip("/")


def load(paths: list[Path], *, authtoken: str = "", env: dict[str, str] | None = None) -> Settings:
    """Merge the files (later ones win, as ngrok does), then the environment, then flags."""
    env = dict(os.environ) if env is None else env
    s = Settings()
    for path in paths:
        data = read_file(path)
        if "version" in data:
            s.version = str(data["version"])
        agent = _agent_part(data)
        if agent.get("connect_url") or agent.get("server_addr"):
            s.relay = strip_scheme(str(agent.get("connect_url") or agent.get("server_addr")))
        if agent.get("authtoken"):
            s.token = str(agent["authtoken"])
        if "web_addr" in agent:
            if agent["web_addr"] is False or str(agent["web_addr"]).lower() == "false":
                raise ConfigError("web_addr: false turns off the local API pyngrok drives")
            s.web_addr, s.web_addr_given = str(agent["web_addr"]), True
        cas = agent.get("root_cas")
        if cas and str(cas) not in ("trusted", "host"):
            s.cafile = Path(str(cas)).expanduser()
        if isinstance(data.get("tunnels"), dict):
            s.tunnels.update({str(k): v for k, v in data["tunnels"].items() if isinstance(v, dict)})
        if isinstance(data.get("endpoints"), list):
            s.endpoints += [e for e in data["endpoints"] if isinstance(e, dict)]
    s.relay = strip_scheme(env.get("NATKIT_RELAY", "")) or s.relay
    s.token = authtoken or env.get("NATKIT_TOKEN", "") or s.token
    s.fingerprint = env.get("NATKIT_FINGERPRINT") or None
    return s


def set_key(path: Path, key: str, value: str) -> None:
    """Write ``key: value`` into the agent part of the file (``ngrok config add-authtoken``),
    keeping its other keys; a new file is a version 3 one."""
    data = read_file(path) or {"version": "3"}
    _agent_part_for_write(data)[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, _yaml().safe_dump(data, default_flow_style=False))
    except OSError as exc:
        raise ConfigError(f"cannot write the ngrok configuration {path}: {exc}") from None


def _agent_part_for_write(data: dict[str, Any]) -> dict[str, Any]:
    if str(data.get("version", "2")) != "3":
        return data
    part = data.setdefault("agent", {})
    if not isinstance(part, dict):
        raise ConfigError("the ngrok configuration's 'agent' is not a mapping of keys")
    return part
