"""Peer to peer in the lab: time to a connected, authenticated session, and the direct path's
throughput and round trip, against aioice's own ICE and plain UDP/TCP, same run.

Two LANs (lan behind rtr, lan2 behind rtr2), a ``natkit relay serve`` on the Internet host.
Each peer runs on a thread inside its own LAN's namespace (modules already imported).

- natkit direct: both routers ``eim``, no port mapping, no TURN: hole punching. Timed from
  the call to ``natkit.p2p.listen/connect`` until both hold an authenticated QUIC session.
- natkit relay: both routers ``random`` (a second lab), no port mapping, no TURN: ICE fails
  within its bound and the relay carries the session.
- aioice ICE, same candidates: two ``aioice.Connection`` with the relay as STUN server,
  candidates handed over in-process (no signalling round trip, no QUIC): gather + connect.
- Over the direct path: a 32 MiB stream (QUIC) and 200 datagram round trips, against plain
  TCP and UDP between the same two hosts through a port mapping on rtr2 (natpmpc).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import queue
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aioice
from benchlib import (
    BenchError,
    Benchmark,
    CaseResult,
    Options,
    Report,
    Sample,
    Section,
    machine_info,
    now,
    ratio,
)

import natkit.p2p
from natkit.lab import Lab, LabConfig, netns
from natkit.lab import config as C
from natkit.relay import seal

NAME = "p2p"
TOKEN = "bench-p2p-token-0123456789abcdef"
SECRET = "bench-p2p-secret-0123456789"  # the peers' own (never the token)
RELAY_HOST, RELAY_PORT = C.WAN_IPS[0], 7835
RELAY = f"{RELAY_HOST}:{RELAY_PORT}"
NATKIT = str(Path(sys.executable).parent / "natkit")
STREAM_BYTES = 32 << 20
# iperf3 downloads (-R -n) through the forward and their plain TCP reference (iperf3's server
# on lan2 through rtr2's mapping): large enough that a connection's set-up (across both NATs,
# and the TCP path's sealed opening) is noise at ~1 GB/s.
DOWNLOAD_BYTES = 256 << 20
RTT_SAMPLES = 200
PLAIN_PORT = 5201  # the plain UDP echo (RTT)
IPERF_PORT = 5202  # iperf3's server on lan2: plain through rtr2's mapping, and natkit's forwards
GOAL_DIRECT_S, GOAL_RELAY_S = 1.0, 3.0
GOAL_TCP_RATIO = 0.5  # issue 16: the direct TCP path at least half of plain TCP
GOAL_QUIC_MBPS = 100.0  # issue 16: the forward over QUIC streams on the direct path


def lab_config(name: str) -> LabConfig:
    # rtr2 offers NAT-PMP for the plain TCP/UDP reference and for the listener's TCP
    # mapping in the direct-TCP-path forward; natkit's peers are otherwise told not to map
    # (port_mapping=False, --no-portmap), so their session's path is hole punching.
    return LabConfig(
        name=name, portmap=frozenset(), second_lan=True, portmap2=frozenset({"natpmp"})
    )


def _in(lab: Lab, node: str, fn: Callable[[], Awaitable[Any]]) -> Any:
    return netns.run_in(lab.netns(node), fn)


def _both(
    lab: Lab, a: Callable[[], Awaitable[Any]], b: Callable[[], Awaitable[Any]]
) -> tuple[Any, Any]:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        fa, fb = pool.submit(_in, lab, "lan2", a), pool.submit(_in, lab, "lan", b)
        return fa.result(timeout=120), fb.result(timeout=120)


class RelayProc:
    def __init__(
        self, lab: Lab, state: Path, token: str = TOKEN, extra: Sequence[str] = ()
    ) -> None:
        env = {**os.environ, "NATKIT_STATE_DIR": str(state)}
        self.proc = lab.popen(
            "wan",
            [NATKIT, "relay", "serve", "--listen", RELAY, "--token", token, "--json", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if b"ready" not in line:
            raise BenchError(f"relay did not start: {line!r}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# ---- natkit ---------------------------------------------------------------------------------


def _session_case(
    lab: Lab, room: str, work: Callable[[Any, Any], Awaitable[Any]] | None = None
) -> tuple[Sample, Any]:
    """One listen/connect pair: total = until both sides hold the session."""
    t0 = time.monotonic()
    ends: dict[str, float] = {}

    async def listen() -> Any:
        conn = await natkit.p2p.listen(
            room, relay=RELAY, token=TOKEN, secret=SECRET, port_mapping=False
        )
        ends["listen"] = time.monotonic()
        try:
            return await work(conn, "listen") if work else conn.path
        finally:
            await conn.close()

    async def connect() -> Any:
        conn = await natkit.p2p.connect(
            room, relay=RELAY, token=TOKEN, secret=SECRET, port_mapping=False
        )
        ends["connect"] = time.monotonic()
        try:
            return (await work(conn, "connect") if work else conn.path), conn.path
        finally:
            await conn.close()

    _, (result, path) = _both(lab, listen, connect)
    total = max(ends.values()) - t0
    return Sample(total, info={"path": path}), result


async def _stream_and_rtt(conn: Any, role: str) -> dict[str, float]:
    if role == "listen":
        stream = await conn.accept_stream()
        chunk = bytes(256 * 1024)
        sent = 0
        while sent < STREAM_BYTES:
            stream.write(chunk)
            await stream.drain()
            sent += len(chunk)
        stream.write_eof()
        await stream.drain()
        bye = asyncio.ensure_future(conn.accept_stream())  # the client is done
        while not bye.done():
            ping = asyncio.ensure_future(conn.recv_datagram())
            await asyncio.wait({bye, ping}, return_when=asyncio.FIRST_COMPLETED)
            if ping.done() and not ping.exception():
                conn.send_datagram(ping.result())
            elif not ping.done():
                ping.cancel()
            else:
                break  # the session ended with the client's goodbye
        if not bye.done():
            bye.cancel()
        elif not bye.cancelled():
            bye.exception()  # retrieved: a goodbye or the end of the session
        return {}
    stream = await conn.open_stream()
    stream.write(b"go")
    await stream.drain()
    t0, got = time.monotonic(), 0
    while data := await stream.read(1 << 20):
        got += len(data)
    seconds = time.monotonic() - t0
    rtts: list[float] = []
    lost = 0
    while len(rtts) < RTT_SAMPLES and lost < RTT_SAMPLES:
        t = time.monotonic()
        conn.send_datagram(len(rtts).to_bytes(4, "big"))
        try:
            await asyncio.wait_for(conn.recv_datagram(), 0.5)
        except asyncio.TimeoutError:
            lost += 1  # a lost datagram (or its echo): not a sample
            continue
        rtts.append(time.monotonic() - t)
    bye = await conn.open_stream()
    bye.write_eof()
    await bye.drain()
    return {"mbps": got / seconds / 1e6, "rtt_ms": statistics.median(rtts) * 1000}


# ---- aioice, same candidates -------------------------------------------------------------------


def _aioice_case(lab: Lab) -> Sample:
    boxes: tuple[queue.Queue[Any], queue.Queue[Any]] = (queue.Queue(), queue.Queue())
    t0 = time.monotonic()
    ends: dict[str, float] = {}

    def side(controlling: bool) -> Callable[[], Awaitable[None]]:
        mine, theirs = (boxes[0], boxes[1]) if controlling else (boxes[1], boxes[0])

        async def run() -> None:
            conn = aioice.Connection(
                ice_controlling=controlling,
                components=1,
                stun_server=(RELAY_HOST, RELAY_PORT),
                use_ipv6=False,
            )
            await conn.gather_candidates()
            mine.put((conn.local_username, conn.local_password, conn.local_candidates))
            loop = asyncio.get_running_loop()
            ufrag, pwd, cands = await loop.run_in_executor(None, theirs.get, True, 30)
            conn.remote_username, conn.remote_password = ufrag, pwd
            for c in cands:
                await conn.add_remote_candidate(c)
            await conn.add_remote_candidate(None)
            await asyncio.wait_for(conn.connect(), 20)
            ends["c" if controlling else "l"] = time.monotonic()
            await asyncio.sleep(0.2)
            await conn.close()

        return run

    _both(lab, side(False), side(True))
    return Sample(max(ends.values()) - t0)


# ---- plain TCP/UDP through a port mapping on rtr2 ----------------------------------------------


def _map_on_rtr2(lab: Lab, port: int, proto: str) -> None:
    argv = ["natpmpc", "-g", C.RTR2_LAN_IP, "-a", str(port), str(port), proto, "600"]
    r = lab.run("lan2", argv, timeout=30)
    if r.returncode != 0:
        raise BenchError(f"natpmpc on lan2: {r.stdout} {r.stderr}")


def _plain(lab: Lab, state: Path) -> dict[str, Any]:
    for port, proto in ((PLAIN_PORT, "udp"), (IPERF_PORT, "tcp")):
        _map_on_rtr2(lab, port, proto)
    server = lab.popen("lan2", [sys.executable, "-c", _PLAIN_SERVER, str(PLAIN_PORT)])
    iperf = lab.popen("lan2", ["iperf3", "-s", "-p", str(IPERF_PORT)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(0.5)
        r = lab.run(
            "lan",
            [sys.executable, "-c", _PLAIN_CLIENT, C.RTR2_WAN_IP, str(PLAIN_PORT), str(RTT_SAMPLES)],
            timeout=120,
        )
        if r.returncode != 0:
            raise BenchError(f"plain client: {r.stderr}")
        rtt = float(r.stdout)
        # The same server, through natkit's forward between two CLI processes, each forward's
        # downloads taking turns with plain ones (this machine's load moves within a run).
        out: dict[str, Any] = {"rtt_ms": rtt}
        every_plain: list[float] = []
        for mode, prefix in (("quic", ""), ("tcp", "tcp_"), ("punch", "punch_")):
            runs, cpu_per_gb, plain = _forwarded(lab, state, mode)
            every_plain += plain
            out.update({f"{prefix}forward_mbps": statistics.median(runs),
                        f"{prefix}forward_runs": runs, f"{prefix}forward_cpu_s_per_gb": cpu_per_gb,
                        f"{prefix}forward_plain_mbps": statistics.median(plain),
                        f"{prefix}forward_plain_runs": plain})  # fmt: skip
        out["mbps"] = statistics.median(every_plain)
        return out
    finally:
        for proc in (server, iperf):
            proc.kill()
            proc.wait()


_PLAIN_SERVER = """
import socket, sys
port = int(sys.argv[1])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", port))
while True:  # a UDP echo: the plain round trip through rtr2's mapping
    d, a = u.recvfrom(2048); u.sendto(d, a)
