"""Build, inspect, reboot and remove a NAT lab made of Linux network namespaces.

Topology (one lab; names are prefixed with the lab's name)::

    lan 192.168.77.10 ─┐
                       ├─ br-lan 192.168.77.1 [rtr] wan0 100.200.0.1 ── 100.200.0.2/.3 [wan]
    dev 192.168.77.20 ─┘     nftables NAT + firewall, miniupnpd                    coturn

With ``upstream_nat`` (double NAT) a carrier NAT sits in front of the router::

    ... [rtr] wan0 100.201.0.2 ── cpe0 100.201.0.1 [isp] wan0 100.200.0.1 ── [wan]

``rtr`` is a real kernel NAT (nftables) running Debian's miniupnpd; ``wan`` stands for the
Internet and runs coturn (STUN/TURN); ``dev`` is a second LAN device (tests use it for
hostile SSDP answers). Nothing is linked to the host's own network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from natkit.errors import LabError, MissingPackageError
from natkit.lab import config as C
from natkit.lab import coturn, netns, topology
from natkit.lab.config import LabConfig
from natkit.lab.procs import in_netns, kill, log_tail, read_pid, spawn
from natkit.lab.procs import run as _run
from natkit.lab.procs import which as _which

STATE_ROOT = Path(os.environ.get("NATKIT_LAB_STATE", "/run/natkit"))
DAEMON_START_TIMEOUT = 10.0

# binary -> Debian package that ships it
REQUIRED = {
    "ip": "iproute2",
    "nft": "nftables",
    "miniupnpd": "miniupnpd-nftables",
    "conntrack": "conntrack",
}
REQUIRED_FOR_COTURN = {"turnserver": "coturn"}


def check_host(cfg: LabConfig | None = None) -> None:
    """Fail with an actionable message unless this is Linux, as root, with the packages
    (coturn's too if ``cfg`` asks for it)."""
    if not sys.platform.startswith("linux"):
        raise LabError(f"the lab needs Linux network namespaces; this is {sys.platform}")
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, nftables): run it with sudo")
    required = dict(REQUIRED)
    if cfg is not None and cfg.coturn:
        required.update(REQUIRED_FOR_COTURN)
    missing = sorted({pkg for binary, pkg in required.items() if _which(binary) is None})
    if missing:
        raise MissingPackageError(missing)


