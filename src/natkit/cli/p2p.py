"""``natkit p2p listen|connect``: a TCP port forwarded over a peer-to-peer session."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shlex
import socket
import time
from typing import TYPE_CHECKING, Any

import click

from natkit.cli.common import emit_event
from natkit.errors import EXIT_INTERRUPTED, NatkitError
from natkit.net.sockets import exclusive_listen, unpaced_on_loopback
from natkit.relay.agent import parse_hostport

if TYPE_CHECKING:  # natkit.p2p loads qh3 and aioice: only when a p2p command runs
    from natkit.p2p.peer import P2PConnection, P2POptions, Role


def _emit(as_json: bool, event: str, **info: Any) -> None:
    """One event (docs/cli.md): a JSON line with --json, else a line for a person (on
    stderr, but for ``ready``, the result)."""
    if as_json:
        emit_event(event, **info)
        return
    if event == "waiting":
        how_long = "for ever" if info["timeout"] is None else f"up to {info['timeout']:g} s"
        text = (f"waiting in room {info['room']!r} on relay {info['relay']} for the peer that "
                f"runs 'natkit p2p {info['peer_role']} {info['room']}' ({how_long})")  # fmt: skip
        if "secret" in info:
            text += (f"\nthe P2P secret (made now; give it to the peer, and keep it from "
                     f"others): {info['secret']}\nthe peer runs (with the relay token in "
                     f"$NATKIT_TOKEN): {info['connect']}")  # fmt: skip
    elif event == "rejected":
        text = (f"rejected a peer in room {info['room']!r}: {info['reason']} (waiting again "
                f"in {info['retry_in']:g} s)")  # fmt: skip
    else:
        text = f"{event}: " + " ".join(f"{k}={v}" for k, v in info.items())
    click.echo(text, err=event != "ready")


# At least natkit.p2p.auth.MIN_SECRET_LENGTH (not imported: it loads cryptography).
MIN_SECRET_LENGTH = 16


def _secret(secret: str | None, *, make: bool) -> str:
    """The peers' own secret: the one given (long enough), else a new one (``make``)."""
    if secret is None or secret == "":
        if make:
            return secrets.token_urlsafe(24)  # 192 bits, as natkit.p2p.new_secret()
        raise click.UsageError(
            "give the P2P secret with --secret or $NATKIT_P2P_SECRET: the one 'natkit p2p "
            "listen' printed (or the one you gave it); the relay token is not a P2P secret"
        )
    if len(secret) < MIN_SECRET_LENGTH:
        raise click.BadParameter(
            f"{len(secret)} characters; at least {MIN_SECRET_LENGTH} are needed, because the "
            "relay sees messages sealed with it and could guess a short one offline (leave "
            "it out on 'natkit p2p listen' to get a strong random one)",
            param_hint="--secret",
        )
    return secret


def _options(
    relay: str,
    token: str,
    secret: str,
    stun: str | None,
    turn: str | None,
    turn_user: str | None,
    turn_password: str | None,
    no_portmap: bool,
    fingerprint: str | None,
    local_addresses: tuple[str, ...] = (),
    no_tcp: bool = False,
) -> P2POptions:
    from natkit.p2p.ice import TurnServer
    from natkit.p2p.peer import P2POptions

    turn_server = None
    if turn is not None:
        if not turn_user or turn_password is None:
            raise click.UsageError("--turn needs --turn-user and --turn-password")
        host, port = parse_hostport(turn, 3478)
        turn_server = TurnServer(host, port, turn_user, turn_password)
    return P2POptions(
        relay=relay,
        token=token,
        secret=secret,
        stun=parse_hostport(stun, 3478) if stun else None,
        turn=turn_server,
        port_mapping=not no_portmap,
        fingerprint=fingerprint,
        host_addresses=local_addresses or None,
        tcp=not no_tcp,
    )


