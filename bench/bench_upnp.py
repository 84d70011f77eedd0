"""UPnP IGD: time from nothing to a working port mapping (discover + add), in the lab.

natkit against the reference client people use from Python, the PyPI ``miniupnpc`` binding
(``discoverdelay=200``), and the binding's own calls on natkit's drop-in for it
(``natkit.compat.miniupnpc``), in the same run and interleaved, so all share the machine's
noise. Every mapping is proved to work (a TCP connection from the lab's "Internet" reaches
a listener on the LAN host through it) and deleted again, outside the timed region.

In-process cases run each iteration on a new thread inside the LAN namespace, with a new
event loop (natkit) or a new ``miniupnpc.UPnP`` object (binding): nothing is carried over
but the imported modules. The "new process" cases start a whole program per iteration
(``natkit map add`` and Debian's ``upnpc -a``), interpreter start included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from typing import Any

from benchlib import (
    BenchError,
    Benchmark,
    CaseResult,
    Options,
    Report,
    Sample,
    TokenServer,
    fetch_token,
    interleaved_rounds,
    machine_info,
    now,
    ratio,
    router_has_forward,
    token_for,
    token_server,
    venv_script,
)

from natkit.api import open_port_async
from natkit.lab import Lab, LabConfig, netns
from natkit.lab import config as C
from natkit.portmap import ssdp
from natkit.portmap.upnp import UPnPMapper

NAME = "upnp"
LEASE = 3600  # seconds, the same for every client (natkit's default)
DISCOVER_DELAY_MS = 200  # the binding's discoverdelay, as in the seed
FIRST_PORT = 30000
MINISSDPD_SOCKETS = ("/var/run/minissdpd.sock", "/run/minissdpd.sock")
NATKIT_GOAL_MS = 100.0
RATIO_GOAL = 10.0


def lab_config(name: str) -> LabConfig:
    return LabConfig(name=name)  # UPnP, NAT-PMP and PCP, endpoint-independent NAT


@dataclasses.dataclass
class Ctx:
    lab: Lab
    tokens: TokenServer
    admin: UPnPMapper  # deletes mappings made by the subprocess cases (untimed)
    minissdpd_socket: str | None  # None: the binding's default (no minissdpd on this host)

    @property
    def lan(self) -> str:
        return self.lab.netns("lan")

    def verify(self, external_ip: str, external_port: int, internal_port: int) -> None:
        """Prove the mapping works: from wan, its public address reaches our LAN listener."""
        if external_ip != C.RTR_WAN_IP:
            raise BenchError(f"mapping reports external IP {external_ip!r}, not {C.RTR_WAN_IP}")
        try:
            got = fetch_token(self.lab, "wan", external_ip, external_port)
        except OSError as exc:
            raise BenchError(
                f"{external_ip}:{external_port} is not reachable from wan: {exc}"
            ) from None
        if got != token_for(internal_port):
            raise BenchError(f"{external_ip}:{external_port} answered {got!r}, not our listener")

    def admin_delete(self, port: int) -> None:
        admin = self.admin
        netns.run_in(self.lan, lambda: admin.delete(port, "tcp"))


CaseFn = Callable[[Ctx, int], Sample]


@dataclasses.dataclass(frozen=True)
class Case:
    key: str
    label: str
    kind: str
    fn: CaseFn
    maps: bool = True  # makes a mapping of the given port (so: listen, verify, clean up)
    note: str = ""


# ---- natkit, in process -------------------------------------------------------------------


def natkit_mapper(ctx: Ctx, port: int) -> Sample:
    async def once() -> Sample:
        t0 = time.perf_counter()
        mapper = await UPnPMapper.discover()
        t1 = time.perf_counter()
        m = await mapper.add(port, lease=LEASE, description="nkb natkit")
        t2 = time.perf_counter()
        try:
            ctx.verify(m.external_ip, m.external_port, port)
        finally:
            await mapper.remove(m)
            mapper.close()
        return Sample(
            t2 - t0,
            {"discover": t1 - t0, "add": t2 - t1},
            {"method": m.method, "public": m.public_address, "lease": m.lease},
        )

    return netns.run_in(ctx.lan, once)


def natkit_open_port(via: str) -> CaseFn:
    def case(ctx: Ctx, port: int) -> Sample:
        async def once() -> Sample:
            t0 = time.perf_counter()
            handle = await open_port_async(port, lease=LEASE, via=via, description="nkb open")
            t1 = time.perf_counter()
            try:
                m = handle.mapping
                ctx.verify(m.external_ip, m.external_port, port)
            finally:
                await handle.close()
            return Sample(
                t1 - t0, {}, {"method": m.method, "public": m.public_address, "lease": m.lease}
            )

        return netns.run_in(ctx.lan, once)

    return case


# ---- the miniupnpc binding, in process ----------------------------------------------------


def binding(ctx: Ctx, port: int) -> Sample:
    import miniupnpc  # the reference; imported here so natkit's own cases never touch it

    return _tutorial(ctx, port, miniupnpc, "nkb binding")


def compat(ctx: Ctx, port: int) -> Sample:
    from natkit.compat import miniupnpc  # the same script on natkit's drop-in

    return _tutorial(ctx, port, miniupnpc, "nkb compat")


def _tutorial(ctx: Ctx, port: int, module: Any, description: str) -> Sample:
    """The binding's tutorial (discover, selectigd, addportmapping) with ``module``."""

    def once() -> Sample:
        kw = {"minissdpdsocket": ctx.minissdpd_socket} if ctx.minissdpd_socket else {}
        t0 = time.perf_counter()
        u = module.UPnP(**kw)
        u.discoverdelay = DISCOVER_DELAY_MS
        devices = u.discover()
        t1 = time.perf_counter()
        u.selectigd()
        t2 = time.perf_counter()
        # AddPortMapping(ext port, proto, internal host, internal port, desc, remote host, lease)
        u.addportmapping(port, "TCP", u.lanaddr, port, description, "", LEASE)
        t3 = time.perf_counter()
        try:
            ext_ip = u.externalipaddress()
            ctx.verify(ext_ip, port, port)
        finally:
            u.deleteportmapping(port, "TCP")
        return Sample(
            t3 - t0,
            {"discover": t1 - t0, "selectigd": t2 - t1, "add": t3 - t2},
            {"devices": devices, "public": f"{ext_ip}:{port}", "lanaddr": u.lanaddr},
        )

    return netns.call_in(ctx.lan, once)


