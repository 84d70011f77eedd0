"""Time to a public URL: existing pyngrok code on natkit-ngrok vs ``natkit expose`` (lab).

Every iteration starts a new process on lan (``ip netns exec``: interpreter start and imports
included) and times it from just before the start until the public URL is known:

- ``natkit expose 8080 --via relay [--http] --json`` until its ``ready`` line;
- a Python script with the real pyngrok, ``PyngrokConfig(ngrok_path=natkit-ngrok)``, until
  ``ngrok.connect(8080, "tcp"|"http")`` returns (pyngrok starts natkit-ngrok, reads its log
  lines, polls its API, then posts the tunnel);
- a script with ``natkit.compat.ngrok.connect(8080, "http")`` (in process, no agent).

Each URL is then fetched from wan through the relay (untimed) and must reach the service on
lan's loopback; then the process is stopped. lan's router offers no mapping and drops
unsolicited inbound: only the relay (``natkit relay serve`` on wan) makes the service public.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench_p2p import RELAY, RelayProc
from bench_startup import precompile
from benchlib import (
    BenchError,
    Benchmark,
    CaseResult,
    Options,
    Report,
    Sample,
    interleaved_rounds,
    machine_info,
    now,
    ratio,
    token_for,
    token_server,
    venv_script,
)

from natkit.compat.ngrok_agent.launcher import natkit_ngrok_path
from natkit.lab import Lab, LabConfig, netns

NAME = "ngrok"
TOKEN = "bench-ngrok-token-0123456789abcdef"
RELAY_HOST = RELAY.rpartition(":")[0]
HTTP_PORT = 8080  # the relay's HTTP port (by Host)
SERVICE_PORT = 8080  # a listener on lan's loopback
NATKIT = venv_script("natkit")
LINE_TIMEOUT = 30.0
SRC = Path(__file__).resolve().parents[1] / "src"

PYNGROK_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
from pyngrok import conf, ngrok
cfg = conf.PyngrokConfig(ngrok_path=sys.argv[1], config_path=sys.argv[2])
t1 = time.perf_counter()
tunnel = ngrok.connect(int(sys.argv[3]), sys.argv[4], pyngrok_config=cfg)
t2 = time.perf_counter()
print(json.dumps({"public": tunnel.public_url, "import_ms": (t1 - t0) * 1000,
                  "connect_ms": (t2 - t1) * 1000}), flush=True)
sys.stdin.readline()
ngrok.kill(pyngrok_config=cfg)
"""
COMPAT_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
from natkit.compat import ngrok
t1 = time.perf_counter()
tunnel = ngrok.connect(int(sys.argv[1]), sys.argv[2])
t2 = time.perf_counter()
print(json.dumps({"public": tunnel.public_url, "import_ms": (t1 - t0) * 1000,
                  "connect_ms": (t2 - t1) * 1000}), flush=True)
