"""What the HTTP tunnel's inspector costs: bench_relay's small-request case (wrk, 50
kept-alive connections against nginx's 13-byte answer) through a natkit HTTP tunnel
(relay + agent on 127.0.0.1, routed by Host), on both data paths: sealed (the default) and
``--plaintext-data`` (splice; a tapped read is peeked first), three ways each:

- ``--no-inspect``: no inspector at all;
- inspector on, nobody looking: ``--inspect-idle 1`` and no page or API use during the
  rounds, so capture has paused (what ``natkit expose --http`` costs once nobody has looked
  for ``--inspect-idle``, 10 minutes by default);
- inspector on, capturing: ``--inspect-idle 0`` (never pauses: as while a page is open),
  every exchange copied, parsed and kept.

Same run, interleaved rounds in rotating order.

``bench/run.py relay_inspect`` (``-n``: rounds, default 3); results in
results/relay_inspect.md and .json.
"""

from __future__ import annotations

import json
import re
import secrets
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench_relay import (
    LOOPBACK,
    SMALL_BODY,
    WRK_CONNS,
    WRK_SECONDS,
    WRK_THREADS,
    Env,
    RelayReport,
    Route,
    Table,
    _raise_nofile,
    _relay_machine,
    _steal_s,
    free_port,
)
from benchlib import BenchError, Benchmark, Options, Ratio, now, venv_script

NAME = "relay_inspect"
ROUNDS = 3
DOMAIN = "bench.test"
HOSTNAME = "web"
GOAL_COST = 0.95  # inspector on ≥ 95 % of --no-inspect's requests/s (the run-to-run noise)


MODES = {"off": "--no-inspect", "idle": "inspector on, nobody looking (paused)",
         "on": "inspector on, capturing"}  # fmt: skip


def _http_tunnel(env: Env, target: int, *, plaintext: bool, inspect: str) -> Route:
    """natkit relay serve (HTTP port) + natkit expose --http, inspector as ``inspect``."""
    mode = ("plain" if plaintext else "sealed") + ("" if inspect == "off" else f"_{inspect}")
    state = env.tmp / f"natkit-{mode}"
    state.mkdir()
    penv = {"NATKIT_STATE_DIR": str(state)}
    token = secrets.token_urlsafe(24)
    relay = env.start(f"relay-{mode}", [
        venv_script("natkit"), "relay", "serve", "--listen", f"{LOOPBACK}:{free_port()}",
        "--token", token, "--http-port", str(free_port()), "--domain", DOMAIN, "--no-stun",
        "--ports", "21100-21199", "--json"], penv)  # fmt: skip
    ready = json.loads(relay.wait_for(r"\{.*\"ready\".*\}").group(0))
    argv = [venv_script("natkit"), "expose", str(target), "--via", "relay", "--relay",
            str(ready["listen"]), "--token", token, "--http", "--hostname", HOSTNAME, "--json"]  # fmt: skip
    argv += ["--plaintext-data"] if plaintext else []
    if inspect == "off":
        argv.append("--no-inspect")
    else:
        argv += ["--inspect", f"{LOOPBACK}:{free_port()}",
                 "--inspect-idle", "1" if inspect == "idle" else "0"]  # fmt: skip
    agent = env.start(f"agent-{mode}", argv, penv)
    agent.wait_for(r"\{.*\"event\": \"ready\".*\}")
    info: dict[str, Any] = {}
    if inspect != "off":  # (its line follows ready's; none: not this checkout's natkit)
        found = agent.wait_for(r"\{.*\"event\": \"inspector\".*\}", timeout=5)
        info["inspector"] = json.loads(found.group(0))["url"]
    label = ("plaintext data (splice)" if plaintext else "sealed data") + ", " + MODES[inspect]
    return Route(f"natkit_{mode}", f"natkit HTTP tunnel, {label}", int(ready["http_port"]),
                 {"relay": relay, "agent": agent}, info)  # fmt: skip


def _wrk_host(port: int, seconds: float) -> dict[str, Any]:
    argv = ["wrk", "-t", str(WRK_THREADS), "-c", str(WRK_CONNS), "-d", f"{seconds:g}s",
            "-H", f"Host: {HOSTNAME}.{DOMAIN}", f"http://{LOOPBACK}:{port}/"]  # fmt: skip
    p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", p.stdout)
    total = re.search(r"(\d+) requests in", p.stdout)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", p.stdout)
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", p.stdout
    )
    if p.returncode != 0 or rps is None:
        raise BenchError(f"wrk exited {p.returncode}: {(p.stdout + p.stderr).strip()[-300:]}")
    errors = (sum(int(x) for x in sock.groups()) if sock else 0) + (
        int(non2xx.group(1)) if non2xx else 0
    )
    return {"rps": float(rps.group(1)), "requests": int(total.group(1)) if total else 0,
            "errors": errors}  # fmt: skip


def _captured(route: Route) -> int:
    """How many records the inspector holds now (it lists them all without a limit)."""
    url = route.info.get("inspector")
    if not url:
        return 0
    req = urllib.request.Request(f"{url}/api/requests/http?limit=100000")
    with urllib.request.urlopen(req, timeout=30) as resp:  # loopback only
        return len(json.loads(resp.read())["requests"])


