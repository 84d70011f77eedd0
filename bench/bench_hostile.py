"""The relay under unauthenticated floods and slow visitors, on 127.0.0.0/8 only.

``natkit relay serve`` runs as its own process (this checkout's code, and, as the
reference in the same run, the code of a git revision given with ``NATKIT_BENCH_BEFORE``,
default ``d985f4b``: the relay before issue 12, checked out in a temporary worktree):

* **TLS flood**: 7,000 clients from eight loopback addresses (127.0.0.2-9) complete a TLS
  handshake on the listen port and hang up without a word, 64 at a time; then 4,000 clients
  (500 from each address) try one at once and stay silent until the relay drops them. The relay's RSS is read
  (``/proc/PID/status``) before, at the peak, and 12 s after the flood stopped.
* **Slow visitors**: 2,000 visitors on the HTTP port send part of a request head and then
  one byte a second; the relay's CPU time (``/proc/PID/stat``) over 8 s, as a share of
  one core.

Run: ``.venv/bin/python bench/run.py hostile`` (or this file directly).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    REPO_DIR,
    BenchError,
    Benchmark,
    Options,
    Report,
    machine_info,
    now,
    python_bin,
)

NAME = "hostile"
TOKEN = "bench-hostile-token-0123456789"
BEFORE = os.environ.get("NATKIT_BENCH_BEFORE", "d985f4b")
SOURCES = [f"127.0.0.{i}" for i in range(2, 10)]
FLOOD = 7000
CONCURRENCY = 64
HELD = 4000
SLOW = 2000
SLOW_SECONDS = 8.0
TICK = os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class Relay:
    """``natkit relay serve`` from ``src`` (a checkout's src directory) on 127.0.0.1."""

    def __init__(self, src: Path, state: Path) -> None:
        state.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(src), "NATKIT_STATE_DIR": str(state),
               "PYTHONUNBUFFERED": "1"}  # fmt: skip
        args = [python_bin(), "-c", "from natkit.cli.main import main; main()", "relay",
                "serve", "--listen", "127.0.0.1:0", "--token", TOKEN, "--ports", "43000-43010",
                "--http-port", "0", "--domain", "lab.test", "--no-stun", "--json",
                "--state-dir", str(state / "relay")]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError(f"the relay from {src} did not start")
        ready = json.loads(line)
        self.port = int(ready["listen"].rpartition(":")[2])
        self.http_port = int(ready["http_port"])
        self.pid = self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.poll() is None:
            self.proc.kill()


async def _handshake(port: int, source: str, ctx: ssl.SSLContext, hold: float) -> bool:
    try:
        _, w = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, local_addr=(source, 0)), 10
        )
    except (OSError, asyncio.TimeoutError, ssl.SSLError):
        return False
    if hold:
        await asyncio.sleep(hold)
    w.transport.abort()
    return True


async def _tls_flood(relay: Relay) -> dict[str, Any]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    await asyncio.sleep(2)
    base = _rss_mb(relay.pid)
    peak = base
    done = ok = 0
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        nonlocal done, ok, peak
        async with sem:
            shook = await _handshake(relay.port, SOURCES[i % len(SOURCES)], ctx, 0)
            ok += shook  # (not ``ok += await ...``: that reads ok before the await)
            done += 1
            if done % 250 == 0:
                peak = max(peak, _rss_mb(relay.pid))

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(FLOOD)))
    quick_s = time.monotonic() - t0
    peak = max(peak, _rss_mb(relay.pid))
    held = [_handshake(relay.port, SOURCES[i % len(SOURCES)], ctx, 12.0) for i in range(HELD)]
    held_task = asyncio.gather(*held)
    for _ in range(10):
        await asyncio.sleep(1)
        peak = max(peak, _rss_mb(relay.pid))
    held_ok = sum(await held_task)
    await asyncio.sleep(12)  # the relay's housekeeping runs every 5 s
    after = _rss_mb(relay.pid)
    return {"baseline_mb": round(base, 1), "peak_mb": round(peak, 1),
            "after_mb": round(after, 1), "growth_after_mb": round(after - base, 1),
            "handshakes_ok": ok, "handshakes": FLOOD, "flood_s": round(quick_s, 1),
            "held_ok": held_ok, "held": HELD}  # fmt: skip


