"""``natkit relay serve``: run the public side of relay tunnels."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import NoReturn

import click

from natkit.cli.common import emit_json, fail_with, out, run_loop
from natkit.errors import EXIT_ERROR, EXIT_USAGE
from natkit.net.fdlimit import raise_fd_limit
from natkit.relay.agent import parse_hostport
from natkit.relay.pump import small_tls_buffers
from natkit.relay.server import RelayConfig, RelayServer
from natkit.relay.tenants import MIN_TOKEN, Tenant, TenantError, parse_tenants
from natkit.state import state_dir, writable_state_dir


def _refuse(message: str, code: int, as_json: bool) -> NoReturn:
    fail_with(ValueError(message) if code == EXIT_USAGE else OSError(message), code,
              as_json=as_json)  # fmt: skip


def _tenants(tokens: tuple[str, ...], tokens_file: Path | None, as_json: bool) -> list[Tenant]:
    """``--token`` values and ``--tokens-file`` lines (``LABEL:TOKEN [quotas] [reserve=...]``,
    see :mod:`natkit.relay.tenants`)."""
    lines = list(tokens)
    if tokens_file is not None:
        lines += tokens_file.read_text().splitlines()
    try:
        found = parse_tenants(lines)
    except TenantError as exc:
        where = f" in {tokens_file}" if tokens_file is not None else ""
        _refuse(f"{exc}{where}", EXIT_USAGE, as_json)
    if not found:
        _refuse("give at least one --token (or --tokens-file): the relay is no open proxy",
                EXIT_USAGE, as_json)  # fmt: skip
    return found


@click.group()
def relay() -> None:
    """Relay tunnels: a self-hosted ngrok."""


@relay.command("serve")
@click.option("--listen", default="0.0.0.0:7835", show_default=True, help="Agents connect here.")
@click.option("--token", "tokens", multiple=True,
              help=f"A token agents must prove, at least {MIN_TOKEN} random characters "
                   "(repeatable).")  # fmt: skip
@click.option("--tokens-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File of LABEL:TOKEN lines, each with optional quotas and reserved names "
                   "(sessions=N tunnels=N ports=N hostnames=N reserve=NAME,...).")  # fmt: skip
@click.option(
    "--ports", default="20000-20999", show_default=True, help="Public TCP ports: LOW-HIGH."
)
@click.option(
    "--http-port", type=click.IntRange(0, 65535), help="Serve HTTP tunnels (by Host) here."
)
@click.option(
    "--https-port", type=click.IntRange(0, 65535), help="Serve HTTPS tunnels (by SNI) here."
)
@click.option("--domain", help="HTTP(S) tunnels are NAME.DOMAIN.")
@click.option("--public-host", metavar="HOST",
              help="How visitors reach this relay, e.g. its DNS name (default: the listen host; "
                   "listening on 0.0.0.0 or ::, the address each agent reached).")  # fmt: skip
@click.option("--cert", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--metrics", metavar="HOST:PORT", help="Prometheus metrics endpoint.")
@click.option(
    "--no-plaintext-data",
    is_flag=True,
    help="Refuse agents' plaintext tunnel data connections (P2P relay paths stay plain: "
    "their peers encrypt end to end).",
)
@click.option("--no-stun", is_flag=True,
              help="Do not answer STUN Binding requests on UDP at the --listen address.")  # fmt: skip
@click.option("--grace", type=float, default=60.0, show_default=True,
              help="Seconds a tunnel's address waits for its agent to come back.")  # fmt: skip
@click.option("--pool-size", type=click.IntRange(0, 64), default=8, show_default=True,
              help="Data connections each tunnel keeps ready for visitors.")  # fmt: skip
@click.option("--state-dir", "relay_state", type=click.Path(file_okay=False, path_type=Path),
              help="Where the self-signed certificate lives.")  # fmt: skip
@click.option("--max-unauthenticated-per-ip", "per_ip", type=click.IntRange(1), default=64,
              show_default=True,
              help="Connections one address (an IPv6 /64) may hold before it authenticates.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True,
              help="JSON lines: ready (and error); see docs/cli.md.")  # fmt: skip
def serve(
    listen: str, tokens: tuple[str, ...], tokens_file: Path | None, ports: str,
    http_port: int | None, https_port: int | None, domain: str | None, public_host: str | None,
    cert: Path | None, key: Path | None, metrics: str | None, no_plaintext_data: bool,
    no_stun: bool, grace: float, pool_size: int, relay_state: Path | None, per_ip: int,
    as_json: bool,
) -> None:  # fmt: skip
    """Run the relay: agents connect to --listen, visitors to the tunnels' public ports.

    The relay is also a rendezvous for peer-to-peer agents (rooms by token and name) and,
    unless --no-stun, a STUN server on UDP at the --listen address."""
    host, port = parse_hostport(listen, allow_zero=True)
    low, _sep, high = ports.partition("-")
    if not (low.isdigit() and high.isdigit() and 0 < int(low) <= int(high) < 65536):
        _refuse(f"--ports must be LOW-HIGH, not {ports!r}", EXIT_USAGE, as_json)
    if (http_port is not None or https_port is not None) and not domain:
        _refuse("--http-port/--https-port need --domain (tunnels are NAME.DOMAIN)", EXIT_USAGE,
                as_json)  # fmt: skip
    if (cert is None) != (key is None):
        _refuse("give both --cert and --key, or neither (a self-signed pair is made)", EXIT_USAGE,
                as_json)  # fmt: skip
    own_state = relay_state or state_dir() / "relay"
    if cert is None:
        writable_state_dir(own_state)  # the self-signed pair lives there: fail before serving
    cfg = RelayConfig(
        listen_host=host, listen_port=port, tenants=_tenants(tokens, tokens_file, as_json),
        ports=(int(low), int(high)), http_port=http_port, https_port=https_port, domain=domain,
        public_host=public_host, cert=cert, key=key,
        state_dir=own_state,
        metrics=parse_hostport(metrics) if metrics else None,
        allow_plaintext_data=not no_plaintext_data, grace=grace, pool_size=pool_size,
        stun=not no_stun, max_unauthenticated_per_ip=per_ip,
    )  # fmt: skip
    run_loop(_serve(cfg, as_json))


async def _serve(cfg: RelayConfig, as_json: bool) -> None:
    small_tls_buffers()
    raise_fd_limit()
    try:
        server = RelayServer(cfg)
    except ValueError as exc:  # tenants that contradict each other, a bad reserved name
        _refuse(str(exc), EXIT_USAGE, as_json)
    try:
        await server.start()
    except OSError as exc:  # a port in use, an address not on this host…
        await server.close()
        _refuse(exc.strerror or str(exc), EXIT_ERROR, as_json)
    info = {
        "event": "ready",
        "listen": f"{cfg.listen_host}:{server.listen_port}",
        "fingerprint": server.fingerprint,
        "http_port": server.http_port,
        "https_port": server.https_port,
        "ports": f"{cfg.ports[0]}-{cfg.ports[1]}",
        "stun": f"{cfg.listen_host}:{server.stun.address[1]}" if server.stun else None,
        # null: each agent's public ports are at the relay address that agent reached
        "public_host": None
        if server.listens_everywhere and not cfg.public_host
        else cfg.public_host or cfg.listen_host,
    }
    if as_json:
        emit_json(info)
    else:
        out.print(f"relay listening on [b]{info['listen']}[/]")
        out.print(f"certificate fingerprint: {server.fingerprint}  (agents: --fingerprint to "
                  "pin it)", soft_wrap=True)  # fmt: skip
        if server.http_port:
            out.print(f"HTTP tunnels: http://NAME.{cfg.domain}:{server.http_port}")
        if server.https_port:
            out.print(f"HTTPS tunnels (TLS passed through): NAME.{cfg.domain}:{server.https_port}")
        if info["stun"]:
            out.print(f"STUN (UDP): {info['stun']}")
        if info["public_host"] is None:
            out.print("public ports: at the address each agent reached this relay by "
                      "(--public-host NAME to announce one name instead)")  # fmt: skip
        else:
            out.print(f"public ports: {info['public_host']}:PORT")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await server.close()
