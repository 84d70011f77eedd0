"""Shared pieces of natkit's benchmarks: options, samples, statistics, reports, lab helpers.

Every benchmark module (``bench_*.py``) exports ``BENCHMARK``, a :class:`Benchmark`: the lab
it needs and a ``run`` function that returns a :class:`Report`. ``run.py`` builds the lab,
runs the benchmark, writes ``results/<name>.md`` and ``results/<name>.json`` and removes
the lab again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from natkit.lab import Lab, LabConfig, netns

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
LAB_PREFIX = "nkb"


class BenchError(Exception):
    """A benchmark could not measure what it claims to (e.g. a mapping did not work)."""


@dataclasses.dataclass(frozen=True)
class Options:
    iterations: int = 15
    warmup: int = 1
    lab_name: str = LAB_PREFIX
    results_dir: Path = RESULTS_DIR


@dataclasses.dataclass
class Sample:
    """One timed run of a case: total seconds, and the phases it is made of."""

    total: float
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Stats:
    n: int
    median: float
    p10: float
    p90: float
    min: float
    max: float
    mean: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not values:
            raise ValueError("no values")
        vals = sorted(values)
        if len(vals) >= 2:
            deciles = statistics.quantiles(vals, n=10, method="inclusive")
            p10, p90 = deciles[0], deciles[-1]
        else:
            p10 = p90 = vals[0]
        return cls(
            n=len(vals),
            median=statistics.median(vals),
            p10=p10,
            p90=p90,
            min=vals[0],
            max=vals[-1],
            mean=statistics.fmean(vals),
        )

    def to_json_ms(self) -> dict[str, float | int]:
        return {
            "n": self.n,
            **{
                k: round(getattr(self, k) * 1000, 3)
                for k in ("median", "p10", "p90", "min", "max", "mean")
            },
        }


@dataclasses.dataclass
class CaseResult:
    """All samples of one case (one tool doing one thing)."""

    key: str
    label: str
    kind: str  # "subject" (natkit), "reference" (the thing to beat) or "baseline" (floor)
    note: str = ""
    samples: list[Sample] = dataclasses.field(default_factory=list)
    warmup: list[Sample] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    detail: bool = False  # JSON: also every sample's phases and info (few, long samples)

    @property
    def stats(self) -> Stats | None:
        return Stats.of([s.total for s in self.samples]) if self.samples else None

    def phase_stats(self) -> dict[str, Stats]:
        names: list[str] = []
        for s in self.samples:
            names.extend(p for p in s.phases if p not in names)
        return {p: Stats.of([s.phases[p] for s in self.samples if p in s.phases]) for p in names}

    def to_json(self) -> dict[str, Any]:
        st = self.stats
        return {
            "key": self.key,
            "label": self.label,
            "kind": self.kind,
            "note": self.note,
            "ok": len(self.samples),
            "failed": len(self.failures),
            "failures": self.failures[:10],
            "total_ms": st.to_json_ms() if st else None,
            "phases_ms": {p: s.to_json_ms() for p, s in self.phase_stats().items()},
            "samples_ms": [round(s.total * 1000, 3) for s in self.samples],
            "warmup_ms": [round(s.total * 1000, 3) for s in self.warmup],
            "info": self.samples[0].info if self.samples else {},
            **({"samples_detail": [_sample_json(x) for x in self.samples]} if self.detail else {}),
        }


def interleaved_rounds(
    opts: Options, results: dict[str, CaseResult], run_case: Callable[[str], Sample]
) -> None:
    """Warm-up rounds, then ``opts.iterations`` timed ones; each round runs every case of
    ``results`` once, starting one further along each time (so that cases share the machine's
    noise). A case that raises is a failure of that case, not of the run; progress is printed."""
    keys = list(results)
    for rnd in range(opts.warmup + opts.iterations):
        warm = rnd < opts.warmup
        k = rnd % len(keys)
        tag = "warm-up" if warm else f"{rnd - opts.warmup + 1}/{opts.iterations}"
        print(f"  round {tag}:", end="", flush=True)
        for key in keys[k:] + keys[:k]:
            res = results[key]
            try:
                sample = run_case(key)
            except Exception as exc:
                res.failures.append(f"{type(exc).__name__}: {exc}")
                print(f" {key}=FAIL", end="", flush=True)
                continue
            (res.warmup if warm else res.samples).append(sample)
            print(f" {key}={sample.total * 1000:.0f}", end="", flush=True)
        print(flush=True)


def _sample_json(s: Sample) -> dict[str, Any]:
    return {
        "total_ms": round(s.total * 1000, 3),
        "phases_ms": {p: round(v * 1000, 3) for p, v in s.phases.items()},
        "info": s.info,
    }


@dataclasses.dataclass(frozen=True)
class Ratio:
    label: str
    slower: str  # case key (numerator)
    faster: str  # case key (denominator)
    value: float | None


HEADERS = (
    "case",
    "median ms",
    "p10 – p90 ms",
    "min – max ms",
    "vs natkit",
    "ok",
    "phases (median ms)",
)


@dataclasses.dataclass
class Section:
    """A further table of a report, after the main one, with cases of its own.

    ``unit`` is how its times print ("ms" or "s"; JSON stays in ms); ``compare`` adds the
    "vs natkit" column (each case over the section's first subject); ``phase_sep`` joins the
    phase medians: " + " when they are parts of the total, " → " when they are points on a
    timeline (each measured from the same start as the total).
    """

    key: str
    title: str
    cases: list[CaseResult]
    unit: str = "ms"
    compare: bool = True
    phase_sep: str = " + "
    phases_header: str = ""  # default: "phases (median <unit>)"
    intro: str = ""

    def headers(self) -> tuple[str, ...]:
        return _headers(self.unit, self.compare, self.phases_header)

    def rows(self) -> list[list[str]]:
        return _rows(self.cases, self.unit, self.compare, self.phase_sep)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "intro": self.intro,
            "cases": [c.to_json() for c in self.cases],
        }


def _headers(unit: str, compare: bool, phases_header: str = "") -> tuple[str, ...]:
    if unit == "ms" and compare and not phases_header:
        return HEADERS
    heads = [
        "case",
        f"median {unit}",
        f"p10 – p90 {unit}",
        f"min – max {unit}",
        *(["vs natkit"] if compare else []),
        "ok",
        phases_header or f"phases (median {unit})",
    ]
    return tuple(heads)


def _fmt_time(seconds: float, unit: str) -> str:
    return f"{seconds:.2f}" if unit == "s" else f"{seconds * 1000:.1f}"


def _rows(cases: Sequence[CaseResult], unit: str, compare: bool, sep: str) -> list[list[str]]:
    rows = []
    for c in cases:
        st = c.stats
        phases = sep.join(f"{p} {_fmt_time(s.median, unit)}" for p, s in c.phase_stats().items())
        ok = f"{len(c.samples)}/{len(c.samples) + len(c.failures)}"
        vs = [_vs(cases, c)] if compare else []
        if st is None:
            rows.append([c.label, "failed", "", "", *([""] if compare else []), ok, phases])
            continue
        rows.append(
            [
                c.label,
                _fmt_time(st.median, unit),
                f"{_fmt_time(st.p10, unit)} – {_fmt_time(st.p90, unit)}",
                f"{_fmt_time(st.min, unit)} – {_fmt_time(st.max, unit)}",
                *vs,
                ok,
                phases,
            ]
        )
    return rows


def _text_table(title: str, headers: Sequence[str], rows: list[list[str]]) -> list[str]:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    right = set(range(1, len(headers) - 1))

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [title, fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def _md_table(headers: Sequence[str], rows: list[list[str]]) -> list[str]:
    out = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers) - 1)) + "|---|",
    ]
    return out + ["| " + " | ".join(row) + " |" for row in rows]


@dataclasses.dataclass
class Report:
    name: str
    title: str
    started: datetime.datetime
    machine: dict[str, str]
    config: dict[str, Any]
    cases: list[CaseResult]
    ratios: list[Ratio]
    goals: list[tuple[str, bool]]
    notes: list[str]
    elapsed: float = 0.0
    sections: list[Section] = dataclasses.field(default_factory=list)
    clients: str = ""  # the markdown's "clients" line (default: natkit and the UPnP clients)

    def case(self, key: str) -> CaseResult:
        return next(c for c in self.all_cases() if c.key == key)

    def all_cases(self) -> list[CaseResult]:
        return self.cases + [c for sec in self.sections for c in sec.cases]

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "title": self.title,
            "date": self.started.isoformat(timespec="seconds"),
            "elapsed_s": round(self.elapsed, 1),
            "machine": self.machine,
            "config": self.config,
            "cases": [c.to_json() for c in self.cases],
            **({"sections": [s.to_json() for s in self.sections]} if self.sections else {}),
            "ratios": [
                {
                    "label": r.label,
                    "numerator": r.slower,
                    "denominator": r.faster,
                    "value": None if r.value is None else round(r.value, 2),
                }
                for r in self.ratios
            ],
            "goals": [{"goal": g, "met": ok} for g, ok in self.goals],
            "notes": self.notes,
        }

    # ---- text ------------------------------------------------------------------------

    def _rows(self) -> list[list[str]]:
        return _rows(self.cases, "ms", True, " + ")

    HEADERS = HEADERS

    def to_text(self) -> str:
        lines = _text_table(self.title, self.HEADERS, self._rows())
        for sec in self.sections:
            lines.append("")
            lines += _text_table(sec.title, sec.headers(), sec.rows())
        lines.append("")
        for r in self.ratios:
            lines.append(f"{r.label}: {_ratio_text(r.value)}")
        for goal, met in self.goals:
            lines.append(f"goal {goal}: {'MET' if met else 'NOT MET'}")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        m = self.machine
        clients = self.clients or (
            f"natkit {m.get('natkit')} (git {m.get('git')}), PyPI `miniupnpc` "
            f"{m.get('miniupnpc_binding')}, Debian `upnpc` {m.get('upnpc_deb')}, "
            f"Python {m.get('python')}"
        )
        out = [
            f"# {self.title}",
            "",
            f"- date: {self.started.strftime('%Y-%m-%d %H:%M:%S %Z').strip()}",
            f"- machine: {m.get('nproc')} CPUs ({m.get('cpu')}), Linux {m.get('kernel')}, "
            f"{m.get('os')}",
            f"- router: {m.get('miniupnpd')} (Debian `miniupnpd-nftables` {m.get('miniupnpd_deb')})",
            f"- clients: {clients}",
            f"- {self.config.get('iterations')} timed iterations per case after "
            f"{self.config.get('warmup')} warm-up, cases interleaved (rotating order); "
            f"run took {self.elapsed:.0f} s",
            "",
            *_md_table(self.HEADERS, self._rows()),
        ]
        for sec in self.sections:
            out += ["", f"## {sec.title}", ""]
            if sec.intro:
                out += [sec.intro, ""]
            out += _md_table(sec.headers(), sec.rows())
        out.append("")
        for r in self.ratios:
            out.append(f"- **{r.label}: {_ratio_text(r.value)}**")
        for goal, met in self.goals:
            out.append(f"- goal {goal}: {'met' if met else '**not met**'}")
        out.append("")
        if self.notes:
            out.append("Notes:")
            out.append("")
            out += [f"- {n}" for n in self.notes]
            out.append("")
        fails = [(c.label, f) for c in self.all_cases() for f in c.failures]
        if fails:
            out.append("Failures:")
            out.append("")
            out += [f"- {label}: {f}" for label, f in fails[:20]]
            out.append("")
        return "\n".join(out)


def _ratio_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}x"


def _vs(cases: Sequence[CaseResult], case: CaseResult) -> str:
    """This case's median over natkit's main subject's median (first subject case)."""
    subject = next((c for c in cases if c.kind == "subject" and c.stats), None)
    st = case.stats
    if case.kind == "baseline" or subject is None or st is None or subject.stats is None:
        return ""
    return f"{st.median / subject.stats.median:.1f}x"


def ratio(cases: dict[str, CaseResult], label: str, slower: str, faster: str) -> Ratio:
    a, b = cases[slower].stats, cases[faster].stats
    value = a.median / b.median if a and b and b.median > 0 else None
    return Ratio(label, slower, faster, value)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    lab_config: Callable[[str], LabConfig] | None  # None: no lab (the relay runs on loopback)
    run: Callable[[Lab | None, Options], Report]
    iterations: int = 15  # timed runs per case unless run.py -n says otherwise
    default: bool = True  # run when run.py is given no names (False: a part of another one)


# ---- the machine ------------------------------------------------------------------------


def _cmd(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (proc.stdout or proc.stderr).strip()


def deb_version(pkg: str) -> str:
    return _cmd(["dpkg-query", "-W", "-f=${Version}", pkg]) or "?"


def machine_info() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    os_name = "?"
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip().strip('"')
    git = _cmd(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"]) or "?"
    if _cmd(["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"]):
        git += "+dirty"
    try:
        binding = importlib.metadata.version("miniupnpc")
    except importlib.metadata.PackageNotFoundError:
        binding = "not installed"
    try:
        natkit_version = importlib.metadata.version("natkit")
    except importlib.metadata.PackageNotFoundError:
        natkit_version = "?"
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "kernel": platform.release(),
        "os": os_name,
        "python": platform.python_version(),
        "miniupnpd": _cmd(["/usr/sbin/miniupnpd", "--version"]).splitlines()[0]
        if _cmd(["/usr/sbin/miniupnpd", "--version"])
        else "?",
        "miniupnpd_deb": deb_version("miniupnpd-nftables"),
        "upnpc_deb": deb_version("miniupnpc"),
        "miniupnpc_binding": binding,
        "natkit": natkit_version,
        "git": git,
    }


def now() -> datetime.datetime:
    return datetime.datetime.now().astimezone()


def python_bin() -> str:
    return sys.executable


def venv_script(name: str) -> str:
    """A console script next to this interpreter (the venv's ``natkit``)."""
    return str(Path(sys.executable).parent / name)


# The natkit command of whatever tree PYTHONPATH names: the console script imports
# natkit.cli.main:entry, which older checkouts (the "before" rows) do not have (their main()).
_ANY_NATKIT = (
    "import sys; from natkit.cli import main as m; sys.argv[0] = 'natkit'; "
    "(getattr(m, 'entry', None) or m.main)()"
)


def natkit_of_tree() -> list[str]:
    """argv that runs ``natkit`` from the tree on PYTHONPATH, old or new."""
    return [sys.executable, "-c", _ANY_NATKIT]


# ---- proving a mapping works --------------------------------------------------------------


def token_for(port: int) -> bytes:
    return f"nkb-bench {port}\n".encode()


class TokenServer:
    """TCP listeners on a lab node; each connection gets ``token_for(port)`` and is closed.

    The listening sockets are made inside the node's namespace (that is where they live),
    then served from one plain thread with a selector.
    """

    def __init__(self, lab: Lab, node: str, ip: str) -> None:
        self.lab, self.node, self.ip = lab, node, ip
        self._sel = selectors.DefaultSelector()
        self._ports: dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="bench-token-server", daemon=True)
        self._thread.start()

    def listen(self, port: int) -> None:
        with self._lock:
            if port in self._ports:
                return
            ip = self.ip
            srv = netns.call_in(
                self.lab.netns(self.node), lambda: socket.create_server((ip, port), backlog=16)
            )
            srv.setblocking(False)
            self._ports[port] = srv
            self._sel.register(srv, selectors.EVENT_READ, port)

    def _serve(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                has = bool(self._ports)
            if not has:
                time.sleep(0.05)
                continue
            for key, _ in self._sel.select(timeout=0.1):
                srv = key.fileobj
                assert isinstance(srv, socket.socket)
                with contextlib.suppress(OSError):
                    conn, _ = srv.accept()
                    with conn:
                        conn.settimeout(1)
                        conn.sendall(token_for(int(key.data)))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        with self._lock:
            for srv in self._ports.values():
                with contextlib.suppress(Exception):
                    self._sel.unregister(srv)
                srv.close()
            self._ports.clear()
        self._sel.close()


@contextlib.contextmanager
def token_server(lab: Lab, node: str, ip: str) -> Iterator[TokenServer]:
    srv = TokenServer(lab, node, ip)
    try:
        yield srv
    finally:
        srv.close()


def fetch_token(lab: Lab, node: str, host: str, port: int, timeout: float = 2.0) -> bytes:
    """Connect from ``node`` to host:port and read what the far end sends."""

    def get() -> bytes:
        with socket.create_connection((host, port), timeout=timeout) as s:
            chunks = []
            while data := s.recv(256):
                chunks.append(data)
        return b"".join(chunks)

    return netns.call_in(lab.netns(node), get)


def router_has_forward(lab: Lab, external_port: int, internal_ip: str, internal_port: int) -> bool:
    """Does the router's nftables hold miniupnpd's DNAT for this mapping?"""
    return f"dport {external_port} dnat ip to {internal_ip}:{internal_port}" in lab.router_rules()
