"""Helpers for relay lab tests: ``natkit relay serve`` on wan, ``natkit expose --via relay``
on lan, both as real subprocesses whose JSON lines are read by threads (never blocking a
test), and an asyncio loop living inside a lab node for services and visitors.

Typical use::

    lab = build_lab("relay")                      # portmap off: only the relay can help
    relay = start_relay(lab, state_dir, token=TOKEN, metrics_port=9100)
    agent = start_agent(lab, state_dir, relay, service_port, token=TOKEN)
    host, port = split_public(agent.public_address)
    ...
    agent.stop(); relay.stop()                    # SIGTERM, then SIGKILL if it hangs

Every natkit subprocess gets ``NATKIT_STATE_DIR`` (known_relays, the relay's certificate).
Agents are given the relay's fingerprint (from its ready line) unless told otherwise, so
nothing is pinned behind a test's back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import queue
import re
import resource
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from natkit.lab import Lab, LabConfig, netns
from natkit.lab import config as C

T = TypeVar("T")

NATKIT = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "natkit")
RELAY_IP = C.WAN_IPS[0]  # the relay runs on wan, first address
VISITOR_IP = C.WAN_IPS[1]
SERVICE_IP = C.LAN_IP  # services and agents run on lan, behind the NAT
DOMAIN = "lab.test"
TERM_TIMEOUT = 10.0


# ---- the lab ---------------------------------------------------------------------------------


def build_lab(name: str = "relay") -> Lab:
    """A private lab ``PREFIX-name`` with port mapping OFF (the router offers nothing, its
    firewall drops unsolicited inbound), so a relay is the only way in. Call ``.down()``."""
    from tests.conftest import LAB_PREFIX, _build

    return _build(LabConfig(name=f"{LAB_PREFIX}-{name}", portmap=frozenset()))


def raise_nofile(want: int = 65536) -> int:
    """Raise this process's soft RLIMIT_NOFILE (children inherit it); returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def natkit_env(state_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["NATKIT_STATE_DIR"] = str(state_dir)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


# ---- subprocesses ----------------------------------------------------------------------------


class NatkitProc:
    """A natkit CLI subprocess on a lab node; stdout lines (JSON) are read by a thread into
    a queue, stderr is collected. Use as a context manager or call :meth:`stop`."""

    def __init__(
        self,
        lab: Lab,
        node: str,
        args: Sequence[str],
        *,
        state_dir: Path,
        env: dict[str, str] | None = None,
        label: str = "",
    ) -> None:
        self.lab, self.node, self.args = lab, node, list(args)
        self.label = label or f"natkit {' '.join(a for a in self.args[:3] if a != '-v')}"
        self.proc: subprocess.Popen[str] = lab.popen(  # type: ignore[assignment]
            node,
            [NATKIT, *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=natkit_env(state_dir, env),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        self.events: list[dict[str, Any]] = []  # every JSON object consumed so far
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream: IO[str], is_stdout: bool) -> None:
        try:
            for line in stream:
                (self.out if is_stdout else self.err).append(line)
                if is_stdout:
                    self.lines.put(line)
        except (OSError, ValueError):
            pass
        finally:
            if is_stdout:
                self.lines.put(None)

    # -- reading --

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    def why(self) -> str:
        return (
            f"[{self.label} on {self.node}] rc={self.proc.poll()} "
            f"stdout={self.stdout[-2000:]!r} stderr={self.stderr[-4000:]!r}"
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def next_line(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout} s: {self.why()}") from None
        if line is None:
            self.lines.put(None)  # keep reporting the end to later readers
            # Give stderr a moment to be collected, for the message.
            self._threads[1].join(timeout=2)
            raise AssertionError(f"{self.label} ended early: {self.why()}")
        return line

    def next_event(self, timeout: float = 15.0) -> dict[str, Any]:
        line = self.next_line(timeout)
        try:
            obj = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}; {self.why()}") from None
        assert isinstance(obj, dict), line
        self.events.append(obj)
        return obj

    def wait_event(self, name: str, timeout: float = 15.0) -> dict[str, Any]:
        """Skip events until one called ``name`` (returns it)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {name!r} event within {timeout} s: {self.why()}")
            obj = self.next_event(left)
            if obj.get("event") == name:
                return obj

    def rest(self) -> list[str]:
        """Lines not consumed yet (best after the process ended)."""
        lines: list[str] = []
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return lines
            if line is not None:
                lines.append(line)

    # -- ending --

    def stop(self, sig: int = signal.SIGTERM, timeout: float = TERM_TIMEOUT) -> int | None:
        """Signal the process (SIGTERM), wait; SIGKILL it if it does not exit in time.
        Returns the exit code of a clean exit, None if it had to be killed."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        for t in self._threads:
            t.join(timeout=5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        for t in self._threads:
            t.join(timeout=2)

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Relay(NatkitProc):
    """``natkit relay serve --json`` on a node; ``ready`` is its first JSON line."""

    def __init__(
        self,
        *a: Any,
        host: str,
        token: str,
        metrics: tuple[str, int] | None,
        domain: str | None,
        **kw: Any,
    ) -> None:
        super().__init__(*a, **kw)
        self.host, self.token, self.metrics_addr, self.domain = host, token, metrics, domain
        self.ready: dict[str, Any] = {}

    @property
    def address(self) -> str:
        """``HOST:PORT`` agents connect to."""
        return str(self.ready["listen"])

    @property
    def fingerprint(self) -> str:
        return str(self.ready["fingerprint"])

    @property
    def http_port(self) -> int:
        return int(self.ready["http_port"])

    @property
    def https_port(self) -> int:
        return int(self.ready["https_port"])

    def metrics(self, node: str = "wan", timeout: float = 5.0) -> str:
        """The Prometheus text of ``--metrics`` (fetched from ``node``)."""
        assert self.metrics_addr is not None, "relay started without metrics_port"
        host, port = self.metrics_addr
        raw = http_request(
            self.lab,
            node,
            host,
            port,
            f"GET /metrics HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode(),
            timeout=timeout,
        )
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), raw[:500]
        return body.decode()


def start_relay(
    lab: Lab,
    state_dir: Path,
    *,
    token: str | Iterable[str],
    node: str = "wan",
    host: str = RELAY_IP,
    port: int = 7835,
    ports: tuple[int, int] = (20000, 20099),
    http_port: int | None = 8080,
    https_port: int | None = 8443,
    domain: str | None = DOMAIN,
    metrics_port: int | None = None,
    extra: Sequence[str] = (),
    verbose: bool = False,
    timeout: float = 20.0,
) -> Relay:
    """Start ``natkit relay serve`` and wait for its ready line (stops it on failure)."""
    tokens = [token] if isinstance(token, str) else list(token)
    args = [
        "relay",
        "serve",
        "--listen",
        f"{host}:{port}",
        "--ports",
        f"{ports[0]}-{ports[1]}",
        "--json",
    ]
    for tok in tokens:
        args += ["--token", tok]
    if http_port is not None:
        args += ["--http-port", str(http_port)]
    if https_port is not None:
        args += ["--https-port", str(https_port)]
    if domain is not None and (http_port is not None or https_port is not None):
        args += ["--domain", domain]
    metrics = (host, metrics_port) if metrics_port is not None else None
    if metrics is not None:
        args += ["--metrics", f"{host}:{metrics_port}"]
    args += list(extra)
    if verbose:  # natkit -v: its log (DEBUG) on stderr
        args.insert(0, "-v")
    relay = Relay(
        lab,
        node,
        args,
        state_dir=state_dir,
        label="relay serve",
        host=host,
        token=tokens[0],
        metrics=metrics,
        domain=domain,
    )
    try:
        ready = relay.next_event(timeout)
        assert ready.get("event") == "ready", f"{ready}; {relay.why()}"
        assert str(ready["fingerprint"]).startswith("sha256:"), ready
        relay.ready = ready
    except BaseException:
        relay.kill()
        raise
    return relay


class Agent(NatkitProc):
    """``natkit expose --via relay --json`` on a node; ``ready`` is its ready event."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.ready: dict[str, Any] = {}

    @property
    def public_address(self) -> str:
        return str(self.ready["public_address"])


def start_agent(
    lab: Lab,
    state_dir: Path,
    relay: Relay | str,
    local_port: int,
    *,
    token: str | None = None,
    node: str = "lan",
    local_host: str = SERVICE_IP,
    kind: str = "tcp",
    hostname: str = "",
    plaintext_data: bool = False,
    fingerprint: str | bool | None = True,
    extra: Sequence[str] = (),
    verbose: bool = False,
    timeout: float = 20.0,
    wait_ready: bool = True,
) -> Agent:
    """Start ``natkit expose PORT --via relay`` and (by default) wait for its ready event.

    ``kind``: tcp, http (``--http``) or tls (``--tls``). ``fingerprint=True`` passes the
    relay's own fingerprint (nothing is pinned); False/None lets the agent pin on first use;
    a string is passed as is. ``relay`` may be a :class:`Relay` or ``HOST:PORT``."""
    if isinstance(relay, Relay):
        address = relay.address
        token = token if token is not None else relay.token
        fp = relay.fingerprint if fingerprint is True else fingerprint
    else:
        address = relay
        fp = fingerprint if isinstance(fingerprint, str) else None
    assert token is not None, "give a token"
    args = [
        "expose",
        str(local_port),
        "--via",
        "relay",
        "--relay",
        address,
        "--token",
        token,
        "--local-host",
        local_host,
        "--json",
    ]
    if kind == "http":
        args.append("--http")
    elif kind == "tls":
        args.append("--tls")
    elif kind != "tcp":
        raise ValueError(f"unknown tunnel kind {kind!r}")
    if hostname:
        args += ["--hostname", hostname]
    if plaintext_data:
        args.append("--plaintext-data")
    if isinstance(fp, str):
        args += ["--fingerprint", fp]
    args += list(extra)
    if verbose:
        args.insert(0, "-v")
    agent = Agent(lab, node, args, state_dir=state_dir, label=f"expose {kind} {hostname}".strip())
    if wait_ready:
        try:
            agent.ready = agent.wait_event("ready", timeout)
        except BaseException:
            agent.kill()
            raise
    return agent


def split_public(address: str) -> tuple[str, int]:
    """``100.200.0.2:20000`` or ``http://a.lab.test:8080`` → (host, port)."""
    m = re.fullmatch(r"(?:(https?)://)?([^:/]+)(?::(\d+))?/?", address)
    assert m is not None, f"not a public address: {address!r}"
    scheme, host, port = m.groups()
    if port is None:
        assert scheme is not None, address
        return host, 80 if scheme == "http" else 443
    return host, int(port)


# ---- metrics ---------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {'name{labels}': value} (comments skipped)."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        found[name] = float(value)
    return found


def relay_event(metrics: dict[str, float], event: str) -> float:
    return metrics.get(f'natkit_relay_events_total{{event="{event}"}}', 0.0)


# ---- sockets inside nodes --------------------------------------------------------------------


def http_request(
    lab: Lab, node: str, host: str, port: int, request: bytes, timeout: float = 5.0
) -> bytes:
    """Send ``request`` from ``node`` and read until the server closes (or timeout)."""

    def go() -> bytes:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(request)
            return recv_all(s, deadline=time.monotonic() + timeout)

    return netns.call_in(lab.netns(node), go)


def recv_all(s: socket.socket, deadline: float, limit: int = 1 << 30) -> bytes:
    """Read until EOF; raises TimeoutError when ``deadline`` (monotonic) passes first."""
    chunks: list[bytes] = []
    total = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no EOF before the deadline ({total} bytes read)")
        s.settimeout(left)
        data = s.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
        total += len(data)
        if total > limit:
            raise AssertionError(f"more than {limit} bytes")


def recv_exact(s: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"got {len(buf)} of {n} bytes before the deadline")
        s.settimeout(left)
        data = s.recv(min(n - len(buf), 1 << 20))
        if not data:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


class NodeLoop:
    """An asyncio loop on a thread inside a lab node's namespace: every socket its code
    creates (servers, clients) lives in that node. ``run`` waits for a coroutine's result."""

    def __init__(self, lab: Lab, node: str) -> None:
        self.lab, self.node = lab, node
        self.loop = asyncio.new_event_loop()
        started: concurrent.futures.Future[None] = concurrent.futures.Future()

        def main() -> None:
            try:
                with netns.entered(lab.netns(node)):
                    asyncio.set_event_loop(self.loop)
                    started.set_result(None)
                    self.loop.run_forever()
                    # Drain what is left, so that nothing is destroyed while pending.
                    pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
                    for t in pending:
                        t.cancel()
                    if pending:
                        self.loop.run_until_complete(
                            asyncio.gather(*pending, return_exceptions=True)
                        )
                    self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            except BaseException as exc:
                if not started.done():
                    started.set_exception(exc)
                raise
            finally:
                self.loop.close()

        self.thread = threading.Thread(target=main, name=f"loop:{lab.netns(node)}", daemon=True)
        self.thread.start()
        started.result(timeout=10)

    def run(self, coro: Awaitable[T], timeout: float = 60.0) -> T:
        fut = asyncio.run_coroutine_threadsafe(_as_coro(coro), self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(
                f"{coro!r} did not finish within {timeout} s on {self.node}"
            ) from None

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run a plain function on the loop's thread (e.g. to create a socket in the node)."""

        async def wrap() -> T:
            return fn()

        return self.run(wrap(), timeout)

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=15)


async def _as_coro(aw: Awaitable[T]) -> T:
    return await aw


async def start_service(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    host: str = SERVICE_IP,
    port: int = 0,
    *,
    ssl: Any = None,
    backlog: int = 4096,
) -> tuple[asyncio.Server, int]:
    """``asyncio.start_server`` (call it on a :class:`NodeLoop` of the service's node);
    returns the server and its port."""
    server = await asyncio.start_server(
        handler, host, port, ssl=ssl, backlog=backlog, limit=1 << 20
    )
    return server, server.sockets[0].getsockname()[1]


async def stop_service(server: asyncio.Server) -> None:
    server.close()
    # Not wait_closed(): on 3.11 it returns at once, and on 3.12+ it waits for every
    # connection handler, which a test that failed halfway may never finish.
    await asyncio.sleep(0)


__all__ = [
    "DOMAIN",
    "NATKIT",
    "RELAY_IP",
    "SERVICE_IP",
    "VISITOR_IP",
    "Agent",
    "NatkitProc",
    "NodeLoop",
    "Relay",
    "build_lab",
    "http_request",
    "natkit_env",
    "parse_metrics",
    "raise_nofile",
    "recv_all",
    "recv_exact",
    "relay_event",
    "split_public",
    "start_agent",
    "start_relay",
    "start_service",
    "stop_service",
]
