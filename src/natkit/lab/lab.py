"""Build, inspect, reboot and remove a NAT lab made of Linux network namespaces.

Topology (one lab; names are prefixed with the lab's name)::

    lan 192.168.77.10 ─┐
                       ├─ br-lan 192.168.77.1 [rtr] wan0 100.200.0.1 ── 100.200.0.2/.3 [wan]
    dev 192.168.77.20 ─┘     nftables NAT + firewall, miniupnpd

``rtr`` is a real kernel NAT (nftables) running Debian's miniupnpd; ``wan`` stands for the
Internet; ``dev`` is a second LAN device (tests use it for hostile SSDP answers). Nothing
is linked to the host's own network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from natkit.errors import LabError, MissingPackageError
from natkit.lab import config as C
from natkit.lab import netns
from natkit.lab.config import LabConfig

STATE_ROOT = Path(os.environ.get("NATKIT_LAB_STATE", "/run/natkit"))

# binary -> Debian package that ships it
REQUIRED = {
    "ip": "iproute2",
    "nft": "nftables",
    "miniupnpd": "miniupnpd-nftables",
    "conntrack": "conntrack",
}
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


def _which(binary: str) -> str | None:
    found = shutil.which(binary)
    if found:
        return found
    for d in SBIN_DIRS:
        path = os.path.join(d, binary)
        if os.access(path, os.X_OK):
            return path
    return None


def check_host() -> None:
    """Fail with an actionable message unless this is Linux, as root, with the packages."""
    if not sys.platform.startswith("linux"):
        raise LabError(f"the lab needs Linux network namespaces; this is {sys.platform}")
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, nftables): run it with sudo")
    missing = sorted({pkg for binary, pkg in REQUIRED.items() if _which(binary) is None})
    if missing:
        raise MissingPackageError(missing)


def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise LabError(
            f"command failed ({proc.returncode}): {' '.join(argv)}: {proc.stderr.strip()}"
        )
    return proc.stdout


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state != "Z"


def _kill(pid: int, timeout: float = 3.0) -> None:
    """SIGTERM, then SIGKILL; reap it if it is our child."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                pass
            if not _pid_alive(pid):
                return
            time.sleep(0.02)