async def _slow_visitors(relay: Relay) -> dict[str, Any]:
    writers: list[asyncio.StreamWriter] = []
    for i in range(SLOW):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", relay.http_port,
                                                 local_addr=(SOURCES[i % len(SOURCES)], 0))  # fmt: skip
        except OSError:
            continue
        w.write(b"GET / HTTP/1.1\r\nHost: slow")
        writers.append(w)
    await asyncio.sleep(0.5)
    cpu0, t0 = _cpu_s(relay.pid), time.monotonic()
    while time.monotonic() - t0 < SLOW_SECONDS:
        await asyncio.sleep(1)
        for w in writers:
            with contextlib.suppress(Exception):
                w.write(b"w")  # one byte a second: never a whole head
    share = (_cpu_s(relay.pid) - cpu0) / (time.monotonic() - t0)
    for w in writers:
        w.transport.abort()
    return {"visitors": len(writers), "seconds": SLOW_SECONDS, "cpu_share": round(share, 4)}


def _enough_descriptors() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _measure(src: Path, state: Path) -> dict[str, Any]:
    _enough_descriptors()
    relay = Relay(src, state)
    try:
        flood = asyncio.run(_tls_flood(relay))
        slow = asyncio.run(_slow_visitors(relay))
    finally:
        relay.stop()
    return {"tls_flood": flood, "slow_visitors": slow}


def run(lab: Any, opts: Options) -> Report:
    started, t_start = now(), time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="natkit-bench-hostile-"))
    results: dict[str, Any] = {}
    try:
        before_src = tmp / "before"
        rc = subprocess.run(["git", "-C", str(REPO_DIR), "worktree", "add", "--detach",
                             str(before_src), BEFORE], capture_output=True, text=True)  # fmt: skip
        if rc.returncode == 0:
            results["before"] = _measure(before_src / "src", tmp / "state-before")
        results["now"] = _measure(REPO_DIR / "src", tmp / "state-now")
    finally:
        subprocess.run(["git", "-C", str(REPO_DIR), "worktree", "remove", "--force",
                        str(tmp / "before")], capture_output=True)  # fmt: skip
        shutil.rmtree(tmp, ignore_errors=True)
    now_ = results["now"]
    goals = [
        ("RSS back within 20 MB of its baseline after the TLS flood",
         now_["tls_flood"]["growth_after_mb"] <= 20),
        (f"{SLOW} slow visitors under 5 % of a core", now_["slow_visitors"]["cpu_share"] < 0.05),
    ]  # fmt: skip
    notes = []
    for which, r in results.items():
        f, s = r["tls_flood"], r["slow_visitors"]
        label = "this checkout" if which == "now" else f"before (git {BEFORE})"
        notes.append(
            f"{label}: TLS flood RSS {f['baseline_mb']} MB → peak {f['peak_mb']} MB → "
            f"{f['after_mb']} MB 12 s after ({f['growth_after_mb']:+} MB); "
            f"{f['handshakes_ok']}/{f['handshakes']} quick handshakes completed, "
            f"{f['held_ok']}/{f['held']} tried at once were let in; {s['visitors']} slow visitors cost "
            f"{100 * s['cpu_share']:.1f} % of a core"
        )
    return Report(
        name=NAME, title="Relay under unauthenticated floods and slow visitors",
        started=started, machine=machine_info(), config={"results": results, "before": BEFORE},
        cases=[], ratios=[], goals=goals, notes=notes, elapsed=time.monotonic() - t_start,
        clients="natkit relay serve (this checkout and the reference revision), Python clients",
    )  # fmt: skip


BENCHMARK = Benchmark(
    name=NAME,
    description="relay RSS after a TLS flood, CPU of 2,000 slow visitors (vs the code before)",
    lab_config=None,
    run=run,
    iterations=1,
)

if __name__ == "__main__":
    report = run(None, Options())
    (REPO_DIR / "bench" / "results").mkdir(exist_ok=True)
    (REPO_DIR / "bench" / "results" / f"{NAME}.md").write_text(report.to_markdown())
    (REPO_DIR / "bench" / "results" / f"{NAME}.json").write_text(
        json.dumps(report.to_json(), indent=2) + "\n"
    )
    print(report.to_text())
