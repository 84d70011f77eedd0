"""The test suite's network guard: no socket may reach beyond loopback and the lab.

Installed in the pytest process (by conftest) and, through ``sitecustomize`` on
PYTHONPATH, in every Python child the tests start. A thread in the host's own network
namespace may talk to loopback only; a thread inside a lab namespace may talk to the lab's
subnets, loopback and the SSDP group. Anything else raises ``PermissionError`` (so code
under test sees an ordinary network failure) *and* is written to the violations log, which
fails the test even when the code under test swallows the error.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
from typing import Any

# Keep in step with natkit.lab.config.LAB_SUBNETS (tests/lab/test_lab_nat.py checks it).
LAB_NETS = [
    ipaddress.ip_network(n)
    for n in ("192.168.77.0/24", "100.200.0.0/16", "100.201.0.0/24", "192.168.78.0/24")
]
LAB_MULTICAST = [ipaddress.ip_network("239.255.255.250/32"), ipaddress.ip_network("224.0.0.0/24")]
LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
ANY = [ipaddress.ip_network("0.0.0.0/32"), ipaddress.ip_network("::/128")]

_host_netns = int(os.environ.get("NATKIT_NETGUARD_HOST_NETNS", "0")) or os.stat(
    "/proc/self/ns/net"
).st_ino
LOG = os.environ.get("NATKIT_NETGUARD_LOG", "")
violations: list[str] = []


SIOCGSKNS = 0x894C  # ioctl: a file descriptor for the socket's own network namespace


def _netns(sock: socket.socket | None = None) -> int:
    """The namespace a socket lives in (where it was created), else the thread's."""
    if sock is not None:
        try:
            fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
            try:
                return os.fstat(fd).st_ino
            finally:
                os.close(fd)
        except OSError:
            pass
    return os.stat("/proc/thread-self/ns/net").st_ino


def allowed(ip: str, *, in_host_netns: bool) -> bool:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if getattr(addr, "ipv4_mapped", None):
        addr = addr.ipv4_mapped  # type: ignore[union-attr]
    if any(addr in n for n in LOOPBACK):
        return True
    if in_host_netns:
        return False
    if addr.version == 6 and addr.is_link_local:
        return True  # link-local in a lab namespace stays on the lab's own veths
    return any(addr in n for n in LAB_NETS + LAB_MULTICAST + ANY)


def _record(what: str) -> None:
    violations.append(what)
    if LOG:
        with open(LOG, "a") as f:
            f.write(what + "\n")


def check(address: Any, op: str, sock: socket.socket | None = None) -> None:
    if not isinstance(address, tuple) or not address or not isinstance(address[0], str):
        return  # AF_UNIX paths, netlink and friends
    ip = address[0]
    in_host = _netns(sock) == _host_netns
    if not allowed(ip, in_host_netns=in_host):
        where = "the host's namespace" if in_host else "a lab namespace"
        what = f"network guard: {op} to {ip!r} from {where} (pid {os.getpid()}) is forbidden"
        _record(what)
        raise PermissionError(what)


_orig: dict[str, Any] = {}


def install() -> None:
    if _orig:
        return
    cls = socket.socket
    _orig.update(
        connect=cls.connect, connect_ex=cls.connect_ex, sendto=cls.sendto,
        sendmsg=cls.sendmsg, getaddrinfo=socket.getaddrinfo,
    )  # fmt: skip

    def connect(self: socket.socket, address: Any) -> None:
        check(address, "connect", self)
        return _orig["connect"](self, address)  # type: ignore[no-any-return]

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(address, "connect", self)
        return _orig["connect_ex"](self, address)  # type: ignore[no-any-return]

    def sendto(self: socket.socket, data: Any, *args: Any) -> int:
        check(args[-1], "sendto", self)
        return _orig["sendto"](self, data, *args)  # type: ignore[no-any-return]

    def sendmsg(self: socket.socket, buffers: Any, *args: Any) -> int:
        if len(args) >= 3 and args[2] is not None:
            check(args[2], "sendmsg", self)
        return _orig["sendmsg"](self, buffers, *args)  # type: ignore[no-any-return]

    def getaddrinfo(host: Any, *args: Any, **kw: Any) -> Any:
        # A name lookup would send a DNS query to the host's resolver: numeric hosts only.
        if isinstance(host, bytes):
            host = host.decode()
        if host not in (None, "localhost"):
            try:
                ipaddress.ip_address(str(host).split("%", 1)[0])
            except ValueError:
                _record(f"network guard: DNS lookup of {host!r} (pid {os.getpid()}) is forbidden")
                raise socket.gaierror(socket.EAI_NONAME, f"network guard: no DNS for {host!r}") from None
        return _orig["getaddrinfo"](host, *args, **kw)

    cls.connect = connect  # type: ignore[method-assign]
    cls.connect_ex = connect_ex  # type: ignore[method-assign]
    cls.sendto = sendto  # type: ignore[assignment]
    cls.sendmsg = sendmsg  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo
