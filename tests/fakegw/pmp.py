"""A fake NAT-PMP (RFC 6886) + PCP (RFC 6887) gateway on a loopback UDP port.

It keeps a real mapping table (keyed by protocol and internal port, as both RFCs key a
client's mappings), an epoch, lifetimes that expire, and switchable behaviours:

- ``reboot()``: the table is cleared and the epoch restarts from 0 (what a client must notice);
- ``lose_mappings()``: the table is cleared while the epoch runs on (a silent loss: miniupnpd
  restarted with ``system_uptime=yes``, a firewall reload);
- ``answering = False``: every request is dropped;
- ``pcp = "unsupported"``: a NAT-PMP-only gateway (PCP gets UNSUPP_VERSION, RFC 6887 9),
  ``pcp = "silent"``: PCP is ignored; ``natpmp = False``: NAT-PMP is ignored;
- ``max_lifetime``: shorter leases than asked; ``port_offset``: another external port than
  the one suggested;
- ``checks_nonce``: a PCP request naming another mapping's nonce is refused (RFC 6887 11.3);
  off, it replaces or deletes that mapping (draft-cheshire-pcp-unsupp-family);
- ``missing_delete``: what a delete of no mapping gets: ``success`` (RFC 6887) or
  ``no_resources`` (miniupnpd 2.3.1, measured in the lab; docs/miniupnpd-silent-loss.md).

The server runs in a thread with a blocking socket, independent of the client's event loop.
Replies are built here by hand (struct), not with natkit's codecs, so the two check each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Literal

EXTERNAL_IP = "198.51.100.7"
TCP, UDP = 6, 17
NOT_AUTHORIZED, NO_RESOURCES, UNSUPP_VERSION = 2, 8, 1
ERROR_LIFETIME = 30  # how long a PCP error "lasts" (RFC 6887 7.4)


@dataclasses.dataclass
class Entry:
    protocol: int  # TCP or UDP
    internal_port: int
    external_port: int
    expires: float  # monotonic
    nonce: bytes | None  # PCP's; None for a NAT-PMP mapping


@dataclasses.dataclass
class FakePmpGateway:
    answering: bool = True
    natpmp: bool = True
    pcp: Literal["serve", "unsupported", "silent"] = "serve"
    max_lifetime: int | None = None
    port_offset: int = 0
    checks_nonce: bool = True
    missing_delete: Literal["success", "no_resources"] = "success"
    epoch_start: int = 10_000  # "up for a while" when the test starts
    table: dict[tuple[int, int], Entry] = dataclasses.field(default_factory=dict)
    requests: list[bytes] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self._origin = time.monotonic() - self.epoch_start
        self._lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-pmp", daemon=True)

    # ---- what tests switch ---------------------------------------------------------------

    def reboot(self) -> None:
        with self._lock:
            self.table.clear()
            self._origin = time.monotonic()

    def lose_mappings(self) -> None:
        with self._lock:
            self.table.clear()

    @property
    def epoch(self) -> int:
        return int(time.monotonic() - self._origin)

    def mapped(self, protocol: str, internal_port: int) -> Entry | None:
        with self._lock:
            self._expire()
            return self.table.get((TCP if protocol == "tcp" else UDP, internal_port))

    def count(self, version: int, opcode: int, *, lifetime: int | None = None) -> int:
        """Requests seen of one version and opcode (PCP MAP: optionally one lifetime)."""
        n = 0
        for req in list(self.requests):
            if len(req) < 2 or req[0] != version or req[1] != opcode:
                continue
            if lifetime is not None and struct.unpack_from("!I", req, 4)[0] != lifetime:
                continue
            n += 1
        return n

    # ---- serving -------------------------------------------------------------------------

    def start(self) -> FakePmpGateway:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                req, peer = self.sock.recvfrom(2048)
            except (TimeoutError, OSError):
                continue
            self.requests.append(req)
            with self._lock:
                self._expire()
                reply = self._answer(req) if self.answering else None
            if reply is not None:
                self.sock.sendto(reply, peer)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, e in self.table.items() if e.expires <= now]:
            del self.table[key]

    def _answer(self, req: bytes) -> bytes | None:
        if len(req) < 2:
            return None
        if req[0] == 0:
            return self._natpmp(req) if self.natpmp else None
        if self.pcp == "silent":
            return None
        if self.pcp == "unsupported":
            # RFC 6887 9: a server that knows only NAT-PMP answers in version 0.
            return struct.pack("!BBHI", 0, 128 + req[1], UNSUPP_VERSION, self.epoch)
        if req[0] != 2:  # a PCP version it does not know: answered in its own, 2
            return self._pcp_reply(req[1] & 0x7F, UNSUPP_VERSION, ERROR_LIFETIME)
        return self._pcp(req)

    def _grant(self, lifetime: int) -> int:
        return min(lifetime, self.max_lifetime) if self.max_lifetime else lifetime

    def _free_port(self, want: int, key: tuple[int, int]) -> int:
        taken = {e.external_port for k, e in self.table.items() if k != key and k[0] == key[0]}
        port = want + self.port_offset
        while port in taken or not 0 < port < 65536:
            port = port + 1 if port < 65535 else 1024
        return port

    # ---- NAT-PMP -------------------------------------------------------------------------

    def _natpmp(self, req: bytes) -> bytes | None:
        op = req[1]
        if op == 0 and len(req) == 2:
            ip = ipaddress.IPv4Address(EXTERNAL_IP).packed
            return struct.pack("!BBHI", 0, 128, 0, self.epoch) + ip
        if op not in (1, 2) or len(req) != 12:
            return None
        _, _, _, internal, suggested, lifetime = struct.unpack("!BBHHHI", req)
        key = (UDP if op == 1 else TCP, internal)
        if lifetime == 0:
            self.table.pop(key, None)
            return struct.pack("!BBHIHHI", 0, 128 + op, 0, self.epoch, internal, 0, 0)
        granted = self._grant(lifetime)
        entry = self.table.get(key)
        if entry is None:  # RFC 6886 3.3: an existing mapping is kept, whatever is suggested
            ext = self._free_port(suggested or internal, key)
            entry = self.table[key] = Entry(key[0], internal, ext, 0.0, None)
        entry.expires = time.monotonic() + granted
        reply = (0, 128 + op, 0, self.epoch, internal, entry.external_port, granted)
        return struct.pack("!BBHIHHI", *reply)

    # ---- PCP -----------------------------------------------------------------------------

    def _pcp_reply(self, op: int, result: int, lifetime: int, payload: bytes = b"") -> bytes:
        head = struct.pack("!BBBBII", 2, 0x80 | op, 0, result, lifetime, self.epoch)
        return head + b"\x00" * 12 + payload

    def _pcp(self, req: bytes) -> bytes | None:
        if len(req) < 24 or len(req) % 4:
            return None
        op = req[1]
        if op == 0:
            return self._pcp_reply(0, 0, 0)
        if op != 1 or len(req) < 60:
            return None
        lifetime = struct.unpack_from("!I", req, 4)[0]
        nonce = req[24:36]
        proto, internal, suggested = struct.unpack_from("!B3xHH", req, 36)
        key = (proto, internal)
        entry = self.table.get(key)

        def reply(result: int, life: int, ext: int, ip: str) -> bytes:
            addr = b"\x00" * 10 + b"\xff\xff" + ipaddress.IPv4Address(ip).packed
            payload = nonce + struct.pack("!B3xHH", proto, internal, ext) + addr
            return self._pcp_reply(1, result, life, payload)

        foreign = entry is not None and entry.nonce != nonce
        if foreign and self.checks_nonce:
            return reply(
                NOT_AUTHORIZED, 0 if lifetime == 0 else ERROR_LIFETIME, suggested, "0.0.0.0"
            )
        if lifetime == 0:
            if entry is None and self.missing_delete == "no_resources":
                return reply(NO_RESOURCES, ERROR_LIFETIME, suggested, "0.0.0.0")
            self.table.pop(key, None)
            return reply(0, 0, suggested, "0.0.0.0")
        granted = self._grant(lifetime)
        if entry is None:
            ext = self._free_port(suggested or internal, key)
            entry = self.table[key] = Entry(proto, internal, ext, 0.0, nonce)
        entry.nonce = nonce
        entry.expires = time.monotonic() + granted
        return reply(0, granted, entry.external_port, EXTERNAL_IP)


@contextlib.contextmanager
def fake_pmp_gateway(**behaviour: object) -> Iterator[FakePmpGateway]:
    gw = FakePmpGateway(**behaviour).start()  # type: ignore[arg-type]
    try:
        yield gw
    finally:
        gw.stop()
