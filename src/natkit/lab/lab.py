"""Build, inspect, reboot and remove a NAT lab made of Linux network namespaces.

Topology (one lab; names are prefixed with the lab's name)::

    lan 192.168.77.10 ─┐
                       ├─ br-lan 192.168.77.1 [rtr] wan0 100.200.0.1 ── 100.200.0.2/.3 [wan]
    dev 192.168.77.20 ─┘     nftables NAT + firewall, miniupnpd                    coturn

With ``upstream_nat`` (double NAT) a carrier NAT sits in front of the router::

    ... [rtr] wan0 100.201.0.2 ── cpe0 100.201.0.1 [isp] wan0 100.200.0.1 ── [wan]

With ``second_lan`` a peer host sits behind a second router on the same Internet segment
(wan's eth0 becomes a bridge), so traffic between lan and lan2 crosses both NATs::

    [rtr or isp] wan0 100.200.0.1 ──┐
                                    ├── eth0 (bridge) 100.200.0.2/.3 [wan]
    [rtr2] wan0 100.200.0.4 ────────┘
      br-lan 192.168.78.1 ── lan2 192.168.78.10

The first LAN is dual stack (not with ``upstream_nat``): 2001:db8:77::/64, routed without NAT
to 2001:db8:201::/64 where rtr's wan0 is ::1 and wan ::2/::3; rtr drops unsolicited inbound
IPv6, so a LAN host is reached only through a pinhole (UPnP IGD2 or PCP, from miniupnpd).

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
from natkit.lab.config import LabConfig, RouterNode
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


def _next_upnp_port(port: int) -> int:
    """Where a "moved" IGD's SOAP port goes: the next one, wrapping within 100 ports."""
    return port + 1 if port < C.UPNP_HTTP_PORT + 99 else C.UPNP_HTTP_PORT


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
        return any(netns.exists(self.cfg.netns(n)) for n in C.EVERY_NODE)

    def down(self) -> None:
        """Remove every namespace, process and state file of this lab. Idempotent.

        Looks at every node and router a lab may have (isp, rtr2 too), whatever this config
        says: a stale lab of the same name may have been built with other options.
        """
        self.stop_coturn()
        for router in C.ROUTERS:
            self._stop_daemon(router)
        for node in C.EVERY_NODE:
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
        for router in self.cfg.routers:
            self._load_ruleset(router)
        # coturn comes up while miniupnpd does; it is waited for afterwards.
        starting = self._spawn_coturn()
        for router in self.cfg.routers:
            self.start_router_daemon(router)
        if starting is not None:
            self._wait_coturn(starting)

    def _save_config(self) -> None:
        (self.state_dir / "lab.json").write_text(json.dumps(self.cfg.to_json(), indent=2))

    # ---- the routers (rtr, and rtr2 with a second LAN) ---------------------------------------

    def _router(self, router: RouterNode) -> C.Router:
        try:
            return self.cfg.router(router)
        except ValueError as exc:
            raise LabError(str(exc)) from None

    def _daemon_file(self, router: RouterNode, suffix: str) -> Path:
        # rtr keeps the names it had before there was a second router.
        stem = "miniupnpd" if router == "rtr" else f"miniupnpd-{router}"
        return self.state_dir / f"{stem}.{suffix}"

    @property
    def router_log(self) -> Path:
        """rtr's miniupnpd log (see :meth:`miniupnpd_log` for rtr2's)."""
        return self.miniupnpd_log("rtr")

    def miniupnpd_log(self, router: RouterNode = "rtr") -> Path:
        return self._daemon_file(router, "log")

    def _load_ruleset(self, router: RouterNode = "rtr") -> None:
        ruleset = C.router_ruleset(self.cfg, self._router(router).node)
        in_netns(self.cfg.netns(router), "nft", "-f", "-", input=ruleset)

    def router_pid(self, router: RouterNode = "rtr") -> int | None:
        return read_pid(self._daemon_file(router, "pid"))

    def router_uptime(self, router: RouterNode = "rtr") -> float:
        """Seconds since the router daemon (re)started; 0 if it is not running.

        NAT-PMP/PCP clients notice a reboot from the epoch, with 2 s of slack (RFC 6886 3.6,
        RFC 6887 8.5): a router rebooted within 2 s of its last start looks unchanged.
        """
        pid = self.router_pid(router)
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

    def start_router_daemon(self, router: RouterNode = "rtr") -> None:
        """Start ``router``'s miniupnpd (its own conf, pid file and log) and wait until every
        service it was asked for listens."""
        spec = self._router(router)
        if not spec.portmap:
            return  # --portmap none: a router that offers no port mapping at all
        conf, pidfile, log = (self._daemon_file(router, x) for x in ("conf", "pid", "log"))
        conf.write_text(C.miniupnpd_conf(self.cfg, router))
        pidfile.unlink(missing_ok=True)
        # The log is appended to across reboots: look for readiness only in what follows.
        offset = log.stat().st_size if log.exists() else 0
        binary = _which("miniupnpd") or "miniupnpd"
        argv = [binary, "-f", str(conf), "-d", "-P", str(pidfile)]
        proc = spawn(self.cfg.netns(router), argv, log)
        wants = []  # ready when every service it was asked for listens (stderr with -d)
        if "upnp" in spec.portmap:
            wants.append("HTTP listening on port")
        if spec.portmap & {"natpmp", "pcp"}:
            wants.append("Listening for NAT-PMP/PCP traffic")
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(
                    f"{router}'s miniupnpd exited with {proc.returncode}: {log_tail(log)}"
                )
            with open(log, "rb") as f:
                f.seek(offset)
                fresh = f.read().decode(errors="replace")
            if all(w in fresh for w in wants) and self.router_pid(router):
                return
            time.sleep(0.02)
        raise LabError(
            f"{router}'s miniupnpd did not become ready in {DAEMON_START_TIMEOUT:g} s: "
            f"{log_tail(log)}"
        )

    def stop_router_daemon(self, router: RouterNode = "rtr") -> None:
        self._stop_daemon(self._router(router).node)

    def _stop_daemon(self, router: RouterNode) -> None:
        """Stop by pid file, whatever the config says (down() cleans up stale labs too)."""
        pid = self.router_pid(router)
        if pid is not None:
            kill(pid)
        self._daemon_file(router, "pid").unlink(missing_ok=True)

    def reboot_router(self, *, move_upnp_port: bool = False, router: RouterNode = "rtr") -> None:
        """As a real router reboot: the daemon restarts and every mapping and NAT state is lost.

        ``move_upnp_port`` also moves the IGD's HTTP (SOAP) port, as some routers do. The
        other router (if any) does not notice.
        """
        spec = self._router(router)
        self.stop_router_daemon(router)
        if move_upnp_port:
            port = _next_upnp_port(spec.upnp_port)
            if router == "rtr":
                self.cfg = dataclasses.replace(self.cfg, upnp_port=port)
            else:
                self.cfg = dataclasses.replace(self.cfg, upnp_port2=port)
            self._save_config()
        self._load_ruleset(router)
        self.flush_nat(router, check=False)
        with open(self.miniupnpd_log(router), "a") as log:
            log.write("---- natkit lab reboot ----\n")
        self.start_router_daemon(router)

    def flush_nat(
        self, router: RouterNode = "rtr", *, protocol: str | None = None, check: bool = True
    ) -> None:
        """Forget the NAT mappings and connection state of ``router`` (``conntrack -F``; only
        one protocol's with ``protocol``, e.g. "udp"), as when a path dies: established flows
        lose their public port, replies from outside are dropped as unsolicited until the LAN
        side sends again (and gets a mapping anew). Port mappings (rules, not state) stay."""
        netns = self.cfg.netns(self._router(router).node)
        if protocol is None:
            in_netns(netns, "conntrack", "-F", check=check)
        else:
            # conntrack -D exits 1 when nothing matched: not an error here.
            in_netns(netns, "conntrack", "-D", "-p", protocol, check=False)

    def router_rules(self, router: RouterNode = "rtr") -> str:
        """A router's current nftables ruleset (mappings appear in the miniupnpd chains)."""
        return in_netns(self.cfg.netns(self._router(router).node), "nft", "list", "ruleset")

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
            hint = ""
            if node == C.UPSTREAM_NODE:
                hint = " (only a lab built with --upstream-nat has isp)"
            elif node in C.SECOND_LAN_NODES:
                hint = " (only a lab built with --second-lan has lan2 and rtr2)"
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
        return {
            "name": cfg.name,
            "nat": cfg.nat,
            "portmap": sorted(cfg.portmap),
            "upstream_nat": cfg.upstream_nat,
            "public_ip": C.RTR_WAN_IP,
            "nodes": nodes,
            "router": self._router_status("rtr"),
            "second_lan": cfg.second_lan,
            "router2": self._router_status("rtr2") if cfg.second_lan else None,
            "isp": {"cpe_ip": C.ISP_CPE_IP, "wan_ip": C.RTR_WAN_IP, "nat": "masquerade"}
            if cfg.upstream_nat
            else None,
            "coturn": self._coturn_status(),
            "lan_ip": C.LAN_IP,
            "lan2_ip": C.LAN2_IP if cfg.second_lan else None,
            "wan_ips": list(C.WAN_IPS),
            "ipv6": {
                "lan_ip": C.LAN_IP6,
                "lan_prefix": f"{C.LAN6_NET}/{C.LAN6_PREFIX}",
                "router_lan_ip": C.RTR_LAN_IP6,
                "router_wan_ip": C.RTR_WAN_IP6,
                "wan_ips": list(C.WAN_IPS6),
            }
            if cfg.ipv6
            else None,
        }

    def _router_status(self, router: RouterNode) -> dict[str, Any]:
        spec = self._router(router)
        pid = self.router_pid(router)
        wan_subnet = f"{C.WAN_NET}/{C.WAN_PREFIX}"
        if router == "rtr" and self.cfg.upstream_nat:
            wan_subnet = f"{C.ISP_NET}/{C.ISP_PREFIX}"
        pmp = bool(spec.portmap & {"natpmp", "pcp"})
        return {
            "node": router,
            "netns": self.cfg.netns(router),
            "nat": spec.nat,
            "portmap": sorted(spec.portmap),
            "lan_ip": spec.lan_ip,
            "wan_ip": spec.wan_ip,
            "gateway": spec.gateway,
            "lan_subnet": spec.lan_subnet,
            "wan_subnet": wan_subnet,
            "lan_host": {"node": spec.host, "ip": spec.host_ip},
            "miniupnpd_pid": pid,
            "miniupnpd_running": pid is not None,
            "upnp_description": f"http://{spec.lan_ip}:{spec.upnp_port}/rootDesc.xml"
            if "upnp" in spec.portmap
            else None,
            "natpmp_port": C.NATPMP_PORT if pmp else None,
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
