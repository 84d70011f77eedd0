"""Relay tunnels on loopback: natkit relay + agent against ``ssh -R`` and socat, same run.

Everything runs on 127.0.0.1 (no lab): one service process, one client process per
measurement, and the tunnel's own processes in between —

- direct: the client talks to the service (no tunnel; the floor);
- socat: ``socat -b 262144 TCP-LISTEN:P,bind=127.0.0.1,reuseaddr,fork TCP:127.0.0.1:SVC``
  (one hop);
- ssh -R: our own ``sshd -f CONFIG`` on 127.0.0.1 (own host key and authorized key,
  ``UsePAM no``, ``Ciphers aes128-gcm@openssh.com``) and ``ssh -N -R 127.0.0.1:0:...``;
- natkit: ``natkit relay serve`` and ``natkit expose SVC --via relay`` (sealed data
  connections: ChaCha20-Poly1305 keyed from the TLS control session), and the same with
  ``--plaintext-data`` (the splice path).

Measured: throughput of 1 GiB each way (wall time, and CPU seconds of the tunnel's
processes from /proc/PID/stat), the latency of a new visitor connection (1 KiB request,
1 KiB reply), and 10,000 concurrent visitor connections held open (RSS, fds, CPU).

The service and the clients are this file run as a program (``_service``, ``_client``):
the service discards with ``recv(MSG_TRUNC)`` (the kernel drops the bytes, no copy) and
sends with ``os.sendfile`` from a page-cached file; the client does the same on its side,
so nearly all the CPU of the 2-core machine is left to the tunnel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import gc
import json
import os
import random
import re
import resource
import secrets
import select
import selectors
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchlib import (
    REPO_DIR,
    BenchError,
    Benchmark,
    Options,
    Ratio,
    Report,
    machine_info,
    natkit_of_tree,
    now,
)

NAME = "relay"
LOOPBACK = "127.0.0.1"
GIB = 1 << 30
MIB = 1 << 20
THROUGHPUT_BYTES = GIB
WARMUP_BYTES = 256 * MIB  # per path and direction, untimed
BLOB_BYTES = 64 * MIB  # the file sendfile() sends from, over and over (page cached)
REQUEST = 1024  # latency and hold: 1 KiB request, 1 KiB reply (an echo)
LAT_REQUESTS = 2000
LAT_WARMUP = 200
LAT_ROUNDS = 4  # the 2,000 requests are 4 interleaved rounds of 500 per path
HOLD_CONNS = 10_000
HOLD_BATCH = 250
HOLD_SAMPLE = 200  # held connections asked again while all 10,000 are open
HOLD_SECONDS = 10.0  # idle CPU is measured over this long with everything open
NOFILE = 65536
RELAY_PORTS = "21000-21099"
SSH_CIPHER = "aes128-gcm@openssh.com"
SOCAT_BUFFER = 262144
CLK_TCK = os.sysconf("SC_CLK_TCK")

GOAL_PLAIN_VS_SSH = 2.0
GOAL_PLAIN_VS_SOCAT = 0.85  # issue 12
GOAL_SEALED_VS_SSH = 1.2  # issue 12
GOAL_NOT_REGRESSED = 0.95  # this checkout over the code before issue 12, same run (noise: 5 %)
# The relay before issue 12, run from a temporary worktree beside this checkout (throughput
# only): whether a ratio to socat moved because of the code or because of the machine.
BEFORE = os.environ.get("NATKIT_BENCH_BEFORE", "d985f4b")
# NATKIT_BENCH_ACCESS=1 (relay_small): two more natkit sealed rows in the same rounds, one
# whose tunnel has an access policy and one of the code before access control (issue 15) —
# what a policy costs per visitor, and that a tunnel without one costs what it did.
ACCESS_ROWS = os.environ.get("NATKIT_BENCH_ACCESS") == "1"
ACCESS_BEFORE = os.environ.get("NATKIT_BENCH_ACCESS_BEFORE", "a978797")
ACCESS_ARGS = ("--allow", "127.0.0.0/8", "--deny", "10.0.0.0/8", "--rate-limit", "100000/s")
GOAL_P50_MS = 0.8
GOAL_P99_MS = 1.5
GOAL_RSS_MB = 100.0

# Small requests: real HTTP clients against nginx's tiny answer, through each path.
SMALL_BODY = "hello, world\n"  # 13 bytes: nginx `return 200`
NGINX_WORKERS = 1  # one nginx worker: the tunnels, the clients and nginx share 2 CPUs
WRK_CONNS = 50  # kept-alive connections
WRK_THREADS = 1
WRK_SECONDS = 4
AB_CONC = 20  # ab: a new connection per request (no -k)
AB_REQUESTS = 10_000
SMALL_ROUNDS = 3  # interleaved rounds per client and path
GOAL_SMALL_SEALED_VS_SOCAT = 0.8
GOAL_SMALL_NEW_PER_S = 5000.0

DIRECTIONS = {
    "down": "download: service → visitor (service sendfile, visitor discards)",
    "up": "upload: visitor → service (visitor sendfile, service discards, replies the count)",
}

# ==== the service and the client (run as separate processes) ==============================


def _raise_nofile(n: int = NOFILE) -> None:
    """RLIMIT_NOFILE to n: for us, and as preexec_fn for what we start. Raising the hard
    limit needs CAP_SYS_RESOURCE (some containers lack it): then up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= n:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, hard)))
    except (ValueError, OSError):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def nofile_limit() -> int:
    _raise_nofile()
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError(f"closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def _discard(sock: socket.socket) -> int:
    """Read until EOF without copying: the kernel drops TCP data read with MSG_TRUNC."""
    buf = bytearray(MIB)
    total = 0
    while k := sock.recv_into(buf, MIB, socket.MSG_TRUNC):
        total += k
    return total


def _send_blob(sock: socket.socket, fd: int, size: int, n: int) -> None:
    """Send n bytes from the (page-cached) file fd of size `size`, wrapping around."""
    off = sent = 0
    while sent < n:
        k = os.sendfile(sock.fileno(), fd, off, min(n - sent, size - off))
        if k == 0:
            raise ConnectionError("sendfile sent nothing")
        sent += k
        off = (off + k) % size


class _Service:
    """One op per connection, by its first byte:

    - ``D`` + u64 N: the service sends N bytes (sendfile), then half-closes;
    - ``U`` + u64 N: the service discards until EOF, then replies the byte count (u64);
    - ``R`` + 1023 bytes: the service echoes each 1 KiB request until EOF (latency, hold).

    Echo connections live on one selector (10,000 of them are fine); bulk ones get a thread.
    """

    def __init__(self, port: int, blob: Path) -> None:
        self.sel = selectors.DefaultSelector()
        self.srv = socket.create_server((LOOPBACK, port), backlog=4096)
        self.srv.setblocking(False)
        self.sel.register(self.srv, selectors.EVENT_READ, None)
        self.blob_fd = os.open(blob, os.O_RDONLY)
        self.blob_size = os.fstat(self.blob_fd).st_size
        self.port = self.srv.getsockname()[1]

    def serve(self) -> None:
        conns: dict[socket.socket, bytearray] = {}
        while True:
            for key, _ in self.sel.select():
                if key.data is None:
                    self._accept(conns)
                    continue
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                self._readable(sock, conns)

    def _accept(self, conns: dict[socket.socket, bytearray]) -> None:
        for _ in range(256):
            try:
                sock, _addr = self.srv.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                time.sleep(0.01)  # EMFILE: back off rather than spin
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns[sock] = bytearray()
            self.sel.register(sock, selectors.EVENT_READ, True)

    def _close(self, sock: socket.socket, conns: dict[socket.socket, bytearray]) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)
        conns.pop(sock, None)
        sock.close()

    def _readable(self, sock: socket.socket, conns: dict[socket.socket, bytearray]) -> None:
        buf = conns[sock]
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(sock, conns)
            return
        buf += data
        op = buf[:1]
        if op in (b"D", b"U"):
            if len(buf) < 9:
                return
            n = int.from_bytes(buf[1:9], "big")
            early = len(buf) - 9  # upload bytes that came with the header
            self.sel.unregister(sock)
            del conns[sock]
            sock.setblocking(True)
            target = self._download if op == b"D" else self._upload
            threading.Thread(target=target, args=(sock, n, early), daemon=True).start()
            return
        if op != b"R":
            self._close(sock, conns)
            return
        while len(buf) >= REQUEST:
            reply = bytes(buf[:REQUEST])
            del buf[:REQUEST]
            try:
                sock.setblocking(True)  # 1 KiB into an idle socket: never blocks for long
                sock.sendall(reply)
                sock.setblocking(False)
            except OSError:
                self._close(sock, conns)
                return

    def _download(self, sock: socket.socket, n: int, early: int) -> None:
        with sock:
            try:
                _send_blob(sock, self.blob_fd, self.blob_size, n)
                sock.shutdown(socket.SHUT_WR)
                _discard(sock)  # until the client closes
            except OSError:
                pass

    def _upload(self, sock: socket.socket, n: int, early: int) -> None:
        with sock:
            try:
                got = early + _discard(sock)
                sock.sendall(got.to_bytes(8, "big"))
            except OSError:
                pass


def _service_main(args: argparse.Namespace) -> int:
    _raise_nofile()
    svc = _Service(args.port, Path(args.blob))
    print(json.dumps({"event": "ready", "port": svc.port}), flush=True)
    svc.serve()
    return 0


