"""The inspector's page in a real headless browser (Debian's chromium and chromium-driver,
driven by Selenium), against real processes on loopback: ``natkit relay serve`` with an
HTTP port, ``natkit expose --http`` with its inspector, and an HTTP service. A visitor's
request through the tunnel appears on the page by itself (server-sent events), the page's
Replay sends it to the service again, and Replay with changes sends the changed one.
Chromium is held to loopback (every other host name resolves to nothing)."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest

TOKEN = "inspect-browser-token-0123456789"
HOST = "shop.lab.test"
DENIED = "127.0.0.2"  # a visitor the tunnel's access policy keeps out (--deny)
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
T = TypeVar("T")


def _need_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip, the dev extra)")
    if missing:
        why = (
            f"no headless browser: {', '.join(missing)} (apt-get install chromium chromium-driver)"
        )
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)


class Recorder(http.server.BaseHTTPRequestHandler):
    """The service: answers JSON and keeps (method, path, body) of every request."""

    protocol_version = "HTTP/1.1"
    got: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        Recorder.got.append((self.command, self.path, body))
        out = json.dumps({"path": self.path, "n": len(Recorder.got)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


class Proc:
    def __init__(self, *args: str, state: Path) -> None:
        env = {**os.environ, "NATKIT_STATE_DIR": str(state)}
        self.p = subprocess.Popen([sys.executable, "-m", "natkit.cli.main", *args], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def event(self, name: str, timeout: float = 20) -> dict[str, Any]:
        assert self.p.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.p.stdout.readline()
            if not line:
                break
            obj: dict[str, Any] = json.loads(line)
            if obj["event"] == name:
                return obj
        raise AssertionError(
            f"no {name} event; stderr: {self.p.stderr.read() if self.p.stderr else ''}"
        )

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def until(check: Callable[[], T], what: str, timeout: float = 15) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def visit(port: int, method: str, path: str, body: bytes = b"", source: str = "") -> bytes:
    address = (source, 0) if source else None
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=address) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n"
                  f"Connection: close\r\n\r\n".encode() + body)  # fmt: skip
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.fixture
def tunnel(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """(the relay's HTTP port, the inspector's URL) with the service behind the tunnel."""
    Recorder.got = []
    service = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=service.serve_forever, daemon=True).start()
    relay = Proc("relay", "serve", "--listen", "127.0.0.1:0", "--token", TOKEN, "--http-port", "0",
                 "--domain", "lab.test", "--ports", "41430-41439", "--no-stun", "--json",
                 state=tmp_path / "relay")  # fmt: skip
    agent: Proc | None = None
    try:
        ready = relay.event("ready")
        agent = Proc("expose", str(service.server_address[1]), "--via", "relay", "--relay",
                     ready["listen"], "--token", TOKEN, "--http", "--hostname", "shop",
                     "--inspect", "127.0.0.1:0", "--deny", DENIED, "--json",
                     state=tmp_path / "agent")  # fmt: skip
        up = agent.event("ready")
        inspector = agent.event("inspector")  # right after ready
        assert up["public_address"] == f"http://{HOST}:{ready['http_port']}", up
        yield int(ready["http_port"]), str(inspector["url"])
    finally:
        if agent is not None:
            agent.stop()
        relay.stop()
        service.shutdown()


@pytest.fixture
def browser() -> Iterator[Any]:
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,900", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-default-apps",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):  # fmt: skip
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def test_a_request_appears_live_and_is_replayed_from_the_page(
    tunnel: tuple[int, str], browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    http_port, url = tunnel
    browser.get(url)
    rows = lambda: browser.find_elements(By.CSS_SELECTOR, "#requests tbody tr")  # noqa: E731
    until(lambda: browser.find_element(By.ID, "live").text == "live", "the event stream")
    assert rows() == [] and browser.find_element(By.ID, "empty").is_displayed()

    # A visitor's request through the tunnel appears without a reload.
    answer = visit(http_port, "POST", "/orders?x=1", b'{"item": "tea", "qty": 2}')
    assert answer.startswith(b"HTTP/1.1 200") and len(Recorder.got) == 1
    row = until(lambda: [r for r in rows() if "/orders?x=1" in r.text and "200" in r.text],
                "the request on the page")[0]  # fmt: skip
    assert "POST" in row.text and "127.0.0.1" in row.text
    row.click()
    detail = browser.find_element(By.ID, "detail")
    until(detail.is_displayed, "the detail")
    bodies = [pre.text for pre in browser.find_elements(By.CSS_SELECTOR, "#req pre.body")]
    assert bodies == ['{\n  "item": "tea",\n  "qty": 2\n}'], bodies  # JSON pretty-printed
    browser.find_element(By.CSS_SELECTOR, "#req button[data-view=raw]").click()
    raw = browser.find_element(By.CSS_SELECTOR, "#req pre.body").text
    assert raw.startswith("POST /orders?x=1 HTTP/1.1\\r\\n\nHost: shop.lab.test\\r\\n"), raw
    browser.find_element(By.CSS_SELECTOR, "#req button[data-view=hex]").click()
    hexdump = browser.find_element(By.CSS_SELECTOR, "#req pre.body").text
    assert hexdump.startswith("00000000  50 4f 53 54 20 2f 6f 72"), hexdump  # "POST /or"

    # Replay: the service gets the same request again; the replay is listed too.
    browser.find_element(By.ID, "replay").click()
    until(lambda: len(Recorder.got) == 2, "the replay at the service")
    assert Recorder.got[1] == Recorder.got[0]
    until(lambda: len(rows()) == 2 and "replay" in rows()[0].text, "the replay on the page")
    until(
        lambda: "replayed: 200 OK" in browser.find_element(By.ID, "replay-result").text,
        "the result",
    )

    # Replay with changes: path and body edited in the page's form.
    browser.find_element(By.ID, "replay-edit").click()
    path = browser.find_element(By.ID, "edit-path")
    path.clear()
    path.send_keys("/orders/changed")
    body = browser.find_element(By.ID, "edit-body")
    body.clear()
    body.send_keys('{"item": "coffee"}')
    browser.find_element(By.ID, "edit-send").click()
    until(lambda: len(Recorder.got) == 3, "the changed replay at the service")
    assert Recorder.got[2] == ("POST", "/orders/changed", b'{"item": "coffee"}')
    until(
        lambda: len(rows()) == 3 and "/orders/changed" in rows()[0].text,
        "the changed replay listed",
    )
    # A visitor the relay keeps out (--deny) is shown among the refused, live.
    assert not browser.find_element(By.ID, "refused-box").is_displayed()
    kept_out = visit(http_port, "GET", "/secret", source=DENIED)
    assert kept_out.startswith(b"HTTP/1.1 403"), kept_out
    assert len(Recorder.got) == 3  # the service never saw it
    box = until(lambda: browser.find_element(By.ID, "refused-box"), "the refused visitors")
    until(box.is_displayed, "the refused box shown")
    box.find_element(By.TAG_NAME, "summary").click()
    refusal = until(lambda: [r for r in browser.find_elements(By.CSS_SELECTOR, "#refused tbody tr")
                             if DENIED in r.text], "the refused visitor's row")[0]  # fmt: skip
    assert "denied" in refusal.text, refusal.text
    assert browser.find_element(By.ID, "refused-count").text == "1"
    browser.save_screenshot(str(tmp_path / "inspector.png"))
    if shot := os.environ.get("NATKIT_INSPECTOR_SCREENSHOT"):
        shutil.copy(tmp_path / "inspector.png", shot)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors
