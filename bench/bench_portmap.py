"""PCP, NAT-PMP and UPnP: nothing → working mapping, and router reboot → reachable again.

Part 1, in the LAN namespace, interleaved like ``bench_upnp``: natkit's
``open_port_async(port, via=V)`` for V in auto (all three offered), pcp, natpmp and upnp,
timed until it returns (closing is untimed), and ``probe()`` + ``add()`` to split auto into
its phases; against Debian's ``natpmpc`` (a new process per mapping, so natkit's own
``natkit map add --via natpmp`` is timed as a new process too) and the PyPI ``miniupnpc``
binding (``bench_upnp``'s case, ``discoverdelay=200``). Every mapping is proved to work from
the lab's "Internet" and deleted again, untimed.

Part 2: a ``KeptMapping`` (lease 120 s) per protocol on the LAN host; the router reboots
(``Lab.reboot_router``: miniupnpd restarts, nftables and conntrack are flushed) and we time
from the start of the reboot until a TCP connection from wan to the public address reaches
the LAN listener again, polling every 20 ms, and note when the keeper said "lost" and
"restored".

Part 3: a silent loss. The lab's miniupnpd is switched to ``system_uptime=yes`` (OpenWrt's
default: the NAT-PMP/PCP epoch is the machine's uptime) and restarted as a service
(``Lab.restart_router_daemon``: every mapping gone, the epoch runs on). A ``KeptMapping``
with natkit's default settings per protocol; timed from the restart until a TCP connection
from wan reaches the LAN listener again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import random
import re
import selectors
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import bench_upnp
from benchlib import (
    BenchError,
    Benchmark,
    CaseResult,
    Options,
    Report,
    Sample,
    Section,
    TokenServer,
    deb_version,
    machine_info,
    now,
    ratio,
    router_has_forward,
    token_for,
    token_server,
    venv_script,
)

from natkit.lab import Lab, LabConfig, netns
from natkit.lab import config as C
from natkit.portmap import pcp, ssdp
from natkit.portmap.manager import REFRESH_INTERVAL, KeptMapping, probe
from natkit.portmap.mapping import PortMapping
from natkit.portmap.pmp_mappers import NatPmpMapper
from natkit.portmap.upnp import UPnPMapper

NAME = "portmap"
GW = C.RTR_LAN_IP
PMP_PORT = 5351
LEASE = 3600  # part 1: the same lease for every client
# Below the kernel's ephemeral range (32768-60999): no outgoing connection can hold them.
FIRST_PORT = 31000
AUTO_GOAL_MS = 50.0
SETTLE = 0.1  # between cases: miniupnpd answers an M-SEARCH ~50 ms later; let it be done
SSDP_HEAD_START = 0.002  # about when PCP has answered auto's ANNOUNCE

KEEP_LEASE = 120  # part 2: the kept mapping's lease; natkit renews at half of it
RENEWAL_INTERVAL = KEEP_LEASE / 2
CHECK_INTERVALS = (2.0, 0.5)  # natkit's default first
DEFAULT_CHECK_INTERVAL = 2.0
REBOOT_ITERATIONS = 5
REBOOT_METHODS = ("pcp", "natpmp", "upnp")
PMP_REBOOT_GOAL_S = 5.0
# NAT-PMP/PCP clients see a reboot as the epoch (the server's seconds since start) going back
# by more than the 2 s slack of RFC 6886 3.6 / RFC 6887 8.5: a router restarted within ~2 s
# of its previous start cannot be told from one that was not. Real routers are up far longer.
ROUTER_MIN_UPTIME = 4.0
POLL_INTERVAL = 0.02  # a new SYN from wan every 20 ms
POLL_STALE = 0.5  # a SYN unanswered this long was dropped (no mapping yet): forget it
POLL_GIVE_UP = RENEWAL_INTERVAL + 10  # long enough to see "within one renewal interval"
SILENT_ITERATIONS = 3  # part 3: each waits up to one refresh interval (30 s by default)
SILENT_METHODS = ("pcp", "natpmp", "upnp")
SILENT_GOAL_S = 60.0  # issue 13: noticed and restored within 60 s by default

NATPMPC_PUBLIC = re.compile(r"Public IP address : (\S+)")
NATPMPC_MAPPED = re.compile(
    r"Mapped public port (\d+) protocol (\w+) to local port (\d+) li\w*time (\d+)"
)


def lab_config(name: str) -> LabConfig:
    return LabConfig(name=name)  # UPnP, NAT-PMP and PCP all offered, endpoint-independent NAT


@dataclasses.dataclass
class Ctx:
    lab: Lab
    tokens: TokenServer
    upnp: bench_upnp.Ctx  # bench_upnp's context: verify(), admin_delete(), the binding's case
    cli_env: dict[str, str]  # environment of `natkit map add` (its own state directory)

    @property
    def lan(self) -> str:
        return self.lab.netns("lan")

    def verify(self, external_ip: str, external_port: int, internal_port: int) -> None:
        self.upnp.verify(external_ip, external_port, internal_port)

    def pmp_delete(self, port: int) -> None:
        """Delete a NAT-PMP mapping of ``port`` (NAT-PMP deletes by internal port)."""

        async def rm() -> None:
            mapper = await NatPmpMapper.open(GW)
            try:
                await mapper.remove(PortMapping("natpmp", "tcp", C.LAN_IP, port, "", port, 0))
            finally:
                mapper.close()

        netns.run_in(self.lan, rm)


CaseFn = Callable[[Ctx, int], Sample]


@dataclasses.dataclass(frozen=True)
class Case:
    key: str
    label: str
    kind: str
    fn: CaseFn
    maps: bool = True  # makes a mapping of the given port (so: listen, verify, clean up)
    note: str = ""


# ---- part 1: natkit, in process -------------------------------------------------------------


def natkit_open_port(via: str) -> CaseFn:
    """``open_port_async(port, via=via)`` on a new loop, timed until it returns (bench_upnp's)."""
    fn = bench_upnp.natkit_open_port(via)
    return lambda ctx, port: fn(ctx.upnp, port)


def natkit_probe_add(ctx: Ctx, port: int) -> Sample:
    """What ``open_port_async()`` does, minus the keeper: ``probe()`` (auto), then ``add()``."""

    async def once() -> Sample:
        t0 = time.perf_counter()
        result = await probe()
        t1 = time.perf_counter()
        mapper = result.chosen
        try:
            m = await mapper.add(port, lease=LEASE, description="nkb probe")
            t2 = time.perf_counter()
            try:
                ctx.verify(m.external_ip, m.external_port, port)
            finally:
                await mapper.remove(m)
        finally:
            mapper.close()
        return Sample(
            t2 - t0,
            {"probe": t1 - t0, "add": t2 - t1},
            {
                "method": m.method,
                "public": m.public_address,
                "offered": sorted(result.offered),
                "refused": result.refused,
            },
        )

    return netns.run_in(ctx.lan, once)


# ---- part 1: whole programs, one process per mapping ----------------------------------------


def natpmpc(ctx: Ctx, port: int) -> Sample:
    argv = ["natpmpc", "-g", GW, "-a", str(port), str(port), "tcp", str(LEASE)]
    t0 = time.perf_counter()
    proc = ctx.lab.run("lan", argv)
    t1 = time.perf_counter()
    try:
        public = NATPMPC_PUBLIC.search(proc.stdout)
        mapped = NATPMPC_MAPPED.search(proc.stdout)
        if proc.returncode != 0 or public is None or mapped is None:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            raise BenchError(f"natpmpc -a failed ({proc.returncode}): {' | '.join(tail)}")
        ctx.verify(public.group(1), int(mapped.group(1)), port)
    finally:
        with contextlib.suppress(Exception):
            ctx.pmp_delete(port)
    return Sample(
        t1 - t0, {}, {"public": f"{public.group(1)}:{mapped.group(1)}", "lease": mapped.group(4)}
    )


def natkit_cli_natpmp(ctx: Ctx, port: int) -> Sample:
    argv = [venv_script("natkit"), "map", "add", str(port), "--via", "natpmp"]
    argv += ["--lease", str(LEASE), "--description", "nkb cli", "--json"]
    t0 = time.perf_counter()
    proc = ctx.lab.run("lan", argv, env=ctx.cli_env)
    t1 = time.perf_counter()
    try:
        if proc.returncode != 0:
            raise BenchError(f"natkit map add exited {proc.returncode}: {proc.stderr.strip()}")
        m = json.loads(proc.stdout)
        ctx.verify(str(m["external_ip"]), int(m["external_port"]), port)
    finally:
        with contextlib.suppress(Exception):
            ctx.pmp_delete(port)
    return Sample(t1 - t0, {}, {"method": m["method"], "public": m["public_address"]})


def binding(ctx: Ctx, port: int) -> Sample:
    return bench_upnp.binding(ctx.upnp, port)


# ---- part 1: floors -------------------------------------------------------------------------


def baseline_pmp(ctx: Ctx, port: int) -> Sample:
    """One NAT-PMP public-address request on a plain socket, timed to the router's answer."""

    def once() -> Sample:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((C.LAN_IP, 0))
            s.settimeout(2.0)
            t0 = time.perf_counter()
            s.sendto(b"\x00\x00", (GW, PMP_PORT))
            data, _ = s.recvfrom(64)
            t1 = time.perf_counter()
        if len(data) < 12 or data[:2] != b"\x00\x80" or data[2:4] != b"\x00\x00":
            raise BenchError(f"not a NAT-PMP public-address answer: {data.hex()}")
        return Sample(t1 - t0, {}, {"public": socket.inet_ntoa(data[8:12])})

    return netns.call_in(ctx.lan, once)


def _raw_pcp_map(ctx: Ctx, port: int, after_ssdp: bool) -> Sample:
    """One PCP MAP on a plain socket, timed to its answer; optionally first the M-SEARCHes
    that natkit's UPnP probe sends in its first round (2 targets, unicast and multicast)."""

    def once() -> tuple[Sample, pcp.MapResult]:
        nonce = pcp.new_nonce()
        req = pcp.build_map(
            client_ip=C.LAN_IP,
            nonce=nonce,
            protocol="tcp",
            internal_port=port,
            lifetime=LEASE,
            suggested_port=port,
        )
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u,
        ):
            s.bind((C.LAN_IP, 0))
            s.connect((GW, PMP_PORT))
            s.settimeout(2.0)
            u.bind((C.LAN_IP, 0))
            u.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(C.LAN_IP))
            if after_ssdp:
                for st in ssdp.IGD_SEARCH_TARGETS[:2]:
                    u.sendto(
                        ssdp.build_msearch(st, host=f"{GW}:{ssdp.SSDP_PORT}"),
                        (GW, ssdp.SSDP_PORT),
                    )
                    u.sendto(ssdp.build_msearch(st, mx=1), (ssdp.SSDP_GROUP, ssdp.SSDP_PORT))
                time.sleep(SSDP_HEAD_START)
            t0 = time.perf_counter()
            s.send(req)
            data = s.recv(pcp.MAX_MESSAGE)
            t1 = time.perf_counter()
            res = pcp.parse_map_response(data, nonce=nonce, protocol="tcp", internal_port=port)
            try:
                ctx.verify(res.external_ip, res.external_port, port)
            finally:
                delete = pcp.build_map(
                    client_ip=C.LAN_IP, nonce=nonce, protocol="tcp", internal_port=port, lifetime=0
                )
                s.send(delete)
                s.recv(pcp.MAX_MESSAGE)
        return Sample(t1 - t0, {}, {"public": f"{res.external_ip}:{res.external_port}"}), res

    return netns.call_in(ctx.lan, once)[0]


