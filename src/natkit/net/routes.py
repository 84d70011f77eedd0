"""Which gateway, which local address, which LAN: read from the system's routing table.

Each platform's table is parsed by pure code (text in, routes out): Linux's
``/proc/thread-self/net/route`` (not ``/proc/net/route``, so that a thread that entered a
network namespace sees that namespace's routes) in :mod:`.routes_linux`, macOS's ``netstat
-rn -f inet`` and ``route -n get default`` in :mod:`.routes_darwin`, Windows' ``route print
-4`` and ``ipconfig`` in :mod:`.routes_windows`. The commands run with a bounded time and
output size. The local address towards a host needs no table: a connected UDP socket says
which one the system picked (no packet is sent).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from natkit.errors import DiscoveryError
from natkit.net.routes_darwin import parse_netstat, parse_route_get
from natkit.net.routes_linux import parse_proc_route
from natkit.net.routes_model import Route
from natkit.net.routes_windows import parse_ipconfig, parse_route_print

log = logging.getLogger("natkit.net")

ROUTE_FILES = ("/proc/thread-self/net/route", "/proc/net/route")
COMMAND_TIMEOUT = 5.0  # seconds; netstat/route print answer in milliseconds
COMMAND_OUTPUT_LIMIT = 1 << 20  # bytes; a table of a few thousand routes is ~200 KiB
# How often a watcher (a kept mapping checks every 2 s) may run the table's command: a
# gateway change is then seen within this, instead of netstat/route print every check.
COMMAND_READ_INTERVAL = 10.0
parse_route_table = parse_proc_route  # the name this module had for it first

# Addresses that cannot be a public endpoint: RFC 1918, CGNAT, loopback, link-local,
# documentation, benchmarking, multicast, reserved. A router reporting one of these as its
# "external" address sits behind another NAT.
_NOT_PUBLIC = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
]


_last_error = ""  # why the last read of the table failed (named by default_gateway)


def run_command(argv: list[str], timeout: float = COMMAND_TIMEOUT) -> str:
    """The standard output of ``argv``, read within ``timeout`` seconds and
    :data:`COMMAND_OUTPUT_LIMIT` bytes; :class:`DiscoveryError` if it cannot be had."""
    what = os.path.basename(argv[0])
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),  # Windows: no console
        )  # fmt: skip
    except OSError as exc:
        raise DiscoveryError(f"cannot run {argv[0]} to read the routing table: {exc}") from None
    expired = threading.Event()

    def expire() -> None:  # a read that blocks ends when the child dies
        expired.set()
        proc.kill()

    timer = threading.Timer(timeout, expire)
    timer.start()
    try:
        assert proc.stdout is not None
        with proc.stdout:
            data = proc.stdout.read(COMMAND_OUTPUT_LIMIT + 1)
        if len(data) > COMMAND_OUTPUT_LIMIT:
            proc.kill()
        status = proc.wait()
    finally:
        timer.cancel()
    if len(data) > COMMAND_OUTPUT_LIMIT:
        raise DiscoveryError(
            f"{what} printed more than {COMMAND_OUTPUT_LIMIT} bytes: not a routing table"
        )
    if expired.is_set():
        raise DiscoveryError(f"cannot read the routing table with {what}: it ran longer "
                             f"than {timeout:g} s")  # fmt: skip
    if status != 0:
        raise DiscoveryError(
            f"cannot read the routing table with {what}: it exited with status {status}"
        )
    # Windows prints in the console's code page: only the ASCII parts are parsed.
    return data.decode("utf-8", "replace")


def system_command(name: str) -> str:
    root = os.environ.get("SYSTEMROOT", r"C:\Windows")
    return os.path.join(root, "System32", name)


def _installed(*paths: str) -> str:
    """The first of ``paths`` that exists (macOS has netstat in /usr/sbin, FreeBSD in
    /usr/bin), else the first (its failure then names it)."""
    return next((p for p in paths if os.path.exists(p)), paths[0])


def _read_proc() -> list[Route]:
    for path in ROUTE_FILES:
        try:
            with open(path) as f:
                return parse_proc_route(f.read())
        except OSError:
            continue
    raise DiscoveryError(f"cannot read the routing table ({' or '.join(ROUTE_FILES)})")


def _read_darwin() -> list[Route]:
    netstat = _installed("/usr/sbin/netstat", "/usr/bin/netstat")
    failed: DiscoveryError | None = None
    try:
        routes = parse_netstat(run_command([netstat, "-rn", "-f", "inet"]))
    except DiscoveryError as exc:
        log.info("%s; asking route(8) for the default route alone", exc)
        routes, failed = [], exc
    if not any(r.destination.prefixlen == 0 and r.gateway for r in routes):
        # The route in use; route(8) fails (status 1, "not in table") when there is none.
        try:
            routes += parse_route_get(run_command(["/sbin/route", "-n", "get", "default"]))
        except DiscoveryError as exc:
            if failed is not None:
                raise failed from None  # neither answered: say why the table is unknown
            log.info("%s", exc)
    return routes


def _read_windows() -> list[Route]:
    try:
        routes = parse_route_print(run_command([system_command("route.exe"), "print", "-4"]))
    except DiscoveryError as exc:
        log.info("route print failed (%s); reading ipconfig instead", exc)
        routes = []
    return routes or parse_ipconfig(run_command([system_command("ipconfig.exe")]))


def table_source() -> str:
    """How this platform's tables are read: ``win32`` and ``darwin`` (macOS and the BSDs) by
    their commands, ``linux`` (anything else) from /proc."""
    if sys.platform == "win32":
        return "win32"
    return "darwin" if sys.platform == "darwin" or "bsd" in sys.platform else "linux"


def _reader() -> Callable[[], list[Route]]:
    return {"win32": _read_windows, "darwin": _read_darwin}.get(table_source(), _read_proc)


def read_routes() -> list[Route]:
    """This system's IPv4 routes; empty (the reason logged, and named by
    :func:`default_gateway`) when the table cannot be read."""
    global _last_error
    try:
        routes = _reader()()
    except DiscoveryError as exc:
        _last_error = str(exc)
        log.warning("%s", exc)
        return []
    _last_error = ""
    return routes


def default_gateway(routes: list[Route] | None = None) -> str:
    """The IPv4 default gateway's address; :class:`DiscoveryError` if there is none."""
    routes = read_routes() if routes is None else routes
    defaults = [r for r in routes if r.destination.prefixlen == 0 and r.gateway is not None]
    if not defaults:
        why = f" ({_last_error})" if _last_error and not routes else ""
        raise DiscoveryError(
            f"no IPv4 default gateway{why}: this machine has no route to a router; "
            "name the router with --gateway IP"
        )
    return str(min(defaults, key=lambda r: r.metric).gateway)


