"""coturn on the lab's Internet host: STUN with RFC 5780 behaviour discovery, and TURN.

Pure helpers (the command line, a readiness probe); :class:`natkit.lab.lab.Lab` starts and
stops the daemon by pid like its other daemons.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

from natkit.lab import config as C

# Every address and port coturn answers STUN on: readiness means all of them answer.
LISTENERS: tuple[tuple[str, int], ...] = tuple(
    (ip, port) for ip in C.WAN_IPS for port in (C.STUN_PORT, C.STUN_ALT_PORT)
)

_MAGIC_COOKIE = 0x2112A442
_BINDING_REQUEST = 0x0001
_BINDING_SUCCESS = 0x0101


def turnserver_argv(binary: str, state_dir: Path) -> list[str]:
    """The command line: no config file, because Debian's /etc/turnserver.conf sets
    ``no-rfc5780``; everything the lab needs is given here instead."""
    low, high = C.TURN_RELAY_PORTS
    return [
        binary,
        "-n",
        *(f"--listening-ip={ip}" for ip in C.WAN_IPS),
        f"--listening-port={C.STUN_PORT}",
        f"--alt-listening-port={C.STUN_ALT_PORT}",
        f"--relay-ip={C.TURN_RELAY_IP}",
        f"--min-port={low}",
        f"--max-port={high}",
        "--lt-cred-mech",
        f"--user={C.TURN_USER}:{C.TURN_PASSWORD}",
        f"--realm={C.TURN_REALM}",
        "--fingerprint",
        "--no-tls",
        "--no-dtls",
        "--no-cli",
        # Its own pid file and user database: the defaults (/var/run, /var/lib/turn) would
        # be shared by every lab on the machine.
        f"--pidfile={state_dir / 'coturn.pid'}",
        f"--db={state_dir / 'coturn.db'}",
        "--log-file=stdout",
        "--simple-log",
    ]


def binding_request() -> tuple[bytes, bytes]:
    """A bare STUN binding request (RFC 5389: a 20-byte header) and its transaction id.

    Written by hand: readiness needs no codec, and the lab stays free of STUN libraries.
    """
    txid = os.urandom(12)
    return struct.pack("!HHI", _BINDING_REQUEST, 0, _MAGIC_COOKIE) + txid, txid


def is_binding_success(data: bytes, txid: bytes) -> bool:
    if len(data) < 20:
        return False
    kind, _length, cookie = struct.unpack_from("!HHI", data)
    return kind == _BINDING_SUCCESS and cookie == _MAGIC_COOKIE and data[8:20] == txid


def answering(listeners: tuple[tuple[str, int], ...], timeout: float) -> set[tuple[str, int]]:
    """Which of ``listeners`` answer a binding request within ``timeout`` seconds.

    Call it inside a namespace that reaches them (the lab's wan host itself).
    """
    answered: set[tuple[str, int]] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        pending: dict[bytes, tuple[str, int]] = {}
        for addr in listeners:
            request, txid = binding_request()
            pending[txid] = addr
            try:
                sock.sendto(request, addr)
            except OSError:
                continue  # not listening yet (ICMP errors surface here): ask again later
        deadline = time.monotonic() + timeout
        while pending and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(2048)
            except TimeoutError:
                break
            except OSError:
                continue  # ICMP port unreachable from a listener that is not up yet
            txid = data[8:20]
            if txid in pending and is_binding_success(data, txid):
                answered.add(pending.pop(txid))
    return answered