# ---- whole programs, one process per mapping ----------------------------------------------


def natkit_cli(ctx: Ctx, port: int) -> Sample:
    argv = [venv_script("natkit"), "map", "add", str(port), "--via", "upnp"]
    argv += ["--lease", str(LEASE), "--description", "nkb cli", "--json"]
    t0 = time.perf_counter()
    proc = ctx.lab.run("lan", argv)
    t1 = time.perf_counter()
    try:
        if proc.returncode != 0:
            raise BenchError(f"natkit map add exited {proc.returncode}: {proc.stderr.strip()}")
        m = json.loads(proc.stdout)
        ctx.verify(str(m["external_ip"]), int(m["external_port"]), port)
    finally:
        with contextlib.suppress(Exception):
            ctx.admin_delete(port)
    return Sample(t1 - t0, {}, {"method": m["method"], "public": m["public_address"]})


UPNPC_REDIRECT = re.compile(r"external (\S+):(\d+) TCP is redirected to internal (\S+):(\d+)")


def upnpc(ctx: Ctx, port: int) -> Sample:
    argv = ["upnpc", "-e", "nkb upnpc", "-a", C.LAN_IP, str(port), str(port), "TCP", str(LEASE)]
    t0 = time.perf_counter()
    proc = ctx.lab.run("lan", argv)
    t1 = time.perf_counter()
    try:
        found = UPNPC_REDIRECT.search(proc.stdout)
        if proc.returncode != 0 or found is None:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            raise BenchError(f"upnpc -a failed ({proc.returncode}): {' | '.join(tail)}")
        ctx.verify(found.group(1), int(found.group(2)), port)
    finally:
        with contextlib.suppress(Exception):
            ctx.admin_delete(port)
    return Sample(t1 - t0, {}, {"public": f"{found.group(1)}:{found.group(2)}"})


