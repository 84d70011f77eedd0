"""Run natkit's benchmarks: ``make bench`` (root; each lab benchmark builds and removes its lab).

    .venv/bin/python bench/run.py                 # every benchmark
    .venv/bin/python bench/run.py upnp -n 30      # one benchmark, 30 iterations per case
    .venv/bin/python bench/run.py portmap         # PCP/NAT-PMP/UPnP and router reboots
    .venv/bin/python bench/run.py relay           # relay tunnels vs ssh -R and socat
    .venv/bin/python bench/run.py relay_small     # only its small HTTP requests (wrk, ab)

Each benchmark module (``bench_<name>.py``) exports ``BENCHMARK``; add new ones to
``MODULES``. Results go to ``bench/results/<name>.md`` and ``.json``.
All traffic stays inside the lab's network namespaces (names start with ``nkb``); the relay
benchmark needs no lab and runs on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from benchlib import LAB_PREFIX, RESULTS_DIR, BenchError, Benchmark, Options

MODULES = (
    "bench_upnp", "bench_portmap", "bench_relay", "bench_hostile", "bench_check", "bench_p2p",
    "bench_pinhole", "bench_startup", "bench_quic", "bench_ngrok", "bench_inspect",
)  # fmt: skip


def load_benchmarks() -> dict[str, Benchmark]:
    found: dict[str, Benchmark] = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for bench in getattr(module, "BENCHMARKS", (module.BENCHMARK,)):
            assert isinstance(bench, Benchmark), module_name
            found[bench.name] = bench
    return found


def _require_root() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"the benchmarks need Linux network namespaces; this is {sys.platform}"
    if os.geteuid() != 0:
        return (
            "the benchmarks need root: they build a NAT lab of network namespaces, nftables "
            "rules and a miniupnpd router (nothing leaves those namespaces).\n"
            "Run them as root, e.g.  sudo make bench  or  sudo .venv/bin/python bench/run.py"
        )
    return None


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    benchmarks = load_benchmarks()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all of {', '.join(benchmarks)})",
    )
    parser.add_argument(
        "-n",
        "--iterations",
        type=int,
        help="timed runs per case (default: 15; relay: 5 runs of 1 GiB per path and direction)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per case first")
    parser.add_argument(
        "--lab-name", default=LAB_PREFIX, help=f"lab name (must start with {LAB_PREFIX!r})"
    )
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="output directory")
    args = parser.parse_args(argv)

    unknown = [n for n in args.names if n not in benchmarks]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; have {', '.join(benchmarks)}")
    if not args.lab_name.startswith(LAB_PREFIX) or len(args.lab_name) > 10:
        parser.error(f"--lab-name must start with {LAB_PREFIX!r} and be at most 10 characters")
    if (args.iterations is not None and args.iterations < 1) or args.warmup < 0:
        parser.error("--iterations must be at least 1 and --warmup at least 0")
    problem = _require_root()
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    selected = (
        [benchmarks[n] for n in args.names]
        if args.names
        else [b for b in benchmarks.values() if b.default]
    )
    try:
        if any(b.lab_config is not None for b in selected):
            import miniupnpc  # noqa: F401 - the reference the UPnP benchmark compares against
    except ImportError:
        print(
            "bench: the PyPI miniupnpc binding is missing: .venv/bin/pip install -e '.[bench]'",
            file=sys.stderr,
        )
        return 2

    from natkit.errors import NatkitError
    from natkit.lab import Lab

    # Ctrl-C, even when started with SIGINT ignored (e.g. in the background of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    opts = Options(
        iterations=args.iterations or 15,
        warmup=args.warmup,
        lab_name=args.lab_name,
        results_dir=args.results,
    )
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    failed = False
    for bench in selected:
        print(f"== {bench.name}: {bench.description}", flush=True)
        lab: Lab | None = None
        try:
            t0 = time.monotonic()
            if bench.lab_config is not None:
                lab = Lab.create(bench.lab_config(opts.lab_name), replace=True)
                print(f"  lab {opts.lab_name!r} up in {time.monotonic() - t0:.1f} s", flush=True)
            iterations = args.iterations or bench.iterations
            report = bench.run(lab, dataclasses.replace(opts, iterations=iterations))
        except KeyboardInterrupt:
            print("\nbench: interrupted; removing the lab", file=sys.stderr, flush=True)
            return 130
        except (NatkitError, OSError, BenchError) as exc:
            print(f"bench: {bench.name} failed: {exc}", file=sys.stderr)
            failed = True
            continue
        finally:
            if lab is not None:
                # A second Ctrl-C must not leave namespaces behind.
                with contextlib.suppress(KeyboardInterrupt):
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    lab.down()
                    signal.signal(signal.SIGINT, signal.default_int_handler)
        md = opts.results_dir / f"{bench.name}.md"
        js = opts.results_dir / f"{bench.name}.json"
        md.write_text(report.to_markdown())
        js.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print()
        print(report.to_text())
        print(f"\n  wrote {md} and {js}\n", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
