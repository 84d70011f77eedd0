"""``natkit check`` in the lab vs Debian's ``stun`` client and pystun3, same run.

Every case is a whole new process under ``ip netns exec LAB-lan`` (interpreter start
included), asking the lab's coturn (RFC 5780, two addresses) through the router's NAT.
natkit's full check also asks the router for UPnP, NAT-PMP and PCP; ``--no-portmap`` is
the same scope as the two classifiers (STUN only). The classifiers' verdicts are recorded
too: a fast wrong answer is no win.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchlib import (
    BenchError,
    Benchmark,
    CaseResult,
    Options,
    Report,
    Sample,
    machine_info,
    now,
    ratio,
)

from natkit.lab import Lab, LabConfig
from natkit.lab import config as C

NAME = "check"
GOAL_S = 2.0
NATKIT = str(Path(sys.executable).parent / "natkit")
PYSTUN3 = str(Path(sys.executable).parent / "pystun3")
STUN = f"{C.STUN_PRIMARY[0]}:{C.STUN_PRIMARY[1]}"


def lab_config(name: str) -> LabConfig:
    return LabConfig(name=name)  # eim NAT, every mapping protocol, coturn


def _argv(key: str) -> list[str]:
    port = str(random.randint(40000, 59999))
    return {
        "natkit": [NATKIT, "check", "--stun", STUN, "--json"],
        "natkit_stun": [NATKIT, "check", "--stun", STUN, "--json", "--no-portmap"],
        "stun": ["stun", C.STUN_PRIMARY[0], "-p", port],
        "pystun3": [PYSTUN3, "-H", C.STUN_PRIMARY[0], "-P", str(C.STUN_PRIMARY[1]), "-p", port],
    }[key]


def _verdict(key: str, out: str) -> str:
    if key.startswith("natkit"):
        d = json.loads(out)
        return f"mapping {d['mapping']}, filtering {d['filtering']}"
    for line in out.splitlines():
        if line.startswith(("Primary:", "NAT Type:")):
            return line.split(":", 1)[1].strip()
    return out.strip().splitlines()[-1] if out.strip() else "?"


def _one(lab: Lab, key: str) -> Sample:
    argv = _argv(key)
    t0 = time.monotonic()
    r = subprocess.run(lab.command("lan", argv), capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    ok_codes = range(0, 256) if key == "stun" else (0,)  # stun's exit code is its verdict
    if r.returncode not in ok_codes:
        raise BenchError(f"{key}: exit {r.returncode}: {r.stderr.strip()[-300:]}")
    return Sample(took, info={"verdict": _verdict(key, r.stdout), "exit": r.returncode})


CASES = (
    ("natkit", "natkit check (STUN + RFC 5780 + UPnP/NAT-PMP/PCP)", "subject"),
    ("natkit_stun", "natkit check --no-portmap (STUN + RFC 5780 only)", "subject"),
    ("stun", "Debian stun (RFC 3489 classifier)", "reference"),
    ("pystun3", "pystun3 (RFC 3489 classifier)", "reference"),
)


def run(lab: Lab | None, opts: Options) -> Report:
    assert lab is not None
    for tool in ("stun",):
        if not shutil.which(tool):
            raise BenchError("Debian's stun client is missing: apt-get install stun-client")
    if not Path(PYSTUN3).exists():
        raise BenchError("pystun3 is missing: pip install '.[bench]'")
    started, t_start = now(), time.monotonic()
    cases = {key: CaseResult(key, label, kind) for key, label, kind in CASES}
    for _ in range(opts.warmup):
        for key in cases:
            cases[key].warmup.append(_one(lab, key))
    for _ in range(opts.iterations):
        for key in cases:  # interleaved: each tool meets the same machine state
            try:
                cases[key].samples.append(_one(lab, key))
            except (BenchError, subprocess.TimeoutExpired) as exc:
                cases[key].failures.append(str(exc))
    ratios = [
        ratio(cases, "stun / natkit check", "stun", "natkit"),
        ratio(cases, "pystun3 / natkit check", "pystun3", "natkit"),
        ratio(cases, "stun / natkit check --no-portmap", "stun", "natkit_stun"),
        ratio(cases, "pystun3 / natkit check --no-portmap", "pystun3", "natkit_stun"),
    ]
    full = cases["natkit"].stats
    refs = [cases[k].stats for k in ("stun", "pystun3")]
    goals = [
        (f"natkit check median under {GOAL_S:.0f} s", full is not None and full.median < GOAL_S),
        (
            "natkit check faster than stun and pystun3 (medians)",
            full is not None and all(r is not None and full.median < r.median for r in refs),
        ),
    ]
    verdicts = {
        c.label: sorted({s.info["verdict"] for s in c.samples}) for c in cases.values()
    }
    notes = [
        "Each sample: a new process in the lab's LAN namespace, interpreter start included, "
        f"asking coturn at {STUN} through the router's NAT (eim: masquerade, home-router "
        "filtering). Cases interleaved per iteration.",
        *(f"{label} said: {'; '.join(v)}" for label, v in verdicts.items()),
    ]
    report = Report(
        name=NAME,
        title="natkit check vs Debian stun and pystun3 (whole process, in the lab)",
        started=started,
        machine=machine_info(),
        config={
            "iterations": opts.iterations,
            "warmup": opts.warmup,
            "stun": STUN,
            "lab": lab.cfg.name,
        },
        cases=list(cases.values()),
        ratios=ratios,
        goals=goals,
        notes=notes,
        clients="natkit, Debian `stun` (stun-client), PyPI `pystun3`",
    )
    report.elapsed = time.monotonic() - t_start
    return report


BENCHMARK = Benchmark(
    name=NAME,
    description="natkit check (whole process) vs Debian stun and pystun3, in the lab",
    lab_config=lab_config,
    run=run,
    iterations=10,
)