def _steal_s() -> float:
    """CPU time the hypervisor gave to others while this VM wanted it (all CPUs, seconds):
    /proc/stat's steal column. A shared machine's noise, measured instead of guessed."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _client_throughput(args: argparse.Namespace) -> dict[str, Any]:
    n = args.bytes
    fd = os.open(args.blob, os.O_RDONLY)
    size = os.fstat(fd).st_size
    gc.disable()
    c0 = _cpu_self()
    t0 = time.perf_counter()
    with socket.create_connection((LOOPBACK, args.port), timeout=10) as sock:
        sock.settimeout(None)  # blocking: os.sendfile() on a socket with a timeout gets EAGAIN
        if args.direction == "down":
            sock.sendall(b"D" + n.to_bytes(8, "big"))
            got = _discard(sock)
        else:
            sock.sendall(b"U" + n.to_bytes(8, "big"))
            _send_blob(sock, fd, size, n)
            sock.shutdown(socket.SHUT_WR)
            got = int.from_bytes(_recv_exact(sock, 8), "big")
    t1 = time.perf_counter()
    os.close(fd)
    return {"seconds": t1 - t0, "bytes": got, "ok": got == n, "client_cpu_s": _cpu_self() - c0}


def _echo_payload(i: int) -> bytes:
    head = b"R%09d " % i
    return head + secrets.token_bytes(REQUEST - len(head))


def _client_latency(args: argparse.Namespace) -> dict[str, Any]:
    addr = (LOOPBACK, args.port)
    payloads = [_echo_payload(i) for i in range(64)]
    samples: list[float] = []
    errors: list[str] = []
    gc.disable()
    for i in range(args.warmup + args.requests):
        payload = payloads[i % len(payloads)]
        t0 = time.perf_counter()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.connect(addr)
                sock.sendall(payload)
                got = _recv_exact(sock, REQUEST)
        except OSError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        t1 = time.perf_counter()
        if got != payload:
            errors.append("wrong reply")
            continue
        if i >= args.warmup:
            samples.append(t1 - t0)
    return {"samples": samples, "errors": errors[:20], "failed": len(errors)}


async def _hold_main(args: argparse.Namespace) -> None:
    """Open N visitor connections in batches, each proved by a 1 KiB echo; hold them.

    Then obey commands on stdin: ``check`` (echo again on a random sample of the held
    connections, and time one new connection), ``close`` (close them all, exit)."""
    loop = asyncio.get_running_loop()
    held: list[socket.socket] = []
    errors: dict[str, int] = {}

    async def echo(sock: socket.socket, i: int) -> None:
        payload = _echo_payload(i)
        await loop.sock_sendall(sock, payload)
        buf = bytearray()
        while len(buf) < REQUEST:
            chunk = await loop.sock_recv(sock, REQUEST - len(buf))
            if not chunk:
                raise ConnectionError("closed before the reply")
            buf += chunk
        if bytes(buf) != payload:
            raise ConnectionError("wrong reply")

    async def open_one(i: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (LOOPBACK, args.port)), 15)
            await asyncio.wait_for(echo(sock, i), 15)
        except BaseException:
            sock.close()
            raise
        last_ok[0] = max(last_ok[0], time.perf_counter() - t0)
        return sock

    last_ok = [0.0]  # seconds from t0 to the latest connection that got through

    def note(exc: BaseException) -> None:
        key = f"{type(exc).__name__}: {exc}"[:120]
        errors[key] = errors.get(key, 0) + 1

    t0 = time.perf_counter()
    progress: list[list[float]] = []
    stalled = False
    for start in range(0, args.n, args.batch):
        idx = range(start, min(args.n, start + args.batch))
        results = await asyncio.gather(*(open_one(i) for i in idx), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                note(r)
            else:
                held.append(r)
        progress.append([len(held), round(time.perf_counter() - t0, 3)])
        if sum(not isinstance(r, BaseException) for r in results) < len(idx) / 10:
            stalled = True  # the tunnel takes no more: stop here rather than time out 10,000 times
            break
    opened_s = time.perf_counter() - t0
    _emit(
        {
            "event": "open",
            "opened": len(held),
            "wanted": args.n,
            "stalled": stalled,
            "seconds": opened_s,
            "reached_at": last_ok[0],  # when the last connection that worked was open
            "errors": errors,
            "progress": progress[:: max(1, len(progress) // 20)],
        }
    )

    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        cmd = line.strip()
        if cmd == "check":
            sample = random.sample(range(len(held)), min(args.sample, len(held)))
            ok, bad = 0, {}
            for i in sample:
                try:
                    await asyncio.wait_for(echo(held[i], i), 10)
                    ok += 1
                except (OSError, asyncio.TimeoutError) as exc:
                    k = f"{type(exc).__name__}: {exc}"[:120]
                    bad[k] = bad.get(k, 0) + 1
            t1 = time.perf_counter()
            try:
                extra = await open_one(args.n)
                new_ms: float | None = (time.perf_counter() - t1) * 1000
                held.append(extra)
            except (OSError, asyncio.TimeoutError) as exc:
                new_ms = None
                bad[f"new: {type(exc).__name__}: {exc}"[:120]] = 1
            _emit(
                {
                    "event": "checked",
                    "ok": ok,
                    "sampled": len(sample),
                    "errors": bad,
                    "new_visitor_ms": new_ms,
                }
            )
        elif cmd in ("close", ""):
            t1 = time.perf_counter()
            for sock in held:
                sock.close()
            _emit({"event": "closed", "seconds": time.perf_counter() - t1})
            return


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _hop_main(args: argparse.Namespace) -> int:
    """The two-hop splice floor: a minimal forwarder (no natkit, no event loop). It accepts on
    ``--port``, connects each connection on to ``--to``, and splices both ways with blocking
    ``os.splice`` in two threads per connection. Two in a row are a two-hop splice relay."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOPBACK, args.port))
    listener.listen(64)
    print(json.dumps({"event": "ready", "port": listener.getsockname()[1]}), flush=True)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        r, w = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
        with contextlib.suppress(OSError):
            while n := os.splice(src.fileno(), w, 1 << 20):
                while n:
                    n -= os.splice(r, dst.fileno(), n)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        os.close(r)
        os.close(w)

    while True:
        conn, _ = listener.accept()
        onward = socket.create_connection((LOOPBACK, args.to))
        for sock in (conn, onward):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for a, b in ((conn, onward), (onward, conn)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()


def _client_main(args: argparse.Namespace) -> int:
    _raise_nofile()
    if args.what == "throughput":
        _emit(_client_throughput(args))
    elif args.what == "latency":
        _emit(_client_latency(args))
    else:
        asyncio.run(_hold_main(args))
    return 0


def _role_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_relay.py")
    sub = parser.add_subparsers(dest="role", required=True)
    s = sub.add_parser("_service")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--blob", required=True)
    h = sub.add_parser("_hop")
    h.add_argument("--port", type=int, default=0)
    h.add_argument("--to", type=int, required=True)
    c = sub.add_parser("_client")
    c.add_argument("what", choices=["throughput", "latency", "hold"])
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--blob", default="")
    c.add_argument("--direction", choices=list(DIRECTIONS), default="down")
    c.add_argument("--bytes", type=int, default=THROUGHPUT_BYTES)
    c.add_argument("--requests", type=int, default=LAT_REQUESTS)
    c.add_argument("--warmup", type=int, default=0)
    c.add_argument("-n", type=int, default=HOLD_CONNS)
    c.add_argument("--batch", type=int, default=HOLD_BATCH)
    c.add_argument("--sample", type=int, default=HOLD_SAMPLE)
    args = parser.parse_args(argv)
    if args.role == "_hop":
        return _hop_main(args)
    return _service_main(args) if args.role == "_service" else _client_main(args)


# ==== processes: start, wait for, measure, stop ==========================================


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime+stime+cutime+cstime in ticks) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(rest[1]), sum(int(x) for x in rest[11:15])


def _all_stats() -> dict[int, tuple[int, int]]:
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            found[int(name)] = st
    return found


def tree_pids(root: int, stats: dict[int, tuple[int, int]] | None = None) -> list[int]:
    stats = _all_stats() if stats is None else stats
    if root not in stats:
        return []
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def tree_cpu(root: int) -> float:
    """CPU seconds of a process and all its descendants, live or reaped (each counted once:
    a live process by its own and its reaped children's time, a reaped one inside its
    parent's cutime/cstime)."""
    stats = _all_stats()
    return sum(stats[p][1] for p in tree_pids(root, stats)) / CLK_TCK


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def tree_rss_mb(root: int) -> float:
    return sum(rss_mb(p) for p in tree_pids(root))


def tree_fds(root: int) -> int:
    n = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            n += len(os.listdir(f"/proc/{pid}/fd"))
    return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"nothing listens on {LOOPBACK}:{port}") from None
            time.sleep(0.05)


class Proc:
    """A process we start (own session, RLIMIT_NOFILE raised), its output in files."""

    def __init__(
        self, name: str, argv: Sequence[str], tmp: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.out_path, self.err_path = tmp / f"{name}.out", tmp / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env={**os.environ, **(env or {})},
                preexec_fn=_raise_nofile,
                start_new_session=True,
            )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self, stream: str = "out") -> str:
        path = self.out_path if stream == "out" else self.err_path
        return path.read_text(errors="replace")

    def wait_for(self, pattern: str, stream: str = "out", timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            found = rx.search(self.text(stream))
            if found:
                return found
            if not self.alive():
                raise BenchError(f"{self.name} exited {self.popen.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no {pattern!r} in {timeout:.0f} s: {self.tail()}")
            time.sleep(0.05)

    def tail(self, lines: int = 4) -> str:
        text = (self.text("out") + self.text("err")).strip().splitlines()
        return " | ".join(text[-lines:])

    def stop(self) -> None:
        """SIGTERM (then SIGKILL) this process, then whatever it started that is still up."""
        pids = tree_pids(self.pid)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(timeout=5)
        for pid in pids[1:]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)


# ==== the paths: each a TCP port on 127.0.0.1 that reaches the service ====================


@dataclasses.dataclass
class Route:
    key: str
    label: str
    port: int
    procs: dict[str, Proc]  # role -> process whose tree does the tunnel's work
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def cpu(self) -> dict[str, float]:
        return {role: tree_cpu(p.pid) for role, p in self.procs.items()}

    def rss(self) -> dict[str, float]:
        return {role: tree_rss_mb(p.pid) for role, p in self.procs.items()}

    def fds(self) -> dict[str, int]:
        return {role: tree_fds(p.pid) for role, p in self.procs.items()}

    def alive(self) -> dict[str, bool]:
        return {role: p.alive() for role, p in self.procs.items()}


class Env:
    """The benchmark's temporary directory, the service, and every process started."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []
        self.blob = tmp / "blob"
        with open(self.blob, "wb") as f:
            for _ in range(BLOB_BYTES // (4 * MIB)):
                f.write(os.urandom(4 * MIB))
        self.service = self.start(
            "service", [sys.executable, __file__, "_service", "--blob", str(self.blob)]
        )
        self.svc_port = int(json.loads(self.service.wait_for(r"\{.*\}").group(0))["port"])
        self._ssh_keys: tuple[Path, Path] | None = None

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        n = sum(1 for p in self.procs if p.name.split("#")[0] == name)
        proc = Proc(f"{name}#{n}" if n else name, argv, self.tmp, env)
        self.procs.append(proc)
        return proc

    def stop(self, *procs: Proc) -> None:
        for p in procs:
            p.stop()

    def close(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                p.stop()

    # -- the paths --

    def direct(self) -> Route:
        return Route("direct", "direct (no tunnel)", self.svc_port, {})

    def socat(self, target: int | None = None) -> Route:
        port = free_port()
        proc = self.start(
            "socat",
            [
                "socat",
                "-b",
                str(SOCAT_BUFFER),
                f"TCP-LISTEN:{port},bind={LOOPBACK},reuseaddr,fork",
                f"TCP:{LOOPBACK}:{target or self.svc_port}",
            ],
        )
        wait_port(port)
        return Route("socat", f"socat -b {SOCAT_BUFFER} (one hop)", port, {"socat": proc})

    def splice_floor(self) -> Route:
        """Two minimal blocking-splice forwarders in a row (``_hop``): what any two-hop splice
        relay costs on this machine, without natkit."""
        far = self.start("hop2", [sys.executable, __file__, "_hop", "--to", str(self.svc_port)])
        far_port = int(json.loads(far.wait_for(r"\{.*\}").group(0))["port"])
        near = self.start("hop1", [sys.executable, __file__, "_hop", "--to", str(far_port)])
        port = int(json.loads(near.wait_for(r"\{.*\}").group(0))["port"])
        return Route("splice2", "two-hop splice floor (2 minimal forwarders)", port,
                     {"hop1": near, "hop2": far})  # fmt: skip

    def nginx(self) -> Route:
        """Our own nginx on 127.0.0.1 (own config, pid file, error log and temp paths in the
        temp dir; no daemon; never the system service): ``return 200`` of SMALL_BODY."""
        d = self.tmp / "nginx"
        d.mkdir(exist_ok=True)
        port = free_port()
        temps = "".join(
            f"    {kind}_temp_path {d}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = d / "nginx.conf"
        conf.write_text(
            f"daemon off;\nmaster_process on;\nworker_processes {NGINX_WORKERS};\n"
            f"pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n"
            "events { worker_connections 4096; }\n"
            "http {\n    access_log off;\n    keepalive_requests 1000000;\n"
            f"{temps}"
            f"    server {{\n        listen {LOOPBACK}:{port} backlog=4096;\n"
            "        default_type text/plain;\n"
            f"        location / {{ return 200 {json.dumps(SMALL_BODY)}; }}\n    }}\n}}\n"
        )
        self.start("nginx", ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)])
        wait_port(port)
        return Route("nginx", f"nginx direct ({NGINX_WORKERS} worker, no tunnel)", port, {})

    def ssh(self, interactive: bool = False) -> Route:
        d = self.tmp / "ssh"
        if self._ssh_keys is None:
            d.mkdir(mode=0o700)
            for name in ("host_key", "client_key"):
                subprocess.run(
                    [
                        "ssh-keygen",
                        "-q",
                        "-t",
                        "ed25519",
                        "-N",
                        "",
                        "-C",
                        "nkb",
                        "-f",
                        str(d / name),
                    ],
                    check=True,
                )
            shutil.copy(d / "client_key.pub", d / "authorized_keys")
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privsep directory
            self._ssh_keys = (d / "host_key", d / "client_key")
        host_key, client_key = self._ssh_keys
        port = free_port()
        cfg = d / f"sshd_config_{port}"
        cfg.write_text(
            f"Port {port}\nListenAddress {LOOPBACK}\nHostKey {host_key}\n"
            f"PidFile {d}/sshd_{port}.pid\nAuthorizedKeysFile {d}/authorized_keys\n"
            "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            f"StrictModes no\nCiphers {SSH_CIPHER}\nAllowTcpForwarding yes\nGatewayPorts no\n"
            "X11Forwarding no\nPrintMotd no\nPrintLastLog no\nUseDNS no\nLogLevel ERROR\n"
        )
        sshd = self.start("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)])
        wait_port(port)
        argv = ["ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-o", "ExitOnForwardFailure=yes", "-o", "IdentitiesOnly=yes",
                "-o", f"Ciphers={SSH_CIPHER}", "-i", str(client_key), "-p", str(port),
                "-R", f"{LOOPBACK}:0:{LOOPBACK}:{self.svc_port}", f"root@{LOOPBACK}"]  # fmt: skip
        if interactive:  # a session with a pty: OpenSSH then sets TCP_NODELAY
            argv[1:1] = ["-tt"]
            argv.append("sleep 2147483647")
        else:  # what people run for a tunnel
            argv[1:1] = ["-N", "-n", "-T"]
        ssh = self.start("ssh", argv)
        found = ssh.wait_for(r"Allocated port (\d+)", stream="err")
        public = int(found.group(1))
        wait_port(public)
        if interactive:
            return Route("ssh_tty", f"ssh -tt -R ({SSH_CIPHER}, pty session)", public,
                         {"sshd": sshd, "ssh": ssh})  # fmt: skip
        return Route("ssh", f"ssh -N -R ({SSH_CIPHER})", public, {"sshd": sshd, "ssh": ssh})

    def natkit(
        self,
        plaintext: bool,
        *,
        asyncio_loop: bool = False,
        target: int | None = None,
        before: Path | None = None,
        agent_args: Sequence[str] = (),
        tag: tuple[str, str] | None = None,
    ) -> Route:
        """natkit relay + agent; ``before``: the ``src`` of an older checkout to run instead;
        ``agent_args``: more ``natkit expose`` options; ``tag``: (label, key) suffixes."""
        mode = "plain" if plaintext else "sealed"
        state = self.tmp / f"natkit-{mode}-{len(self.procs)}"
        state.mkdir()
        env = {"NATKIT_STATE_DIR": str(state)}
        if asyncio_loop:  # the same code on asyncio's own event loop (a reference row)
            env["NATKIT_EVENT_LOOP"] = "asyncio"
        if before is not None:
            env["PYTHONPATH"] = str(before)
        token = secrets.token_urlsafe(24)
        relay = self.start(
            f"relay-{mode}",
            [
                *natkit_of_tree(),
                "relay",
                "serve",
                "--listen",
                f"{LOOPBACK}:{free_port()}",
                "--token",
                token,
                "--ports",
                RELAY_PORTS,
                "--json",
            ],
            env,
        )
        ready = json.loads(relay.wait_for(r"\{.*\"ready\".*\}").group(0))
        listen = str(ready["listen"])
        argv = [
            *natkit_of_tree(),
            "expose",
            str(target or self.svc_port),
            "--via",
            "relay",
            "--relay",
            listen,
            "--token",
            token,
            "--json",
        ]
        argv += list(agent_args)
        agent = self.start(f"agent-{mode}", argv + (["--plaintext-data"] if plaintext else []), env)
        up = json.loads(agent.wait_for(r"\{.*\"ready\".*\}").group(0))
        public = str(up["public_address"])
        port = int(public.rsplit(":", 1)[1])
        label = "natkit relay+agent, " + ("plaintext data (splice)" if plaintext else "sealed data")
        key = f"natkit_{mode}"
        if asyncio_loop:
            label, key = label + ", on asyncio's event loop", key + "_asyncio"
        if tag is not None:
            label, key = f"{label}, {tag[0]}", f"{key}_{tag[1]}"
        elif before is not None:
            label, key = label + f", before issue 12 (git {BEFORE})", key + "_before"
        info = {"listen": listen, "public": public, "tls": _tls_of(listen)}
        return Route(key, label, port, {"relay": relay, "agent": agent}, info)

    # -- clients --

    def client(self, what: str, port: int, *extra: str, timeout: float = 300) -> dict[str, Any]:
        argv = [sys.executable, __file__, "_client", what, "--port", str(port), *extra]
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, preexec_fn=_raise_nofile
        )
        if proc.returncode != 0 or not proc.stdout.strip():
            raise BenchError(
                f"client {what} exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
            )
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result


def _tls_of(listen: str) -> str:
    """The TLS version and cipher natkit's relay negotiates with a default client."""
    host, port = listen.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, int(port)), timeout=5) as raw:  # noqa: SIM117
            with ctx.wrap_socket(raw) as tls:
                cipher = tls.cipher()
                return f"{tls.version()} {cipher[0] if cipher else '?'}"
    except OSError as exc:
        return f"? ({exc})"


# ==== the measurements ===================================================================


@dataclasses.dataclass
class Run:
    seconds: float
    bytes: int
    cpu: dict[str, float]  # role -> CPU seconds of that process tree during the run
    client_cpu: float
    service_cpu: float
    steal_s: float = 0.0  # hypervisor steal (both CPUs) during the run

    @property
    def mbps(self) -> float:
        return self.bytes / self.seconds / 1e6