sys.stdin.readline()
ngrok.kill()
"""


def lab_config(name: str) -> LabConfig:
    return LabConfig(name=name, portmap=frozenset())


class Ctx:
    def __init__(self, lab: Lab, state: Path) -> None:
        self.lab, self.state = lab, state
        self.env = {**os.environ, "NATKIT_STATE_DIR": str(state / "clients")}
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p
        )
        self.ngrok_path = natkit_ngrok_path(state)
        self.config = state / "ngrok.yml"
        self.config.write_text(
            f'version: "3"\nagent:\n  connect_url: {RELAY}\n  authtoken: {TOKEN}\n'
            "  web_addr: 127.0.0.1:0\n"
        )

    def popen(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self.lab.popen("lan", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env or self.env)  # fmt: skip

    def fetch(self, public: str) -> None:
        """The URL from wan through the relay must reach the service (untimed)."""
        scheme, _, rest = public.partition("://") if "://" in public else ("tcp", "", public)
        port = rest.rpartition(":")[2]

        def get() -> bytes:
            with socket.create_connection((RELAY_HOST, int(port)), timeout=5) as s:
                if scheme == "http":
                    s.sendall(f"GET / HTTP/1.1\r\nHost: {rest}\r\n\r\n".encode())
                return s.recv(100)

        got = netns.call_in(self.lab.netns("wan"), get)
        if got != token_for(SERVICE_PORT):
            raise BenchError(f"{public} from wan gave {got!r}, not the service's token")


def _first_line(
    proc: subprocess.Popen[bytes], accept: Callable[[dict[str, object]], bool]
) -> dict[str, object]:
    watchdog = threading.Timer(LINE_TIMEOUT, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        while line := proc.stdout.readline():
            with contextlib.suppress(ValueError):
                got = json.loads(line)
                if isinstance(got, dict) and accept(got):
                    return got
        err = proc.stderr.read().decode(errors="replace")[-300:] if proc.stderr else ""
        raise BenchError(f"ended (exit {proc.wait()}) before the public URL: {err}")
    finally:
        watchdog.cancel()


def _end(proc: subprocess.Popen[bytes], *, stdin_ends: bool) -> None:
    if stdin_ends and proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # the script kills its agent and exits
    else:
        proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _timed(ctx: Ctx, argv: list[str], accept: Callable[[dict[str, object]], bool],
           public_of: Callable[[dict[str, object]], str], script: bool,
           env: dict[str, str] | None = None) -> Sample:  # fmt: skip
    t0 = time.perf_counter()
    proc = ctx.popen(argv, env)
    try:
        got = _first_line(proc, accept)
        t1 = time.perf_counter()
        public = public_of(got)
        ctx.fetch(public)
    finally:
        _end(proc, stdin_ends=script)
    info: dict[str, object] = {"public": public}
    info.update({k: round(float(v), 1) for k, v in got.items() if k.endswith("_ms") and isinstance(v, (int, float))})  # type: ignore[arg-type]  # fmt: skip
    return Sample(t1 - t0, info=info)


def expose(kind: str) -> Callable[[Ctx], Sample]:
    def case(ctx: Ctx) -> Sample:
        argv = [NATKIT, "expose", str(SERVICE_PORT), "--via", "relay", "--relay", RELAY,
                "--token", TOKEN, "--json"] + (["--http"] if kind == "http" else [])  # fmt: skip
        return _timed(ctx, argv, lambda e: e.get("event") == "ready",
                      lambda e: str(e["public_address"]), script=False)  # fmt: skip

    return case


def pyngrok(kind: str) -> Callable[[Ctx], Sample]:
    def case(ctx: Ctx) -> Sample:
        argv = [sys.executable, "-c", PYNGROK_SCRIPT, ctx.ngrok_path, str(ctx.config),
                str(SERVICE_PORT), kind]  # fmt: skip
        return _timed(ctx, argv, lambda e: "public" in e, lambda e: str(e["public"]), script=True)

    return case


def compat(kind: str) -> Callable[[Ctx], Sample]:
    def case(ctx: Ctx) -> Sample:
        env = {**ctx.env, "NATKIT_RELAY": RELAY, "NATKIT_TOKEN": TOKEN}
        argv = [sys.executable, "-c", COMPAT_SCRIPT, str(SERVICE_PORT), kind]
        return _timed(ctx, argv, lambda e: "public" in e, lambda e: str(e["public"]),
                      script=True, env=env)  # fmt: skip

    return case


CASES: list[tuple[str, str, str, Callable[[Ctx], Sample]]] = [
    ("expose_tcp", "natkit expose --via relay --json → ready (tcp)", "subject", expose("tcp")),
    ("pyngrok_tcp", "pyngrok + natkit-ngrok: ngrok.connect(8080, 'tcp')", "subject", pyngrok("tcp")),
    ("expose_http", "natkit expose --via relay --http --json → ready", "subject", expose("http")),
    ("pyngrok_http", "pyngrok + natkit-ngrok: ngrok.connect(8080, 'http')", "subject", pyngrok("http")),
    ("compat_http", "natkit.compat.ngrok.connect(8080, 'http') (in process)", "subject", compat("http")),
]  # fmt: skip


def run(lab: Lab | None, opts: Options) -> Report:
    assert lab is not None
    started, t_start = now(), time.monotonic()
    byte_compiled = precompile()  # as a wheel install leaves it (see bench_startup)
    state = Path(tempfile.mkdtemp(prefix="nkb-ngrok-"))
    results = {key: CaseResult(key, label, kind) for key, label, kind, _ in CASES}
    http = ["--http-port", str(HTTP_PORT), "--domain", "lab.test"]
    relay = RelayProc(lab, state / "relay", TOKEN, http)
    try:
        with token_server(lab, "lan", "127.0.0.1") as local:
            local.listen(SERVICE_PORT)
            ctx = Ctx(lab, state)
            cases = {key: fn for key, _, _, fn in CASES}
            interleaved_rounds(opts, results, lambda key: cases[key](ctx))
    finally:
        relay.stop()

    def inner(key: str, field: str) -> str:
        values = sorted(float(s.info[field]) for s in results[key].samples if field in s.info)
        return f"{values[len(values) // 2]:.0f} ms" if values else "n/a"

    notes = [
        "Every case is a new process on lan under `ip netns exec`, timed from just before it "
        "starts until the public URL is printed; medians and p10–p90 of the timed samples, "
        "cases interleaved in rotating order in one run.",
        "Inside the scripts (medians): importing pyngrok "
        f"{inner('pyngrok_http', 'import_ms')}, ngrok.connect (natkit-ngrok started, its API "
        f"polled, the tunnel posted) {inner('pyngrok_http', 'connect_ms')} for http and "
        f"{inner('pyngrok_tcp', 'connect_ms')} for tcp; importing natkit.compat.ngrok "
        f"{inner('compat_http', 'import_ms')}, its connect {inner('compat_http', 'connect_ms')}.",
        f"A natkit relay serves on wan at {RELAY} (HTTP by Host on port {HTTP_PORT}); every "
        "client shares one state directory (the relay's certificate pinned in the warm-up). "
        f"Each URL is fetched from wan (untimed) and must reach the listener on lan's "
        f"127.0.0.1:{SERVICE_PORT}.",
        "lan's router offers no port mapping and drops unsolicited inbound traffic.",
        f"Byte-compiled first, as pip does when it installs a wheel: {byte_compiled}.",
    ]
    report = Report(
        name=NAME,
        title="Time to a public URL: pyngrok on natkit-ngrok vs natkit expose (lab)",
        started=started,
        machine=machine_info(),
        config={
            "iterations": opts.iterations,
            "warmup": opts.warmup,
            "lab": lab.cfg.name,
            "relay": RELAY,
        },
        cases=list(results.values()),
        ratios=[
            ratio(results, "pyngrok tcp / natkit expose tcp", "pyngrok_tcp", "expose_tcp"),
            ratio(results, "pyngrok http / natkit expose --http", "pyngrok_http", "expose_http"),
            ratio(
                results,
                "natkit.compat.ngrok http / natkit expose --http",
                "compat_http",
                "expose_http",
            ),
        ],
        goals=[],
        notes=notes,
        clients="natkit-ngrok (this tree), pyngrok " + _pyngrok_version(),
    )
    report.elapsed = time.monotonic() - t_start
    return report


def _pyngrok_version() -> str:
    try:
        from importlib.metadata import version

        return version("pyngrok")
    except Exception:
        return "(not installed)"


BENCHMARK = Benchmark(
    name=NAME,
    description="time to a public URL: pyngrok + natkit-ngrok vs natkit expose (lab)",
    lab_config=lab_config,
    run=run,
)
