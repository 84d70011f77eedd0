"""``make demo``: natkit's main job, shown end to end on a fresh lab."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from rich.console import Console

from natkit.api import open_port_async
from natkit.errors import NatkitError
from natkit.lab import config as C
from natkit.lab import netns
from natkit.lab.config import LabConfig
from natkit.lab.lab import Lab

console = Console(highlight=False)
PAGE = "hello from a web server behind NAT\n"


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


def run_demo(name: str = "natkit-demo", *, keep: bool = False) -> int:
    step = iter(range(1, 100))

    def say(text: str) -> None:
        console.print(f"[bold cyan]{next(step)}.[/] {text}")

    lab = Lab.create(LabConfig(name=name), replace=True)
    server: subprocess.Popen[bytes] | None = None
    try:
        say(
            f"lab {name!r} is up: [b]lan[/] {C.LAN_IP} → [b]rtr[/] (nftables NAT, miniupnpd) "
            f"{C.RTR_WAN_IP} → [b]wan[/] {C.WAN_IPS[0]} (the Internet)"
        )
        server = lab.popen(
            "lan",
            [sys.executable, "-m", "natkit.lab.webserver", C.LAN_IP, "8080", PAGE],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not netns.call_in(lab.netns("lan"), lambda: _reachable(C.LAN_IP, 8080)):
            if time.monotonic() > deadline:
                raise NatkitError("the demo web server did not start")
            time.sleep(0.05)
        say(f"a web server listens on lan {C.LAN_IP}:8080")
        blocked = not netns.call_in(lab.netns("wan"), lambda: _reachable(C.RTR_WAN_IP, 8080))
        say(
            f"from wan, {C.RTR_WAN_IP}:8080 is {'[red]unreachable[/]' if blocked else 'reachable?!'} "
            "(the router drops unsolicited traffic)"
        )

        async def map_and_fetch() -> int:
            t0 = time.perf_counter()
            async with await open_port_async(8080, lease=600, description="natkit demo") as port:
                ms = (time.perf_counter() - t0) * 1000
                m = port.mapping
                say(
                    f"natkit.open_port(8080) on lan: UPnP IGD found and mapping made in {ms:.0f} ms → "
                    f"public address [b]{port.public_address}[/] ({m.reachability_note})"
                )
                host, p = m.external_ip, m.external_port
                reply = netns.call_in(lab.netns("wan"), lambda: _http_get(host, p))
                status, _, body = reply.partition("\r\n\r\n")
                say(
                    f"from wan: GET http://{host}:{p}/ → {status.splitlines()[0]}: {body.strip()!r}"
                )
                ok = body == PAGE
                rules = lab.router_rules()
                say(
                    f"router's nftables has the mapping: "
                    f"{'yes' if f'dport {p} dnat' in rules else 'no'}"
                )
            gone = not netns.call_in(lab.netns("wan"), lambda: _reachable(host, p))
            say(
                f"mapping removed on exit: from wan the port is now "
                f"{'unreachable' if gone else 'still reachable?!'}"
            )
            return 0 if ok and gone else 1

        code = netns.run_in(lab.netns("lan"), map_and_fetch)
        console.print("[bold green]demo passed[/]" if code == 0 else "[bold red]demo failed[/]")
        return code
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        if not keep:
            lab.down()
            say(f"lab {name!r} torn down")