class Lab:
    """A lab by name. ``Lab.create(cfg)`` builds one; ``Lab.open(name)`` finds a running one."""

    def __init__(self, cfg: LabConfig) -> None:
        self.cfg = cfg
        self.state_dir = STATE_ROOT / cfg.name

    # ---- life cycle -------------------------------------------------------------------

    @classmethod
    def create(cls, cfg: LabConfig, *, replace: bool = False) -> Lab:
        check_host(cfg)
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
        return any(netns.exists(self.cfg.netns(n)) for n in C.ALL_NODES)

    def down(self) -> None:
        """Remove every namespace, process and state file of this lab. Idempotent.

        Looks at every node a lab may have (isp too), whatever this config says: a stale
        lab of the same name may have been built with other options.
        """
        self.stop_coturn()
        self.stop_router_daemon()
        for node in C.ALL_NODES:
            ns = self.cfg.netns(node)
            if not netns.exists(ns):
                continue
            # Anything still running inside (daemons, test servers) goes too, by pid.
            for line in _run(["ip", "netns", "pids", ns], check=False).split():
                if line.isdigit():
                    kill(int(line), timeout=1.0)
            _run(["ip", "netns", "delete", ns], check=False)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def _build(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._save_config()
        topology.build(self.cfg)
        self._load_ruleset()
        # coturn comes up while miniupnpd does; it is waited for afterwards.
        starting = self._spawn_coturn()
        self.start_router_daemon()
        if starting is not None:
            self._wait_coturn(starting)

    def _save_config(self) -> None:
        (self.state_dir / "lab.json").write_text(json.dumps(self.cfg.to_json(), indent=2))

    # ---- the router ---------------------------------------------------------------------

    @property
    def _pidfile(self) -> Path:
        return self.state_dir / "miniupnpd.pid"

    @property
    def router_log(self) -> Path:
        return self.state_dir / "miniupnpd.log"

    def _load_ruleset(self) -> None:
        in_netns(self.cfg.netns("rtr"), "nft", "-f", "-", input=C.router_ruleset(self.cfg))

    def router_pid(self) -> int | None:
        return read_pid(self._pidfile)

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
        binary = _which("miniupnpd") or "miniupnpd"
        argv = [binary, "-f", str(conf), "-d", "-P", str(self._pidfile)]
        proc = spawn(self.cfg.netns("rtr"), argv, self.router_log)
        wants = []  # ready when every service it was asked for listens (stderr with -d)
        if "upnp" in self.cfg.portmap:
            wants.append("HTTP listening on port")
        if self.cfg.portmap & {"natpmp", "pcp"}:
            wants.append("Listening for NAT-PMP/PCP traffic")
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(
                    f"miniupnpd exited with {proc.returncode}: {log_tail(self.router_log)}"
                )
            with open(self.router_log, "rb") as f:
                f.seek(offset)
                fresh = f.read().decode(errors="replace")
            if all(w in fresh for w in wants) and self.router_pid():
                return
            time.sleep(0.02)
        raise LabError(
            f"miniupnpd did not become ready in {DAEMON_START_TIMEOUT:g} s: "
            f"{log_tail(self.router_log)}"
        )

    def stop_router_daemon(self) -> None:
        pid = self.router_pid()
        if pid is not None:
            kill(pid)
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
            self._save_config()
        self._load_ruleset()
        in_netns(self.cfg.netns("rtr"), "conntrack", "-F", check=False)
        with open(self.router_log, "a") as log:
            log.write("---- natkit lab reboot ----\n")
        self.start_router_daemon()

    def router_rules(self) -> str:
        """The router's current nftables ruleset (mappings appear in the miniupnpd chains)."""
        return in_netns(self.cfg.netns("rtr"), "nft", "list", "ruleset")

    # ---- coturn (STUN/TURN on the Internet host) -------------------------------------------

    @property
    def _coturn_pidfile(self) -> Path:
        return self.state_dir / "coturn.pid"

    @property
    def coturn_log(self) -> Path:
        return self.state_dir / "coturn.log"

    def coturn_pid(self) -> int | None:
        return read_pid(self._coturn_pidfile)

    def start_coturn(self) -> None:
        """Start coturn on wan (if the config wants it) and wait until every listener answers.

        With :meth:`stop_coturn`, tests can take the STUN/TURN server away and bring it back.
        """
        proc = self._spawn_coturn()
        if proc is not None:
            self._wait_coturn(proc)

    def _spawn_coturn(self) -> subprocess.Popen[bytes] | None:
        if not self.cfg.coturn:
            return None
        self._coturn_pidfile.unlink(missing_ok=True)
        argv = coturn.turnserver_argv(_which("turnserver") or "turnserver", self.state_dir)
        return spawn(self.cfg.netns("wan"), argv, self.coturn_log)

    def _wait_coturn(self, proc: subprocess.Popen[bytes]) -> None:
        """Ready when a STUN binding request is answered on every address and port, asked
        from wan itself (coturn writes its pid file before its listeners are up)."""
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        missing = set(coturn.LISTENERS)

        def probe() -> bool:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    return False
                missing.difference_update(coturn.answering(tuple(missing), timeout=0.05))
                if not missing:
                    return True
            return False

        if netns.call_in(self.cfg.netns("wan"), probe):
            return
        if proc.poll() is not None:
            why = f"coturn exited with {proc.returncode}"
        else:
            not_yet = ", ".join(f"{ip}:{port}" for ip, port in sorted(missing))
            why = f"coturn did not answer STUN on {not_yet} in {DAEMON_START_TIMEOUT:g} s"
        raise LabError(f"{why}: {log_tail(self.coturn_log)}")

    def stop_coturn(self) -> None:
        pid = self.coturn_pid()
        if pid is not None:
            kill(pid)
        self._coturn_pidfile.unlink(missing_ok=True)

    # ---- running things on nodes --------------------------------------------------------

    def netns(self, node: str) -> str:
        if node not in self.cfg.nodes:
            hint = " (only a lab built with --upstream-nat has isp)" if node in C.ALL_NODES else ""
            raise LabError(
                f"unknown node {node!r}: lab {self.cfg.name!r} has {', '.join(self.cfg.nodes)}"
                + hint
            )
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
        nodes = {n: {"netns": cfg.netns(n), "addresses": self.addresses(n)} for n in cfg.nodes}
        pid = self.router_pid()
        upnp = "upnp" in cfg.portmap
        wan_subnet = (
            f"{C.ISP_NET}/{C.ISP_PREFIX}" if cfg.upstream_nat else f"{C.WAN_NET}/{C.WAN_PREFIX}"
        )
        return {
            "name": cfg.name,
            "nat": cfg.nat,
            "portmap": sorted(cfg.portmap),
            "upstream_nat": cfg.upstream_nat,
            "public_ip": C.RTR_WAN_IP,
            "nodes": nodes,
            "router": {
                "lan_ip": C.RTR_LAN_IP,
                "wan_ip": cfg.rtr_wan_ip,
                "gateway": cfg.rtr_gateway,
                "lan_subnet": f"{C.LAN_NET}/{C.LAN_PREFIX}",
                "wan_subnet": wan_subnet,
                "miniupnpd_pid": pid,
                "miniupnpd_running": pid is not None,
                "upnp_description": f"http://{C.RTR_LAN_IP}:{cfg.upnp_port}/rootDesc.xml"
                if upnp
                else None,
                "natpmp_port": 5351 if ("natpmp" in cfg.portmap or "pcp" in cfg.portmap) else None,
            },
            "isp": {"cpe_ip": C.ISP_CPE_IP, "wan_ip": C.RTR_WAN_IP, "nat": "masquerade"}
            if cfg.upstream_nat
            else None,
            "coturn": self._coturn_status(),
            "lan_ip": C.LAN_IP,
            "wan_ips": list(C.WAN_IPS),
        }

    def _coturn_status(self) -> dict[str, Any]:
        if not self.cfg.coturn:
            return {"enabled": False, "running": False, "pid": None}
        pid = self.coturn_pid()
        low, high = C.TURN_RELAY_PORTS
        return {
            "enabled": True,
            "running": pid is not None,
            "pid": pid,
            "listeners": [f"{ip}:{port}" for ip, port in coturn.LISTENERS],
            "stun_primary": "{}:{}".format(*C.STUN_PRIMARY),
            "stun_alternate": "{}:{}".format(*C.STUN_ALTERNATE),
            "turn": {
                "server": "{}:{}".format(*C.STUN_PRIMARY),
                "transports": ["udp", "tcp"],
                "user": C.TURN_USER,
                "password": C.TURN_PASSWORD,
                "realm": C.TURN_REALM,
                "relay_ip": C.TURN_RELAY_IP,
                "relay_ports": [low, high],
            },
        }
