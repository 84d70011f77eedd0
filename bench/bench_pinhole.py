"""An IPv6 pinhole's time to reachable, through the lab's dual-stack router (miniupnpd).

Each sample, in process on the lab's LAN host: a TCP listener on its global IPv6 address, a
prober on wan (the Internet) trying to connect to it over and over (each try a fresh socket
with a short timeout: a dropped SYN is never answered), then natkit opens a pinhole — UPnP
IGD2 (discovery, GetFirewallStatus, AddPinhole) or PCP (ANNOUNCE, MAP) — and the clock runs
from that call to the prober's first connection. The pinhole is deleted after each sample.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from benchlib import BenchError, Benchmark, CaseResult, Options, Report, Sample, machine_info, now

from natkit.lab import Lab, LabConfig, netns
from natkit.lab import config as C
from natkit.portmap.pinhole_mappers import open_pinholer

NAME = "pinhole"
TRY_TIMEOUT = 0.01  # per connection attempt from wan; the tries follow each other at once
SAMPLE_TIMEOUT = 10.0


def lab_config(name: str) -> LabConfig:
    return LabConfig(name=name, coturn=False)  # dual stack, every mapping protocol


class _Prober:
    """Connects from wan to [ip]:port until it works; notes the monotonic time it did."""

    def __init__(self, lab: Lab, ip: str, port: int) -> None:
        self.reached_at = 0.0
        self.tries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=netns.call_in, args=(lab.netns("wan"), lambda: self._probe(ip, port)),
            daemon=True,
        )  # fmt: skip
        self._thread.start()

    def _probe(self, ip: str, port: int) -> None:
        deadline = time.monotonic() + SAMPLE_TIMEOUT
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.tries += 1
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
                s.settimeout(TRY_TIMEOUT)
                try:
                    s.connect((ip, port))
                except OSError:
                    continue
                self.reached_at = time.monotonic()
                return

    def wait(self) -> float:
        self._thread.join(SAMPLE_TIMEOUT + 1)
        self._stop.set()
        return self.reached_at


def _one(lab: Lab, via: str) -> Sample:
    listener = netns.call_in(
        lab.netns("lan"),
        lambda: socket.create_server((C.LAN_IP6, 0), family=socket.AF_INET6, backlog=64),
    )
    with listener:
        port = listener.getsockname()[1]
        prober = _Prober(lab, C.LAN_IP6, port)
        time.sleep(0.05)  # the prober is trying (and failing) before the pinhole is asked for

        async def open_pinhole() -> tuple[float, float, str, int]:
            t0 = time.monotonic()
            pinholer = await open_pinholer(via=via, timeout=2.0)
            t_open = time.monotonic()
            try:
                pinhole = await pinholer.add(port, "tcp", 600)
                reached = await asyncio.to_thread(prober.wait)
                await pinholer.remove(pinhole)
            finally:
                pinholer.close()
            return t0, t_open, pinhole.method, reached

        t0, t_open, method, reached = netns.run_in(lab.netns("lan"), open_pinhole)
    if not reached:
        raise BenchError(f"{via}: [{C.LAN_IP6}]:{port} not reachable within {SAMPLE_TIMEOUT} s")
    return Sample(
        reached - t0,
        phases={"find router": t_open - t0, "add + first connection": reached - t_open},
        info={"method": method, "tries": prober.tries},
    )


CASES = (  # auto first: the "vs natkit" column compares each case with natkit's default
    ("auto", "natkit's choice (PCP first, then UPnP) → reachable"),
    ("upnp", "UPnP IGD2 pinhole (discover + GetFirewallStatus + AddPinhole) → reachable"),
    ("pcp", "PCP MAP pinhole over IPv6 (ANNOUNCE + MAP) → reachable"),
)


def run(lab: Lab | None, opts: Options) -> Report:
    assert lab is not None
    started, t_start = now(), time.monotonic()
    cases = {key: CaseResult(key, label, "subject") for key, label in CASES}
    for _ in range(opts.warmup):
        for key in cases:
            cases[key].warmup.append(_one(lab, key))
    for _ in range(opts.iterations):
        for key in cases:  # interleaved: each protocol meets the same machine state
            try:
                cases[key].samples.append(_one(lab, key))
            except BenchError as exc:
                cases[key].failures.append(str(exc))
    chosen = sorted({s.info["method"] for s in cases["auto"].samples})
    report = Report(
        name=NAME,
        title="IPv6 pinhole: from natkit's call to the first connection from the Internet",
        started=started,
        machine=machine_info(),
        config={
            "iterations": opts.iterations,
            "warmup": opts.warmup,
            "lab": lab.cfg.name,
            "probe_try_timeout_s": TRY_TIMEOUT,
        },
        cases=list(cases.values()),
        ratios=[],
        goals=[],  # issue 13 asks for the figure, names no target
        notes=[
            "In process, on the lab's LAN host (a thread in its namespace); the router is "
            "Debian's miniupnpd 2.3.1 (nftables). The prober on wan retries a TCP connect every "
            f"{TRY_TIMEOUT * 1000:g} ms, so a figure carries up to that much of its own delay.",
            f"auto chose: {', '.join(chosen) or '?'}.",
        ],
        clients="natkit (no reference client: miniupnpc's Python binding has no pinhole calls)",
    )
    report.elapsed = time.monotonic() - t_start
    return report


BENCHMARK = Benchmark(
    name=NAME,
    description="IPv6 pinhole time to reachable (UPnP IGD2, PCP), in the lab",
    lab_config=lab_config,
    run=run,
    iterations=15,
)
