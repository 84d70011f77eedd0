"""CPU per GB of the QUIC forward (``natkit p2p connect --forward`` on the hole-punched
direct path; ``--mode tcp``/``punch``: the direct TCP path), for one or more natkit source
trees, interleaved in one lab run.

Not a ``bench/run.py`` benchmark: a tool for the question "did this change make the QUIC
forward cheaper?" on a noisy machine. Each round starts a listen/connect pair per tree (as
bench_p2p's forward case does: ``--no-portmap --no-tcp``), downloads through it and reads
both processes' CPU from /proc; the trees take turns, round after round.

    .venv/bin/python bench/forward_cpu.py --tree /tmp/base/src --tree src -r 3
    .venv/bin/python bench/forward_cpu.py --tree src --profile /tmp/prof   # py-spy both ends
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_p2p import (
    DOWNLOAD_BYTES,
    FORWARD_MODES,
    IPERF_PORT,
    RELAY,
    SECRET,
    TOKEN,
    RelayProc,
    _cpu_seconds,
    _download,
    lab_config,
)
from benchlib import BenchError

from natkit.lab import Lab


def _pair(
    lab: Lab, tree: Path, state: Path, room: str, mode: str
) -> tuple[subprocess.Popen[bytes], ...]:
    env = {**os.environ, "NATKIT_STATE_DIR": str(state), "PYTHONPATH": str(tree.resolve())}
    natkit = [sys.executable, "-m", "natkit", "p2p"]
    common = ["--relay", RELAY, "--token", TOKEN, "--secret", SECRET, "--json",
              *FORWARD_MODES[mode]]  # fmt: skip
    listen = lab.popen("lan2", [*natkit, "listen", room, *common, "--allow", str(IPERF_PORT)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)  # fmt: skip
    connect = lab.popen("lan", [*natkit, "connect", room, *common, "--forward",
                                f"9100:{IPERF_PORT}"],
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)  # fmt: skip
    assert connect.stdout is not None
    while True:
        line = connect.stdout.readline()
        if not line:
            raise BenchError(f"{tree}: natkit p2p connect ended early")
        if json.loads(line).get("event") == "forwarding":
            return listen, connect


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--tree", action="append", type=Path, required=True,
                    help="a natkit src directory (repeat to compare)")  # fmt: skip
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("--downloads", type=int, default=2, help="per round and tree")
    ap.add_argument("--lab-name", default="nkbfwd")
    ap.add_argument("--mode", choices=sorted(FORWARD_MODES), default="quic")
    ap.add_argument("--profile", type=Path, help="py-spy both processes into this directory")
    args = ap.parse_args()
    size = DOWNLOAD_BYTES
    lab = Lab.create(lab_config(args.lab_name), replace=True)
    state = Path(tempfile.mkdtemp(prefix="nkb-fwd-"))
    relay = RelayProc(lab, state / "relay")
    server = lab.popen("lan2", ["iperf3", "-s", "-p", str(IPERF_PORT)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    results: dict[Path, list[tuple[float, float, float, float]]] = {t: [] for t in args.tree}
    try:
        time.sleep(0.5)
        for rnd in range(args.rounds):
            for i, tree in enumerate(args.tree):
                listen, connect = _pair(lab, tree, state / f"t{i}", f"fwd{rnd}x{i}", args.mode)
                spies = []
                try:
                    _download(lab, "127.0.0.1", 9100)  # warm-up (slow start, first stream)
                    if args.profile is not None:
                        args.profile.mkdir(parents=True, exist_ok=True)
                        for name, p in (("listen", listen), ("connect", connect)):
                            out = args.profile / f"{name}-t{i}-r{rnd}.txt"
                            spies.append(subprocess.Popen(
                                [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(p.pid), "--format", "raw",
                                 "--rate", "200", "-o", str(out), "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            ))  # fmt: skip
                        time.sleep(1)
                    cl, cc = _cpu_seconds(listen.pid), _cpu_seconds(connect.pid)
                    t0 = time.monotonic()
                    rates = [_download(lab, "127.0.0.1", 9100) for _ in range(args.downloads)]
                    wall = time.monotonic() - t0
                    gb = args.downloads * size / 1e9
                    dl = (_cpu_seconds(listen.pid) - cl) / gb
                    dc = (_cpu_seconds(connect.pid) - cc) / gb
                    results[tree].append((statistics.median(rates), dl, dc, gb / wall * 1e3))
                    print(f"round {rnd} {tree}: {', '.join(f'{r:.1f}' for r in rates)} MB/s; "
                          f"CPU s/GB listen {dl:.2f} connect {dc:.2f} total {dl + dc:.2f}",
                          flush=True)  # fmt: skip
                finally:
                    for spy in spies:
                        spy.send_signal(2)
                    for spy in spies:
                        spy.wait(30)
                    for p in (connect, listen):
                        p.terminate()
                        p.wait(10)
        print("\nmedians over rounds:")
        for tree, rows in results.items():
            mb = statistics.median(r[0] for r in rows)
            cl = statistics.median(r[1] for r in rows)
            cc = statistics.median(r[2] for r in rows)
            print(f"  {tree}: {mb:.1f} MB/s; CPU s/GB listen {cl:.2f} + connect {cc:.2f} "
                  f"= {cl + cc:.2f}")  # fmt: skip
    finally:
        server.kill()
        server.wait()
        relay.stop()
        lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