def baseline_pcp_map(ctx: Ctx, port: int) -> Sample:
    return _raw_pcp_map(ctx, port, after_ssdp=False)


def pcp_map_after_ssdp(ctx: Ctx, port: int) -> Sample:
    return _raw_pcp_map(ctx, port, after_ssdp=True)


def baseline_natpmpc_start(ctx: Ctx, port: int) -> Sample:
    """``natpmpc -h``: netns exec + exec + dynamic linking, and nothing sent."""
    t0 = time.perf_counter()
    proc = ctx.lab.run("lan", ["natpmpc", "-h"])
    t1 = time.perf_counter()
    if proc.returncode != 0:
        raise BenchError(f"natpmpc -h exited {proc.returncode}")
    return Sample(t1 - t0)


def baseline_netns_exec(ctx: Ctx, port: int) -> Sample:
    return bench_upnp.baseline_netns_exec(ctx.upnp, port)


def baseline_natkit_start(ctx: Ctx, port: int) -> Sample:
    return bench_upnp.baseline_natkit_start(ctx.upnp, port)


def cases() -> list[Case]:
    found = [
        Case(
            "natkit_auto",
            "natkit open_port_async() (auto)",
            "subject",
            natkit_open_port("auto"),
            note="via='auto' asks PCP, NAT-PMP and UPnP at once and takes the most preferred "
            "that answers (PCP, then NAT-PMP, then UPnP)",
        ),
        Case("natkit_pcp", "natkit open_port_async(via='pcp')", "subject", natkit_open_port("pcp")),
        Case(
            "natkit_natpmp",
            "natkit open_port_async(via='natpmp')",
            "subject",
            natkit_open_port("natpmp"),
        ),
        Case(
            "natkit_upnp", "natkit open_port_async(via='upnp')", "subject", natkit_open_port("upnp")
        ),
        Case(
            "natkit_probe_add",
            "natkit probe() (auto) + add()",
            "subject",
            natkit_probe_add,
            note="open_port_async() without the keeper, split into its two phases",
        ),
        Case(
            "binding",
            f"miniupnpc binding discover+selectigd+add (delay {bench_upnp.DISCOVER_DELAY_MS})",
            "reference",
            binding,
        ),
        Case(
            "natkit_cli_natpmp",
            "new process: natkit map add --via natpmp",
            "subject",
            natkit_cli_natpmp,
        ),
    ]
    if shutil.which("natpmpc"):
        found.append(
            Case(
                "natpmpc",
                "new process: natpmpc -a (Debian C client)",
                "reference",
                natpmpc,
                note=f"`natpmpc -g {GW} -a PORT PORT tcp {LEASE}`: a public-address request, "
                "then the mapping request",
            )
        )
    found += [
        Case(
            "baseline_pmp",
            "floor: raw NAT-PMP public-address request → answer",
            "baseline",
            baseline_pmp,
            maps=False,
            note="two bytes to UDP 5351 on a plain socket, timed to miniupnpd's answer",
        ),
        Case(
            "baseline_pcp_map",
            "floor: raw PCP MAP → answer",
            "baseline",
            baseline_pcp_map,
            note="one PCP MAP request on a plain socket, timed to miniupnpd's answer (it "
            "adds the nftables rules first); proved from wan and deleted untimed",
        ),
        Case(
            "pcp_map_after_ssdp",
            f"raw PCP MAP {SSDP_HEAD_START * 1000:g} ms after auto's 4 M-SEARCHes",
            "baseline",
            pcp_map_after_ssdp,
            note="as the raw PCP MAP, but first the four M-SEARCHes natkit's UPnP probe sends "
            "in its first round (auto sends them at once with PCP and NAT-PMP): how much the "
            "router's SSDP work delays the MAP that follows",
        ),
        Case(
            "baseline_natpmpc_start",
            "floor: natpmpc -h (new process)",
            "baseline",
            baseline_natpmpc_start,
            maps=False,
            note="`ip netns exec` + exec of natpmpc, which prints its help and sends nothing: "
            "the process floor of the natpmpc row",
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


def _cleanup(ctx: Ctx, port: int) -> None:
    """Whatever made the mapping: one table behind all three protocols, so UPnP deletes it."""
    with contextlib.suppress(Exception):
        ctx.upnp.admin_delete(port)
    with contextlib.suppress(Exception):
        ctx.pmp_delete(port)


def _run_case(ctx: Ctx, case: Case, port: int) -> Sample:
    if case.maps:
        ctx.tokens.listen(port)
    try:
        sample = case.fn(ctx, port)
    except BaseException:
        if case.maps:
            _cleanup(ctx, port)  # leave nothing behind for the next case
        raise
    if case.maps and router_has_forward(ctx.lab, port, C.LAN_IP, port):
        _cleanup(ctx, port)
        raise BenchError(f"the mapping of port {port} was not deleted")
    return sample


# ---- part 2: router reboot → reachable again ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RebootCase:
    key: str
    label: str
    via: str
    check_interval: float
    silent: bool = False  # a service restart under system_uptime=yes, not a reboot


def reboot_cases() -> list[RebootCase]:
    found = []
    for k in CHECK_INTERVALS:
        for via in REBOOT_METHODS:
            default = " (default)" if k == DEFAULT_CHECK_INTERVAL else ""
            found.append(
                RebootCase(
                    f"reboot_{via}_{k:g}",
                    f"KeptMapping via {via}, check every {k:g} s{default}",
                    via,
                    k,
                )
            )
    return found


def silent_cases() -> list[RebootCase]:
    return [
        RebootCase(
            f"silent_{via}",
            f"KeptMapping via {via}, natkit's defaults",
            via,
            DEFAULT_CHECK_INTERVAL,
            silent=True,
        )
        for via in SILENT_METHODS
    ]


def wait_router_uptime(lab: Lab, seconds: float) -> None:
    deadline = time.monotonic() + seconds + 15
    while lab.router_uptime() < seconds:
        if time.monotonic() > deadline:
            raise BenchError(f"the router did not stay up for {seconds:g} s")
        time.sleep(0.05)


def poll_reachable(host: str, port: int, expect: bytes, give_up: float) -> tuple[float, int]:
    """From the calling thread's namespace: a new TCP connection attempt to host:port every
    POLL_INTERVAL (attempts overlap: a SYN the router drops just stays unanswered) until one
    connects and the far end sends ``expect``. Returns when it connected, and the attempts."""
    sel = selectors.DefaultSelector()
    started: dict[socket.socket, float] = {}
    attempts = 0
    next_at = time.perf_counter()
    try:
        while True:
            t = time.perf_counter()
            if t >= give_up:
                raise BenchError(
                    f"{host}:{port} not reachable from wan within {POLL_GIVE_UP:g} s "
                    f"({attempts} attempts)"
                )
            if t >= next_at:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                s.connect_ex((host, port))
                sel.register(s, selectors.EVENT_WRITE)
                started[s] = t
                attempts += 1
                next_at = max(next_at + POLL_INTERVAL, t)
            for s, t_s in list(started.items()):
                if t - t_s > POLL_STALE:
                    sel.unregister(s)
                    s.close()
                    del started[s]
            for key, _ in sel.select(timeout=max(0.0, next_at - time.perf_counter())):
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                t_conn = time.perf_counter()
                sel.unregister(conn)
                del started[conn]
                with conn:
                    if conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                        continue  # refused or unreachable: try the next one
                    conn.setblocking(True)
                    conn.settimeout(2.0)
                    chunks = []
                    with contextlib.suppress(OSError):
                        while data := conn.recv(256):
                            chunks.append(data)
                got = b"".join(chunks)
                if got != expect:
                    raise BenchError(f"{host}:{port} answered {got!r}, not our listener")
                return t_conn, attempts
    finally:
        for s in started:
            s.close()
        sel.close()


def reboot_once(ctx: Ctx, case: RebootCase, port: int) -> Sample:
    events: list[tuple[float, str, dict[str, Any]]] = []

    def on_event(event: str, mapping: PortMapping, info: dict[str, Any]) -> None:
        events.append((time.perf_counter(), event, {k: str(v) for k, v in info.items()}))

    def reboot_and_wait(m: PortMapping) -> tuple[float, float, float, int]:
        t0 = time.perf_counter()
        if case.silent:
            ctx.lab.restart_router_daemon()
        else:
            ctx.lab.reboot_router()
        t1 = time.perf_counter()
        t_reach, attempts = netns.call_in(
            ctx.lab.netns("wan"),
            lambda: poll_reachable(
                m.external_ip, m.external_port, token_for(port), t0 + POLL_GIVE_UP
            ),
        )
        return t0, t1, t_reach, attempts

    async def once() -> Sample:
        keeper = KeptMapping(
            port,
            via=case.via,
            lease=KEEP_LEASE,
            check_interval=case.check_interval,
            description="nkb keep",
        )
        keeper.on_event(on_event)
        before = await keeper.start()
        try:
            await asyncio.to_thread(ctx.verify, before.external_ip, before.external_port, port)
            await asyncio.to_thread(wait_router_uptime, ctx.lab, ROUTER_MIN_UPTIME)
            cycle = case.check_interval
            if case.silent:
                cycle = keeper.refresh_interval  # a loss is looked for once per refresh
                async with asyncio.timeout(30):  # NAT-PMP: is there a UPnP table?
                    while keeper.loss_check == "pending":  # noqa: ASYNC110 (no event for it)
                        await asyncio.sleep(0.05)
            # Let the reboot fall at a random point of the keeper's cycle.
            await asyncio.sleep(random.uniform(0, cycle))
            try:
                t0, t_rebooted, t_reach, attempts = await asyncio.to_thread(reboot_and_wait, before)
            except BenchError as exc:
                raise BenchError(f"{exc}; keeper events: {[e for _, e, _ in events]}") from None
            # The first connection can beat the "restored" event by a hair.
            deadline = time.monotonic() + 5
            while not any(e == "restored" for t, e, _ in events if t > t0):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.01)
            after = keeper.mapping
        finally:
            await keeper.close()
        after_events = [(t - t0, e, info) for t, e, info in events if t > t0]
        if after is None or after.public_address != before.public_address:
            raise BenchError(f"restored elsewhere: {before} → {after}")
        phases = {"restart" if case.silent else "reboot": t_rebooted - t0}
        lost = next(((t, info) for t, e, info in after_events if e == "lost"), None)
        restored = next((t for t, e, _ in after_events if e == "restored"), None)
        if lost is not None:
            phases["lost"] = lost[0]
        if restored is not None:
            phases["restored"] = restored
        return Sample(
            t_reach - t0,
            phases,
            {
                "method": before.method,
                "public": before.public_address,
                "check_interval_s": case.check_interval,
                "loss_check": keeper.loss_check,
                "lost_reason": lost[1].get("reason", "") if lost else "",
                "events": [(e, round(t, 3)) for t, e, _ in after_events],
                "poll_attempts": attempts,
            },
        )

    sample = netns.run_in(ctx.lan, once)
    if router_has_forward(ctx.lab, port, C.LAN_IP, port):
        raise BenchError(f"the kept mapping of port {port} was not deleted on close")
    return sample


# ---- the run --------------------------------------------------------------------------------


def _run_part1(
    ctx: Ctx,
    opts: Options,
    results: dict[str, CaseResult],
    all_cases: list[Case],
    ports: Iterator[int],
) -> None:
    for rnd in range(opts.warmup + opts.iterations):
        warm = rnd < opts.warmup
        k = rnd % len(all_cases)
        order = all_cases[k:] + all_cases[:k]
        tag = "warm-up" if warm else f"{rnd - opts.warmup + 1}/{opts.iterations}"
        print(f"  round {tag}:", end="", flush=True)
        for case in order:
            res = results[case.key]
            try:
                sample = _run_case(ctx, case, next(ports))
            except Exception as exc:
                res.failures.append(f"{type(exc).__name__}: {exc}")
                print(f" {case.key}=FAIL", end="", flush=True)
                time.sleep(SETTLE)
                continue
            (res.warmup if warm else res.samples).append(sample)
            print(f" {case.key}={sample.total * 1000:.0f}", end="", flush=True)
            time.sleep(SETTLE)
        print(flush=True)


def _run_part2(
    ctx: Ctx,
    rounds: int,
    results: dict[str, CaseResult],
    all_cases: list[RebootCase],
    ports: Iterator[int],
    what: str = "reboots",
) -> None:
    for rnd in range(rounds):
        k = rnd % len(all_cases)
        order = all_cases[k:] + all_cases[:k]
        print(f"  {what} {rnd + 1}/{rounds}:", end="", flush=True)
        for case in order:
            res = results[case.key]
            port = next(ports)
            try:
                ctx.tokens.listen(port)
                sample = reboot_once(ctx, case, port)
            except Exception as exc:
                res.failures.append(f"{type(exc).__name__}: {exc}")
                print(f" {case.key}=FAIL", end="", flush=True)
                _cleanup(ctx, port)
                continue
            res.samples.append(sample)
            print(f" {case.key}={sample.total:.2f}s", end="", flush=True)
        print(flush=True)


def run(lab: Lab | None, opts: Options) -> Report:
    if lab is None:
        raise BenchError("the portmap benchmark needs its lab")
    started = now()
    t_start = time.monotonic()
    machine = {**machine_info(), "natpmpc_deb": deb_version("natpmpc")}
    minissdpd = next((p for p in bench_upnp.MINISSDPD_SOCKETS if os.path.exists(p)), None)
    reboot_rounds = min(REBOOT_ITERATIONS, opts.iterations)

    all_cases = cases()
    results = {c.key: CaseResult(c.key, c.label, c.kind, c.note) for c in all_cases}
    all_reboots = reboot_cases()
    reboots = {c.key: CaseResult(c.key, c.label, "subject", detail=True) for c in all_reboots}
    all_silent = silent_cases()
    silent = {c.key: CaseResult(c.key, c.label, "subject", detail=True) for c in all_silent}
    silent_rounds = min(SILENT_ITERATIONS, opts.iterations)

    admin = netns.run_in(lab.netns("lan"), UPnPMapper.discover)
    with (
        tempfile.TemporaryDirectory(prefix="nkb-state-") as state_dir,
        token_server(lab, "lan", C.LAN_IP) as tokens,
    ):
        upnp_ctx = bench_upnp.Ctx(
            lab, tokens, admin, "/nonexistent/minissdpd.sock" if minissdpd else None
        )
        ctx = Ctx(lab, tokens, upnp_ctx, {**os.environ, "NATKIT_STATE_DIR": state_dir})
        ports = itertools.count(FIRST_PORT)  # a new port for every mapping of both parts
        _run_part1(ctx, opts, results, all_cases, ports)
        _run_part2(ctx, reboot_rounds, reboots, all_reboots, ports)
        # Part 3: OpenWrt's setting; a restart is then a silent loss (the epoch runs on).
        lab.cfg = dataclasses.replace(lab.cfg, system_uptime=True)
        lab.restart_router_daemon()
        _run_part2(ctx, silent_rounds, silent, all_silent, ports, "silent losses")

    ordered = [results[c.key] for c in all_cases]
    for res in ordered:  # say which protocol "auto" chose
        methods = sorted({str(s.info["method"]) for s in res.samples if "method" in s.info})
        if res.key in ("natkit_auto", "natkit_probe_add") and methods:
            res.label += f" → {'/'.join(methods)}"
    reboot_ordered = [reboots[c.key] for c in all_reboots]
    silent_ordered = [silent[c.key] for c in all_silent]

    ratios = [
        ratio(
            results, "miniupnpc binding / natkit open_port_async() (auto)", "binding", "natkit_auto"
        ),
        ratio(
            results,
            "miniupnpc binding / natkit open_port_async(via='upnp')",
            "binding",
            "natkit_upnp",
        ),
    ]
    if "natpmpc" in results:
        ratios += [
            ratio(
                results,
                "natpmpc (new process) / natkit open_port_async() (auto)",
                "natpmpc",
                "natkit_auto",
            ),
            ratio(
                results,
                "natpmpc / natkit map add --via natpmp (new process each)",
                "natpmpc",
                "natkit_cli_natpmp",
            ),
        ]
    auto = results["natkit_auto"].stats

    def all_within(methods: tuple[str, ...], limit: float) -> bool:
        sel = [r for c, r in zip(all_reboots, reboot_ordered, strict=True) if c.via in methods]
        return all(r.samples and not r.failures for r in sel) and all(
            s.total < limit for r in sel for s in r.samples
        )

    goals = [
        (
            f"natkit open_port_async() (auto) median under {AUTO_GOAL_MS:.0f} ms",
            auto is not None and auto.median * 1000 < AUTO_GOAL_MS,
        ),
        (
            f"router reboot → reachable again under {PMP_REBOOT_GOAL_S:.0f} s with PCP and "
            "NAT-PMP (epoch), every run",
            all_within(("pcp", "natpmp"), PMP_REBOOT_GOAL_S),
        ),
        (
            f"router reboot → reachable again within one renewal interval "
            f"({RENEWAL_INTERVAL:.0f} s) with UPnP, every run",
            all_within(("upnp",), RENEWAL_INTERVAL),
        ),
        (
            f"silent loss (service restart, system_uptime=yes) → reachable again within "
            f"{SILENT_GOAL_S:.0f} s with natkit's defaults, every protocol, every run",
            all(r.samples and not r.failures for r in silent_ordered)
            and all(s.total < SILENT_GOAL_S for r in silent_ordered for s in r.samples),
        ),
    ]
    notes = [
        "Part 1 timed: from nothing to a mapping the router has confirmed. In-process cases: "
        "each iteration on a new thread in the LAN namespace with a new asyncio loop (natkit) "
        "or a new `miniupnpc.UPnP()` (binding); the modules are already imported. "
        "`open_port_async()` is timed until it returns (closing it is not). New-process cases: "
        "the whole program under `ip netns exec`, interpreter start included.",
        f"Every client asks for the same mapping: TCP, external port = internal port, lease "
        f"{LEASE} s. Untimed after each: a TCP connection from wan to the public address must "
        "reach a listener on the LAN host, then the mapping is deleted and checked gone from "
        "the router's nftables.",
        f"Ratios are medians of the same run (interleaved, rotating order, {SETTLE * 1000:.0f} ms "
        "pause between cases so that the router's delayed SSDP answers to one case do not land "
        "in the next); p10/p90 are deciles of the timed samples (inclusive method).",
        "`natkit map add` as a new process is mostly interpreter start and imports (the "
        "`natkit --version` floor); natpmpc is a small C program (its process floor is the "
        "`natpmpc -h` row) that needs two NAT-PMP round trips.",
        f"Part 2: `KeptMapping(port, via=V, lease={KEEP_LEASE}, check_interval=K)` on the LAN "
        "host; once it works from wan, `Lab.reboot_router()` restarts miniupnpd and flushes "
        "nftables and conntrack (every mapping is gone). Timed from the start of the reboot "
        "until a TCP connection from wan to the same public address reaches the LAN listener "
        f"again: a new connection attempt every {POLL_INTERVAL * 1000:.0f} ms (the router drops "
        "SYNs it has no mapping for). The timeline gives, from the same start, when the reboot "
        "call returned and when the keeper emitted `lost` and `restored`.",
        f"Before each reboot the router has been up at least {ROUTER_MIN_UPTIME:g} s (NAT-PMP/"
        "PCP see a reboot as the epoch going back by more than RFC 6886/6887's 2 s slack; a "
        "real router is up far longer), and the reboot lands at a random point of the keeper's "
        "check cycle (a uniform 0..K s wait), so on average natkit notices K/2 after it.",
        "PCP and NAT-PMP: natkit's periodic check (PCP ANNOUNCE / NAT-PMP public-address "
        "request, every `check_interval`) sees the new, smaller epoch and re-creates the mapping "
        "at once; a check that lands while the daemon restarts gets no answer ('the router "
        "stopped answering'), and the re-creation is then retried about 0.5 s later (natkit's "
        "first back-off). UPnP has no epoch: natkit notices "
        "through the same periodic check, a GetSpecificPortMappingEntry for its mapping, which "
        "the rebooted IGD no longer has; well within one renewal interval (lease/2 = "
        f"{RENEWAL_INTERVAL:.0f} s), which is when a client that only renews would notice.",
        f"{reboot_rounds} reboots per case, cases interleaved (rotating order); natkit's "
        f"default check interval is {DEFAULT_CHECK_INTERVAL:g} s.",
        "Part 3: the lab's miniupnpd is switched to `system_uptime=yes` (OpenWrt's default; "
        "its NAT-PMP/PCP epoch is the machine's uptime) and `Lab.restart_router_daemon()` "
        "restarts it as a service with a firewall reload: every mapping is gone, conntrack "
        "kept, the epoch runs on. `KeptMapping(port, via=V, lease="
        f"{KEEP_LEASE})` with natkit's defaults (checks every {DEFAULT_CHECK_INTERVAL:g} s, a "
        f"silent loss looked for every {REFRESH_INTERVAL:g} s). The restart lands at a random "
        "point of the refresh cycle (uniform 0..30 s), so on average natkit notices 15 s "
        "after it. How it notices (`loss_check` in the JSON): PCP by a delete under a foreign "
        "nonce, which miniupnpd refuses while the mapping exists; NAT-PMP by the router's "
        "UPnP table; UPnP by the table read of every check. A restart that falls on a check "
        "is seen as 'stopped answering' instead (the lost_reason in the JSON says which).",
    ]
    if minissdpd:
        notes.append(
            f"{minissdpd} exists on this host: the binding was pointed away from it "
            "(it would list the host's devices)."
        )
    notes += [f"{c.label}: {c.note}" for c in ordered if c.note]
    m = machine
    report = Report(
        name=NAME,
        title="NAT-PMP, PCP and UPnP: nothing → working mapping, natkit vs natpmpc and miniupnpc",
        started=started,
        machine=machine,
        config={
            "iterations": opts.iterations,
            "warmup": opts.warmup,
            "lease_s": LEASE,
            "binding_discoverdelay_ms": bench_upnp.DISCOVER_DELAY_MS,
            "reboot_iterations": reboot_rounds,
            "keep_lease_s": KEEP_LEASE,
            "check_intervals_s": list(CHECK_INTERVALS),
            "silent_iterations": silent_rounds,
            "refresh_interval_s": REFRESH_INTERVAL,
            "router_min_uptime_s": ROUTER_MIN_UPTIME,
            "poll_interval_ms": POLL_INTERVAL * 1000,
            "settle_between_cases_ms": SETTLE * 1000,
            "lab": lab.cfg.name,
            "gateway": GW,
            "lan_ip": C.LAN_IP,
            "wan_ip": C.RTR_WAN_IP,
        },
        cases=ordered,
        ratios=ratios,
        goals=goals,
        notes=notes,
        sections=[
            Section(
                "reboot",
                f"Router reboot → reachable again from wan (KeptMapping, lease {KEEP_LEASE} s)",
                reboot_ordered,
                unit="s",
                compare=False,
                phase_sep=" → ",
                phases_header="timeline from the reboot's start (median s)",
                intro=f"{reboot_rounds} reboots per case; total = first TCP connection from "
                f"wan through the restored mapping (polled every {POLL_INTERVAL * 1000:.0f} ms). "
                "Each timeline point is its own median over the runs, so the points need not "
                "come from one run; every run's events are in the JSON (`samples_detail`).",
            ),
            Section(
                "silent",
                "Silent loss (service restart, system_uptime=yes) → reachable again from wan "
                f"(KeptMapping, lease {KEEP_LEASE} s, natkit's defaults)",
                silent_ordered,
                unit="s",
                compare=False,
                phase_sep=" → ",
                phases_header="timeline from the restart's start (median s)",
                intro=f"{silent_rounds} restarts per protocol; total = first TCP connection "
                "from wan through the restored mapping.",
            ),
        ],
        clients=f"natkit {m.get('natkit')} (git {m.get('git')}), Debian `natpmpc` "
        f"{m.get('natpmpc_deb')}, PyPI `miniupnpc` {m.get('miniupnpc_binding')}, "
        f"Python {m.get('python')}",
    )
    report.elapsed = time.monotonic() - t_start
    return report


BENCHMARK = Benchmark(
    name=NAME,
    description="PCP/NAT-PMP/UPnP: nothing → mapping (vs natpmpc, miniupnpc), reboot and "
    "silent loss → reachable",
    lab_config=lab_config,
    run=run,
)