def measure_throughput(env: Env, path: Route, direction: str, n: int) -> Run:
    before, svc0, steal0 = path.cpu(), tree_cpu(env.service.pid), _steal_s()
    r = env.client(
        "throughput",
        path.port,
        "--direction",
        direction,
        "--bytes",
        str(n),
        "--blob",
        str(env.blob),
    )
    time.sleep(0.3)  # let socat reap its child (its CPU moves to the parent's cutime)
    after, svc1 = path.cpu(), tree_cpu(env.service.pid)
    if not r["ok"]:
        raise BenchError(f"{path.key} {direction}: {r['bytes']} bytes arrived, not {n}")
    cpu = {k: after[k] - before[k] for k in after}
    stolen = round(_steal_s() - steal0, 3)
    return Run(r["seconds"], r["bytes"], cpu, r["client_cpu_s"], svc1 - svc0, stolen)


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of values, nearest-rank on sorted data."""
    vals = sorted(values)
    k = max(0, min(len(vals) - 1, round(q / 100 * len(vals) + 0.5) - 1))
    return vals[k]


@dataclasses.dataclass
class Table:
    key: str
    title: str
    headers: list[str]
    rows: list[list[str]]
    intro: str = ""


def _text_table(t: Table) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in t.rows)) for i, h in enumerate(t.headers)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [t.title, fmt(t.headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in t.rows]


def _md_table(t: Table) -> list[str]:
    return [
        "| " + " | ".join(t.headers) + " |",
        "|---|" + "---:|" * (len(t.headers) - 1),
        *("| " + " | ".join(r) + " |" for r in t.rows),
    ]


@dataclasses.dataclass
class RelayReport(Report):
    tables: list[Table] = dataclasses.field(default_factory=list)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    def _ratio_lines(self) -> list[str]:
        return [
            f"{r.label}: {'n/a' if r.value is None else f'{r.value:.3g}x'}" for r in self.ratios
        ]

    def _goal_lines(self, md: bool) -> list[str]:
        return [
            f"goal {g}: {'met' if ok else ('**not met**' if md else 'NOT MET')}"
            for g, ok in self.goals
        ]

    def to_text(self) -> str:
        lines: list[str] = [self.title, ""]
        for t in self.tables:
            lines += [*_text_table(t), ""]
        lines += self._ratio_lines() + self._goal_lines(False)
        return "\n".join(lines)

    def to_markdown(self) -> str:
        m = self.machine
        out = [
            f"# {self.title}",
            "",
            f"- date: {self.started.strftime('%Y-%m-%d %H:%M:%S %Z').strip()}",
            f"- machine: {m.get('nproc')} CPUs ({m.get('cpu')}), Linux {m.get('kernel')}, "
            f"{m.get('os')}; everything on 127.0.0.1",
            f"- natkit {m.get('natkit')} (git {m.get('git')}), Python {m.get('python')}, "
            f"{m.get('openssl')}, event loop of `natkit relay serve`/`expose`: "
            f"{m.get('event_loop')}",
            f"- references: {m.get('openssh')} (Debian `openssh-server` {m.get('openssh_deb')}), "
            f"socat {m.get('socat')} (Debian `socat` {m.get('socat_deb')})",
            f"- run took {self.elapsed:.0f} s; CPU time stolen by the hypervisor meanwhile "
            f"(other guests on the host): {m.get('steal_s', 0):.1f} s of "
            f"{self.elapsed * int(m.get('nproc') or 1):.0f} CPU-s",
            "",
        ]
        for t in self.tables:
            out += [f"## {t.title}", ""]
            if t.intro:
                out += [t.intro, ""]
            out += [*_md_table(t), ""]
        out += [f"- **{line}**" for line in self._ratio_lines()]
        out += [f"- {line}" for line in self._goal_lines(True)]
        out.append("")
        if self.notes:
            out += ["Notes:", "", *(f"- {n}" for n in self.notes), ""]
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "title": self.title,
            "date": self.started.isoformat(timespec="seconds"),
            "elapsed_s": round(self.elapsed, 1),
            "machine": self.machine,
            "config": self.config,
            **self.data,
            "ratios": [
                {
                    "label": r.label,
                    "numerator": r.slower,
                    "denominator": r.faster,
                    "value": None if r.value is None else round(r.value, 3),
                }
                for r in self.ratios
            ],
            "goals": [{"goal": g, "met": ok} for g, ok in self.goals],
            "notes": self.notes,
        }


def _versions() -> dict[str, str]:
    def cmd(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return (p.stdout + p.stderr).strip()

    def deb(pkg: str) -> str:
        return cmd(["dpkg-query", "-W", "-f=${Version}", pkg]) or "?"

    socat_v = re.search(r"socat version (\S+)", cmd(["socat", "-V"]))
    return {
        "openssh": cmd(["ssh", "-V"]).split(",")[0] or "?",
        "openssh_deb": deb("openssh-server"),
        "socat": socat_v.group(1) if socat_v else "?",
        "socat_deb": deb("socat"),
        "openssl": ssl.OPENSSL_VERSION,
        "event_loop": _event_loop(),
    }


def _event_loop() -> str:
    """What natkit's relay and agent commands run on here (natkit.cli.common.run_loop)."""
    if os.environ.get("NATKIT_EVENT_LOOP", "").lower() == "asyncio":
        return "asyncio (NATKIT_EVENT_LOOP=asyncio)"
    try:
        import uvloop
    except ImportError:
        return "asyncio (uvloop not installed)"
    return f"uvloop {uvloop.__version__}"


def _pool_size() -> str:
    try:
        from natkit.relay.server import RelayConfig

        return str(RelayConfig().pool_size)
    except (ImportError, AttributeError):
        return "?"


def _f(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def _mb(x: float) -> str:
    return f"{x:.1f}"


def _relay_machine() -> dict[str, Any]:
    """The machine and the tools' versions, without the UPnP benchmark's entries."""
    machine = {**machine_info(), **_versions()}
    for key in ("miniupnpd", "miniupnpd_deb", "upnpc_deb", "miniupnpc_binding"):
        machine.pop(key, None)
    return machine


def run(lab: Any, opts: Options) -> Report:
    """``lab`` is unused: this benchmark runs on loopback."""
    for tool in ("socat", "ssh", "ssh-keygen"):
        if not shutil.which(tool):
            raise BenchError(
                f"{tool} is missing: apt-get install openssh-server openssh-client socat"
            )
    if not os.path.exists("/usr/sbin/sshd"):
        raise BenchError("/usr/sbin/sshd is missing: apt-get install openssh-server")
    _raise_nofile()
    started = now()
    t_start = time.monotonic()
    machine = _relay_machine()
    runs = max(1, opts.iterations)
    steal0 = _steal_s()
    with tempfile.TemporaryDirectory(prefix="nkb-relay-") as tmpdir:
        env = Env(Path(tmpdir))
        try:
            paths = [env.direct(), env.socat(), env.splice_floor(), env.ssh(), env.natkit(True),
                     env.natkit(False)]  # fmt: skip
            before = _before_checkout(Path(tmpdir))
            olds = (
                [env.natkit(True, before=before), env.natkit(False, before=before)]
                if before
                else []
            )
            tput = _throughput(env, paths + olds, runs, opts.warmup)
            floor = paths.pop(2)  # throughput only: a reference, not a tunnel
            env.stop(*floor.procs.values(), *(proc for p in olds for proc in p.procs.values()))
            path_info = {p.key: {"label": p.label, "port": p.port} for p in [floor, *olds]}
            ssh_tty = env.ssh(interactive=True)  # latency only: ssh with TCP_NODELAY
            paths.insert(3, ssh_tty)
            # Latency only: natkit on asyncio's own loop, to show what uvloop buys.
            paths += [env.natkit(True, asyncio_loop=True), env.natkit(False, asyncio_loop=True)]
            lat = _latency(env, paths)
            for p in paths:
                env.stop(*p.procs.values())
            hold = [
                _hold(env, make)
                for make in (lambda: env.natkit(True), lambda: env.natkit(False), env.ssh)
            ]
            path_info |= {p.key: {"label": p.label, "port": p.port, **p.info} for p in paths}
            small_paths = _small_paths(env)  # fresh: nginx, and socat and natkit in front of it
            small = _small(env, small_paths, SMALL_ROUNDS)
            env.stop(*(proc for p in small_paths for proc in p.procs.values()))
            small_labels = {p.key: p.label for p in small_paths}
        finally:
            env.close()
            subprocess.run(["git", "-C", str(REPO_DIR), "worktree", "remove", "--force",
                            str(Path(tmpdir) / "before")], capture_output=True, check=False)  # fmt: skip
    machine["steal_s"] = round(_steal_s() - steal0, 1)
    report = _report(
        started, time.monotonic() - t_start, machine, opts, runs, path_info, tput, lat, hold
    )
    tables, ratios, goals, data = _small_report(small, small_labels, SMALL_ROUNDS)
    report.tables += tables
    report.ratios += ratios
    report.goals += goals
    report.notes.append(_small_note())
    report.data |= data
    report.config |= {"small_wrk_connections": WRK_CONNS, "small_wrk_seconds": WRK_SECONDS,
                      "small_ab_concurrency": AB_CONC, "small_ab_requests": AB_REQUESTS,
                      "small_rounds": SMALL_ROUNDS, "nginx_workers": NGINX_WORKERS}  # fmt: skip
    return report


def _seal_cipher() -> str:
    from natkit.relay import seal

    return seal.preferred_cipher()


def _before_checkout(tmp: Path, rev: str = BEFORE, name: str = "before") -> Path | None:
    """The ``src`` of git ``rev`` in a temporary worktree; None (and said) when git cannot."""
    where = tmp / name
    p = subprocess.run(["git", "-C", str(REPO_DIR), "worktree", "add", "--detach", str(where),
                        rev], capture_output=True, text=True, check=False)  # fmt: skip
    if p.returncode != 0:
        print(f"  no rows for git {rev}: {p.stderr.strip()[-200:]}", flush=True)
        return None
    return where / "src"


def _access_paths(env: Env, tmp: Path, target: int) -> list[Route]:
    """natkit sealed with an access policy, and natkit sealed of git ACCESS_BEFORE."""
    rows = [env.natkit(False, target=target, agent_args=ACCESS_ARGS,
                       tag=("with an access policy (" + " ".join(ACCESS_ARGS) + ")", "access"))]  # fmt: skip
    before = _before_checkout(tmp, ACCESS_BEFORE, "before-access")
    if before is not None:
        rows.append(env.natkit(False, target=target, before=before,
                               tag=(f"before access control (git {ACCESS_BEFORE})", "pre_access")))  # fmt: skip
    return rows


def _throughput(
    env: Env, paths: list[Route], runs: int, warmup: int
) -> dict[str, dict[str, list[Run]]]:
    combos = [(p, d) for d in DIRECTIONS for p in paths]
    results: dict[str, dict[str, list[Run]]] = {d: {p.key: [] for p in paths} for d in DIRECTIONS}
    for rnd in range(warmup + runs):
        warm = rnd < warmup
        k = (rnd * 3) % len(combos)
        order = combos[k:] + combos[:k]
        tag = "warm-up" if warm else f"{rnd - warmup + 1}/{runs}"
        print(f"  throughput {tag} (MB/s):", end="", flush=True)
        for path, direction in order:
            n = WARMUP_BYTES if warm else THROUGHPUT_BYTES
            r = measure_throughput(env, path, direction, n)
            if not warm:
                results[direction][path.key].append(r)
            note = f"(steal {r.steal_s * 1000:.0f} ms)" if r.steal_s >= 0.02 else ""
            print(f" {path.key}/{direction}={r.mbps:.0f}{note}", end="", flush=True)
        print(flush=True)
    return results


def _latency(env: Env, paths: list[Route]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {
        p.key: {"samples": [], "failed": 0, "errors": []} for p in paths
    }
    print("  latency warm-up", flush=True)
    for p in paths:
        env.client("latency", p.port, "--requests", "0", "--warmup", str(LAT_WARMUP))
    per_round = LAT_REQUESTS // LAT_ROUNDS
    for rnd in range(LAT_ROUNDS):
        order = paths[rnd % len(paths) :] + paths[: rnd % len(paths)]
        print(f"  latency {rnd + 1}/{LAT_ROUNDS} (p50 ms):", end="", flush=True)
        for p in order:
            cpu0, steal0 = p.cpu(), _steal_s()
            r = env.client("latency", p.port, "--requests", str(per_round))
            cpu1, stolen = p.cpu(), _steal_s() - steal0
            o = out[p.key]
            o["steal_s"] = o.get("steal_s", 0.0) + stolen
            o.setdefault("rounds", []).append(
                {"p50": statistics.median(r["samples"]) if r["samples"] else None,
                 "steal_s": round(stolen, 3)}
            )  # fmt: skip
            o["samples"] += r["samples"]
            o["failed"] += r["failed"]
            o["errors"] += r["errors"]
            o.setdefault("cpu_s", {})
            for k in cpu1:
                o["cpu_s"][k] = o["cpu_s"].get(k, 0.0) + cpu1[k] - cpu0[k]
            p50 = statistics.median(r["samples"]) * 1000 if r["samples"] else float("nan")
            note = f" (steal {stolen * 1000:.0f} ms)" if stolen >= 0.02 else ""
            print(f" {p.key}={p50:.3f}{note}", end="", flush=True)
        print(flush=True)
    return out


class _Sampler(threading.Thread):
    """Every half second: fds, RSS and CPU of a tunnel's processes (while connections open)."""

    def __init__(self, path: Route) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.path, self.stop_event = path, threading.Event()
        self.t0 = time.monotonic()
        self.rows: list[dict[str, Any]] = []

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            p = self.path
            self.rows.append({"t": round(time.monotonic() - self.t0, 2), "fds": p.fds(),
                              "rss_mb": {k: round(v, 1) for k, v in p.rss().items()},
                              "cpu_s": p.cpu()})  # fmt: skip

    def stop(self) -> list[dict[str, Any]]:
        self.stop_event.set()
        self.join()
        return self.rows


def _count_in(path: Path, needle: bytes) -> int:
    n = 0
    with contextlib.suppress(OSError), open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            n += chunk.count(needle)  # (a needle split across chunks is missed: fine here)
    return n


def _hold(env: Env, make: Callable[[], Route]) -> dict[str, Any]:
    path = make()
    print(f"  {HOLD_CONNS:,} concurrent: {path.label}", flush=True)
    res: dict[str, Any] = {"key": path.key, "label": path.label, "nofile": nofile_limit()}
    try:
        time.sleep(1.0)  # the pool fills
        res["rss_idle_mb"], res["fds_idle"] = path.rss(), path.fds()
        cpu0 = path.cpu()
        argv = [sys.executable, __file__, "_client", "hold", "--port", str(path.port),
                "-n", str(HOLD_CONNS), "--batch", str(HOLD_BATCH), "--sample", str(HOLD_SAMPLE)]  # fmt: skip
        sampler = _Sampler(path)
        sampler.start()
        client = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=_raise_nofile
        )
        assert client.stdin is not None and client.stdout is not None

        def reply(timeout: float) -> dict[str, Any]:
            assert client.stdout is not None
            ready, _, _ = select.select([client.stdout], [], [], timeout)
            line = client.stdout.readline() if ready else ""
            if not line:
                raise BenchError(f"the hold client said nothing in {timeout:.0f} s")
            return dict(json.loads(line))

        try:
            try:
                opened = reply(900)
            finally:
                res["timeline"] = sampler.stop()
            cpu1 = path.cpu()
            res["open"] = opened
            res["cpu_open_s"] = {k: cpu1[k] - cpu0[k] for k in cpu1}
            if opened["opened"] < HOLD_CONNS:  # the CPU until the last connection that worked
                at = float(opened.get("reached_at", 0)) + 0.3  # (+ the client's start-up)
                row = next((r for r in res["timeline"] if r["t"] >= at), None)
                if row is not None:
                    res["cpu_open_s"] = {k: row["cpu_s"][k] - cpu0[k] for k in cpu1}
                    res["cpu_stalled_s"] = {k: cpu1[k] - row["cpu_s"][k] for k in cpu1}
            print(f"    opened {opened['opened']:,}/{HOLD_CONNS:,} in {opened['seconds']:.1f} s"
                  + (" (then stalled)" if opened.get("stalled") else "")
                  + (f"; errors {json.dumps(opened['errors'])}" if opened["errors"] else ""),
                  flush=True)  # fmt: skip
            time.sleep(HOLD_SECONDS)
            cpu2 = path.cpu()
            res["cpu_held_pct"] = {k: (cpu2[k] - cpu1[k]) / HOLD_SECONDS * 100 for k in cpu2}
            res["rss_held_mb"], res["fds_held"] = path.rss(), path.fds()
            res["alive_held"] = path.alive()
            n_open = max(1, opened["opened"])
            res["fds_per_visitor"] = {
                k: (res["fds_held"][k] - res["fds_idle"][k]) / n_open for k in res["fds_held"]
            }
            res["rss_mb_per_1k"] = {
                k: (res["rss_held_mb"][k] - res["rss_idle_mb"][k]) / n_open * 1000
                for k in res["rss_held_mb"]
            }
            if opened["opened"] < HOLD_CONNS:
                res["rss_extrapolated_mb"] = {
                    k: res["rss_idle_mb"][k] + res["rss_mb_per_1k"][k] * HOLD_CONNS / 1000
                    for k in res["rss_held_mb"]
                }
            client.stdin.write("check\n")
            client.stdin.flush()
            res["check"] = reply(120)
            client.stdin.write("close\n")
            client.stdin.flush()
            res["closed"] = reply(120)
        finally:
            with contextlib.suppress(Exception):
                client.stdin.close()
            try:
                client.wait(timeout=30)
            except subprocess.TimeoutExpired:
                client.kill()
                client.wait()
        time.sleep(3.0)
        cpu3 = path.cpu()
        res["cpu_close_s"] = {k: cpu3[k] - cpu2[k] for k in cpu3}
        res["rss_after_mb"], res["fds_after"] = path.rss(), path.fds()
        res["alive_after"] = path.alive()
        try:
            r = env.client("latency", path.port, "--requests", "20", timeout=60)
            res["after_ok"] = r["failed"] == 0 and len(r["samples"]) == 20
            res["after_p50_ms"] = statistics.median(r["samples"]) * 1000 if r["samples"] else None
        except (BenchError, subprocess.TimeoutExpired) as exc:
            res["after_ok"], res["after_error"] = False, str(exc)
        print(f"    RSS held {json.dumps({k: round(v, 1) for k, v in res['rss_held_mb'].items()})} MB, "
              f"fds/visitor {json.dumps({k: round(v, 2) for k, v in res['fds_per_visitor'].items()})}, "
              f"recheck {res['check']['ok']}/{res['check']['sampled']}, serving after close: "
              f"{res['after_ok']}", flush=True)  # fmt: skip
    except BenchError as exc:
        res["error"] = str(exc)
        res["alive_after"] = path.alive()
        print(f"    failed: {exc}", flush=True)
    finally:
        env.stop(*path.procs.values())
        for role, proc in path.procs.items():
            if proc.popen.returncode not in (0, -signal.SIGTERM, None):
                res.setdefault("exit", {})[role] = proc.popen.returncode
            emfile = _count_in(proc.err_path, b"Too many open files")
            if emfile:
                res.setdefault("emfile_log_lines", {})[role] = emfile
                res.setdefault("log_bytes", {})[role] = proc.err_path.stat().st_size
    return res


# ---- small requests: wrk (kept-alive) and ab (a new connection each) ----------------------


def _wrk(port: int, seconds: float) -> dict[str, Any]:
    argv = ["wrk", "-t", str(WRK_THREADS), "-c", str(WRK_CONNS), "-d", f"{seconds:g}s",
            f"http://{LOOPBACK}:{port}/"]  # fmt: skip
    p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    out = p.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    socket_err = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if p.returncode != 0 or rps is None:
        raise BenchError(f"wrk exited {p.returncode}: {(out + p.stderr).strip()[-300:]}")
    errors = sum(int(x) for x in socket_err.groups()) if socket_err else 0
    return {"rps": float(rps.group(1)), "requests": int(total.group(1)) if total else 0,
            "errors": errors + (int(non2xx.group(1)) if non2xx else 0)}  # fmt: skip


def _ab(port: int, n: int) -> dict[str, Any]:
    argv = ["ab", "-q", "-r", "-c", str(AB_CONC), "-n", str(n), f"http://{LOOPBACK}:{port}/"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    out = p.stdout
    rps = re.search(r"Requests per second:\s+([\d.]+)", out)
    done = re.search(r"Complete requests:\s+(\d+)", out)
    failed = re.search(r"Failed requests:\s+(\d+)", out)
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    if p.returncode != 0 or rps is None:
        raise BenchError(f"ab exited {p.returncode}: {(out + p.stderr).strip()[-300:]}")
    return {"rps": float(rps.group(1)), "requests": int(done.group(1)) if done else 0,
            "errors": (int(failed.group(1)) if failed else 0)
            + (int(non2xx.group(1)) if non2xx else 0)}  # fmt: skip


SMALL_CLIENTS = {
    "wrk": f"wrk: {WRK_CONNS} kept-alive connections, {WRK_THREADS} thread, {WRK_SECONDS} s",
    "ab": f"ab: a new connection per request (no keep-alive), -c {AB_CONC}, -n {AB_REQUESTS:,}",
}


def _small(env: Env, paths: list[Route], rounds: int) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Requests/s of each path with wrk and with ab, in interleaved rotating rounds (after one
    short untimed warm-up of each); per run also the tunnel's CPU and the hypervisor's steal."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {
        c: {p.key: [] for p in paths} for c in SMALL_CLIENTS
    }
    print("  small requests warm-up", flush=True)
    for p in paths:
        _wrk(p.port, 1)
        _ab(p.port, AB_REQUESTS // 10)
    combos = [(c, p) for c in SMALL_CLIENTS for p in paths]
    for rnd in range(rounds):
        k = (rnd * 3) % len(combos)
        order = combos[k:] + combos[:k]
        print(f"  small requests {rnd + 1}/{rounds} (req/s):", end="", flush=True)
        for client, p in order:
            cpu0, steal0, t0 = p.cpu(), _steal_s(), time.monotonic()
            r = _wrk(p.port, WRK_SECONDS) if client == "wrk" else _ab(p.port, AB_REQUESTS)
            time.sleep(0.2)  # socat reaps its children (their CPU moves to its cutime)
            cpu1, stolen = p.cpu(), _steal_s() - steal0
            r["cpu_s"] = {role: round(cpu1[role] - cpu0[role], 3) for role in cpu1}
            r["steal_s"] = round(stolen, 3)
            r["wall_s"] = round(time.monotonic() - t0, 3)
            out[client][p.key].append(r)
            note = f"(steal {stolen * 1000:.0f} ms)" if stolen >= 0.02 else ""
            print(f" {client}/{p.key}={r['rps']:,.0f}{note}", end="", flush=True)
        print(flush=True)
    return out


def _small_report(
    small: dict[str, dict[str, list[dict[str, Any]]]], labels: dict[str, str], rounds: int
) -> tuple[list[Table], list[Ratio], list[tuple[str, bool]], dict[str, Any]]:
    tables, ratios, goals = [], [], []
    medians: dict[str, dict[str, float]] = {}
    for client, by_path in small.items():
        med = {k: statistics.median(r["rps"] for r in rs) for k, rs in by_path.items() if rs}
        medians[client] = med
        socat = med.get("socat")
        rows = []
        for key, rs in by_path.items():
            if not rs:
                rows.append([labels[key], "failed", "", "", "", "", "", ""])
                continue
            rps = [r["rps"] for r in rs]
            # the same round's socat: a ratio per round, then their median
            same = [r["rps"] / s["rps"] for r, s in zip(rs, by_path.get("socat", []), strict=False)]
            n_req = sum(r["requests"] for r in rs)
            cpu = {role: sum(r["cpu_s"][role] for r in rs) for role in rs[0]["cpu_s"]}
            cpu_txt = " + ".join(f"{k} {v / n_req * 1e6:.0f}" for k, v in cpu.items()) or "–"
            rows.append([
                labels[key],
                _f(med[key]),
                f"{_f(min(rps))} – {_f(max(rps))}",
                f"{med[key] / socat:.2f}" if socat else "",
                f"{statistics.median(same):.2f}" if same else "",
                cpu_txt,
                str(sum(r["errors"] for r in rs)),
                f"{sum(r['steal_s'] for r in rs) * 1000:.0f}",
            ])  # fmt: skip
        tables.append(Table(
            f"small_{client}", f"Small requests, {SMALL_CLIENTS[client]}",
            ["path", "median req/s", "min – max req/s", "vs socat (medians)",
             "vs socat (per round, median)", "tunnel CPU µs/request", "errors",
             "hypervisor steal ms"],
            rows,
            intro=f"nginx ({NGINX_WORKERS} worker, its own config on {LOOPBACK}) answers every "
            f"GET with a {len(SMALL_BODY)}-byte body (`return 200`). {rounds} runs per path, "
            "interleaved in rotating order with the other client, after an untimed warm-up. "
            "vs socat: this path's requests/s over socat's in the same run. CPU: utime+stime "
            "of the tunnel's processes over the run, per request.",
        ))  # fmt: skip
        for key in ("natkit_sealed", "natkit_plain"):
            if key in med and socat:
                ratios.append(Ratio(f"small requests ({client}) {labels[key]} / socat", key,
                                    "socat", med[key] / socat))  # fmt: skip
        base = med.get("natkit_sealed")
        for key in ("natkit_sealed_access", "natkit_sealed_pre_access"):  # NATKIT_BENCH_ACCESS
            if key in med and base:
                ratios.append(Ratio(f"small requests ({client}) {labels[key]} / natkit sealed",
                                    key, "natkit_sealed", med[key] / base))  # fmt: skip
    wrk_sealed = next(
        (r for r in ratios if r.slower == "natkit_sealed" and "(wrk)" in r.label), None
    )
    goals.append((f"small requests (wrk): natkit sealed ≥ {GOAL_SMALL_SEALED_VS_SOCAT:g}x socat",
                  wrk_sealed is not None and (wrk_sealed.value or 0) >= GOAL_SMALL_SEALED_VS_SOCAT))  # fmt: skip
    ab_sealed = medians.get("ab", {}).get("natkit_sealed", 0.0)
    goals.append((f"new visitors (ab): natkit sealed ≥ {GOAL_SMALL_NEW_PER_S:,.0f}/s",
                  ab_sealed >= GOAL_SMALL_NEW_PER_S))  # fmt: skip
    data = {
        "small_requests": small,
        "small_requests_median_rps": {
            c: {k: round(v, 1) for k, v in m.items()} for c, m in medians.items()
        },
    }
    return tables, ratios, goals, data


SMALL_NOTE = (
    f"Small requests: wrk (Debian `wrk` {{wrk}}) and ab (Debian `apache2-utils` {{ab}}) against "
    f"nginx (Debian `nginx-light` {{nginx}}, {NGINX_WORKERS} worker process, started with its "
    "own config, pid file and error log in a temp dir; not the system service). Each tunnel "
    "exposes that nginx; socat here is the same one-hop forking socat as above."
)


def _small_paths(env: Env) -> list[Route]:
    for tool in ("wrk", "ab", "nginx"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            raise BenchError(f"{tool} is missing: apt-get install wrk apache2-utils nginx-light")
    web = env.nginx()
    return [web, env.socat(web.port), env.natkit(True, target=web.port),
            env.natkit(False, target=web.port)]  # fmt: skip


def _small_note() -> str:
    def deb(pkg: str) -> str:
        try:
            p = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                               text=True, timeout=10, check=False)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return p.stdout.strip() or "?"

    return SMALL_NOTE.format(wrk=deb("wrk"), ab=deb("apache2-utils"), nginx=deb("nginx-light"))


def run_small(lab: Any, opts: Options) -> Report:
    """Only the small-requests part (``run.py relay_small``): results/relay_small.md/json."""
    _raise_nofile()
    started, t_start = now(), time.monotonic()
    machine = _relay_machine()
    rounds = max(1, opts.iterations)
    steal0 = _steal_s()
    with tempfile.TemporaryDirectory(prefix="nkb-relay-") as tmpdir:
        env = Env(Path(tmpdir))
        try:
            paths = _small_paths(env)
            if ACCESS_ROWS:
                paths += _access_paths(env, Path(tmpdir), paths[0].port)
            small = _small(env, paths, rounds)
        finally:
            env.close()
            subprocess.run(["git", "-C", str(REPO_DIR), "worktree", "remove", "--force",
                            str(Path(tmpdir) / "before-access")], capture_output=True, check=False)  # fmt: skip
    machine["steal_s"] = round(_steal_s() - steal0, 1)
    labels = {p.key: p.label for p in paths}
    tables, ratios, goals, data = _small_report(small, labels, rounds)
    return RelayReport(
        name="relay_small",
        title="Relay tunnels on loopback, small HTTP requests: natkit relay + agent vs socat",
        started=started, machine=machine,
        config={"wrk_connections": WRK_CONNS, "wrk_threads": WRK_THREADS,
                "wrk_seconds": WRK_SECONDS, "ab_concurrency": AB_CONC,
                "ab_requests": AB_REQUESTS, "rounds": rounds, "nginx_workers": NGINX_WORKERS,
                "body_bytes": len(SMALL_BODY), "socat_buffer": SOCAT_BUFFER, "host": LOOPBACK},
        cases=[], ratios=ratios, goals=goals, notes=[_small_note()],
        elapsed=time.monotonic() - t_start, tables=tables,
        data={"paths": {p.key: {"label": p.label, "port": p.port, **p.info} for p in paths}, **data},
    )  # fmt: skip


# ==== the report =========================================================================


def _report(
    started: Any,
    elapsed: float,
    machine: dict[str, str],
    opts: Options,
    runs: int,
    paths: dict[str, dict[str, Any]],
    tput: dict[str, dict[str, list[Run]]],
    lat: dict[str, dict[str, Any]],
    hold: list[dict[str, Any]],
) -> RelayReport:
    tables: list[Table] = []
    med_mbps: dict[str, dict[str, float]] = {}
    for direction, by_path in tput.items():
        rows = []
        med_mbps[direction] = {}
        direct = statistics.median(r.mbps for r in by_path["direct"]) if by_path["direct"] else 0
        for key, rs in by_path.items():
            if not rs:
                rows.append([paths[key]["label"], "failed", "", "", "", "", ""])
                continue
            mb = [r.mbps for r in rs]
            med = statistics.median(mb)
            med_mbps[direction][key] = med
            gib = [r.bytes / GIB for r in rs]
            roles = list(rs[0].cpu)
            per = {
                role: statistics.median(r.cpu[role] / g for r, g in zip(rs, gib, strict=True))
                for role in roles
            }
            total = sum(per.values())
            split = " + ".join(f"{role} {v:.2f}" for role, v in per.items())
            ends = statistics.median(
                (r.client_cpu + r.service_cpu) / g for r, g in zip(rs, gib, strict=True)
            )
            rows.append(
                [
                    paths[key]["label"],
                    _f(med),
                    f"{_f(min(mb))} – {_f(max(mb))}",
                    f"{statistics.median(r.seconds for r in rs):.2f}",
                    f"{med / direct:.2f}" if direct else "",
                    f"{total:.2f}" + (f" ({split})" if len(roles) > 1 else "") if roles else "–",
                    f"{ends:.2f}",
                ]
            )
        tables.append(
            Table(
                f"throughput_{direction}",
                f"Throughput, {THROUGHPUT_BYTES / GIB:g} GiB {DIRECTIONS[direction]}",
                [
                    "path",
                    "median MB/s",
                    "min – max MB/s",
                    "median s",
                    "vs direct",
                    "tunnel CPU s/GiB",
                    "client+service CPU s/GiB",
                ],
                rows,
                intro=f"{runs} runs of {THROUGHPUT_BYTES / GIB:g} GiB per path (one connection each), interleaved in "
                "rotating order; MB/s = 10^6 bytes/s of wall time from connect to the last byte "
                "(download) or to the service's byte count (upload). CPU: utime+stime from "
                "/proc/PID/stat of the tunnel's processes (and their children) over the run.",
            )
        )

    lat_rows, lat_stats = [], {}
    for key, o in lat.items():
        s = o["samples"]
        if not s:
            lat_rows.append(
                [paths[key]["label"], "failed", "", "", "", "", f"0/{o['failed']}", "", ""]
            )
            continue
        st = {
            "p50": pct(s, 50),
            "p90": pct(s, 90),
            "p99": pct(s, 99),
            "max": max(s),
            "mean": statistics.fmean(s),
        }
        lat_stats[key] = st
        cpu = o.get("cpu_s", {})
        cpu_txt = " + ".join(f"{k} {v / len(s) * 1e6:.0f}" for k, v in cpu.items()) or "–"
        lat_rows.append(
            [
                paths[key]["label"],
                *(f"{st[q] * 1000:.3f}" for q in ("p50", "p90", "p99")),
                f"{st['max'] * 1000:.2f}",
                f"{st['mean'] * 1000:.3f}",
                f"{len(s)}/{len(s) + o['failed']}",
                cpu_txt,
                f"{o.get('steal_s', 0.0) * 1000:.0f}",
            ]
        )
    tables.append(
        Table(
            "latency",
            "Latency of a new visitor connection: connect, 1 KiB request, 1 KiB reply, close",
            [
                "path",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "mean ms",
                "ok",
                "tunnel CPU µs/request",
                "hypervisor steal ms",
            ],
            lat_rows,
            intro=f"{LAT_REQUESTS} requests per path, one new TCP connection each, sequential, after "
            f"{LAT_WARMUP} untimed; {LAT_ROUNDS} rounds of {LAT_REQUESTS // LAT_ROUNDS}, interleaved. "
            "Percentiles: nearest rank. Hypervisor steal: CPU time (both CPUs) the host gave to "
            "other guests during that path's rounds (/proc/stat); each round's p50 and steal "
            "are printed as it runs and kept in the JSON.",
        )
    )

    hold_rows, proc_rows = [], []
    for h in hold:
        opened = h.get("open", {})
        check = h.get("check", {})
        n_open = int(opened.get("opened", 0))
        nofile = int(h.get("nofile", NOFILE))
        full = [
            f"{k} {v:,}/{nofile:,}" for k, v in h.get("fds_held", {}).items() if v >= nofile - 64
        ]
        why = ""
        if n_open < HOLD_CONNS:
            why = f"out of fds ({', '.join(full)})" if full else "see the JSON's errors"
        new_ms = check.get("new_visitor_ms")
        hold_rows.append([
            h["label"],
            f"{n_open:,}" + (" (stalled)" if opened.get("stalled") else ""),
            f"{float(opened.get('reached_at') or opened.get('seconds', 0)):.1f}",
            f"{check.get('ok', 0)}/{check.get('sampled', 0)}",
            f"{new_ms:.1f}" if new_ms else "failed",
            ("yes" if h.get("after_ok") else "**no**")
            + ("" if all(h.get("alive_after", {}).values()) else " (a process died)"),
            "; ".join(x for x in (why, h.get("error", "")) if x) or "–",
        ])  # fmt: skip
        for role in h.get("rss_idle_mb", {}):
            held_mb = h.get("rss_held_mb", {}).get(role, 0.0)
            extra = h.get("rss_extrapolated_mb", {}).get(role)
            stalled_cpu = h.get("cpu_stalled_s", {}).get(role)
            proc_rows.append([
                f"{h['label']}: {role}",
                _mb(h["rss_idle_mb"][role]),
                f"{_mb(held_mb)} at {n_open:,}",
                f"{h.get('rss_mb_per_1k', {}).get(role, 0):.1f}",
                f"≈ {extra:,.0f} (extrapolated)" if extra is not None else f"{held_mb:,.0f}",
                f"{h.get('fds_per_visitor', {}).get(role, 0):.1f}",
                f"{h.get('cpu_open_s', {}).get(role, 0):.1f}"
                + (f" (+{stalled_cpu:.1f} stalled)" if stalled_cpu else ""),
                f"{h.get('cpu_held_pct', {}).get(role, 0):.0f}",
                _mb(h.get("rss_after_mb", {}).get(role, 0)),
                f"{h['emfile_log_lines'][role]:,}" if role in h.get("emfile_log_lines", {}) else "0",
            ])  # fmt: skip
    hold_intro = (
        f"Fresh tunnel processes; an asyncio client opens {HOLD_CONNS:,} visitor connections in "
        f"batches of {HOLD_BATCH}, each proved by a 1 KiB echo through the tunnel (it stops "
        "when a batch gets under 10% through), holds them "
        f"{HOLD_SECONDS:.0f} s, re-asks {HOLD_SAMPLE} random held ones and opens one more, then "
        "closes all and checks that the tunnel still serves 20 new visitors. RLIMIT_NOFILE: "
        f"{hold[0].get('nofile', NOFILE) if hold else NOFILE:,} for every process (asked "
        f"{NOFILE:,}; raising the hard limit needs CAP_SYS_RESOURCE)."
    )
    tables.append(Table(
        "hold", f"{HOLD_CONNS:,} concurrent visitor connections, held open",
        ["tunnel", "visitors open", "s to open", "recheck ok", "new visitor ms",
         "serves after close", "what stopped it"],
        hold_rows, intro=hold_intro,
    ))  # fmt: skip
    tables.append(Table(
        "hold_processes", f"{HOLD_CONNS:,} concurrent: the tunnel's processes",
        ["tunnel: process", "RSS idle MB", "RSS open MB", "MB per 1k visitors",
         f"RSS at {HOLD_CONNS:,} MB", "fds per visitor", "CPU s to open", "CPU % held",
         "RSS after close MB", "EMFILE log lines"],
        proc_rows,
        intro="RSS: VmRSS, summed over the process tree (sshd: listener + monitor + session "
        "process). Where fewer than all visitors got through, RSS at the full count is "
        "extrapolated linearly from the RSS per visitor measured. CPU % held: over "
        f"{HOLD_SECONDS:.0f} s with everything open (100 = one core).",
    ))  # fmt: skip

    def tp_ratio(direction: str, a: str, b: str, label: str) -> Ratio:
        x, y = med_mbps[direction].get(a), med_mbps[direction].get(b)
        return Ratio(f"{label} ({direction})", a, b, x / y if x and y else None)

    ratios, goals = [], []
    for direction in DIRECTIONS:
        r1 = tp_ratio(direction, "natkit_plain", "ssh", "throughput natkit plaintext / ssh -R")
        r2 = tp_ratio(direction, "natkit_plain", "socat", "throughput natkit plaintext / socat")
        r3 = tp_ratio(direction, "natkit_sealed", "ssh", "throughput natkit sealed / ssh -R")
        r4 = tp_ratio(direction, "splice2", "socat", "throughput two-hop splice floor / socat")
        r5 = tp_ratio(direction, "natkit_plain", "splice2", "throughput natkit plaintext / floor")
        ratios += [r1, r2, r3, r4, r5]
        goals += [
            (f"{r1.label} ≥ {GOAL_PLAIN_VS_SSH:g}x", (r1.value or 0) >= GOAL_PLAIN_VS_SSH),
            (f"{r2.label} ≥ {GOAL_PLAIN_VS_SOCAT:g}x", (r2.value or 0) >= GOAL_PLAIN_VS_SOCAT),
            (f"{r3.label} ≥ {GOAL_SEALED_VS_SSH:g}x", (r3.value or 0) >= GOAL_SEALED_VS_SSH),
        ]
        for key, what in (("natkit_plain", "plaintext"), ("natkit_sealed", "sealed")):
            if key + "_before" not in med_mbps[direction]:
                continue
            r = tp_ratio(direction, key, key + "_before",
                         f"throughput natkit {what} / the same before issue 12 (git {BEFORE})")  # fmt: skip
            ratios.append(r)
            goals.append((f"{r.label} ≥ {GOAL_NOT_REGRESSED:g}x (not regressed)",
                          (r.value or 0) >= GOAL_NOT_REGRESSED))  # fmt: skip
    for key in ("natkit_plain", "natkit_sealed"):
        on_uv, on_asyncio = lat_stats.get(key), lat_stats.get(key + "_asyncio")
        ratios.append(Ratio(
            f"latency p50 {key.replace('_', ' ')} on asyncio's loop / on uvloop", key + "_asyncio",
            key, on_asyncio["p50"] / on_uv["p50"] if on_uv and on_asyncio else None,
        ))  # fmt: skip
    for key in ("natkit_plain", "natkit_sealed"):
        st = lat_stats.get(key)
        goals.append(
            (
                f"{paths[key]['label']}: latency p50 ≤ {GOAL_P50_MS} ms",
                st is not None and st["p50"] * 1000 <= GOAL_P50_MS,
            )
        )
        goals.append(
            (
                f"{paths[key]['label']}: latency p99 ≤ {GOAL_P99_MS} ms",
                st is not None and st["p99"] * 1000 <= GOAL_P99_MS,
            )
        )
    for h in hold:
        if not h["key"].startswith("natkit"):
            continue
        full = h.get("open", {}).get("opened") == HOLD_CONNS and not h.get("error")
        alive = bool(h.get("alive_after")) and all(h["alive_after"].values())
        goals.append((f"{h['label']}: all {HOLD_CONNS:,} visitors open at once", bool(full)))
        goals.append((f"{h['label']}: relay and agent stay up and serve new visitors after",
                      bool(alive and h.get("after_ok"))))  # fmt: skip
        for role, mb in h.get("rss_held_mb", {}).items():
            at_full = mb if full else h.get("rss_extrapolated_mb", {}).get(role, mb)
            goals.append((f"{h['label']}: {role} RSS at {HOLD_CONNS:,} under {GOAL_RSS_MB:g} MB"
                          + ("" if full else " (extrapolated)"), at_full < GOAL_RSS_MB))  # fmt: skip

    nofile = hold[0].get("nofile", NOFILE) if hold else NOFILE
    notes = [
        "Service and clients are `bench_relay.py _service` / `_client` processes: discarding "
        "with recv(MSG_TRUNC) (no copy to user space) and sending with os.sendfile from a "
        f"{BLOB_BYTES // MIB} MiB page-cached file of random bytes, so the CPU goes to the tunnel. "
        "Download (the service sends) is what a tunnel mostly carries; upload is shown too.",
        f"natkit sealed data connections: {_seal_cipher()} records (AES-256-GCM where both "
        "ends have AES instructions, else ChaCha20-Poly1305), keys derived per connection "
        f"from a secret sent over the TLS control connection "
        f"({paths.get('natkit_sealed', {}).get('tls', '?')}); "
        f"ssh: {SSH_CIPHER}. Both natkit modes run with the relay's default pool "
        f"({_pool_size()} data connections kept ready).",
        "natkit's relay and agent run on uvloop (the default of `natkit relay serve` and "
        "`natkit expose` where it is installed); the latency rows '... on asyncio's event loop' "
        "are the same code with NATKIT_EVENT_LOOP=asyncio, measured in the same rounds.",
        "The two-hop splice floor is two minimal forwarders in a row (this file's `_hop`: "
        "blocking os.splice in two threads per connection, no event loop, no natkit): what any "
        "relay plus agent built on splice costs here, measured in the same run as socat.",
        "Each tunnel's processes are separate: natkit relay and agent; sshd (listener, monitor "
        "and session process) and ssh; socat (a child per connection, reaped: its CPU is in the "
        "parent's cutime). The client is a new process per measurement (start-up untimed).",
        "`ssh -N -R` answers a new connection only after ~40 ms: OpenSSH sets TCP_NODELAY on "
        "its connection only for interactive sessions, so a small channel packet waits for the "
        "peer's delayed ACK (Nagle). The `ssh -tt -R ... sleep` row (a pty session) is the same "
        "tunnel with TCP_NODELAY; throughput is the same for both.",
        "The machine is shared (2 CPUs, other jobs running): medians, and all samples in the JSON.",
        f"Rows '... before issue 12 (git {BEFORE})' run the relay and agent of that revision "
        "(from a temporary git worktree, same Python and event loop) in the same rounds: "
        "whether a ratio to socat moved because of the code or because of the machine.",
        "Every daemon (nginx, socat, relay, agent, sshd) runs in its own session, as services "
        "do; with Linux's autogroup scheduling (on here) each session shares the CPUs as one "
        "group, which costs the two-process tunnels more than one-process socat on this "
        "2-CPU machine (wrk through the sealed tunnel, measured by hand: ~37,000 requests/s "
        "with relay and agent in sessions of their own, ~48,000/s in one with nginx).",
    ]
    for h in hold:
        fpv, idle = h.get("fds_per_visitor", {}), h.get("fds_idle", {})
        opened = h.get("open", {}).get("opened", 0)
        if opened < HOLD_CONNS and fpv:
            need = {k: round(fpv[k] * HOLD_CONNS + idle.get(k, 0)) for k in fpv}
            notes.append(
                f"{h['label']}: {opened:,} of {HOLD_CONNS:,} visitors got through; "
                f"{HOLD_CONNS:,} need about "
                + ", ".join(f"{v:,} fds in the {k}" for k, v in need.items())
                + f" ({', '.join(f'{k} {v:.1f}' for k, v in fpv.items())} per visitor), "
                f"against RLIMIT_NOFILE {h.get('nofile', nofile):,}."
            )
    if nofile < NOFILE:
        notes.append(
            f"RLIMIT_NOFILE could only be raised to {nofile:,} here (the hard limit; raising it "
            f"needs CAP_SYS_RESOURCE), not {NOFILE:,}: {HOLD_CONNS:,} visitors at "
            f"{nofile / HOLD_CONNS:g} fds each would take all of it, before the process's own."
        )
    config = {
        "nofile_effective": nofile,
        "throughput_bytes": THROUGHPUT_BYTES,
        "throughput_runs": runs,
        "warmup_rounds": opts.warmup,
        "warmup_bytes": WARMUP_BYTES,
        "latency_requests": LAT_REQUESTS,
        "latency_warmup": LAT_WARMUP,
        "hold_connections": HOLD_CONNS,
        "hold_batch": HOLD_BATCH,
        "hold_seconds": HOLD_SECONDS,
        "nofile": NOFILE,
        "relay_ports": RELAY_PORTS,
        "socat_buffer": SOCAT_BUFFER,
        "ssh_cipher": SSH_CIPHER,
        "host": LOOPBACK,
    }
    data = {
        "paths": paths,
        "throughput": {
            d: {
                k: [dataclasses.asdict(r) | {"mbps": round(r.mbps, 1)} for r in rs]
                for k, rs in by.items()
            }
            for d, by in tput.items()
        },
        "throughput_median_mbps": {
            d: {k: round(v, 1) for k, v in m.items()} for d, m in med_mbps.items()
        },
        "latency": {
            k: {
                "ms": {q: round(v * 1000, 4) for q, v in lat_stats.get(k, {}).items()},
                "failed": o["failed"],
                "errors": o["errors"][:10],
                "cpu_s": o.get("cpu_s", {}),
                "steal_s": round(o.get("steal_s", 0.0), 3),
                "rounds": o.get("rounds", []),  # each round's p50 (s) and steal (s)
                # in order, space-separated: one line of JSON rather than 2,000
                "samples_ms": " ".join(f"{x * 1000:.4f}" for x in o["samples"]),
            }
            for k, o in lat.items()
        },
        "hold": hold,
    }
    return RelayReport(
        name=NAME,
        title="Relay tunnels on loopback: natkit relay + agent vs ssh -R and socat",
        started=started,
        machine=machine,
        config=config,
        cases=[],
        ratios=ratios,
        goals=goals,
        notes=notes,
        elapsed=elapsed,
        tables=tables,
        data=data,
    )


BENCHMARK = Benchmark(
    name=NAME,
    description="relay tunnels on 127.0.0.1: natkit relay+agent vs ssh -R and socat "
    "(throughput, new-connection latency, 10,000 held connections, small HTTP requests)",
    lab_config=None,
    run=run,
    iterations=5,
)

BENCHMARK_SMALL = Benchmark(
    name="relay_small",
    description="relay tunnels on 127.0.0.1, only the small-requests part: wrk and ab against "
    "nginx, direct / socat / natkit plaintext / natkit sealed (-n: rounds, default 3)",
    lab_config=None,
    run=run_small,
    iterations=SMALL_ROUNDS,
    default=False,
)
BENCHMARKS = (BENCHMARK, BENCHMARK_SMALL)


if __name__ == "__main__":
    sys.exit(_role_main(sys.argv[1:]))