"""


def _download(lab: Lab, host: str, port: int) -> float:
    """MB/s of one iperf3 download (``-R``: the server on lan2 sends) of DOWNLOAD_BYTES, to
    lan from ``host:port`` (iperf3's server through rtr2's mapping, or natkit's forward)."""
    argv = ["iperf3", "-c", host, "-p", str(port), "-R", "-n", str(DOWNLOAD_BYTES), "-J"]
    r = lab.run("lan", argv, timeout=300)
    try:
        end = json.loads(r.stdout)["end"]["sum_received"]
    except (ValueError, KeyError) as exc:
        raise BenchError(f"iperf3 to {host}:{port}: {r.stdout[-500:]} {r.stderr}") from exc
    if int(end["bytes"]) < DOWNLOAD_BYTES:
        raise BenchError(f"iperf3 to {host}:{port} moved {end['bytes']} of {DOWNLOAD_BYTES} bytes")
    return float(end["bits_per_second"]) / 8e6


FORWARD_RUNS = 5  # downloads through one forward: one alone moves with the machine's load


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (``ip netns exec`` execs, so the Popen's pid is
    natkit's own)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# How the forward's two processes are started: over QUIC streams on the hole-punched path
# (no router mapping, no TCP path), and over the direct TCP path through the TCP mapping the
# listener asks rtr2 for (NAT-PMP; rtr offers none, so the connector's ICE finds no mapping).
# "punch": no mapping anywhere, so the TCP path is a TCP hole punch (simultaneous open).
FORWARD_MODES = {"quic": ["--no-portmap", "--no-tcp"], "tcp": [], "punch": ["--no-portmap"]}
ROUTE_OF_MODE = {"tcp": "direct", "punch": "punch"}  # the tcp_path event each must report


def _forwarded(lab: Lab, state: Path, mode: str = "quic") -> tuple[list[float], float, list[float]]:
    """MB/s of TCP downloads through ``natkit p2p connect --forward`` (separate processes,
    as deployed), the CPU seconds both natkit processes spent per GB moved, and MB/s of plain
    downloads (through rtr2's mapping) taken in turns with them, first one then the other."""
    env = {**os.environ, "NATKIT_STATE_DIR": str(state / mode)}
    common = ["--relay", RELAY, "--token", TOKEN, "--secret", SECRET, "--json",
              *FORWARD_MODES[mode]]  # fmt: skip
    room = f"fwd-{mode}"
    (state / mode).mkdir(parents=True, exist_ok=True)
    logs = {side: state / mode / f"{side}.err" for side in ("listen", "connect")}
    errs = {side: path.open("wb") for side, path in logs.items()}  # the children's stderr
    listen = lab.popen(
        "lan2",
        [NATKIT, "p2p", "listen", room, *common, "--allow", str(IPERF_PORT)],
        stdout=subprocess.PIPE,
        stderr=errs["listen"],
        env=env,
    )
    connect = lab.popen(
        "lan",
        [NATKIT, "p2p", "connect", room, *common, "--forward", f"9100:{IPERF_PORT}"],
        stdout=subprocess.PIPE,
        stderr=errs["connect"],
        env=env,
        bufsize=0,  # unbuffered: an event read ahead into a buffer is one select() never sees
    )
    try:
        assert connect.stdout is not None
        route: dict[str, Any] | None = None  # tcp_path: the route search starts with the session
        while True:  # waiting, peer, ready, then forwarding (docs/cli.md)
            line = connect.stdout.readline()
            if not line:
                said = "; ".join(f"{side}: {path.read_text(errors='replace')[-300:].strip()}"
                                 for side, path in logs.items())  # fmt: skip
                raise BenchError(f"{mode} forward: natkit p2p connect ended early ({said})")
            event = json.loads(line)
            if event.get("event") == "ready" and mode == "tcp":
                mapped = [e for e in event.get("tcp") or [] if e.startswith(f"{C.RTR2_WAN_IP}:")]
                if not mapped:
                    raise BenchError(f"no TCP mapping on rtr2 offered: {event}")
            if event.get("event") == "tcp_path":
                route = event
            if event.get("event") == "forwarding":
                break
        runs: list[float] = []
        plain: list[float] = []
        cpu = 0.0
        for i in range(FORWARD_RUNS):
            for which in ("plain", "forward") if i % 2 == 0 else ("forward", "plain"):
                if which == "plain":
                    plain.append(_download(lab, C.RTR2_WAN_IP, IPERF_PORT))
                    continue
                cpu_before = _cpu_seconds(listen.pid) + _cpu_seconds(connect.pid)
                runs.append(_download(lab, "127.0.0.1", 9100))
                cpu += _cpu_seconds(listen.pid) + _cpu_seconds(connect.pid) - cpu_before
        if mode in ROUTE_OF_MODE:  # how the TCP path's route search went
            via = (route or _next_event(connect, "tcp_path")).get("via")
            if via != ROUTE_OF_MODE[mode]:
                raise BenchError(f"{mode} forward: the TCP path went {via!r}")
        return runs, cpu / (FORWARD_RUNS * DOWNLOAD_BYTES / 1e9), plain
    finally:
        for proc in (connect, listen):
            proc.terminate()
            proc.wait(10)
        for err in errs.values():
            err.close()


def _vs_plain(link: dict[str, Any], prefix: str) -> str:
    """A forward's median over the median of the plain downloads taken in turns with it."""
    plain = link[f"{prefix}forward_plain_mbps"]
    runs = ", ".join(f"{x:.0f}" for x in link[f"{prefix}forward_plain_runs"])
    return (f"{link[f'{prefix}forward_mbps'] / plain:.3f}x the plain TCP downloads taken in "
            f"turns with it ({plain:.0f} MB/s, median of {runs})")  # fmt: skip


def _next_event(proc: subprocess.Popen[bytes], name: str, timeout: float = 5.0) -> dict[str, Any]:
    """The next JSON event called ``name`` on ``proc``'s stdout (BenchError if none comes)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
        line = proc.stdout.readline()
        if not line:
            break
        event: dict[str, Any] = json.loads(line)
        if event.get("event") == name:
            return event
    raise BenchError(f"no {name!r} event from natkit p2p connect")


_PLAIN_CLIENT = """
import socket, sys, statistics, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(2); u.connect((host, port))
rtts = []
for i in range(n):
    t = time.monotonic(); u.send(i.to_bytes(4, "big")); u.recv(64)
    rtts.append(time.monotonic() - t)
print(statistics.median(rtts) * 1000)
"""


# ---- the run -----------------------------------------------------------------------------------


def run(lab: Lab | None, opts: Options) -> Report:
    assert lab is not None
    started, t_start = now(), time.monotonic()
    state = Path(tempfile.mkdtemp(prefix="nkb-p2p-"))
    os.environ["NATKIT_STATE_DIR"] = str(state / "peers")
    cases = {
        "direct": CaseResult("direct", "natkit p2p, direct (eim/eim, hole punching)", "subject"),
        "aioice": CaseResult(
            "aioice", "aioice ICE alone, same candidates (no QUIC, no signalling)", "reference"
        ),
        "relay": CaseResult(
            "relay", "natkit p2p via the relay (random/random, no TURN)", "subject"
        ),
    }
    relay = RelayProc(lab, state / "relay")
    try:
        for i in range(opts.warmup + opts.iterations):
            jobs: list[tuple[str, Callable[[], Sample]]] = [
                ("direct", lambda i=i: _session_case(lab, f"d{i}")[0]),  # type: ignore[misc]
                ("aioice", lambda: _aioice_case(lab)),
            ]
            for key, fn in jobs:
                try:
                    sample = fn()
                except Exception as exc:
                    cases[key].failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                (cases[key].warmup if i < opts.warmup else cases[key].samples).append(sample)
        _, natkit_link = _session_case(lab, "tput", _stream_and_rtt)
        plain_link = _plain(lab, state / "fwd")
        natkit_link["forward_mbps"] = plain_link.pop("forward_mbps")
        natkit_link["forward_runs"] = plain_link.pop("forward_runs")
        natkit_link["forward_cpu_s_per_gb"] = plain_link.pop("forward_cpu_s_per_gb")
        natkit_link["forward_plain_mbps"] = plain_link.pop("forward_plain_mbps")
        natkit_link["forward_plain_runs"] = plain_link.pop("forward_plain_runs")
        for mode in ("tcp", "punch"):
            for key in ("mbps", "runs", "cpu_s_per_gb", "plain_mbps", "plain_runs"):
                natkit_link[f"{mode}_forward_{key}"] = plain_link.pop(f"{mode}_forward_{key}")
    finally:
        relay.stop()
    hard = Lab.create(
        LabConfig(
            name=f"{lab.cfg.name}h",
            portmap=frozenset(),
            nat="random",
            second_lan=True,
            nat2="random",
            portmap2=frozenset(),
        ),
        replace=True,
    )
    try:
        relay = RelayProc(hard, state / "relay")  # the same certificate: pinned already
        try:
            for i in range(max(3, opts.iterations // 3)):
                try:
                    cases["relay"].samples.append(_session_case(hard, f"r{i}")[0])
                except Exception as exc:
                    cases["relay"].failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            relay.stop()
    finally:
        hard.down()
    direct, relayed = cases["direct"].stats, cases["relay"].stats
    paths = {c.key: sorted({str(s.info.get("path")) for s in c.samples}) for c in cases.values()}
    goals = [
        (
            f"forwarded over QUIC on the direct path >= {GOAL_QUIC_MBPS:g} MB/s (median)",
            natkit_link["forward_mbps"] >= GOAL_QUIC_MBPS,
        ),
        (
            f"forwarded over the direct TCP path >= {GOAL_TCP_RATIO:g}x plain TCP (median)",
            natkit_link["tcp_forward_mbps"]
            >= GOAL_TCP_RATIO * natkit_link["tcp_forward_plain_mbps"],
        ),
        (
            f"forwarded over a punched TCP path >= {GOAL_TCP_RATIO:g}x plain TCP (median)",
            natkit_link["punch_forward_mbps"]
            >= GOAL_TCP_RATIO * natkit_link["punch_forward_plain_mbps"],
        ),
        (
            f"natkit direct session under {GOAL_DIRECT_S:g} s (median)",
            direct is not None and direct.median < GOAL_DIRECT_S,
        ),
        (
            f"natkit session via the relay under {GOAL_RELAY_S:g} s (median)",
            relayed is not None and relayed.median < GOAL_RELAY_S,
        ),
    ]
    notes = [
        f"Paths taken: direct case {paths['direct']}, relay case {paths['relay']}.",
        f"Direct path, lan → lan2 across both NATs: natkit QUIC stream "
        f"{natkit_link['mbps']:.1f} MB/s with both peers in one process (GIL shared), "
        f"{natkit_link['forward_mbps']:.1f} MB/s through `natkit p2p connect --forward` between "
        f"two processes (median of {FORWARD_RUNS} `iperf3 -R -n {DOWNLOAD_BYTES >> 20}M` downloads: "
        f"{', '.join(f'{x:.1f}' for x in natkit_link['forward_runs'])}; both natkit processes "
        f"together {natkit_link['forward_cpu_s_per_gb']:.1f} CPU s per GB); datagram RTT {natkit_link['rtt_ms']:.2f} ms (median of "
        f"{RTT_SAMPLES}); plain TCP (iperf3, the same downloads through a port mapping on rtr2, taken in turns with each forward's: plain, forward, forward, plain, …) {plain_link['mbps']:.0f} MB/s (median of all {3 * FORWARD_RUNS}), plain UDP RTT "
        f"{plain_link['rtt_ms']:.2f} ms through a port mapping on rtr2 "
        f"(natkit/plain throughput {natkit_link['mbps'] / plain_link['mbps']:.3f}x, forwarded "
        f"{natkit_link['forward_mbps'] / plain_link['mbps']:.3f}x; QUIC here is qh3, its packet "
        "and crypto work in Rust).",
        f"Direct TCP path (the listener's TCP mapping on rtr2, forwarded connections over "
        f"kernel TCP sealed with the session's keys, {seal.preferred_cipher()}): "
        f"{natkit_link['tcp_forward_mbps']:.1f} MB/s through `natkit p2p connect --forward` "
        f"(median of {FORWARD_RUNS}: "
        f"{', '.join(f'{x:.1f}' for x in natkit_link['tcp_forward_runs'])}; both natkit "
        f"processes together {natkit_link['tcp_forward_cpu_s_per_gb']:.1f} CPU s per GB), "
        f"{_vs_plain(natkit_link, 'tcp_')}.",
        f"Punched TCP path (no mapping on either router: the listener dials back from its TCP "
        f"port while the connector's SYN is out, a simultaneous open through both NATs): "
        f"{natkit_link['punch_forward_mbps']:.1f} MB/s (median of {FORWARD_RUNS}: "
        f"{', '.join(f'{x:.1f}' for x in natkit_link['punch_forward_runs'])}; "
        f"{natkit_link['punch_forward_cpu_s_per_gb']:.1f} CPU s per GB), "
        f"{_vs_plain(natkit_link, 'punch_')}.",
    ]
    report = Report(
        name=NAME,
        title="Peer to peer: time to an authenticated session, natkit vs aioice ICE (lab)",
        started=started,
        machine=machine_info(),
        config={
            "iterations": opts.iterations,
            "warmup": opts.warmup,
            "relay": RELAY,
            "stream_bytes": STREAM_BYTES,
            "download_bytes": DOWNLOAD_BYTES,
            "rtt_samples": RTT_SAMPLES,
        },
        cases=[cases["direct"], cases["aioice"]],
        ratios=[ratio(cases, "natkit direct session / aioice ICE alone", "direct", "aioice")],
        goals=goals,
        notes=notes,
        sections=[
            Section(
                "relay",
                "Via the relay (ICE fails: both NATs random, no TURN)",
                [cases["relay"]],
                unit="ms",
                compare=False,
            )
        ],
        clients="natkit (aioice + qh3), aioice",
    )
    report.config["link"] = {"natkit": natkit_link, "plain": plain_link}
    report.elapsed = time.monotonic() - t_start
    return report


BENCHMARK = Benchmark(
    name=NAME,
    description="p2p: time to an authenticated session (direct, relay) vs aioice; link speed",
    lab_config=lab_config,
    run=run,
    iterations=10,
)