def run(lab: Any, opts: Options) -> RelayReport:
    _raise_nofile()
    started, t0 = now(), time.monotonic()
    machine = _relay_machine()
    rounds = max(1, opts.iterations)
    steal0 = _steal_s()
    results: dict[str, list[dict[str, Any]]] = {}
    captured: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="nkb-inspect-") as tmp:
        env = Env(Path(tmp))
        try:
            web = env.nginx()
            paths = [_http_tunnel(env, web.port, plaintext=p, inspect=i)
                     for p in (False, True) for i in MODES]  # fmt: skip
            results = {p.key: [] for p in paths}
            print("  warm-up", flush=True)
            for p in paths:
                _wrk_host(p.port, 1)
            time.sleep(2.5)  # the idle inspectors pause (--inspect-idle 1, checked each second)
            for rnd in range(rounds):
                order = paths[rnd % len(paths) :] + paths[: rnd % len(paths)]
                print(f"  round {rnd + 1}/{rounds} (req/s):", end="", flush=True)
                for p in order:
                    cpu0, s0 = p.cpu(), _steal_s()
                    r = _wrk_host(p.port, WRK_SECONDS)
                    cpu1 = p.cpu()
                    r["cpu_s"] = {k: round(cpu1[k] - cpu0[k], 3) for k in cpu1}
                    r["steal_s"] = round(_steal_s() - s0, 3)
                    results[p.key].append(r)
                    print(f" {p.key}={r['rps']:,.0f}", end="", flush=True)
                print(flush=True)
            captured = {p.key: _captured(p) for p in paths}
            labels = {p.key: p.label for p in paths}
        finally:
            env.close()
    machine["steal_s"] = round(_steal_s() - steal0, 1)
    return _report(started, time.monotonic() - t0, machine, rounds, results, labels, captured)


def _report(started: Any, elapsed: float, machine: dict[str, Any], rounds: int,
            results: dict[str, list[dict[str, Any]]], labels: dict[str, str],
            captured: dict[str, int]) -> RelayReport:  # fmt: skip
    rows, ratios, goals = [], [], []
    med = {k: statistics.median(r["rps"] for r in rs) for k, rs in results.items()}

    def agent_us(rs: list[dict[str, Any]]) -> float:  # the agent's CPU per request
        return sum(r["cpu_s"]["agent"] for r in rs) / sum(r["requests"] for r in rs) * 1e6

    for key, rs in results.items():
        base = key.removesuffix("_idle").removesuffix("_on")
        per_round = [r["rps"] / b["rps"] for r, b in zip(rs, results[base], strict=True)]
        n = sum(r["requests"] for r in rs)
        cpu = {role: sum(r["cpu_s"][role] for r in rs) for role in rs[0]["cpu_s"]}
        cpu_ratio = agent_us(rs) / agent_us(results[base])
        rows.append([labels[key], f"{med[key]:,.0f}", f"{min(r['rps'] for r in rs):,.0f} – "
                     f"{max(r['rps'] for r in rs):,.0f}",
                     f"{statistics.median(per_round):.3f}" if key != base else "1",
                     " + ".join(f"{k} {v / n * 1e6:.1f}" for k, v in cpu.items()),
                     f"{cpu_ratio:.3f}" if key != base else "1",
                     str(sum(r["errors"] for r in rs)), f"{captured.get(key, 0):,}",
                     f"{sum(r['steal_s'] for r in rs) * 1000:.0f}"])  # fmt: skip
        if key != base:
            ratio = statistics.median(per_round)
            ratios.append(
                Ratio(
                    f"{labels[key]} / --no-inspect (requests/s per round, median)", key, base, ratio
                )
            )
            ratios.append(Ratio(f"{labels[key]} / --no-inspect (agent CPU per request)", key, base,
                                cpu_ratio))  # fmt: skip
            if key.endswith("_idle"):  # the goal: nobody looking costs nothing measurable
                goals.append((f"{labels[key]}: ≥ {GOAL_COST:g}x the requests/s of --no-inspect",
                              ratio >= GOAL_COST))  # fmt: skip
                goals.append((f"{labels[key]}: agent CPU per request ≤ {1 / GOAL_COST:.2f}x "
                              "--no-inspect's", cpu_ratio <= 1 / GOAL_COST))  # fmt: skip
    table = Table(
        "inspect_wrk", "Small requests through an HTTP tunnel, inspector off and on",
        ["path", "median req/s", "min – max req/s", "/ --no-inspect (per round, median)",
         "tunnel CPU µs/request", "agent CPU / --no-inspect's", "errors",
         "records held after the run", "hypervisor steal ms"],
        rows,
        intro=f"nginx answers every GET with a {len(SMALL_BODY)}-byte body; wrk: {WRK_CONNS} "
        f"kept-alive connections, {WRK_THREADS} thread, {WRK_SECONDS} s; {rounds} rounds, "
        "interleaved in rotating order after an untimed warm-up. Capturing: every exchange "
        "copied, parsed and kept (ring buffer of 32 MiB). Records held: what the inspector "
        "lists after the run (the paused ones hold the warm-up's, from before they paused). "
        "The machine is shared: requests/s vary from round to round with the other load; the "
        "CPU the agent spends per request does not.",
    )  # fmt: skip
    return RelayReport(
        name=NAME, title="The HTTP tunnel's inspector: what capture costs (wrk, small requests)",
        started=started, machine=machine,
        config={"rounds": rounds, "wrk_connections": WRK_CONNS, "wrk_seconds": WRK_SECONDS,
                "host": LOOPBACK},
        cases=[], ratios=ratios, goals=goals, notes=[], elapsed=elapsed, tables=[table],
        data={"results": results, "median_rps": med, "captured": captured},
    )  # fmt: skip


BENCHMARK = Benchmark(
    name=NAME,
    description="the HTTP tunnel's inspector: wrk small requests through natkit --http with "
    "--no-inspect and with the inspector on, sealed and plaintext (-n: rounds, default 3)",
    lab_config=None,
    run=run,
    iterations=ROUNDS,
    default=False,
)