def _common(f: Any) -> Any:
    options = [
        click.argument("name"),
        click.option("--relay", required=True, metavar="HOST:PORT", help="The natkit relay."),
        click.option("--token", required=True, envvar="NATKIT_TOKEN", help="The relay token."),
        click.option(
            "--secret",
            envvar="NATKIT_P2P_SECRET",
            help=(
                f"The secret both peers share, at least {MIN_SECRET_LENGTH} characters (or "
                "$NATKIT_P2P_SECRET). Required to connect; listen makes and prints one when "
                "none is given. Never the relay token."
            ),
        ),
        click.option("--stun", metavar="HOST:PORT", help="STUN server (default: the relay)."),
        click.option(
            "--turn",
            envvar="NATKIT_TURN",
            metavar="HOST:PORT",
            help="A TURN server for relayed candidates (or $NATKIT_TURN).",
        ),
        click.option("--turn-user", envvar="NATKIT_TURN_USER"),
        click.option("--turn-password", envvar="NATKIT_TURN_PASSWORD"),
        click.option("--no-portmap", is_flag=True, help="Do not ask the router for a mapping."),
        click.option(
            "--no-tcp", is_flag=True, help="Forward over QUIC streams only (no direct TCP path)."
        ),
        click.option(
            "--local-address",
            "local_addresses",
            multiple=True,
            metavar="ADDRESS",
            help="Gather host candidates only on this local address (repeatable; "
            "default: every address of this machine).",
        ),
        click.option("--fingerprint", help="The relay's certificate fingerprint."),
        click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


async def _session(
    name: str, role: Role, opts: P2POptions, as_json: bool, shown: dict[str, str] | None = None
) -> P2PConnection:
    """Meet the peer; ``shown``: fields added to each ``waiting`` event (a made secret)."""
    from natkit.p2p.peer import connect_peer

    def progress(event: str, info: dict[str, Any]) -> None:
        extra = shown if event == "waiting" and shown else {}
        _emit(as_json, event, **info, **extra)

    conn = await connect_peer(name, role, opts, on_event=progress)
    # tcp: the listener's TCP port for the direct TCP path, or the connector's endpoints of
    # it that it may try; null: forwarded streams go over QUIC only
    tcp: Any = None
    dialer = conn.tcp_dialer
    if conn.tcp_endpoint is not None:
        tcp = conn.tcp_endpoint.port
    elif dialer is not None:
        tcp = [f"{h}:{p}" for h, p in dialer.endpoints]

        def found(via: str) -> None:  # the first forward found the TCP path's route (or none)
            _emit(as_json, "tcp_path", via=via, remote=dialer.remote or None)

        dialer.on_route = found
        if dialer.route is not None or dialer.failed:  # (found already)
            found(dialer.route.kind if dialer.route else "none")
    _emit(as_json, "ready", path=conn.path, elapsed_ms=round(conn.elapsed * 1000, 1), tcp=tcp)

    def moved(kind: str, reason: str) -> None:
        _emit(as_json, "path", path=kind, reason=reason)

    conn.on_path_change(moved)
    return conn


@click.group()
def p2p() -> None:
    """Peer to peer: two hosts behind NAT, connected directly when possible."""


def _target(to: str | None, allow: tuple[int, ...]) -> tuple[str, frozenset[int]]:
    """What the peer may reach: the host and the ports the listener named, never more."""
    host, ports = "127.0.0.1", set(allow)
    if to is not None:
        bare_ipv6 = to.count(":") > 1 and not to.startswith("[")
        try:
            host, port = (to, 0) if bare_ipv6 else parse_hostport(to, 0)
        except ValueError:
            raise click.BadParameter(
                f"{to!r} is not HOST or HOST:PORT", param_hint="--to"
            ) from None
        if port:
            ports.add(port)
    for port in ports:
        if not 1 <= port <= 65535:
            raise click.BadParameter(f"{port}: ports are 1-65535", param_hint="--allow")
    if not ports:
        raise click.UsageError(
            "name what the peer may reach: --allow PORT (repeatable; on 127.0.0.1, or on the "
            "--to host) or --to HOST:PORT; nothing is forwarded that was not named"
        )
    return host, frozenset(ports)


@p2p.command()
@_common
@click.option("--to", "to", metavar="HOST[:PORT]",
              help="Forward to this host (default 127.0.0.1); with :PORT, that port is allowed.")  # fmt: skip
@click.option("--allow", multiple=True, type=int, metavar="PORT",
              help="A port the peer may reach (repeatable). --allow or --to HOST:PORT is required.")  # fmt: skip
def listen(
    name: str, relay: str, token: str, secret: str | None, stun: str | None, turn: str | None,
    turn_user: str | None, turn_password: str | None, no_portmap: bool, no_tcp: bool,
    local_addresses: tuple[str, ...], fingerprint: str | None, as_json: bool, to: str | None, allow: tuple[int, ...],
) -> None:  # fmt: skip
    """Wait for the peer NAME and serve its forwarded connections (again after it leaves)."""
    target, allowed = _target(to, allow)
    made = not secret
    secret = _secret(secret, make=True)
    opts = _options(relay, token, secret, stun, turn, turn_user, turn_password, no_portmap,
                    fingerprint, local_addresses, no_tcp)  # fmt: skip
    shown: dict[str, str] = {}
    if made:  # the only way the peer can learn it: say it, with the command to paste
        port = min(allowed)
        argv = ["natkit", "p2p", "connect", name, "--relay", relay, "--secret", secret,
                "--forward", f"{port}:{port}"]  # fmt: skip
        shown = {"secret": secret, "connect": shlex.join(argv)}

    async def main() -> None:
        from natkit.p2p.errors import P2PError
        from natkit.p2p.forward import serve_forward
        from natkit.p2p.tcppath import serve_tcp_forwards

        while True:
            conn = await _session(name, "listen", opts, as_json, shown)
            tasks: set[asyncio.Task[None]] = set()
            if conn.tcp_endpoint is not None:  # forwards that come over the direct TCP path
                tasks.add(asyncio.ensure_future(serve_tcp_forwards(
                    conn.tcp_endpoint, target_host=target, allowed=allowed)))  # fmt: skip
            dials = conn.tcp_dial_server  # the peer's requests to dial it back (TCP path)
            try:
                while True:
                    stream = await conn.accept_stream()
                    task = asyncio.ensure_future(serve_forward(
                        stream, target_host=target, allowed=allowed,
                        dial=dials.serve if dials is not None else None))  # fmt: skip
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            except P2PError as exc:
                _emit(as_json, "closed", reason=str(exc))
            finally:
                for task in tasks:
                    task.cancel()
                await conn.close()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # Ctrl-C: the session is closed; exit 130 (docs/cli.md)
        raise SystemExit(EXIT_INTERRUPTED) from None


async def _refuse_streams(conn: P2PConnection) -> None:
    """Streams the listening peer opens: the connector serves nothing, so each is reset.
    Returns (with the session's error) when the session ends."""
    while True:
        stream = await conn.accept_stream()
        stream.abort()


def _listen(bind: str, port: int) -> socket.socket:
    """A listening socket for ``--forward``'s local side, or a natkit error that says why not."""
    sock = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
    try:
        exclusive_listen(sock)
        # Accepted connections take the listener's congestion control from their start (a
        # switch after BBR has started leaves the socket paced: BBR marks it so, for good).
        unpaced_on_loopback(sock, bind)
        sock.bind((bind, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise NatkitError(
            f"cannot listen on {bind}:{port} for --forward: {exc.strerror or exc} (a port in "
            "use, or --bind not an address of this machine)"
        ) from None
    return sock


@p2p.command()
@_common
@click.option("--forward", "forwards", multiple=True, required=True,
              metavar="LOCAL_PORT:REMOTE_PORT", help="Forward a local port (repeatable).")  # fmt: skip
@click.option("--bind", default="127.0.0.1", help="Local address to listen on.")
def connect(
    name: str, relay: str, token: str, secret: str | None, stun: str | None, turn: str | None,
    turn_user: str | None, turn_password: str | None, no_portmap: bool, no_tcp: bool,
    local_addresses: tuple[str, ...], fingerprint: str | None, as_json: bool, forwards: tuple[str, ...], bind: str,
) -> None:  # fmt: skip
    """Connect to the peer NAME and forward local ports to ports on its side."""
    secret = _secret(secret, make=False)
    opts = _options(relay, token, secret, stun, turn, turn_user, turn_password, no_portmap,
                    fingerprint, local_addresses, no_tcp)  # fmt: skip
    pairs: list[tuple[int, int]] = []
    for spec in forwards:
        local, sep, remote = spec.partition(":")
        if not sep or not local.isdigit() or not remote.isdigit():
            raise click.BadParameter(
                f"{spec!r} is not LOCAL_PORT:REMOTE_PORT", param_hint="--forward"
            )
        if not (0 <= int(local) <= 65535 and 1 <= int(remote) <= 65535):
            raise click.BadParameter(
                f"{spec!r}: ports are 1-65535 (a local port of 0: any free one)",
                param_hint="--forward",
            )
        pairs.append((int(local), int(remote)))
    # The local ports are taken first: one in use fails at once, not after meeting the peer.
    listeners = [_listen(bind, local) for local, _ in pairs]

    async def main() -> None:
        from natkit.p2p.errors import P2PError
        from natkit.p2p.forward import open_forward, splice_stream
        from natkit.p2p.tcppath import bridge_client

        try:
            conn = await _session(name, "connect", opts, as_json)
        except BaseException:
            for sock in listeners:
                sock.close()
            raise
        loop = asyncio.get_running_loop()

        async def one(client: socket.socket, remote: int) -> None:
            try:
                # the direct TCP path when the listener's TCP port answers, else QUIC
                dialer = conn.tcp_dialer
                sealed = await dialer.open(remote) if dialer is not None else None
                if sealed is not None:
                    await bridge_client(sealed, client)
                    return
                stream = await open_forward(conn, remote)
            except (NatkitError, OSError) as exc:
                _emit(as_json, "refused", port=remote, reason=str(exc))
                client.close()
                return
            await splice_stream(client, stream)

        running: set[asyncio.Task[None]] = set()

        async def serve(sock: socket.socket, remote: int) -> None:
            while True:
                client, peer = await loop.sock_accept(sock)
                unpaced_on_loopback(client, peer[0])  # (a wildcard bind: its loopback peers)
                task = asyncio.ensure_future(one(client, remote))
                running.add(task)
                task.add_done_callback(running.discard)

        try:
            for sock, (_, remote) in zip(listeners, pairs, strict=True):
                _emit(as_json, "forwarding", local=f"{bind}:{sock.getsockname()[1]}",
                      remote=remote)  # fmt: skip
            serving = [
                asyncio.ensure_future(serve(s, r))
                for s, (_, r) in zip(listeners, pairs, strict=True)
            ]
            # ends when the session does; a stream the peer opens is refused, not an end
            closed = asyncio.ensure_future(_refuse_streams(conn))
            await asyncio.wait([closed, *serving], return_when=asyncio.FIRST_COMPLETED)
            with contextlib.suppress(Exception):
                closed.result()
            _emit(as_json, "closed", reason="session ended", at=round(time.time(), 1))
        except P2PError as exc:
            _emit(as_json, "closed", reason=str(exc))
        finally:
            for sock in listeners:
                sock.close()
            await conn.close()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # Ctrl-C: the session is closed; exit 130 (docs/cli.md)
        raise SystemExit(EXIT_INTERRUPTED) from None