class Lab:
    """A lab by name. ``Lab.create(cfg)`` builds one; ``Lab.open(name)`` finds a running one."""

    def __init__(self, cfg: LabConfig) -> None:
        self.cfg = cfg
        self.state_dir = STATE_ROOT / cfg.name

    # ---- life cycle -------------------------------------------------------------------

    @classmethod
    def create(cls, cfg: LabConfig, *, replace: bool = False) -> Lab:
        check_host()
        lab = cls(cfg)
        if lab.exists():
            if not replace:
                raise LabError(
                    f"a lab named {cfg.name!r} already exists: use it, remove it with "
                    f"'natkit lab down --name {cfg.name}', or pick another --name"
                )
            lab.down()
        try:
            lab._build()
        except BaseException:
            lab.down()
            raise
        return lab

    @classmethod
    def open(cls, name: str = "natkit") -> Lab:
        path = STATE_ROOT / name / "lab.json"
        if not netns.exists(f"{name}-rtr"):
            raise LabError(
                f"no lab named {name!r} is up (start one with 'natkit lab up --name {name}')"
            )
        try:
            cfg = LabConfig.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError) as exc:
            raise LabError(f"lab {name!r} has no readable state in {path}: {exc}") from None
        return cls(cfg)

    def exists(self) -> bool:
        return any(netns.exists(self.cfg.netns(n)) for n in C.NODES)

    def down(self) -> None:
        """Remove every namespace, process and state file of this lab. Idempotent."""
        self.stop_router_daemon()
        for node in C.NODES:
            ns = self.cfg.netns(node)
            if not netns.exists(ns):
                continue
            # Anything still running inside (daemons, test servers) goes too, by pid.
            for line in _run(["ip", "netns", "pids", ns], check=False).split():
                if line.isdigit():
                    _kill(int(line), timeout=1.0)
            _run(["ip", "netns", "delete", ns], check=False)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def _build(self) -> None:
        cfg = self.cfg
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "lab.json").write_text(json.dumps(cfg.to_json(), indent=2))
        ns = {n: cfg.netns(n) for n in C.NODES}
        for n in C.NODES:
            _run(["ip", "netns", "add", ns[n]])
            _run(["ip", "-n", ns[n], "link", "set", "lo", "up"])
        rtr = ns["rtr"]
        # The LAN: a bridge on the router, one veth per LAN host.
        _run(
            [
                "ip",
                "-n",
                rtr,
                "link",
                "add",
                C.RTR_LAN_BRIDGE,
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ]
        )
        _run(
            [
                "ip",
                "-n",
                rtr,
                "addr",
                "add",
                f"{C.RTR_LAN_IP}/{C.LAN_PREFIX}",
                "dev",
                C.RTR_LAN_BRIDGE,
            ]
        )
        _run(["ip", "-n", rtr, "link", "set", C.RTR_LAN_BRIDGE, "up"])
        for host, ip in (("lan", C.LAN_IP), ("dev", C.DEV_IP)):
            port = f"{host}-p"
            _run(
                [
                    "ip",
                    "-n",
                    rtr,
                    "link",
                    "add",
                    port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    C.HOST_IF,
                    "netns",
                    ns[host],
                ]
            )
            _run(["ip", "-n", rtr, "link", "set", port, "master", C.RTR_LAN_BRIDGE, "up"])
            _run(["ip", "-n", ns[host], "addr", "add", f"{ip}/{C.LAN_PREFIX}", "dev", C.HOST_IF])
            _run(["ip", "-n", ns[host], "link", "set", C.HOST_IF, "up"])
            _run(["ip", "-n", ns[host], "route", "add", "default", "via", C.RTR_LAN_IP])
        # The "Internet": a veth from the router's WAN port to the wan host (two addresses).
        wan = ns["wan"]
        _run(
            [
                "ip",
                "-n",
                rtr,
                "link",
                "add",
                C.RTR_WAN_IF,
                "type",
                "veth",
                "peer",
                "name",
                C.HOST_IF,
                "netns",
                wan,
            ]
        )
        _run(
            ["ip", "-n", rtr, "addr", "add", f"{C.RTR_WAN_IP}/{C.WAN_PREFIX}", "dev", C.RTR_WAN_IF]
        )
        _run(["ip", "-n", rtr, "link", "set", C.RTR_WAN_IF, "up"])
        for ip in C.WAN_IPS:
            _run(["ip", "-n", wan, "addr", "add", f"{ip}/{C.WAN_PREFIX}", "dev", C.HOST_IF])
        _run(["ip", "-n", wan, "link", "set", C.HOST_IF, "up"])
        # A default route keeps daemons from seeing "network unreachable"; it leads nowhere.
        _run(["ip", "-n", wan, "route", "add", "default", "dev", C.HOST_IF])
        _run(["ip", "-n", rtr, "route", "add", "default", "via", C.WAN_IPS[0]])
        _run(["ip", "netns", "exec", rtr, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self._load_ruleset()
        self.start_router_daemon()

    # ---- the router ---------------------------------------------------------------------

    @property
    def _pidfile(self) -> Path:
        return self.state_dir / "miniupnpd.pid"

    @property
    def router_log(self) -> Path:
        return self.state_dir / "miniupnpd.log"

    def _load_ruleset(self) -> None:
        _run(
            ["ip", "netns", "exec", self.cfg.netns("rtr"), "nft", "-f", "-"],
            input=C.router_ruleset(self.cfg),
        )

    def router_pid(self) -> int | None:
        try:
            pid = int(self._pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def router_uptime(self) -> float:
        """Seconds since the router daemon (re)started; 0 if it is not running.

        NAT-PMP/PCP clients notice a reboot from the epoch, with 2 s of slack (RFC 6886 3.6,
        RFC 6887 8.5): a router rebooted within 2 s of its last start looks unchanged.
        """
        pid = self.router_pid()
        if pid is None:
            return 0.0
        try:
            with open(f"/proc/{pid}/stat") as f:
                start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
            with open("/proc/uptime") as f:
                now = float(f.read().split()[0])
        except (OSError, IndexError, ValueError):
            return 0.0
        return now - start_ticks / os.sysconf("SC_CLK_TCK")

    def start_router_daemon(self) -> None:
        if not self.cfg.portmap:
            return  # --portmap none: a router that offers no port mapping at all
        conf = self.state_dir / "miniupnpd.conf"
        conf.write_text(C.miniupnpd_conf(self.cfg))
        self._pidfile.unlink(missing_ok=True)
        # The log is appended to across reboots: look for readiness only in what follows.
        offset = self.router_log.stat().st_size if self.router_log.exists() else 0
        log = open(self.router_log, "ab")  # noqa: SIM115 - handed to the daemon
        try:
            proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.cfg.netns("rtr"),
                    _which("miniupnpd") or "miniupnpd",
                    "-f",
                    str(conf),
                    "-d",
                    "-P",
                    str(self._pidfile),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()
        wants = []  # ready when every service it was asked for listens (stderr with -d)
        if "upnp" in self.cfg.portmap:
            wants.append("HTTP listening on port")
        if self.cfg.portmap & {"natpmp", "pcp"}:
            wants.append("Listening for NAT-PMP/PCP traffic")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"miniupnpd exited with {proc.returncode}: {self._log_tail()}")
            with open(self.router_log, "rb") as f:
                f.seek(offset)
                fresh = f.read().decode(errors="replace")
            if all(w in fresh for w in wants) and self.router_pid():
                return
            time.sleep(0.02)
        raise LabError(f"miniupnpd did not become ready in 10 s: {self._log_tail()}")

    def _log_tail(self, lines: int = 8) -> str:
        try:
            return " | ".join(self.router_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop_router_daemon(self) -> None:
        pid = self.router_pid()
        if pid is not None:
            _kill(pid)
        self._pidfile.unlink(missing_ok=True)

    def reboot_router(self, *, move_upnp_port: bool = False) -> None:
        """As a real router reboot: the daemon restarts and every mapping and NAT state is lost.

        ``move_upnp_port`` also moves the IGD's HTTP (SOAP) port, as some routers do.
        """
        self.stop_router_daemon()
        if move_upnp_port:
            port = (
                self.cfg.upnp_port + 1
                if self.cfg.upnp_port < C.UPNP_HTTP_PORT + 99
                else C.UPNP_HTTP_PORT
            )
            self.cfg = dataclasses.replace(self.cfg, upnp_port=port)
            (self.state_dir / "lab.json").write_text(json.dumps(self.cfg.to_json(), indent=2))
        self._load_ruleset()
        _run(["ip", "netns", "exec", self.cfg.netns("rtr"), "conntrack", "-F"], check=False)
        with open(self.router_log, "a") as log:
            log.write("---- natkit lab reboot ----\n")
        self.start_router_daemon()

    def router_rules(self) -> str:
        """The router's current nftables ruleset (mappings appear in the miniupnpd chains)."""
        return _run(["ip", "netns", "exec", self.cfg.netns("rtr"), "nft", "list", "ruleset"])

    # ---- running things on nodes --------------------------------------------------------

    def netns(self, node: str) -> str:
        if node not in C.NODES:
            raise LabError(f"unknown node {node!r}: the lab has {', '.join(C.NODES)}")
        return self.cfg.netns(node)

    def command(self, node: str, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` on ``node``."""
        return ["ip", "netns", "exec", self.netns(node), *argv]

    def run(self, node: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.command(node, argv), check=False, **kw)

    def popen(self, node: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command(node, argv), **kw)

    # ---- what it looks like ---------------------------------------------------------------

    def addresses(self, node: str) -> list[str]:
        out = _run(["ip", "-n", self.netns(node), "-j", "addr", "show"], check=False) or "[]"
        addrs: list[str] = []
        for link in json.loads(out):
            if link.get("ifname") == "lo":
                continue
            for info in link.get("addr_info", []):
                if info.get("family") == "inet":
                    addrs.append(f"{info['local']}/{info['prefixlen']}")
        return addrs

    def status(self) -> dict[str, Any]:
        cfg = self.cfg
        nodes = {n: {"netns": cfg.netns(n), "addresses": self.addresses(n)} for n in C.NODES}
        pid = self.router_pid()
        upnp = "upnp" in cfg.portmap
        return {
            "name": cfg.name,
            "nat": cfg.nat,
            "portmap": sorted(cfg.portmap),
            "nodes": nodes,
            "router": {
                "lan_ip": C.RTR_LAN_IP,
                "wan_ip": C.RTR_WAN_IP,
                "lan_subnet": f"{C.LAN_NET}/{C.LAN_PREFIX}",
                "wan_subnet": f"{C.WAN_NET}/{C.WAN_PREFIX}",
                "miniupnpd_pid": pid,
                "miniupnpd_running": pid is not None,
                "upnp_description": f"http://{C.RTR_LAN_IP}:{cfg.upnp_port}/rootDesc.xml"
                if upnp
                else None,
                "natpmp_port": 5351 if ("natpmp" in cfg.portmap or "pcp" in cfg.portmap) else None,
            },
            "lan_ip": C.LAN_IP,
            "wan_ips": list(C.WAN_IPS),
        }
