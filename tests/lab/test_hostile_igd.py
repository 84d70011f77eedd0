"""A hostile LAN device answering M-SEARCH: every attack is refused in bounded time, and the
real IGD (miniupnpd on the lab router) is still found when both answer.

The hostile device is the test suite's own, on the lab's ``dev`` host: an SSDP responder
joined to the multicast group, and a TCP server that serves the chosen payload at the
LOCATION it advertises. natkit runs on ``lan``. Two canaries record any connection that
must never happen: one on ``dev`` (targets of external XML entities) and one on ``wan``
(off-subnet LOCATIONs, control URLs and redirects).
"""

from __future__ import annotations

import contextlib
import dataclasses
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from natkit.errors import DiscoveryError
from natkit.lab import Lab, LabConfig, netns
from natkit.lab import config as C
from natkit.portmap.description import MAX_DESCRIPTION_BYTES
from natkit.portmap.discovery import discover_igd
from natkit.portmap.ssdp import SSDP_GROUP, SSDP_PORT
from tests.conftest import LAB_PREFIX, _build, run_in_node

FETCH = 1.0  # discover_igd's default fetch_timeout: the cap on one hostile connection
ALONE_TIMEOUT = 2.0
BOTH_TIMEOUT = 3.0
ROUTER_LOCATION = f"http://{C.RTR_LAN_IP}:{C.UPNP_HTTP_PORT}/rootDesc.xml"
IGD1 = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
BIG = 50 * 1024 * 1024
HOLD_LIMIT = 10.0  # a hostile connection the client never closes ends here (and fails)
# "closed before request": the client gave up (its probe was cancelled) right after connecting.
CLOSED_BY_CLIENT = ("eof", "reset", "broken pipe", "closed before request")


# ---- the hostile TCP server's side of one connection ------------------------------------


class _End(Exception):
    """The connection is over (the client closed it, or the test is stopping)."""


@dataclasses.dataclass
class Conn:
    """What the hostile server saw on one connection."""

    accepted: float
    path: str = ""
    sent: int = 0
    how: str = ""  # served | eof | reset | broken pipe | no request | limit | stopped
    ended: float | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def lifetime(self) -> float:
        assert self.ended is not None
        return self.ended - self.accepted


class Peer:
    """Send to the client and notice at once when it closes (or resets) the connection."""

    def __init__(self, sock: socket.socket, rec: Conn, stop: threading.Event) -> None:
        self.sock, self.rec, self.stop = sock, rec, stop

    def _over(self, how: str) -> None:
        self.rec.how = how
        raise _End(how)

    def _check_limits(self) -> None:
        if self.stop.is_set():
            self._over("stopped")
        if time.monotonic() - self.rec.accepted > HOLD_LIMIT:
            self._over("limit")

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._check_limits()
            try:
                n = self.sock.send(view)
            except TimeoutError:  # the client is not reading: has it gone?
                self.wait(0)
                continue
            except BrokenPipeError:
                self._over("broken pipe")
            except ConnectionResetError:
                self._over("reset")
            self.rec.sent += n
            view = view[n:]

    def wait(self, seconds: float) -> None:
        """Pause up to ``seconds``; raise :class:`_End` as soon as the client closes."""
        self._check_limits()
        readable, _, _ = select.select([self.sock], [], [], seconds)
        if readable:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                self._over("reset")
            if not data:
                self._over("eof")

    def hold(self) -> None:
        """Keep the connection open until the client closes it."""
        while True:
            self.wait(0.5)


Payload = Callable[[Peer, "HostileDevice"], None]


# ---- payloads -----------------------------------------------------------------------------


def description(control_url: str = "/ctl", *, friendly: str = "hostile", prolog: str = "") -> bytes:
    """A complete IGD description (WANIPConnection:1); ``prolog`` goes before <root>."""
    return f"""<?xml version="1.0"?>
{prolog}<root xmlns="urn:schemas-upnp-org:device-1-0">
<specVersion><major>1</major><minor>0</minor></specVersion>
<device><deviceType>{IGD1}</deviceType><friendlyName>{friendly}</friendlyName>
<UDN>uuid:6666-6666</UDN><deviceList><device>
<deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType><deviceList><device>
<deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
<serviceList><service><serviceType>{WANIP1}</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId><controlURL>{control_url}</controlURL>
<eventSubURL>/evt</eventSubURL><SCPDURL>/scpd.xml</SCPDURL></service></serviceList>
</device></deviceList></device></deviceList></device></root>
""".encode()


def _ok(peer: Peer, body: bytes) -> None:
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    peer.send(head.encode() + body)


def xxe_file(peer: Peer, dev: HostileDevice) -> None:
    prolog = '<!DOCTYPE root [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
    _ok(peer, description(friendly="&xxe;", prolog=prolog))


def xxe_http(peer: Peer, dev: HostileDevice) -> None:
    # External general and parameter entities that would fetch from the canary on dev.
    canary = f"http://{C.DEV_IP}:{dev.dev_canary.port}"
    prolog = (
        f'<!DOCTYPE root [<!ENTITY % ext SYSTEM "{canary}/evil.dtd"> %ext;'
        f'<!ENTITY xxe SYSTEM "{canary}/secret">]>\n'
    )
    _ok(peer, description(friendly="&xxe;", prolog=prolog))


def billion_laughs(peer: Peer, dev: HostileDevice) -> None:
    entities = ['<!ENTITY lol0 "lol">'] + [
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)
    ]
    prolog = f"<!DOCTYPE root [{''.join(entities)}]>\n"
    _ok(peer, description(friendly="&lol9;", prolog=prolog))


def _endless(peer: Peer, head: bytes, chunked: bool = False) -> None:
    peer.send(head)
    block = b"<!-- " + b"x" * 65000 + b" -->"
    frame = b"%x\r\n%s\r\n" % (len(block), block) if chunked else block
    while peer.rec.sent < BIG:
        peer.send(frame)
    peer.hold()  # all 50 MB went out: the client read it all (the check will fail)


def big_announced(peer: Peer, dev: HostileDevice) -> None:
    _endless(peer, b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n" % BIG)


def big_unannounced(peer: Peer, dev: HostileDevice) -> None:
    _endless(peer, b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nConnection: close\r\n\r\n")


def big_chunked(peer: Peer, dev: HostileDevice) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nTransfer-Encoding: chunked\r\n\r\n"
    _endless(peer, head, chunked=True)


def header_flood(peer: Peer, dev: HostileDevice) -> None:
    peer.send(b"HTTP/1.1 200 OK\r\n")
    line = b"X-Padding: " + b"a" * 1000 + b"\r\n"
    while peer.rec.sent < BIG:
        peer.send(line * 64)
    peer.hold()


def _drip(peer: Peer, data: bytes) -> None:
    for i in range(len(data)):
        peer.send(data[i : i + 1])
        peer.wait(1.0)
    peer.hold()


def drip_headers(peer: Peer, dev: HostileDevice) -> None:
    body = description()
    _drip(peer, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def drip_body(peer: Peer, dev: HostileDevice) -> None:
    body = description()
    peer.send(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    _drip(peer, body)


def truncated_xml(peer: Peer, dev: HostileDevice) -> None:
    body = description()
    _ok(peer, body[: len(body) // 2])


def mismatched_xml(peer: Peer, dev: HostileDevice) -> None:
    _ok(peer, description().replace(b"</friendlyName>", b"</friendlyname>"))


def control_off_subnet(peer: Peer, dev: HostileDevice) -> None:
    _ok(peer, description(control_url=f"{dev.wan_canary.url}/ctl"))


def urlbase_off_subnet(peer: Peer, dev: HostileDevice) -> None:
    # A relative controlURL resolved against an off-subnet URLBase.
    body = description(control_url="ctl").replace(
        b"<specVersion>", f"<URLBase>{dev.wan_canary.url}/</URLBase><specVersion>".encode()
    )
    _ok(peer, body)


def redirect_off_subnet(peer: Peer, dev: HostileDevice) -> None:
    peer.send(
        f"HTTP/1.1 302 Found\r\nLocation: {dev.wan_canary.url}/rootDesc.xml\r\n"
        "Content-Length: 0\r\n\r\n".encode()
    )


def soap_drip(peer: Peer, dev: HostileDevice) -> None:
    """A fine description whose (on-LAN) control URL drips its SOAP answers."""
    if peer.rec.path.startswith("/ctl"):
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: 400\r\n\r\n")
        _drip(peer, b"<" * 400)
    else:
        _ok(peer, description())


def nothing(peer: Peer, dev: HostileDevice) -> None:
    raise AssertionError("the client must not fetch anything from this device")


GARBAGE = (
    bytes(range(256)) * 2,
    b"HTTP/1.1 404 Not Found\r\nLOCATION: http://192.168.77.20:1/\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nST: upnp:rootdevice\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nLOCATION: file:///etc/passwd\r\nST: " + IGD1.encode() + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 9000 + b"\r\n\r\n",
    b"",
)


# ---- the variants -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    reason: str  # what DiscoveryError must say when only the hostile device answers
    serve: Payload = nothing
    # The LOCATIONs advertised (given the device); None: the device's own /desc.xml.
    locations: Callable[[HostileDevice], list[str]] | None = None
    flood: int = 0  # garbage datagrams sent to the client before each answer
    answer: bool = True  # send an SSDP answer at all
    endless: bool = False  # the payload never ends: only the client can close it
    big: bool = False  # the payload is 50 MB: the client must stop reading long before

    @property
    def fetched(self) -> bool:
        return self.serve is not nothing


VARIANTS = [
    Variant("xxe-file", "contains a DTD; refused", xxe_file),
    Variant("xxe-http", "contains a DTD; refused", xxe_http),
    Variant("billion-laughs", "contains a DTD; refused", billion_laughs),
    Variant("50mb-content-length", f"body of {BIG} bytes exceeds {MAX_DESCRIPTION_BYTES}",
            big_announced, endless=True, big=True),
    Variant("50mb-unannounced", f"body exceeds {MAX_DESCRIPTION_BYTES} bytes; refused",
            big_unannounced, endless=True, big=True),
    Variant("50mb-chunked", f"body exceeds {MAX_DESCRIPTION_BYTES} bytes; refused",
            big_chunked, endless=True, big=True),
    Variant("endless-headers", "malformed HTTP response", header_flood, endless=True, big=True),
    Variant("drip-headers", f"no complete answer within {FETCH:g} s", drip_headers, endless=True),
    Variant("drip-body", f"no complete answer within {FETCH:g} s", drip_body, endless=True),
    Variant("location-off-subnet", "which is not on the LAN 192.168.77.0/24",
            locations=lambda dev: [f"{dev.wan_canary.url}/rootDesc.xml"]),
    Variant("truncated-xml", "is not valid XML", truncated_xml),
    Variant("mismatched-xml", "is not valid XML", mismatched_xml),
    Variant("control-url-off-subnet", "no WANIPConnection/WANPPPConnection service on the LAN",
            control_off_subnet),
    Variant("urlbase-off-subnet", "no WANIPConnection/WANPPPConnection service on the LAN",
            urlbase_off_subnet),
    Variant("redirect-off-subnet", "redirect (HTTP 302) refused", redirect_off_subnet),
    Variant("soap-drip", f"no WAN service answered: POST http://{C.DEV_IP}:", soap_drip,
            endless=True),
    Variant("garbage-flood", "not an SSDP response or NOTIFY", flood=100, answer=False),
    Variant("location-flood", "is not valid XML", truncated_xml,
            locations=lambda dev: [f"{dev.url}/desc-{i}.xml" for i in range(40)]),
    Variant("off-subnet-location-flood", "which is not on the LAN 192.168.77.0/24",
            locations=lambda dev: [f"{dev.wan_canary.url}/desc-{i}.xml" for i in range(40)]),
]  # fmt: skip


# ---- the device ---------------------------------------------------------------------------


class Listener:
    """A TCP server on a lab node; each connection is handled in its own thread."""

    port: int
    url: str

    def __init__(self, lab: Lab, node: str, ip: str, handle: Callable[[socket.socket], None]):
        self.ip, self.handle = ip, handle
        self.sock = netns.call_in(
            lab.netns(node), lambda: socket.create_server((ip, 0), backlog=64)
        )
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{ip}:{self.port}"
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.accepted = 0
        self.sock.settimeout(0.05)
        self._spawn(self._accept_loop)

    def _spawn(self, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, daemon=True)
        self.threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            self._spawn(lambda conn=conn: self._run(conn))  # type: ignore[misc]

    def _run(self, conn: socket.socket) -> None:
        with conn:
            self.handle(conn)

    def pending(self) -> bool:
        """A connection the kernel has completed that we have not accepted yet."""
        return bool(select.select([self.sock], [], [], 0)[0])

    def close(self) -> None:
        self.stop.set()
        for t in list(self.threads):
            t.join(timeout=5)
        self.sock.close()


class HostileDevice:
    url: str
    location: str
    dev_canary: Listener
    wan_canary: Listener

    def __init__(self, lab: Lab, variant: Variant) -> None:
        self.variant = variant
        self.stop = threading.Event()
        self.conns: list[Conn] = []
        self.searches = 0  # M-SEARCHes heard
        self.answers = 0  # SSDP answers sent
        self.server = Listener(lab, "dev", C.DEV_IP, self._serve)
        self.url = self.server.url
        self.location = f"{self.url}/desc.xml"
        self.dev_canary = Listener(lab, "dev", C.DEV_IP, lambda conn: None)
        self.wan_canary = Listener(lab, "wan", C.WAN_IPS[0], lambda conn: None)
        self.udp = netns.call_in(lab.netns("dev"), self._ssdp_socket)
        self.udp.settimeout(0.05)
        self.ssdp_thread = threading.Thread(target=self._ssdp_loop, daemon=True)
        self.ssdp_thread.start()

    @staticmethod
    def _ssdp_socket() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", SSDP_PORT))
        membership = socket.inet_aton(SSDP_GROUP) + socket.inet_aton(C.DEV_IP)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        return sock

    def _ssdp_loop(self) -> None:
        v = self.variant
        locations = v.locations(self) if v.locations else [self.location]
        while not self.stop.is_set():
            try:
                data, addr = self.udp.recvfrom(8192)
            except (TimeoutError, OSError):
                continue
            if not data.startswith(b"M-SEARCH"):
                continue  # e.g. miniupnpd's NOTIFYs
            self.searches += 1
            with contextlib.suppress(OSError):
                for i in range(v.flood):
                    self.udp.sendto(GARBAGE[i % len(GARBAGE)], addr)
                for location in locations if v.answer else []:
                    self.udp.sendto(
                        (
                            "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
                            f"ST: {IGD1}\r\nUSN: uuid:6666-6666::{IGD1}\r\nEXT:\r\n"
                            "SERVER: Hostile/1.0 UPnP/1.1 Evil/6.6\r\n"
                            f"LOCATION: {location}\r\n\r\n"
                        ).encode(),
                        addr,
                    )
                    self.answers += 1

    def _serve(self, conn: socket.socket) -> None:
        rec = Conn(accepted=time.monotonic())
        self.conns.append(rec)
        conn.settimeout(0.2)
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                if time.monotonic() - rec.accepted > 3 or len(head) > 65536:
                    rec.how = "no request"
                    return
                with contextlib.suppress(TimeoutError):
                    chunk = conn.recv(65536)
                    if not chunk:
                        rec.how = "closed before request"
                        return
                    head += chunk
            rec.path = head.split(b" ", 2)[1].decode("latin-1")
            self.variant.serve(Peer(conn, rec, self.stop), self)
            rec.how = "served"
        except _End:
            pass
        except OSError as exc:
            rec.how = f"error: {exc}"
        finally:
            rec.ended = time.monotonic()
            rec.done.set()

    def settle(self, timeout: float = FETCH + 2.0) -> None:
        """Wait until every connection made so far has been accepted and has ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Accepted is not yet recorded: the handler's thread may not have started.
            recorded = len(self.conns) >= self.server.accepted
            if recorded and not self.server.pending() and all(c.done.is_set() for c in self.conns):
                return
            time.sleep(0.02)

    def close(self) -> None:
        self.stop.set()
        self.ssdp_thread.join(timeout=5)
        self.udp.close()
        for listener in (self.server, self.dev_canary, self.wan_canary):
            listener.close()

    def check(self) -> None:
        """What must hold for every variant, whether or not the real router answered too."""
        v = self.variant
        assert self.searches > 0, "the hostile device heard no M-SEARCH"
        assert self.answers > 0 or not v.answer, "the hostile device never answered"
        # Nothing off the subnet, and no external entity, is ever fetched.
        assert self.wan_canary.accepted == 0, "an off-subnet URL was fetched"
        assert self.dev_canary.accepted == 0, "an external XML entity was fetched"
        if not v.fetched:
            assert not self.conns, f"fetched from a device it must not touch: {self.conns}"
            return
        # It answers at once, long before the router's probe ends: its LOCATION is fetched
        # (concurrently) even when the real router answers too.
        assert self.conns, "the hostile LOCATION was never fetched"
        for c in self.conns:
            assert c.done.is_set(), f"a hostile connection is still open: {c}"
            # Every connection ends within one fetch timeout (plus slack), however hostile.
            assert c.lifetime < FETCH + 1.0, f"a hostile connection lasted too long: {c}"
            if v.endless and not (v.serve is soap_drip and c.path == "/desc.xml"):
                assert c.how in CLOSED_BY_CLIENT, f"the client did not close the connection: {c}"
            if v.big:
                assert c.sent < BIG // 4, f"the client read far past the cap: {c}"


@contextlib.contextmanager
def hostile_device(lab: Lab, variant: Variant) -> Iterator[HostileDevice]:
    dev = HostileDevice(lab, variant)
    try:
        yield dev
    finally:
        dev.close()


@pytest.fixture(scope="module")
def quiet_lab() -> Iterator[Lab]:
    """A private lab whose router offers no UPnP (NAT-PMP only): the hostile device is alone."""
    the_lab = _build(LabConfig(name=f"{LAB_PREFIX}-hostile", portmap=frozenset({"natpmp"})))
    yield the_lab
    the_lab.down()


# ---- the tests ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_hostile_device_alone_is_refused_in_bounded_time(quiet_lab: Lab, variant: Variant) -> None:
    with hostile_device(quiet_lab, variant) as dev:
        t0 = time.monotonic()
        with pytest.raises(DiscoveryError) as info:
            run_in_node(quiet_lab, "lan", lambda: discover_igd(timeout=ALONE_TIMEOUT))
        elapsed = time.monotonic() - t0
        dev.settle()
    assert elapsed < ALONE_TIMEOUT + 1.0, f"discovery took {elapsed:.2f} s"
    message = str(info.value)
    assert "refused: " in message and variant.reason in message, message
    if variant.answer and variant.locations is None:
        assert dev.location in message, message  # the offender is named
    dev.check()


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_real_igd_found_beside_hostile_device(lab: Lab, variant: Variant) -> None:
    # Discovery ends once the router's own answer is probed (three HTTP requests), and the
    # hostile LOCATION's fetch starts at the same moment: on a loaded machine the router can
    # win before the hostile connection is even made (seen about once in four runs). So up
    # to three rounds, each of which must find the router; at least one must have fetched
    # from the hostile device, or its payload was never tested.
    with hostile_device(lab, variant) as dev:
        for _ in range(3):
            t0 = time.monotonic()
            gw = run_in_node(lab, "lan", lambda: discover_igd(timeout=BOTH_TIMEOUT))
            elapsed = time.monotonic() - t0
            dev.settle()
            assert elapsed < BOTH_TIMEOUT + 1.0, f"discovery took {elapsed:.2f} s"
            assert gw.location == ROUTER_LOCATION
            assert gw.external_ip == C.RTR_WAN_IP and gw.connected
            assert "MiniUPnPd" in gw.server
            if dev.conns or not variant.fetched:
                break
    dev.check()