def baseline_netns_exec(ctx: Ctx, port: int) -> Sample:
    t0 = time.perf_counter()
    proc = ctx.lab.run("lan", ["true"])
    t1 = time.perf_counter()
    if proc.returncode != 0:
        raise BenchError(f"ip netns exec … true exited {proc.returncode}")
    return Sample(t1 - t0)


def baseline_ssdp(ctx: Ctx, port: int) -> Sample:
    """One unicast M-SEARCH to the router, timed to its first answer: no client does better."""

    def once() -> Sample:
        msg = ssdp.build_msearch(ssdp.IGD_SEARCH_TARGETS[1], host=f"{C.RTR_LAN_IP}:1900")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((C.LAN_IP, 0))
            s.settimeout(2.0)
            t0 = time.perf_counter()
            s.sendto(msg, (C.RTR_LAN_IP, ssdp.SSDP_PORT))
            s.recvfrom(4096)
            t1 = time.perf_counter()
        return Sample(t1 - t0)

    return netns.call_in(ctx.lan, once)


def baseline_natkit_start(ctx: Ctx, port: int) -> Sample:
    t0 = time.perf_counter()
    proc = ctx.lab.run("lan", [venv_script("natkit"), "--version"])
    t1 = time.perf_counter()
    if proc.returncode != 0:
        raise BenchError(f"natkit --version exited {proc.returncode}")
    return Sample(t1 - t0)


def cases() -> list[Case]:
    found = [
        Case("natkit", "natkit UPnPMapper.discover() + add()", "subject", natkit_mapper),
        Case(
            "natkit_open_port",
            "natkit open_port_async(via='upnp')",
            "subject",
            natkit_open_port("upnp"),
        ),
        Case(
            "natkit_open_port_auto",
            "natkit open_port_async() (auto)",
            "subject",
            natkit_open_port("auto"),
            note="via='auto' asks PCP, NAT-PMP and UPnP at once and prefers PCP",
        ),
        Case(
            "binding",
            f"miniupnpc binding discover+selectigd+add (delay {DISCOVER_DELAY_MS})",
            "reference",
            binding,
        ),
        Case(
            "compat",
            "natkit.compat.miniupnpc: the same discover+selectigd+add",
            "subject",
            compat,
            note="the binding's own calls, on natkit's drop-in (import changed, nothing else)",
        ),
        Case("natkit_cli", "new process: natkit map add --via upnp", "subject", natkit_cli),
    ]
    if shutil.which("upnpc"):
        found.append(Case("upnpc", "new process: upnpc -a (Debian C client)", "reference", upnpc))
    found += [
        Case(
            "baseline_ssdp",
            "floor: raw M-SEARCH → router's first answer",
            "baseline",
            baseline_ssdp,
            maps=False,
            note="one unicast M-SEARCH (ST InternetGatewayDevice:1) on a plain socket, "
            "timed to the router's first reply: miniupnpd's own answer delay, a floor for "
            "any SSDP discovery here",
        ),
        Case(
            "baseline_netns_exec",
            "floor: ip netns exec lan true",
            "baseline",
            baseline_netns_exec,
            maps=False,
        ),
        Case(
            "baseline_natkit_start",
            "floor: natkit --version (new process)",
            "baseline",
            baseline_natkit_start,
            maps=False,
        ),
    ]
    return found


def _run_case(ctx: Ctx, case: Case, port: int) -> Sample:
    if case.maps:
        ctx.tokens.listen(port)
    try:
        sample = case.fn(ctx, port)
    except BaseException:
        if case.maps:
            with contextlib.suppress(Exception):
                ctx.admin_delete(port)  # leave nothing behind for the next case
        raise
    if case.maps and router_has_forward(ctx.lab, port, C.LAN_IP, port):
        raise BenchError(f"the mapping of port {port} was not deleted")
    return sample


def run(lab: Lab, opts: Options) -> Report:
    started = now()
    t_start = time.monotonic()
    machine = machine_info()
    minissdpd = next((p for p in MINISSDPD_SOCKETS if os.path.exists(p)), None)
    notes = [
        "Timed: from nothing to a mapping the router has confirmed. In-process cases: each "
        "iteration on a new thread in the LAN namespace with a new asyncio loop (natkit) or a "
        "new `miniupnpc.UPnP()` (binding); the modules are already imported. New-process "
        "cases: the whole program under `ip netns exec`, interpreter start included.",
        f"Every client asks for the same mapping: TCP, external port = internal port, lease "
        f"{LEASE} s. Untimed after each: a TCP connection from wan to the public address "
        "must reach a listener on the LAN host, then the mapping is deleted and checked gone "
        "from the router's nftables.",
        f"The binding (PyPI `miniupnpc`) runs `discover()` with `discoverdelay={DISCOVER_DELAY_MS}`, "
        "then `selectigd()` and `addportmapping(...)`, as in the seed.",
        "Ratios are medians of the same run (interleaved, rotating order).",
        "p10/p90: deciles of the timed samples (inclusive method).",
    ]
    if minissdpd:
        notes.append(
            f"{minissdpd} exists on this host: the binding was pointed away from it "
            "(it would list the host's devices)."
        )

    all_cases = cases()
    results = {c.key: CaseResult(c.key, c.label, c.kind, c.note) for c in all_cases}
    ports = itertools.count(FIRST_PORT)

    admin = netns.run_in(lab.netns("lan"), UPnPMapper.discover)
    with token_server(lab, "lan", C.LAN_IP) as tokens:
        ctx = Ctx(lab, tokens, admin, "/nonexistent/minissdpd.sock" if minissdpd else None)
        by_key = {c.key: c for c in all_cases}
        interleaved_rounds(opts, results, lambda key: _run_case(ctx, by_key[key], next(ports)))

    ordered = [results[c.key] for c in all_cases]
    for res in ordered:  # say which protocol "auto" chose
        methods = sorted({str(s.info["method"]) for s in res.samples if "method" in s.info})
        if res.key == "natkit_open_port_auto" and methods:
            res.label += f" → {'/'.join(methods)}"
    ratios = [
        ratio(results, "miniupnpc binding / natkit (discover + add)", "binding", "natkit"),
        ratio(
            results,
            "miniupnpc binding / natkit open_port_async(via='upnp')",
            "binding",
            "natkit_open_port",
        ),
    ]
    compat_ratio = ratio(
        results,
        "miniupnpc binding / natkit.compat.miniupnpc (same discover+selectigd+add)",
        "binding",
        "compat",
    )
    ratios.append(compat_ratio)
    if "upnpc" in results:
        ratios.append(
            ratio(results, "upnpc / natkit map add (new process each)", "upnpc", "natkit_cli")
        )
    nk = results["natkit"].stats
    headline = ratios[0].value
    goals = [
        (
            f"natkit discover + add median under {NATKIT_GOAL_MS:.0f} ms",
            nk is not None and nk.median * 1000 < NATKIT_GOAL_MS,
        ),
        (
            f"binding / natkit at least {RATIO_GOAL:.0f}x",
            headline is not None and headline >= RATIO_GOAL,
        ),
        (
            f"binding / natkit.compat.miniupnpc at least {RATIO_GOAL:.0f}x",
            compat_ratio.value is not None and compat_ratio.value >= RATIO_GOAL,
        ),
    ]
    report = Report(
        name=NAME,
        title="UPnP IGD: nothing → working mapping (discover + add), natkit vs miniupnpc",
        started=started,
        machine=machine,
        config={
            "iterations": opts.iterations,
            "warmup": opts.warmup,
            "lease_s": LEASE,
            "binding_discoverdelay_ms": DISCOVER_DELAY_MS,
            "lab": lab.cfg.name,
            "router_upnp": f"http://{C.RTR_LAN_IP}:{lab.cfg.upnp_port}/rootDesc.xml",
            "lan_ip": C.LAN_IP,
            "wan_ip": C.RTR_WAN_IP,
        },
        cases=ordered,
        ratios=ratios,
        goals=goals,
        notes=notes + [f"{c.label}: {c.note}" for c in ordered if c.note],
    )
    report.elapsed = time.monotonic() - t_start
    return report


BENCHMARK = Benchmark(
    name=NAME,
    description="UPnP IGD discover + add: natkit vs the PyPI miniupnpc binding (and CLIs)",
    lab_config=lab_config,
    run=run,
)
