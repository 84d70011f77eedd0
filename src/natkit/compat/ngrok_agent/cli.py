"""The ``natkit-ngrok`` command: the ngrok agent's command line, as far as pyngrok (and a
person used to ngrok) calls it.

    natkit-ngrok start --none --log stdout --config FILE [--authtoken T]   (pyngrok)
    natkit-ngrok start NAME… | --all                  (tunnels defined in the config)
    natkit-ngrok http PORT | tcp PORT | tls PORT       (one tunnel, like ngrok http 8000)
    natkit-ngrok config add-authtoken TOKEN | add-api-key KEY | check | upgrade
    natkit-ngrok version | --version | update
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

from natkit import __version__
from natkit.compat.ngrok_agent import config as C
from natkit.compat.ngrok_agent.logs import LogWriter
from natkit.errors import EXIT_BUG, EXIT_INTERRUPTED, NatkitError

PROG = "natkit-ngrok"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="natkit as the ngrok agent (pyngrok).")
    p.add_argument("-v", "--version", action="store_true", help="print the version")
    sub = p.add_subparsers(dest="command")

    def agent_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", action="append", default=[], help="ngrok config file(s)")
        q.add_argument("--authtoken", default="", help="the relay token")
        q.add_argument("--log", default="false", help="stdout, stderr, false or a file")
        q.add_argument("--log-format", default="logfmt", help="logfmt (term and json: logfmt)")
        q.add_argument("--log-level", default="info")
        q.add_argument("--region", default="", help="ignored: a natkit relay has one place")

    start = sub.add_parser("start", help="start the agent (tunnels from the config)")
    start.add_argument("names", nargs="*")
    start.add_argument("--none", action="store_true", help="no tunnels: the API opens them")
    start.add_argument("--all", action="store_true", help="every tunnel in the config")
    agent_options(start)
    for proto in ("http", "tcp", "tls"):
        q = sub.add_parser(proto, help=f"one {proto} tunnel to ADDR (a port or HOST:PORT)")
        q.add_argument("addr")
        q.add_argument("--url", "--domain", dest="url", default="", help="the public name")
        agent_options(q)
    cfg = sub.add_parser("config", help="edit the ngrok config file")
    cfg.add_argument("action", choices=["add-authtoken", "add-api-key", "check", "upgrade"])
    cfg.add_argument("value", nargs="?", default="")
    cfg.add_argument("--config", action="append", default=[])
    cfg.add_argument("--log", default="false")
    sub.add_parser("version", help="print the version")
    sub.add_parser("update", help="natkit-ngrok is updated with natkit")
    api = sub.add_parser("api", help="(ngrok's cloud API: not available)")
    api.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.version or args.command == "version":
        print(f"{PROG} version {__version__}")
        return 0
    try:
        if args.command == "config":
            return _config(args)
        if args.command == "update":
            print(f"{PROG} comes with natkit: update it with  pip install -U natkit")
            return 0
        if args.command == "api":
            raise NatkitError(
                f"{PROG} has no ngrok cloud API: it runs tunnels on your own natkit relay"
            )
        if args.command in ("start", "http", "tcp", "tls"):
            return _agent(args)
    except NatkitError as exc:  # natkit's exit codes (docs/cli.md): 4 relay, 5 local, else 1
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    _parser().print_help()
    return 0


def _config_paths(args: argparse.Namespace) -> list[Path]:
    return [Path(p).expanduser() for p in args.config] or [C.default_config_path()]


def _config(args: argparse.Namespace) -> int:
    path = _config_paths(args)[-1]
    if args.action in ("add-authtoken", "add-api-key"):
        if not args.value:
            raise NatkitError(f"config {args.action} needs the value")
        key = "authtoken" if args.action == "add-authtoken" else "api_key"
        C.set_key(path, key, args.value)
        what = "Authtoken" if key == "authtoken" else "API key"
        print(f"{what} saved to configuration file: {path}")  # pyngrok looks for this
        return 0
    C.load(_config_paths(args))  # check (and upgrade: both versions are read as they are)
    print(f"Valid configuration file at {path}")
    return 0


def _definitions(
    args: argparse.Namespace, settings: C.Settings
) -> list[tuple[dict[str, Any], bool]]:
    """The tunnels to open at start: (definition, is v3)."""
    if args.command in ("http", "tcp", "tls"):
        body: dict[str, Any] = {"proto": args.command, "addr": args.addr,
                                "name": "command_line"}  # fmt: skip
        if args.url:
            body["url"] = args.url if "://" in args.url else f"{args.command}://{args.url}"
            del body["proto"]
        return [(body, False)]
    if args.none:
        return []
    found: list[tuple[dict[str, Any], bool]] = []
    for name, d in settings.tunnels.items():
        if args.all or name in args.names:
            found.append(({**d, "name": name}, False))
    for d in settings.endpoints:
        if args.all or d.get("name") in args.names:
            found.append((d, True))
    missing = set(args.names) - {d.get("name") for d, _ in found}
    if missing:
        raise NatkitError(f"no tunnel named {', '.join(sorted(missing))} in the configuration")
    return found


def _agent(args: argparse.Namespace) -> int:
    log = LogWriter(args.log)
    paths = _config_paths(args)
    log("info", "open config file", path=",".join(str(p) for p in paths))
    try:
        settings = C.load(paths, authtoken=args.authtoken)
        definitions = _definitions(args, settings)
    except NatkitError as exc:
        log("eror", "failed to start", err=str(exc))
        raise
    from natkit.net.loops import new_event_loop  # the agent's imports, after the quick paths

    loop = new_event_loop()
    try:
        return loop.run_until_complete(_run(settings, definitions, log))
    finally:
        loop.close()


async def _run(
    settings: C.Settings, definitions: list[tuple[dict[str, Any], bool]], log: LogWriter
) -> int:
    import asyncio  # here: version and config answer without it
    import contextlib
    import signal

    from natkit.compat.ngrok_agent.session import Session
    from natkit.compat.ngrok_agent.shapes import tunnel_request
    from natkit.compat.ngrok_agent.web import WebAPI

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        session = Session(settings, log)
    except NatkitError as exc:
        log("eror", "failed to start", err=str(exc))
        raise
    web = WebAPI(session)
    try:
        addr = await web.start(settings.web_addr, move_on=not settings.web_addr_given)
    except OSError as exc:
        msg = f"cannot listen on web_addr {settings.web_addr}: {exc}"
        log("eror", "failed to start web service", err=msg)
        raise NatkitError(msg) from None
    try:
        try:
            await session.start()
        except NatkitError as exc:
            log("eror", "session closing", obj="tunnels.session", err=str(exc))
            raise
        # pyngrok waits for these three, then probes the API (listening already).
        log("info", "starting web service", obj="web", addr=addr, allow_hosts="[]")
        log("info", "tunnel session started", obj="tunnels.session", relay=settings.relay)
        log("info", "client session established", obj="tunnels.session")
        for body, v3 in definitions:
            try:
                req = tunnel_request(body, v3=v3)
                running = await session.open(req)
            except NatkitError as exc:
                log("eror", "failed to start tunnel", obj="tunnels", err=str(exc))
                raise
            if len(definitions) == 1 and body.get("name") == "command_line":
                print(f"Forwarding {running.url} -> {req.upstream_url}", file=sys.stderr)
        log.started()
        ended = session.ended
        waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(stop.wait())}
        if ended is not None:
            waits.add(ended)
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if ended is not None and ended.done() and not ended.cancelled():
            failure = ended.exception()
            if failure is not None:  # a final error: the token revoked, the relay untrusted
                log("eror", "session closed", obj="tunnels.session", err=str(failure))
                raise NatkitError(str(failure))
        return 0
    finally:
        await web.close()
        await session.close()


def entry() -> NoReturn:
    """The console script."""
    try:
        code = main()
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line and natkit's code for it, no traceback
        print(f"{PROG}: unexpected failure (a bug, please report it): {exc!r}", file=sys.stderr)
        code = EXIT_BUG
    sys.stdout.flush()
    sys.exit(code)
