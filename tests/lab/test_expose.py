"""``natkit expose`` as a user runs it: a subprocess on the LAN host of the lab.

It must print where the service is reachable, keep it reachable across a router reboot,
and leave no rule on the router after SIGTERM or SIGINT.
"""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

import pytest

from natkit.lab import Lab
from natkit.lab import config as C
from tests.lab.helpers import http_get, http_server, wait_for, wait_router_uptime

NATKIT = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "natkit")
PUBLIC_RE = re.compile(r"\d+\.\d+\.\d+\.\d+:\d+")


# ---- helpers -------------------------------------------------------------------------------


def reach(lab: Lab, ip: str, port: int, timeout: float = 2.0) -> str | None:
    try:
        return http_get(lab, "wan", ip, port, timeout=timeout)
    except OSError:
        return None


def has_rule(lab: Lab, port: int) -> bool:
    return re.search(rf"\bdport {port}\b", lab.router_rules()) is not None


class Expose:
    """``natkit expose`` on the lan node, its output read by threads (never blocks a test)."""

    def __init__(self, lab: Lab, args: list[str]) -> None:
        self.proc: subprocess.Popen[str] = lab.popen(  # type: ignore[assignment]
            "lan",
            [NATKIT, "expose", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
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
        for line in stream:
            (self.out if is_stdout else self.err).append(line)
            if is_stdout:
                self.lines.put(line)
        if is_stdout:
            self.lines.put(None)

    def _why(self) -> str:
        return f"rc={self.proc.poll()} stdout={''.join(self.out)!r} stderr={''.join(self.err)!r}"

    def next_line(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout} s: {self._why()}") from None
        assert line is not None, f"natkit expose ended early: {self._why()}"
        return line

    def next_event(self, timeout: float = 10.0) -> dict[str, Any]:
        line = self.next_line(timeout)
        try:
            obj = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}; {self._why()}") from None
        assert isinstance(obj, dict)
        return obj

    def events_until(self, name: str, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["event"] != name:
            left = deadline - time.monotonic()
            assert left > 0, f"no {name!r} event within {timeout} s: {seen}; {self._why()}"
            seen.append(self.next_event(left))
        return seen

    def stop(self, sig: int, timeout: float = 15.0) -> int:
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"natkit expose did not exit on {sig}: {self._why()}") from None
        for t in self._threads:
            t.join(timeout=5)
        return rc

    def rest(self) -> list[str]:
        """Lines not yet consumed with next_line (call after the process ended)."""
        lines: list[str] = []
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return lines
            if line is not None:
                lines.append(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


# ---- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "reboot"),
    [("upnp", "api"), ("natpmp", "api"), ("pcp", "cli")],
)
def test_expose_survives_a_reboot_and_cleans_up_on_sigterm(
    lab: Lab, method: str, reboot: str
) -> None:
    if method != "upnp":
        wait_router_uptime(lab)
    with http_server(lab, "lan", C.LAN_IP, 0, f"exposed via {method}") as port:
        public = f"{C.RTR_WAN_IP}:{port}"
        ex = Expose(
            lab,
            [str(port), "--json", "--via", method, "--check-interval", "0.5", "--lease", "120"],
        )
        try:
            ready = ex.next_event(timeout=15)
            assert ready["event"] == "ready", ready
            assert ready["method"] == method and ready["protocol"] == "tcp"
            assert ready["public_address"] == public
            assert ready["internal_ip"] == C.LAN_IP and ready["internal_port"] == port
            assert ready["publicly_reachable"] is True and ready["lease"] == 120
            assert method in ready["offered"] and ready["probe_ms"] >= 0
            assert reach(lab, C.RTR_WAN_IP, port) == f"exposed via {method}"

            if reboot == "cli":
                r = subprocess.run(
                    [NATKIT, "lab", "reboot", "rtr", "--name", lab.cfg.name],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                assert r.returncode == 0, r.stderr
            else:
                lab.reboot_router()
            seen = ex.events_until("restored", timeout=15)
            names = [e["event"] for e in seen]
            assert "lost" in names, names
            # The lab is dual stack: the IPv6 pinhole kept beside the mapping is lost and
            # restored with it (its own lines).
            allowed = {"lost", "restored", "renewed"}
            assert set(names) <= allowed | {f"pinhole_{e}" for e in allowed}, names
            restored = seen[-1]
            assert restored["public_address"] == public and restored["changed"] is False
            assert restored["previous"] == public
            assert reach(lab, C.RTR_WAN_IP, port) == f"exposed via {method}"

            assert ex.stop(signal.SIGTERM) == 0, ex._why()
            closing = [json.loads(line) for line in ex.rest()]
            assert closing and closing[-1]["event"] == "closed", closing
            assert closing[-1]["removed"] is True and closing[-1]["public_address"] == public
        finally:
            ex.kill()
        assert "Traceback" not in "".join(ex.err), "".join(ex.err)
        assert not has_rule(lab, port), lab.router_rules()
        assert reach(lab, C.RTR_WAN_IP, port, timeout=0.5) is None


def test_expose_auto_cleans_up_on_sigint(lab: Lab) -> None:
    with http_server(lab, "lan", C.LAN_IP, 0, "sigint") as port:
        ex = Expose(lab, [str(port), "--json", "--check-interval", "0.5", "--lease", "120"])
        try:
            ready = ex.next_event(timeout=15)
            assert ready["event"] == "ready" and ready["method"] == "pcp", ready
            assert ready["public_address"] == f"{C.RTR_WAN_IP}:{port}"
            assert reach(lab, C.RTR_WAN_IP, port) == "sigint"
            assert has_rule(lab, port)
            assert ex.stop(signal.SIGINT) == 0, ex._why()
            closing = [json.loads(line) for line in ex.rest()]
            assert [e["event"] for e in closing] == ["closed"], closing
            assert closing[0]["removed"] is True
        finally:
            ex.kill()
        assert not has_rule(lab, port), lab.router_rules()
        assert reach(lab, C.RTR_WAN_IP, port, timeout=0.5) is None


@pytest.mark.parametrize("method", ["upnp", "natpmp"])
def test_expose_human_mode_prints_the_address(lab: Lab, method: str) -> None:
    """Without --json (and without a terminal: a pipe or a log file), the public address
    must show up while expose runs, not only when it exits."""
    with http_server(lab, "lan", C.LAN_IP, 0, "human") as port:
        public = f"{C.RTR_WAN_IP}:{port}"
        ex = Expose(lab, [str(port), "--via", method, "--check-interval", "0.5", "--lease", "120"])
        try:
            wait_for(
                lambda: public in "".join(ex.out), 15, lambda: f"{public} on stdout: {ex._why()}"
            )
            assert ex.proc.poll() is None, "expose exited by itself"
            assert reach(lab, C.RTR_WAN_IP, port) == "human"
            assert ex.stop(signal.SIGINT) == 0, ex._why()
        finally:
            ex.kill()
        text = "".join(ex.out)
        assert PUBLIC_RE.search(text)
        assert "closed" in text, text
        assert "Traceback" not in "".join(ex.err), "".join(ex.err)
        assert not has_rule(lab, port), lab.router_rules()
