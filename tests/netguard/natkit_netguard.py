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
import importlib.util
import ipaddress
import os
import socket
import sys
from typing import Any

# Keep in step with natkit.lab.config.LAB_SUBNETS (tests/lab/test_lab_nat.py checks it).
LAB_NETS = [
    ipaddress.ip_network(n)
    for n in (
        "192.168.77.0/24",
        "100.200.0.0/16",
        "100.201.0.0/24",
        "192.168.78.0/24",
        "2001:db8:77::/64",
        "2001:db8:201::/64",
    )
]
LAB_MULTICAST = [ipaddress.ip_network("239.255.255.250/32"), ipaddress.ip_network("224.0.0.0/24")]
LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
ANY = [ipaddress.ip_network("0.0.0.0/32"), ipaddress.ip_network("::/128")]

_host_netns = (
    int(os.environ.get("NATKIT_NETGUARD_HOST_NETNS", "0")) or os.stat("/proc/self/ns/net").st_ino
)
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
        _no_dns(host)
        return _orig["getaddrinfo"](host, *args, **kw)

    cls.connect = connect  # type: ignore[method-assign]
    cls.connect_ex = connect_ex  # type: ignore[method-assign]
    cls.sendto = sendto  # type: ignore[assignment]
    cls.sendmsg = sendmsg  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo
    if "uvloop" in sys.modules:
        _guard_uvloop(sys.modules["uvloop"])
    else:
        sys.meta_path.insert(0, _GuardUvloopOnImport())


# uvloop (the event loop of natkit's relay and agent commands) connects, sends datagrams
# and resolves names in C, past the socket methods above: its loop's methods are guarded
# too, as soon as it is imported.


def _no_dns(host: Any) -> None:
    """A name lookup would send a DNS query to the host's resolver: numeric hosts only."""
    if isinstance(host, bytes):
        host = host.decode()
    if host in (None, "localhost"):
        return
    try:
        ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        if _lookups_stay_in_the_lab():
            return
        _record(f"network guard: DNS lookup of {host!r} (pid {os.getpid()}) is forbidden")
        raise socket.gaierror(socket.EAI_NONAME, f"network guard: no DNS for {host!r}") from None


def _lookups_stay_in_the_lab() -> bool:
    """In a lab namespace whose resolver is a lab address (a test's own DNS server, given by
    /etc/netns/NETNS/resolv.conf) and whose name service asks only files and DNS, a lookup's
    queries never leave the lab."""
    if _netns() == _host_netns:
        return False
    try:
        with open("/etc/resolv.conf") as f:
            resolv = f.read()
        with open("/etc/nsswitch.conf") as f:
            nsswitch = f.read()
    except OSError:
        return False
    servers = [w[1] for w in map(str.split, resolv.splitlines()) if w[:1] == ["nameserver"]
               and len(w) > 1]  # fmt: skip
    sources = [w[1:] for w in map(str.split, nsswitch.splitlines()) if w[:1] == ["hosts:"]]
    return (
        bool(servers)
        and all(allowed(server, in_host_netns=False) for server in servers)
        and len(sources) == 1
        and set(sources[0]) <= {"files", "dns"}
    )


def _check_host(host: Any, port: Any, op: str) -> None:
    if isinstance(host, bytes):
        host = host.decode()
    if host is not None:
        _no_dns(host)
        check((str(host), port), op)


class _GuardedDatagramTransport:
    """A datagram transport whose ``sendto`` to an address is checked first."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def sendto(self, data: Any, addr: Any = None) -> None:
        if addr is None:
            self._transport.sendto(data)
            return
        check(addr, "sendto", self._transport.get_extra_info("socket"))
        self._transport.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _guard_uvloop(uvloop: Any) -> None:
    loop_cls = uvloop.Loop
    if getattr(loop_cls, "_natkit_guarded", False):
        return
    orig = {n: getattr(loop_cls, n) for n in (
        "create_connection", "create_datagram_endpoint", "getaddrinfo", "sock_connect",
        "sock_sendto",
    ) if hasattr(loop_cls, n)}  # fmt: skip

    async def create_connection(self: Any, factory: Any, host: Any = None, port: Any = None, *args: Any, **kw: Any) -> Any:  # fmt: skip
        _check_host(host, port, "connect")
        return await orig["create_connection"](self, factory, host, port, *args, **kw)

    async def create_datagram_endpoint(self: Any, factory: Any, local_addr: Any = None, remote_addr: Any = None, **kw: Any) -> Any:  # fmt: skip
        if remote_addr is not None:
            _check_host(remote_addr[0], remote_addr[1], "connect")
        made: list[_GuardedDatagramTransport] = []

        class Guarded:  # the protocol sees the guarded transport too
            def __init__(self) -> None:
                self.inner = factory()

            def connection_made(self, transport: Any) -> None:
                made.append(_GuardedDatagramTransport(transport))
                self.inner.connection_made(made[0])

            def __getattr__(self, name: str) -> Any:
                return getattr(self.inner, name)

        transport, protocol = await orig["create_datagram_endpoint"](
            self, Guarded, local_addr, remote_addr, **kw
        )
        return (made[0] if made else _GuardedDatagramTransport(transport)), protocol.inner

    async def getaddrinfo(self: Any, host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        _no_dns(host)
        return await orig["getaddrinfo"](self, host, port, *args, **kw)

    async def sock_connect(self: Any, sock: Any, address: Any) -> Any:
        check(address, "connect", sock)
        return await orig["sock_connect"](self, sock, address)

    async def sock_sendto(self: Any, sock: Any, data: Any, address: Any) -> Any:
        check(address, "sendto", sock)
        return await orig["sock_sendto"](self, sock, data, address)

    for name, fn in (("create_connection", create_connection),
                     ("create_datagram_endpoint", create_datagram_endpoint),
                     ("getaddrinfo", getaddrinfo), ("sock_connect", sock_connect),
                     ("sock_sendto", sock_sendto)):  # fmt: skip
        if name in orig:
            setattr(loop_cls, name, fn)
    loop_cls._natkit_guarded = True


class _GuardUvloopOnImport:
    """A meta path finder that guards uvloop once it is imported (importing it eagerly
    would slow every Python child down)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "uvloop":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _guard_uvloop(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec
