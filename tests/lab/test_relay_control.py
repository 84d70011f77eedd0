"""Relay tunnels' control side, as users run them: ``natkit relay serve`` on wan,
``natkit expose`` on lan (behind the NAT), visitors on wan.

* The relay restarts: agents report ``lost``, then ``restored`` at the same public address.
* An agent restarts within the grace period: its address waits for it (by token). After
  an outage, an agent whose address the relay still holds for its dead connection waits
  for the relay to let go instead of giving up.
* Refusals: a wrong token, a name held by another token, garbage on the control port, a
  slowloris visitor, a relay whose certificate changed; each with a clear error, nothing
  else disturbed.
* Auto mode: a mapping the relay can reach from outside is used; one it cannot, or none at
  all, falls back to the relay.
* The Python API: ``natkit.connect`` / ``get_tunnels`` / ``disconnect``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import queue
import random
import re
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

import natkit
from natkit.lab import Lab
from natkit.lab import config as C
from natkit.relay import control, seal
from natkit.relay import messages as M
from natkit.relay.agent import RelayAuthError
from tests.conftest import call_in_node
from tests.lab.helpers import http_server, wait_for, wait_router_uptime

pytestmark = pytest.mark.lab

NATKIT = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "natkit")
RELAY_IP = C.WAN_IPS[0]
RELAY = f"{RELAY_IP}:7835"
HTTP_PORT = 8080
METRICS_PORT = 9100
DOMAIN = "lab.test"
TOKEN_A = "alice-token-0123456789abcdef"
TOKEN_B = "bob-token-0123456789abcdef"
RELAY_ARGS = ["relay", "serve", "--listen", RELAY, "--ports", "20000-20099",
              "--http-port", str(HTTP_PORT), "--domain", DOMAIN, "--json"]  # fmt: skip


# ---- subprocesses ------------------------------------------------------------------------------


class Proc:
    """A natkit subprocess on a lab node; its stdout and stderr are read by threads, so a
    test never blocks on a pipe."""

    def __init__(self, lab: Lab, node: str, args: list[str], state_dir: Path) -> None:
        env = {**os.environ, "NATKIT_STATE_DIR": str(state_dir), "PYTHONUNBUFFERED": "1"}
        self.args = args
        self.proc: subprocess.Popen[str] = lab.popen(  # type: ignore[assignment]
            node,
            [NATKIT, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream: IO[str], is_stdout: bool) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in stream:
                (self.out if is_stdout else self.err).append(line)
                if is_stdout:
                    self.lines.put(line)
        if is_stdout:
            self.lines.put(None)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def why(self) -> str:
        return (
            f"natkit {' '.join(self.args[:2])}: rc={self.proc.poll()} "
            f"stdout={''.join(self.out)!r} stderr={self.stderr!r}"
        )

    def next_event(self, timeout: float = 15.0) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout} s: {self.why()}") from None
        assert line is not None, f"ended early: {self.why()}"
        try:
            obj = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}; {self.why()}") from None
        assert isinstance(obj, dict), line
        return obj

    def events_until(self, name: str, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["event"] != name:
            left = deadline - time.monotonic()
            assert left > 0, f"no {name!r} event within {timeout} s: {seen}; {self.why()}"
            seen.append(self.next_event(left))
        return seen

    def rest(self) -> list[dict[str, Any]]:
        """The JSON lines not consumed yet (call once the process has ended)."""
        for t in self._threads:
            t.join(timeout=5)
        found: list[dict[str, Any]] = []
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return found
            if line is not None:
                found.append(json.loads(line))

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s: {self.why()}") from None
        for t in self._threads:
            t.join(timeout=5)
        return rc

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class Procs:
    """Starts relays and agents for one test and kills whatever is left at its end."""

    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.all: list[Proc] = []

    def state(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(exist_ok=True)
        return path

    def relay(self, *extra: str, state: str = "relay", token: str | None = TOKEN_A,
              lab: Lab | None = None) -> tuple[Proc, dict[str, Any]]:  # fmt: skip
        args = [*RELAY_ARGS, *extra] + (["--token", token] if token else [])
        proc = Proc(lab or self.lab, "wan", args, self.state(state))
        self.all.append(proc)
        ready = proc.next_event(20)
        assert ready["event"] == "ready", ready
        assert ready["listen"] == RELAY and ready["fingerprint"].startswith("sha256:"), ready
        return proc, ready

    def agent(self, port: int, *extra: str, state: str = "agent", token: str = TOKEN_A,
              via_relay: bool = True, lab: Lab | None = None) -> Proc:  # fmt: skip
        args = ["expose", str(port), "--relay", RELAY, "--token", token,
                "--local-host", C.LAN_IP, "--json", *extra]  # fmt: skip
        if via_relay:
            args[2:2] = ["--via", "relay"]
        proc = Proc(lab or self.lab, "lan", args, self.state(state))
        self.all.append(proc)
        return proc

    def ready_agent(self, port: int, *extra: str, **kw: Any) -> tuple[Proc, str]:
        proc = self.agent(port, *extra, **kw)
        ready = proc.next_event(20)
        assert ready["event"] == "ready" and ready["method"] == "relay", (ready, proc.why())
        if "--http" in extra and "--no-inspect" not in extra:  # the inspector's line follows
            inspector = proc.next_event(20)
            assert inspector["event"] == "inspector", (inspector, proc.why())
        return proc, ready["public_address"]

    def kill_all(self) -> None:
        for proc in reversed(self.all):
            proc.kill()


@pytest.fixture
def procs(lab: Lab, tmp_path: Path) -> Iterator[Procs]:
    p = Procs(lab, tmp_path)
    try:
        yield p
    finally:
        p.kill_all()
    for proc in p.all:
        assert "Traceback" not in proc.stderr, proc.why()


def stopped_cleanly(proc: Proc, public: str) -> None:
    """SIGTERM: exit 0 with a final ``closed`` event for the address."""
    assert proc.stop(signal.SIGTERM) == 0, proc.why()
    closing = proc.rest()
    assert closing and closing[-1]["event"] == "closed", (closing, proc.why())
    assert closing[-1]["public_address"] == public, closing


# ---- visitors (threads inside the wan node) ------------------------------------------------------


def _request(lab: Lab, ip: str, port: int, host: str | None, timeout: float, node: str = "wan") -> tuple[str, str]:  # fmt: skip
    """One HTTP/1.0 GET; returns (status line, body). OSError if it cannot connect."""

    def go() -> tuple[str, str]:
        with socket.create_connection((ip, port), timeout=timeout) as s:
            s.sendall(
                b"GET / HTTP/1.0\r\n" + (b"Host: %s\r\n" % host.encode() if host else b"") + b"\r\n"
            )
            chunks = []
            while data := s.recv(65536):
                chunks.append(data)
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        return head.split(b"\r\n", 1)[0].decode(errors="replace"), body.decode(errors="replace")

    return call_in_node(lab, node, go)


def visit(lab: Lab, public: str, timeout: float = 12.0) -> str:
    """GET a public address: ``IP:PORT`` (TCP tunnel) or ``http://NAME.DOMAIN:PORT``; the
    body, or "" if the connection failed or was closed without an answer."""
    if public.startswith("http://"):
        host, _, port = public[len("http://") :].partition(":")
        ip, port_n, header = RELAY_IP, int(port or 80), host
    else:
        ip, _, port = public.rpartition(":")
        ip, port_n, header = ip, int(port), None
    try:
        return _request(lab, ip, port_n, header, timeout)[1]
    except OSError:
        return ""


def refused(lab: Lab, ip: str, port: int) -> bool:
    def go() -> bool:
        try:
            socket.create_connection((ip, port), timeout=2).close()
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
        return False

    return call_in_node(lab, "wan", go)


def metrics(lab: Lab) -> dict[str, float]:
    status, body = _request(lab, RELAY_IP, METRICS_PORT, "metrics", 5)
    assert " 200 " in status, status
    found: dict[str, float] = {}
    for line in body.splitlines():
        # natkit_relay_agents 2 / natkit_relay_events_total{event="garbage"} 7
        if m := re.match(r'(natkit_relay_\w+)(?:\{event="(\w+)"\})? (\S+)$', line):
            found[m[2] or m[1]] = float(m[3])
    return found


def client_hello(name: str) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    tls = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


# ---- the relay restarts; the agent restarts ----------------------------------------------------


def test_relay_restart_agents_come_back_with_the_same_address(lab: Lab, procs: Procs) -> None:
    with (
        http_server(lab, "lan", C.LAN_IP, 0, "tcp service") as tcp_port,
        http_server(lab, "lan", C.LAN_IP, 0, "web service") as web_port,
    ):
        relay, ready = procs.relay()
        tcp, tcp_public = procs.ready_agent(tcp_port, state="agent-tcp")
        web, web_public = procs.ready_agent(
            web_port, "--http", "--hostname", "web", state="agent-web"
        )
        assert tcp_public.startswith(f"{RELAY_IP}:20")
        assert web_public == f"http://web.{DOMAIN}:{HTTP_PORT}"
        assert visit(lab, tcp_public) == "tcp service"
        assert visit(lab, web_public) == "web service"
        # Both agents pinned the relay's certificate on first use.
        for state in ("agent-tcp", "agent-web"):
            known = json.loads((procs.state(state) / "known_relays.json").read_text())
            assert known == {RELAY: ready["fingerprint"]}

        assert relay.stop(signal.SIGTERM) == 0, relay.why()
        for agent, public in ((tcp, tcp_public), (web, web_public)):
            lost = agent.next_event(15)
            assert lost["event"] == "lost", (lost, agent.why())
            assert lost["public_address"] == public and lost["reason"], lost
        assert refused(lab, RELAY_IP, int(tcp_public.rpartition(":")[2]))
        assert refused(lab, RELAY_IP, HTTP_PORT)

        # The same arguments and state directory: the same certificate, so the pin holds.
        relay2, ready2 = procs.relay()
        assert ready2["fingerprint"] == ready["fingerprint"]
        for agent, public in ((tcp, tcp_public), (web, web_public)):
            seen = agent.events_until("restored", 40)
            assert {e["event"] for e in seen} <= {"lost", "restored"}, seen
            assert seen[-1]["public_address"] == public and seen[-1]["changed"] is False, seen
        assert visit(lab, tcp_public) == "tcp service"
        assert visit(lab, web_public) == "web service"

        stopped_cleanly(tcp, tcp_public)
        stopped_cleanly(web, web_public)
        assert relay2.stop() == 0, relay2.why()


@contextlib.contextmanager
def partition(lab: Lab) -> Iterator[Callable[[], None]]:
    """Cut the LAN off from the relay's port in the router (both ways, silently: no FIN, no
    RST gets through); yields a function that heals it (also done on exit)."""
    rtr = ["ip", "netns", "exec", lab.netns("rtr"), "nft"]
    rules = f"""table inet nkrc_partition {{
    chain cut {{
        type filter hook forward priority -10;
        ip daddr {RELAY_IP} tcp dport 7835 drop
        ip saddr {RELAY_IP} tcp sport 7835 drop
    }}
}}
"""
    r = subprocess.run([*rtr, "-f", "-"], input=rules, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    healed = False

    def heal() -> None:
        nonlocal healed
        if not healed:
            healed = True
            subprocess.run([*rtr, "delete", "table", "inet", "nkrc_partition"], check=True)

    try:
        yield heal
    finally:
        heal()


def test_agent_survives_a_relay_that_still_holds_its_address(lab: Lab, procs: Procs) -> None:
    """A network outage long enough for the agent to give up on its connection (30 s of
    silence) but not for the relay (35 s idle): the agent reconnects at once and asks for its
    address, which the relay still holds for the dead connection. The new connection of the
    same token takes the address over, and the agent is back at the same address."""
    with http_server(lab, "lan", C.LAN_IP, 0, "patient") as port:
        relay, _ = procs.relay()
        agent, public = procs.ready_agent(port)
        assert visit(lab, public) == "patient"
        with partition(lab) as heal:
            lost = agent.next_event(45)
            heal()  # right away: the agent's next attempt gets through
        assert lost["event"] == "lost" and "silent" in lost["reason"], lost
        seen = agent.events_until("restored", 40)
        assert {e["event"] for e in seen} <= {"lost", "restored"}, seen
        assert seen[-1]["public_address"] == public and seen[-1]["changed"] is False, seen
        assert visit(lab, public) == "patient"
        stopped_cleanly(agent, public)
        assert relay.stop() == 0


def tokens_file(procs: Procs) -> str:
    path = procs.tmp / "tokens"
    path.write_text(f"# label:token\nalice:{TOKEN_A}\n\nbob:{TOKEN_B}\n")
    return str(path)


def test_agent_restart_within_grace_keeps_its_address(lab: Lab, procs: Procs) -> None:
    with http_server(lab, "lan", C.LAN_IP, 0, "alice's") as port:
        relay, _ = procs.relay("--tokens-file", tokens_file(procs), token=None)
        a_tcp, tcp_public = procs.ready_agent(port, state="a1")
        a_web, web_public = procs.ready_agent(port, "--http", "--hostname", "shop", state="a2")
        assert web_public == f"http://shop.{DOMAIN}:{HTTP_PORT}"
        stopped_cleanly(a_tcp, tcp_public)
        stopped_cleanly(a_web, web_public)
        assert visit(lab, web_public, timeout=3) == "no tunnel for this host\n"

        # Meanwhile another token gets another port, and not the name.
        b_tcp, b_public = procs.ready_agent(port, token=TOKEN_B, state="b1")
        assert b_public != tcp_public, "the relay gave away a port reserved for its agent"
        b_web = procs.agent(port, "--http", "--hostname", "shop", token=TOKEN_B, state="b2")
        assert b_web.wait(15) != 0, b_web.why()
        assert "held by another tunnel" in b_web.stderr, b_web.why()

        # The same token again (another process, same arguments): the same addresses.
        a_tcp2, tcp_public2 = procs.ready_agent(port, state="a1")
        a_web2, web_public2 = procs.ready_agent(port, "--http", "--hostname", "shop", state="a2")
        assert (tcp_public2, web_public2) == (tcp_public, web_public)
        assert visit(lab, tcp_public) == "alice's"
        assert visit(lab, web_public) == "alice's"
        assert visit(lab, b_public) == "alice's"
        for proc, public in ((a_tcp2, tcp_public), (a_web2, web_public), (b_tcp, b_public)):
            stopped_cleanly(proc, public)
        assert relay.stop() == 0


def test_after_the_grace_period_the_address_is_free_again(lab: Lab, procs: Procs) -> None:
    with http_server(lab, "lan", C.LAN_IP, 0, "grace") as port:
        relay, _ = procs.relay("--tokens-file", tokens_file(procs), "--grace", "1", token=None)
        a, a_public = procs.ready_agent(port, state="a")
        a_web, web_public = procs.ready_agent(port, "--http", "--hostname", "shop", state="a2")
        stopped_cleanly(a, a_public)
        stopped_cleanly(a_web, web_public)
        time.sleep(1.5)
        b, b_public = procs.ready_agent(port, token=TOKEN_B, state="b")
        assert b_public == a_public  # the lowest free port, no longer reserved
        b_web, b_web_public = procs.ready_agent(
            port, "--http", "--hostname", "shop", token=TOKEN_B, state="b2"
        )
        assert b_web_public == web_public
        assert visit(lab, b_web_public) == "grace"
        stopped_cleanly(b, b_public)
        stopped_cleanly(b_web, b_web_public)
        assert relay.stop() == 0


# ---- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("via_relay", [True, False], ids=["via-relay", "auto"])
def test_wrong_token_fails_fast_with_a_clear_error(lab: Lab, procs: Procs, via_relay: bool) -> None:
    with http_server(lab, "lan", C.LAN_IP, 0, "ok") as port:
        relay, _ = procs.relay()
        good, public = procs.ready_agent(port, state="good")
        started = time.monotonic()
        bad = procs.agent(port, token="not-the-token-0123456789", via_relay=via_relay, state="bad")
        rc = bad.wait(20)
        assert rc != 0, bad.why()
        assert time.monotonic() - started < 20
        assert re.search(r"^error: .*rejected the token", bad.stderr, re.M), bad.why()
        assert "Traceback" not in bad.stderr, bad.why()
        events = [e["event"] for e in bad.rest()]
        assert "lost" not in events and "ready" not in events, events  # no retry loop
        # In auto mode it had mapped the port before the relay said no: that is undone.
        assert f"dport {port} dnat" not in lab.router_rules(), lab.router_rules()
        assert visit(lab, public) == "ok"
        stopped_cleanly(good, public)
        assert relay.stop() == 0
        assert "failed authentication" in relay.stderr


def test_a_name_held_by_another_token_is_refused(lab: Lab, procs: Procs) -> None:
    with (
        http_server(lab, "lan", C.LAN_IP, 0, "alice's shop") as a_port,
        http_server(lab, "lan", C.LAN_IP, 0, "bob's") as b_port,
    ):
        relay, _ = procs.relay("--tokens-file", tokens_file(procs), token=None)
        alice, shop = procs.ready_agent(a_port, "--http", "--hostname", "shop", state="a")
        bob = procs.agent(b_port, "--http", "--hostname", "SHOP", token=TOKEN_B, state="b")
        assert bob.wait(20) != 0, bob.why()
        assert re.search(
            r"^error: relay \S+ refused the tunnel: host name shop\.lab\.test is held by another tunnel",
            bob.stderr,
            re.M,
        ), bob.why()
        rest = bob.rest()
        assert [e["event"] for e in rest] == ["error"]  # it never opened: no "closed"
        assert rest[-1]["error"] == "TunnelRefusedError" and rest[-1]["exit_code"] == 4
        # Alice is undisturbed, and Bob may have another name.
        assert visit(lab, shop) == "alice's shop"
        bob2, other = procs.ready_agent(
            b_port, "--http", "--hostname", "bob", token=TOKEN_B, state="b"
        )
        assert other == f"http://bob.{DOMAIN}:{HTTP_PORT}"
        assert visit(lab, other) == "bob's"
        assert visit(lab, shop) == "alice's shop"
        # An invalid name is refused as clearly, and does not hurt either.
        bad = procs.agent(b_port, "--http", "--hostname", "no_good", token=TOKEN_B, state="b")
        assert bad.wait(20) != 0
        assert "invalid host name" in bad.stderr, bad.why()
        stopped_cleanly(alice, shop)
        stopped_cleanly(bob2, other)
        assert relay.stop() == 0


def _garbage_conn(lab: Lab, payload: bytes, *, tls: bool = False, hold: float = 0.0) -> tuple[bytes, float]:  # fmt: skip
    """Send ``payload`` to the control port (over TLS if asked) and wait for the relay to
    drop us; returns (what it sent, seconds until it closed)."""

    def go() -> tuple[bytes, float]:
        sock = socket.create_connection((RELAY_IP, 7835), timeout=20)
        started = time.monotonic()
        received = b""
        conn: Any = sock
        try:
            if tls:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                conn = ctx.wrap_socket(sock)
            if payload:
                conn.sendall(payload)
            time.sleep(hold)
            while True:
                try:
                    data = conn.recv(4096)
                except (ConnectionResetError, ssl.SSLError):
                    break
                if not data:
                    break
                received += data
        finally:
            conn.close()
        return received, time.monotonic() - started

    return call_in_node(lab, "wan", go)


def test_garbage_on_the_control_port_is_dropped(lab: Lab, procs: Procs) -> None:
    rng = random.Random(1)
    who = {"instance": "0" * 32, "resume": "1" * 64}  # an agent process's identity
    noise = bytes([0x00]) + rng.randbytes(999)  # type 0: not a relay frame
    frames = {
        "random bytes": (noise, False),
        "random bytes 2": (rng.randbytes(3000), False),
        "an HTTP request": (b"GET / HTTP/1.1\r\nHost: 100.200.0.2:7835\r\n\r\n", False),
        "a truncated TLS hello": (client_hello("relay.lab.test")[:120], False),
        "a TLS record of garbage": (b"\x16\x03\x01\x00\x20" + b"\xee" * 32, False),
        "an unknown frame type": (bytes([99, 0, 0, 2]) + b"{}", False),
        "an oversize frame": (bytes([M.Data.TYPE, 0xFF, 0xFF, 0xFF]) + b"{" * 100, False),
        "a DATA frame with a bogus ticket": (M.encode(M.Data(ticket="bogus")), False),
        "a HELLO without TLS": (M.encode(M.Hello(version=M.VERSION, agent="x")), False),
        "a frame that is not JSON": (bytes([M.Data.TYPE, 0, 0, 4]) + b"\xff\xfe\xfd\xfc", False),
        "garbage inside TLS": (b"\x00\x00\x00\x05hello" + noise, True),
        "AUTH before HELLO inside TLS": (M.encode(M.Auth(token_id="x", mac="y", **who)), True),
        "a forged AUTH inside TLS": (
            M.encode(M.Hello(version=M.VERSION, agent="x"))
            + M.encode(M.Auth(token_id=control.token_id(TOKEN_A), mac="0" * 64, **who)),
            True,
        ),
        "nothing at all inside TLS": (b"", True),
        "a sealed data connection with a bogus ticket": (
            seal.encode_opening("bogus", bytes(seal.NONCE_SIZE)) + noise,
            False,
        ),
        "a sealed data connection with no ticket": (seal.PREFIX + b"\x00" + noise, False),
        "a sealed opening cut short": (seal.PREFIX + b"\x05bog", False),
    }
    with http_server(lab, "lan", C.LAN_IP, 0, "steady") as port:
        relay, _ = procs.relay("--metrics", f"{RELAY_IP}:{METRICS_PORT}")
        agent, public = procs.ready_agent(port, state="a")
        with concurrent.futures.ThreadPoolExecutor(len(frames) + 2) as pool:
            futures = {
                name: pool.submit(_garbage_conn, lab, data, tls=tls)
                for name, (data, tls) in frames.items()
            }
            futures["a silent connection"] = pool.submit(_garbage_conn, lab, b"")
            # While all that is pending: the tunnel works, and a new agent gets in.
            assert visit(lab, public) == "steady"
            newcomer, new_public = procs.ready_agent(port, state="b")
            assert visit(lab, new_public) == "steady"
            for name, fut in futures.items():
                data = frames.get(name, (b"", False))[0]
                received, took = fut.result(timeout=30)
                assert took < 16, f"{name}: the relay kept it {took:.1f} s"
                if name == "a forged AUTH inside TLS":
                    msgs = M.FrameDecoder().messages(received)
                    assert [type(m) for m in msgs] == [M.Challenge, M.Error], msgs
                    assert isinstance(msgs[1], M.Error) and msgs[1].code == "auth", msgs
                elif name.endswith("inside TLS"):
                    msgs = M.FrameDecoder().messages(received)
                    assert not any(isinstance(m, M.Welcome) for m in msgs), name
                elif data.startswith(b"\x16"):  # a TLS handshake: at most a TLS alert back
                    assert received in (b"",) or received[0] == 0x15, (name, received[:80])
                else:
                    assert received == b"", f"{name}: the relay answered {received[:80]!r}"
        assert visit(lab, public) == "steady"
        assert visit(lab, new_public) == "steady"
        counts = metrics(lab)
        assert counts["natkit_relay_agents"] == 2, counts
        assert counts.get("garbage", 0) >= 9, counts  # a frame other than DATA is garbage
        assert counts.get("auth_failures", 0) == 1, counts
        assert counts.get("bad_tickets", 0) >= 2, counts  # bogus tickets, plain and sealed
        stopped_cleanly(agent, public)
        stopped_cleanly(newcomer, new_public)
        assert relay.stop() == 0, relay.why()


def _slowloris(lab: Lab, interval: float, limit: float) -> tuple[float | None, bytes]:
    """A partial request head to the HTTP port, one byte every ``interval`` s, never done.
    Returns (seconds until the relay hung up or None, what it sent)."""
    head = b"GET / HTTP/1.1\r\nHost: shop.lab.test\r\nX-Slow: "

    def go() -> tuple[float | None, bytes]:
        with socket.create_connection((RELAY_IP, HTTP_PORT), timeout=5) as s:
            started = time.monotonic()
            received = b""
            i = 0
            while time.monotonic() - started < limit:
                try:
                    s.send(head[i : i + 1] if i < len(head) else b"a")
                    i += 1
                    ready, _, _ = select.select([s], [], [], interval)
                    if ready:
                        data = s.recv(4096)
                        if not data:
                            return time.monotonic() - started, received
                        received += data
                except (ConnectionResetError, BrokenPipeError):
                    return time.monotonic() - started, received
            return None, received

    return call_in_node(lab, "wan", go)


def test_a_slowloris_visitor_is_cut_off_while_others_are_served(lab: Lab, procs: Procs) -> None:
    with http_server(lab, "lan", C.LAN_IP, 0, "fast") as port:
        relay, _ = procs.relay("--metrics", f"{RELAY_IP}:{METRICS_PORT}")
        agent, shop = procs.ready_agent(port, "--http", "--hostname", "shop", state="a")
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            slow = [pool.submit(_slowloris, lab, 0.5, 15.0) for _ in range(4)]
            served = 0
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                assert visit(lab, shop, timeout=5) == "fast"
                served += 1
                time.sleep(0.5)
            for fut in slow:
                took, received = fut.result(timeout=30)
                assert took is not None, "the relay never hung up on a slowloris visitor"
                assert 5 < took < 15, took  # its 10 s header timeout, loosely
                assert received == b"", received  # nothing was routed to the service
        assert served >= 5
        counts = metrics(lab)
        assert counts.get("slow_visitors", 0) == 4, counts
        assert visit(lab, shop) == "fast"
        stopped_cleanly(agent, shop)
        assert relay.stop() == 0


def test_a_relay_with_another_certificate_is_refused(lab: Lab, procs: Procs) -> None:
    with http_server(lab, "lan", C.LAN_IP, 0, "pinned") as port:
        relay, first = procs.relay(state="relay-1")
        agent, public = procs.ready_agent(port, state="a")
        # (stderr is read by its own thread: the line may trail the ready event a little)
        wait_for(lambda: "pinned relay" in agent.stderr, 5, agent.why)
        stopped_cleanly(agent, public)
        assert relay.stop() == 0

        # Same address, another certificate (another state directory): an impostor.
        relay2, second = procs.relay(state="relay-2")
        assert second["fingerprint"] != first["fingerprint"]
        agent2 = procs.agent(port, state="a")
        assert agent2.wait(20) != 0, agent2.why()
        text = " ".join(agent2.stderr.split())
        assert "error: relay 100.200.0.2:7835 presented certificate" in text, agent2.why()
        assert second["fingerprint"] in text and first["fingerprint"] in text, text
        assert "pinned on first use" in text and "Traceback" not in text, text
        known = json.loads((procs.state("a") / "known_relays.json").read_text())
        assert known == {RELAY: first["fingerprint"]}  # the pin was not overwritten

        # --fingerprint pins explicitly: the wrong one fails, the right one works.
        wrong = procs.agent(port, "--fingerprint", first["fingerprint"], state="fresh")
        assert wrong.wait(20) != 0
        assert "not the expected" in " ".join(wrong.stderr.split()), wrong.why()
        right, public2 = procs.ready_agent(
            port, "--fingerprint", second["fingerprint"], state="fresh"
        )
        assert visit(lab, public2) == "pinned"
        stopped_cleanly(right, public2)
        assert relay2.stop() == 0


# ---- auto mode -----------------------------------------------------------------------------------


def test_auto_uses_a_mapping_the_relay_can_reach(lab: Lab, procs: Procs) -> None:
    wait_router_uptime(lab)
    with http_server(lab, "lan", C.LAN_IP, 0, "mapped") as port:
        relay, _ = procs.relay()
        agent = procs.agent(port, "--check-interval", "1", via_relay=False)
        ready = agent.next_event(30)
        assert ready["event"] == "ready", (ready, agent.why())
        if ready["method"] == "relay":
            # A loaded machine: the proof took longer than the 0.15 s head start, so the
            # relay went ahead; the proven mapping then takes over.
            assert ready["mapping"] == "probing", ready
            later = agent.events_until("ready", 30)
            assert [e["event"] for e in later] == ["switched", "closed", "ready"], later
            ready = later[-1]
        assert ready["method"] in ("pcp", "natpmp", "upnp"), ready
        assert ready["verified"] is True, ready
        public = f"{C.RTR_WAN_IP}:{port}"
        assert ready["public_address"] == public, ready
        assert visit(lab, public) == "mapped"
        assert agent.stop() == 0, agent.why()
        closing = agent.rest()
        assert closing[-1]["event"] == "closed" and closing[-1]["removed"] is True, closing
        assert relay.stop() == 0


def _auto_falls_back(lab: Lab, procs: Procs, reason: str) -> dict[str, Any]:
    with http_server(lab, "lan", C.LAN_IP, 0, "relayed") as port:
        relay, _ = procs.relay(lab=lab)
        agent = procs.agent(port, via_relay=False, lab=lab, state=f"agent-{lab.cfg.name}")
        # The relay tunnel opens while the router is probed: the mapping's verdict comes
        # before the relay's ready when it is quick, else after it (ready says "probing").
        seen = agent.events_until("ready", 60)
        if [e["event"] for e in seen] == ["ready"]:
            assert seen[0].get("mapping") == "probing", seen
            seen += agent.events_until("fallback", 60)
        names = [e["event"] for e in seen]
        assert sorted(names) == ["fallback", "ready"], seen
        fallback, ready = sorted(seen, key=lambda e: e["event"])
        assert re.search(reason, fallback["reason"]), fallback
        assert ready["method"] == "relay" and ready["public_address"].startswith(RELAY_IP), ready
        # A mapping that was made but did not work was removed before falling back.
        assert f"dport {port} dnat" not in lab.router_rules(), lab.router_rules()
        assert visit(lab, ready["public_address"]) == "relayed"
        stopped_cleanly(agent, ready["public_address"])
        assert relay.stop() == 0
        return fallback


def test_auto_falls_back_when_the_mapping_is_unreachable(make_lab: Callable[..., Lab], tmp_path: Path) -> None:  # fmt: skip
    """A router that says yes but whose mapping does not work from outside (its firewall
    drops the forwarded traffic): the relay's dial-back proves it, and the relay is used."""
    liar = make_lab("liar")
    wait_router_uptime(liar)
    procs = Procs(liar, tmp_path)
    try:
        netns = liar.netns("rtr")
        # New connections from the WAN to any port the service may get die in the router's
        # forward chain, ahead of miniupnpd's accept rules (replies to the LAN still pass).
        r = subprocess.run(
            ["ip", "netns", "exec", netns, "nft", "insert", "rule", "inet", "filter", "forward",
             "iifname", C.RTR_WAN_IF, "ct", "state", "new", "tcp", "dport", "1024-65535",
             "drop"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        _auto_falls_back(
            liar, procs, r"^the relay could not reach 100\.200\.0\.1:\d+ from outside: "
        )
    finally:
        procs.kill_all()
    for proc in procs.all:
        assert "Traceback" not in proc.stderr, proc.why()


def test_auto_falls_back_when_mapping_fails(make_lab: Callable[..., Lab], tmp_path: Path) -> None:  # fmt: skip
    none = make_lab("nomap", portmap=frozenset())
    procs = Procs(none, tmp_path)
    try:
        _auto_falls_back(none, procs, r"^port mapping failed")
    finally:
        procs.kill_all()
    for proc in procs.all:
        assert "Traceback" not in proc.stderr, proc.why()


# ---- the Python API -----------------------------------------------------------------------------


def test_python_api_connect_list_disconnect(lab: Lab, procs: Procs, tmp_path: Path) -> None:
    known = tmp_path / "known_relays.json"
    with http_server(lab, "lan", C.LAN_IP, 0, "from python") as port:
        relay, ready = procs.relay()

        def connect(**kw: Any) -> natkit.Tunnel:
            return natkit.connect(port, relay=RELAY, token=TOKEN_A, local_host=C.LAN_IP,
                                  known_relays=known, timeout=20, **kw)  # fmt: skip

        tcp = call_in_node(lab, "lan", connect)
        web = call_in_node(lab, "lan", lambda: connect(kind="http", hostname="api"))
        try:
            assert tcp.kind == "tcp" and tcp.public_url.startswith(f"{RELAY_IP}:20")
            assert web.kind == "http" and web.public_url == f"http://api.{DOMAIN}:{HTTP_PORT}"
            assert json.loads(known.read_text()) == {RELAY: ready["fingerprint"]}
            assert visit(lab, tcp.public_url) == "from python"
            assert visit(lab, web.public_url) == "from python"
            assert {t.public_url for t in natkit.get_tunnels()} >= {tcp.public_url, web.public_url}
            assert str(port) in repr(tcp)

            tcp_port = int(tcp.public_url.rpartition(":")[2])
            tcp.close()
            tcp.close()  # twice is harmless
            assert tcp not in natkit.get_tunnels()
            wait_for(lambda: refused(lab, RELAY_IP, tcp_port), 10, "the TCP tunnel to close")

            natkit.disconnect(web.public_url)
            assert web not in natkit.get_tunnels()
            wait_for(
                lambda: visit(lab, web.public_url, timeout=3) == "no tunnel for this host\n",
                10,
                "the HTTP tunnel to close",
            )
        finally:
            tcp.close()
            web.close()

        # A wrong token is an exception, promptly, not a hang.
        started = time.monotonic()
        with pytest.raises(RelayAuthError, match="rejected the token"):
            call_in_node(
                lab,
                "lan",
                lambda: natkit.connect(
                    port,
                    relay=RELAY,
                    token=TOKEN_B,
                    local_host=C.LAN_IP,
                    known_relays=known,
                    timeout=20,
                ),
            )
        assert time.monotonic() - started < 15
        assert relay.stop() == 0