async def read_routes_async() -> list[Route]:
    """:func:`read_routes` without blocking the event loop where it runs a command (macOS,
    Windows: in a worker thread). Linux reads /proc in place: it takes microseconds, and a
    thread that entered a network namespace must read its own (a worker thread is not in it).
    """
    if table_source() == "linux":
        return read_routes()
    return await asyncio.to_thread(read_routes)


class GatewayWatch:
    """The default gateway for one that asks often (a kept mapping, every check): read
    afresh each time on Linux (/proc, in place); elsewhere at most every ``interval``
    seconds, in a worker thread, the last answer given in between. None: no default
    gateway (or no table) at the last read."""

    def __init__(
        self,
        interval: float = COMMAND_READ_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval, self.clock = interval, clock
        self._gateway: str | None = None
        self._next_read = -math.inf

    async def current(self) -> str | None:
        if table_source() != "linux":
            if self.clock() < self._next_read:
                return self._gateway
            self._next_read = self.clock() + self.interval
        try:
            self._gateway = default_gateway(await read_routes_async())
        except DiscoveryError:
            self._gateway = None
        return self._gateway


def local_address_for(remote_ip: str) -> str:
    """The local address the kernel would use to reach ``remote_ip`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((remote_ip, 9))
        except OSError as exc:
            raise DiscoveryError(f"no route to {remote_ip}: {exc}") from None
        return str(s.getsockname()[0])


def lan_network(local_ip: str, routes: list[Route] | None = None) -> ipaddress.IPv4Network:
    """The directly connected subnet that holds ``local_ip`` (a /24 if the table says nothing).

    Host routes (/32) are not networks: macOS and Windows list one for each local address.
    """
    routes = read_routes() if routes is None else routes
    addr = ipaddress.IPv4Address(local_ip)
    linked = [
        r.destination for r in routes if r.gateway is None and 0 < r.destination.prefixlen < 32
    ]
    matching = [net for net in linked if addr in net]
    if matching:
        return max(matching, key=lambda n: n.prefixlen)
    return ipaddress.IPv4Network(f"{local_ip}/24", strict=False)


def is_public_ipv4(ip: str) -> bool:
    """True if ``ip`` can be a public Internet address (not private, CGNAT, reserved…)."""
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        return False
    return not any(addr in net for net in _NOT_PUBLIC)


def is_cgnat(ip: str) -> bool:
    try:
        return ipaddress.IPv4Address(ip) in ipaddress.IPv4Network("100.64.0.0/10")
    except ValueError:
        return False
