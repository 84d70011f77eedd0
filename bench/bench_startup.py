"""Ready in a blink: whole-process start-up of natkit's commands in the lab, beside their peers.

Every iteration starts a new process in a lab namespace (``ip netns exec``, interpreter start
and imports included) and times it from just before the start to the point a user waits for:

- ``natkit --version`` until it exits, beside the interpreter alone (``python -c pass``),
  ``upnpc --help`` and ``natpmpc -h`` (C programs: the floor of a start-up).
- ``natkit map add PORT --via upnp --json`` until it exits, beside Debian ``upnpc -a`` and a
  script with the PyPI ``miniupnpc`` binding (discover, selectigd, addportmapping). Each mapping
  is deleted again, untimed.
- ``natkit expose PORT --relay … --json`` on lan2, whose router offers no mapping, until its
  first ``ready`` line (the relay's public address); the process is stopped, untimed.
- ``natkit p2p connect NAME --relay … --json`` on lan until its ``ready`` line, with
  ``natkit p2p listen NAME`` already waiting on lan2 (both NATs eim: the direct path).

Cases are interleaved in rotating order so they share the machine's noise. The lab: rtr offers
UPnP, NAT-PMP and PCP; rtr2 offers nothing; a ``natkit relay serve`` runs on wan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench_p2p import NATKIT, RELAY, SECRET, TOKEN, RelayProc
from benchlib import (
    BenchError,
    Benchmark,
    CaseResult,
    Options,
    Report,
    Sample,
    Section,
    interleaved_rounds,
    machine_info,
    now,
    ratio,
    token_server,
)

from natkit.lab import Lab, LabConfig, netns
from natkit.lab import config as C
from natkit.portmap.upnp import UPnPMapper

NAME = "startup"
LEASE = 3600
FIRST_PORT = 31000
EXPOSE_PORT = 8080  # a listener on lan2's loopback: expose finds a live local service
LINE_TIMEOUT = 30.0  # seconds a process may take to print the line we wait for
GOALS_MS = {"version": 60.0, "map_add": 200.0, "expose": 500.0, "p2p": 1000.0}

BINDING_SCRIPT = """
import sys, miniupnpc
port = int(sys.argv[1])
u = miniupnpc.UPnP()
u.discoverdelay = 200
u.discover()
u.selectigd()
u.addportmapping(port, "TCP", u.lanaddr, port, "nkb binding", "", 3600)
print(u.externalipaddress(), port)
"""
UPNPC_REDIRECT = re.compile(r"external (\S+):(\d+) TCP is redirected to internal")


def lab_config(name: str) -> LabConfig:
    return LabConfig(name=name, second_lan=True, portmap2=frozenset())


@dataclasses.dataclass
class Ctx:
    lab: Lab
    admin: UPnPMapper  # deletes the mappings made by the map add cases (untimed)
    env: dict[str, str]  # natkit's processes: one state directory (the relay's pin)
    rooms: itertools.count[int] = dataclasses.field(default_factory=itertools.count)

    def delete(self, port: int) -> None:
        admin = self.admin
        with contextlib.suppress(Exception):
            netns.run_in(self.lab.netns("lan"), lambda: admin.delete(port, "tcp"))


CaseFn = Callable[[Ctx, int], Sample]


@dataclasses.dataclass(frozen=True)
class Case:
    key: str
    label: str
    kind: str
    section: str  # which figure of the issue it belongs to
    fn: CaseFn


# ---- until exit -----------------------------------------------------------------------------


def _exits(node: str, argv: list[str], ok_codes: tuple[int, ...] = (0,)) -> CaseFn:
    def case(ctx: Ctx, port: int) -> Sample:
        t0 = time.perf_counter()
        proc = ctx.lab.run(node, argv, env=ctx.env, timeout=LINE_TIMEOUT)
        t1 = time.perf_counter()
        if proc.returncode not in ok_codes:
            raise BenchError(f"{argv[0]} exited {proc.returncode}: {proc.stderr.strip()[-200:]}")
        return Sample(t1 - t0)

    return case


def _mapping(argv_of: Callable[[int], list[str]], parse: Callable[[str], str]) -> CaseFn:
    """A new process that maps ``port`` on rtr; the mapping is checked and deleted, untimed."""

    def case(ctx: Ctx, port: int) -> Sample:
        try:
            t0 = time.perf_counter()
            proc = ctx.lab.run("lan", argv_of(port), env=ctx.env, timeout=LINE_TIMEOUT)
            t1 = time.perf_counter()
            if proc.returncode != 0:
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-2:]
                raise BenchError(f"exited {proc.returncode}: {' | '.join(tail)}")
            public = parse(proc.stdout)
            if not public.startswith(f"{C.RTR_WAN_IP}:"):
                raise BenchError(f"mapped to {public!r}, not on {C.RTR_WAN_IP}")
        finally:
            ctx.delete(port)
        return Sample(t1 - t0, info={"public": public})

    return case


def _natkit_map_public(out: str) -> str:
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    done = [e for e in events if "external_port" in e]
    if not done:
        raise BenchError(f"no mapping in natkit's output: {out.strip()[-200:]!r}")
    return f"{done[-1]['external_ip']}:{done[-1]['external_port']}"


def _upnpc_public(out: str) -> str:
    found = UPNPC_REDIRECT.search(out)
    if found is None:
        raise BenchError(f"upnpc did not report a redirect: {out.strip()[-200:]!r}")
    return f"{found.group(1)}:{found.group(2)}"


def _binding_public(out: str) -> str:
    ip, port = out.split()
    return f"{ip}:{port}"


# ---- until a line -------------------------------------------------------------------------


def _start(ctx: Ctx, node: str, argv: list[str]) -> subprocess.Popen[bytes]:
    return ctx.lab.popen(node, argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ctx.env)


def _until_event(proc: subprocess.Popen[bytes], event: str) -> dict[str, object]:
    """Read JSON lines until one with ``event``; the process is killed after LINE_TIMEOUT."""
    watchdog = threading.Timer(LINE_TIMEOUT, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        while line := proc.stdout.readline():
            with contextlib.suppress(ValueError):
                got = json.loads(line)
                seen.append(str(got.get("event")))
                if got.get("event") == event:
                    return dict(got)
        raise BenchError(f"ended (exit {proc.wait()}) before {event!r}; saw {seen}")
    finally:
        watchdog.cancel()


def _stop(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def natkit_expose(ctx: Ctx, port: int) -> Sample:
    argv = [NATKIT, "expose", str(EXPOSE_PORT), "--relay", RELAY, "--token", TOKEN, "--json"]
    t0 = time.perf_counter()
    proc = _start(ctx, "lan2", argv)
    try:
        ready = _until_event(proc, "ready")
        t1 = time.perf_counter()
    finally:
        _stop(proc)
    if ready.get("method") != "relay":
        raise BenchError(f"expose was ready by {ready.get('method')!r}, not the relay")
    return Sample(t1 - t0, info={"public": ready.get("public_address")})


def natkit_p2p(ctx: Ctx, port: int) -> Sample:
    room = f"s{next(ctx.rooms)}"
    common = ["--relay", RELAY, "--token", TOKEN, "--secret", SECRET, "--no-portmap", "--json"]
    listen = _start(ctx, "lan2", [NATKIT, "p2p", "listen", room, *common, "--allow", "5201"])
    connect: subprocess.Popen[bytes] | None = None
    try:
        _until_event(listen, "waiting")  # untimed: the peer is there before connect starts
        argv = [NATKIT, "p2p", "connect", room, *common, "--forward", f"{port}:5201"]
        t0 = time.perf_counter()
        connect = _start(ctx, "lan", argv)
        ready = _until_event(connect, "ready")
        t1 = time.perf_counter()
    finally:
        _stop(listen, *([connect] if connect else []))
    if ready.get("path") != "direct":
        raise BenchError(f"the session took the path {ready.get('path')!r}, not direct")
    return Sample(t1 - t0, info={"path": ready.get("path"), "elapsed_ms": ready.get("elapsed_ms")})


# ---- the cases ------------------------------------------------------------------------------


def cases() -> list[Case]:
    py = sys.executable
    found = [
        Case(
            "version",
            "natkit --version",
            "subject",
            "version",
            _exits("lan", [NATKIT, "--version"]),
        ),
        Case(
            "python",
            "floor: python -c pass (natkit's interpreter)",
            "baseline",
            "version",
            _exits("lan", [py, "-c", "pass"]),
        ),
        Case(
            "netns_true",
            "floor: ip netns exec lan true",
            "baseline",
            "version",
            _exits("lan", ["true"]),
        ),
    ]
    if shutil.which("upnpc"):
        found.append(
            Case(
                "upnpc_help",
                "upnpc --help (C)",
                "reference",
                "version",
                _exits("lan", ["upnpc", "--help"], ok_codes=(0, 1)),
            )
        )
    if shutil.which("natpmpc"):
        found.append(
            Case(
                "natpmpc_help",
                "natpmpc -h (C)",
                "reference",
                "version",
                _exits("lan", ["natpmpc", "-h"]),
            )
        )

    def natkit_map(port: int) -> list[str]:
        return [
            NATKIT,
            "map",
            "add",
            str(port),
            "--via",
            "upnp",
            "--lease",
            str(LEASE),
            "--description",
            "nkb startup",
            "--json",
        ]

    found.append(
        Case(
            "map_add",
            "natkit map add --via upnp --json",
            "subject",
            "map_add",
            _mapping(natkit_map, _natkit_map_public),
        )
    )
    if shutil.which("upnpc"):
        found.append(
            Case(
                "upnpc_add",
                "upnpc -a (Debian C client)",
                "reference",
                "map_add",
                _mapping(
                    lambda p: [
                        "upnpc",
                        "-e",
                        "nkb upnpc",
                        "-a",
                        C.LAN_IP,
                        str(p),
                        str(p),
                        "TCP",
                        str(LEASE),
                    ],
                    _upnpc_public,
                ),
            )
        )
    found += [
        Case(
            "binding_add",
            "python script, PyPI miniupnpc binding (discoverdelay 200)",
            "reference",
            "map_add",
            _mapping(lambda p: [py, "-c", BINDING_SCRIPT, str(p)], _binding_public),
        ),
        Case(
            "expose",
            "natkit expose --relay --json → ready (rtr2: no mapping)",
            "subject",
            "expose",
            natkit_expose,
        ),
        Case(
            "p2p",
            "natkit p2p connect --json → ready (direct, listen waiting)",
            "subject",
            "p2p",
            natkit_p2p,
        ),
    ]
    return found


SECTIONS = {
    "map_add": "natkit map add --via upnp --json until it exits, beside the peers",
    "expose": "natkit expose --relay … --json until its first ready line",
    "p2p": "natkit p2p connect --json until its ready line (direct path)",
}


def precompile() -> str:
    """Byte-compile natkit and its dependencies where they are installed; say where."""
    import compileall
    import sysconfig

    import natkit

    places = [str(Path(natkit.__file__).parent), sysconfig.get_paths()["purelib"]]
    for place in places:
        compileall.compile_dir(place, quiet=1)
    return ", ".join(places)


def run(lab: Lab | None, opts: Options) -> Report:
    assert lab is not None
    started, t_start = now(), time.monotonic()
    byte_compiled = precompile()
    state = Path(tempfile.mkdtemp(prefix="nkb-startup-"))
    env = {**os.environ, "NATKIT_STATE_DIR": str(state / "clients")}
    all_cases = cases()
    results = {c.key: CaseResult(c.key, c.label, c.kind) for c in all_cases}
    ports = itertools.count(FIRST_PORT)
    admin = netns.run_in(lab.netns("lan"), UPnPMapper.discover)
    relay = RelayProc(lab, state / "relay")
    try:
        with token_server(lab, "lan2", "127.0.0.1") as local:
            local.listen(EXPOSE_PORT)
            ctx = Ctx(lab, admin, env)
            by_key = {c.key: c for c in all_cases}
            interleaved_rounds(opts, results, lambda key: by_key[key].fn(ctx, next(ports)))
    finally:
        relay.stop()
        admin.close()

    def in_section(name: str) -> list[CaseResult]:
        return [results[c.key] for c in all_cases if c.section == name]

    goals = []
    for key, goal_ms in GOALS_MS.items():
        st = results[key].stats
        goals.append(
            (
                f"{results[key].label} median ≤ {goal_ms:.0f} ms",
                st is not None and st.median * 1000 <= goal_ms,
            )
        )
    ratios = [ratio(results, "natkit --version / python -c pass", "version", "python")]
    if "upnpc_add" in results:
        ratios.append(ratio(results, "upnpc -a / natkit map add", "upnpc_add", "map_add"))
    ratios.append(
        ratio(results, "miniupnpc binding script / natkit map add", "binding_add", "map_add")
    )
    p2p_inner = [s.info.get("elapsed_ms") for s in results["p2p"].samples]
    notes = [
        "Every case is a new process under `ip netns exec` (lan, or lan2 for expose and the "
        "p2p listener), timed from just before it is started; medians and p10–p90 of the timed "
        "samples, all cases interleaved in rotating order in one run.",
        f"map add: TCP, external = internal port, lease {LEASE} s; each client's output must "
        f"name a mapping on {C.RTR_WAN_IP}; the mapping is deleted after each sample (untimed).",
        "expose: on lan2, whose router rtr2 offers no UPnP, NAT-PMP or PCP, with a listener on "
        f"127.0.0.1:{EXPOSE_PORT}; timed to the first `ready` line (method relay), then stopped.",
        "p2p: `natkit p2p listen` on lan2 waits (its `waiting` line, untimed) before `natkit p2p "
        "connect --no-portmap` starts on lan; timed to connect's `ready` line, which must say "
        f"path direct. natkit's own elapsed_ms in those lines: {p2p_inner}.",
        "upnpc -a (Debian miniupnpc 2.2.4) waits out its SSDP discovery delay (about 2 s "
        "here); the binding script runs with discoverdelay=200 as in the upnp benchmark.",
        f"A natkit relay serves on wan at {RELAY}; every natkit process shares one state "
        "directory (the relay's certificate pinned on first use).",
        f"Byte-compiled first, as pip does when it installs a wheel: {byte_compiled}. (An "
        "editable install under PYTHONDONTWRITEBYTECODE, as on this machine, would otherwise "
        "compile every natkit module on every start: ~40 ms more.)",
    ]
    report = Report(
        name=NAME,
        title="Ready in a blink: whole-process start-up of natkit commands vs peers (lab)",
        started=started,
        machine=machine_info(),
        config={
            "iterations": opts.iterations,
            "warmup": opts.warmup,
            "lab": lab.cfg.name,
            "relay": RELAY,
            "goals_ms": GOALS_MS,
        },
        cases=in_section("version"),
        ratios=ratios,
        goals=goals,
        notes=notes,
        sections=[Section(k, title, in_section(k)) for k, title in SECTIONS.items()],
    )
    report.elapsed = time.monotonic() - t_start
    return report


BENCHMARK = Benchmark(
    name=NAME,
    description="whole-process start-up: --version, map add, expose → ready, p2p connect → ready",
    lab_config=lab_config,
    run=run,
)
