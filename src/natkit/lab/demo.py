"""``make demo``: natkit's main job, shown end to end on fresh labs.

Act 1: a home router that offers port mapping: ``natkit.open_port(8080)`` maps the LAN web
server and the Internet reaches it. Act 2: a router that offers none (as behind carrier
NAT): ``natkit expose 8080 --relay ...`` tries the router, finds nothing, and falls back to
a natkit relay on the Internet host, which the web server is then reached through.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console

from natkit.api import open_port_async
from natkit.errors import NatkitError
from natkit.lab import config as C
from natkit.lab import netns
from natkit.lab.config import LabConfig
from natkit.lab.lab import STATE_ROOT, Lab

console = Console(highlight=False)
PAGE = "hello from a web server behind NAT\n"
DEMO_TOKEN = "natkit-demo-token-0123456789"
RELAY = f"{C.WAN_IPS[0]}:7835"
# The lab relay's certificate and key: one identity for every lab on this machine, kept
# beside the labs' state (not in a lab's own directory, which each new lab wipes). Agents pin
# a relay by its address, and every lab's relay has the same one: a new certificate per lab
# made every second lab fail on the first one's pin.
RELAY_IDENTITY = STATE_ROOT / "relay-identity"


def _http_get(host: str, port: int, timeout: float = 2.0) -> str:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(f"GET / HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def _reachable(host: str, port: int) -> bool:
    try:
        _http_get(host, port, timeout=1.0)
        return True
    except OSError:
        return False


class _Steps:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, text: str) -> None:
        self.n += 1
        console.print(f"[bold cyan]{self.n}.[/] {text}")


def _json_lines(proc: subprocess.Popen[str]) -> queue.Queue[dict[str, Any]]:
    """A queue fed with the JSON lines a natkit subprocess prints."""
    lines: queue.Queue[dict[str, Any]] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                lines.put(json.loads(line))
            except ValueError:
                continue

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_event(lines: queue.Queue[dict[str, Any]], want: Callable[[dict[str, Any]], bool],
                timeout: float, seen: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        try:
            obj = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise NatkitError(f"timed out waiting for natkit (saw {seen})") from None
        seen.append(obj)
        if want(obj):
            return obj


def _web_server(lab: Lab) -> subprocess.Popen[bytes]:
    server = lab.popen("lan", [sys.executable, "-m", "natkit.lab.webserver", C.LAN_IP, "8080", PAGE],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 10
    while not netns.call_in(lab.netns("lan"), lambda: _reachable(C.LAN_IP, 8080)):
        if time.monotonic() > deadline:
            raise NatkitError("the demo web server did not start")
        time.sleep(0.05)
    return server


def _act_mapping(lab: Lab, say: _Steps) -> bool:
    blocked = not netns.call_in(lab.netns("wan"), lambda: _reachable(C.RTR_WAN_IP, 8080))
    say(f"from wan, {C.RTR_WAN_IP}:8080 is {'[red]unreachable[/]' if blocked else 'reachable?!'} "
        "(the router drops unsolicited traffic)")  # fmt: skip

    async def map_and_fetch() -> bool:
        t0 = time.perf_counter()
        async with await open_port_async(8080, lease=600, description="natkit demo") as port:
            ms = (time.perf_counter() - t0) * 1000
            m = port.mapping
            say(f"natkit.open_port(8080) on lan: the router mapped it via {m.method} in {ms:.0f} ms"
                f" → public address [b]{port.public_address}[/] ({m.reachability_note})")  # fmt: skip
            host, p = m.external_ip, m.external_port
            reply = netns.call_in(lab.netns("wan"), lambda: _http_get(host, p))
            status, _, body = reply.partition("\r\n\r\n")
            say(f"from wan: GET http://{host}:{p}/ → {status.splitlines()[0]}: {body.strip()!r}")
            in_rules = f"dport {p} dnat" in lab.router_rules()
            say(f"the router's nftables holds the mapping: {'yes' if in_rules else 'no'}")
        gone = not netns.call_in(lab.netns("wan"), lambda: _reachable(host, p))
        say(f"closed: the mapping is removed, from wan the port is "
            f"{'unreachable again' if gone else 'still reachable?!'}")  # fmt: skip
        return body == PAGE and in_rules and gone

    return netns.run_in(lab.netns("lan"), map_and_fetch)


def _act_relay(lab: Lab, say: _Steps) -> bool:
    agent_state = tempfile.mkdtemp(prefix="natkit-demo-state-")  # the demo's own pins
    env = dict(os.environ, NATKIT_STATE_DIR=agent_state)
    natkit = [sys.executable, "-m", "natkit.cli.main"]
    relay_argv = [*natkit, "relay", "serve", "--listen", RELAY, "--token", DEMO_TOKEN,
                  "--ports", "20000-20099", "--state-dir", str(RELAY_IDENTITY), "--json"]  # fmt: skip
    relay = subprocess.Popen(lab.command("wan", relay_argv),
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)  # fmt: skip
    expose: subprocess.Popen[str] | None = None
    seen: list[dict[str, Any]] = []
    try:
        ready = _wait_event(_json_lines(relay), lambda o: o.get("event") == "ready", 15, seen)
        say(
            f"a natkit relay runs on wan at {ready['listen']} (certificate {ready['fingerprint'][:23]}…)"
        )
        t0 = time.perf_counter()
        expose_argv = [*natkit, "expose", "8080", "--relay", RELAY, "--token", DEMO_TOKEN,
                       "--local-host", C.LAN_IP, "--json"]  # fmt: skip
        expose = subprocess.Popen(lab.command("lan", expose_argv),
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)  # fmt: skip
        lines = _json_lines(expose)
        fallback = _wait_event(lines, lambda o: o.get("event") in ("fallback", "ready"), 20, seen)
        if fallback.get("event") == "fallback":
            say(f"natkit expose 8080 --relay {RELAY}: no router mapping ({fallback['reason'][:90]}…)"
                " → falling back to the relay")  # fmt: skip
        up = fallback if fallback.get("event") == "ready" else _wait_event(
            lines, lambda o: o.get("event") == "ready", 20, seen)  # fmt: skip
        ms = (time.perf_counter() - t0) * 1000
        if up.get("mapping") == "probing":
            say(f"natkit expose 8080 --relay {RELAY}: the relay tunnel opened while the router "
                "was still being probed (a mapping proven later would take over)")  # fmt: skip
        host, _, port = str(up["public_address"]).rpartition(":")
        say(
            f"public via {up['method']} in {ms:.0f} ms (process start included): [b]{up['public_address']}[/]"
        )
        reply = netns.call_in(lab.netns("wan"), lambda: _http_get(host, int(port)))
        status, _, body = reply.partition("\r\n\r\n")
        say(
            f"from wan: GET http://{up['public_address']}/ → {status.splitlines()[0]}: {body.strip()!r}"
        )
        expose.terminate()
        closed = _wait_event(lines, lambda o: o.get("event") == "closed", 10, seen)
        say(f"natkit expose stopped (SIGTERM): {closed['event']}, exit code {expose.wait(10)}")
        return up["method"] == "relay" and body == PAGE and expose.returncode == 0
    finally:
        for proc in (expose, relay):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(agent_state, ignore_errors=True)


def run_demo(name: str = "natkit-demo", *, keep: bool = False) -> int:
    say = _Steps()
    ok = True
    for act, portmap in ((1, frozenset(("upnp", "natpmp", "pcp"))), (2, frozenset())):
        lab = Lab.create(LabConfig(name=name, portmap=portmap), replace=True)  # type: ignore[arg-type]
        server = None
        try:
            offer = (
                ", ".join(sorted(portmap)) if portmap else "no port mapping (as behind carrier NAT)"
            )
            console.print(f"\n[bold]Act {act}: a router offering {offer}[/]")
            say(f"lab {name!r} is up: [b]lan[/] {C.LAN_IP} → [b]rtr[/] (nftables NAT, firewall"
                f"{', miniupnpd' if portmap else ''}) {C.RTR_WAN_IP} → [b]wan[/] {C.WAN_IPS[0]} "
                "(the Internet)")  # fmt: skip
            server = _web_server(lab)
            say(f"a web server listens on lan {C.LAN_IP}:8080")
            ok = (_act_mapping(lab, say) if act == 1 else _act_relay(lab, say)) and ok
        finally:
            if server is not None:
                server.terminate()
                server.wait()
            if not keep or act == 1:
                lab.down()
                say(f"lab {name!r} torn down")
    console.print("\n[bold green]demo passed[/]" if ok else "\n[bold red]demo failed[/]")
    return 0 if ok else 1
