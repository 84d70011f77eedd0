"""STUN server names (``--stun HOST:PORT``) and socket addresses.

Servers always come from the user (command line or configuration): natkit has no built-in
list of public servers, so nothing is ever sent anywhere the user did not name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from typing import Any, TypeAlias

from natkit.errors import NatkitError
from natkit.stun.codec import DEFAULT_PORT, Addr
from natkit.stun.errors import StunTransportError

ServerLike: TypeAlias = str | tuple[str, int]


def parse_server(spec: ServerLike, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``"host"``, ``"host:port"``, ``"[v6]:port"``, a bare IPv6 address or ``(host, port)``."""
    if isinstance(spec, tuple):
        host, port = spec
    else:
        text = spec.strip()
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"bad STUN server {spec!r}: use [IPv6]:PORT")
            port_text = rest[1:] if rest else None
        elif text.count(":") == 1:
            host, port_text = text.split(":")
        else:  # a host name, an IPv4 address or a bare IPv6 address
            host, port_text = text, None
            if ":" in host:
                try:
                    ipaddress.IPv6Address(host)
                except ValueError:
                    raise ValueError(
                        f"bad STUN server {spec!r}: not HOST:PORT, nor [IPv6]:PORT"
                    ) from None
        try:
            port = default_port if port_text is None else int(port_text)
        except ValueError:
            raise ValueError(f"bad STUN server {spec!r}: the port must be a number") from None
    if not host:
        raise ValueError(f"bad STUN server {spec!r}: no host")
    if not 0 < port < 65536:
        raise ValueError(f"bad STUN server {spec!r}: port {port} is out of range")
    return host, port


def format_addr(addr: Addr) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def family_of(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


def is_usable_peer(addr: Addr) -> bool:
    """Whether a server-supplied address (OTHER-ADDRESS, a mapped address) may be sent to:
    a unicast IP and a real port. A hostile server must not point our probes at a
    broadcast or multicast group."""
    try:
        ip = ipaddress.ip_address(addr[0])
    except ValueError:
        return False
    if ip.is_multicast or ip.is_unspecified or ip == _BROADCAST:
        return False
    return 0 < addr[1] < 65536


def may_probe(addr: Addr, server: Addr, family: int) -> bool:
    """Whether probes may go to an address a server supplied (OTHER-ADDRESS, our mapped
    address): a unicast address of our family, and loopback only if the server itself is
    loopback (a remote server must not point our packets at this host's own services)."""
    if not is_usable_peer(addr) or family_of(addr[0]) != family:
        return False
    return not ipaddress.ip_address(addr[0]).is_loopback or (
        ipaddress.ip_address(server[0]).is_loopback
    )


async def resolve(server: ServerLike, *, family: int = 0, timeout: float = 2.0) -> Addr:
    """``(ip, port)`` for a server; an IP literal is used as is, a name is looked up once."""
    host, port = parse_server(server)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if family and family_of(str(ip)) != family:
            raise StunTransportError(
                f"STUN server {format_addr((host, port))} is not IPv{4 if family == socket.AF_INET else 6}"
            )
        return str(ip), port
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM), timeout
        )
    except (OSError, asyncio.TimeoutError) as exc:
        raise StunTransportError(
            f"cannot resolve STUN server {host!r}: {exc or 'timed out'}"
        ) from None
    if not infos:
        raise StunTransportError(f"STUN server {host!r} has no address")
    sockaddr = infos[0][4]
    return str(sockaddr[0]), int(sockaddr[1])


def plain(addr: Any) -> Addr:
    """``(ip, port)`` of a socket address (IPv6 ones carry flow info and scope too)."""
    return str(addr[0]), int(addr[1])


async def resolve_all(
    servers: Sequence[ServerLike], *, family: int = 0, timeout: float = 2.0
) -> list[Addr | NatkitError]:
    """:func:`resolve` for each server at once; a failure is returned in its place."""

    async def one(server: ServerLike) -> Addr | NatkitError:
        try:
            return await resolve(server, family=family, timeout=timeout)
        except NatkitError as exc:
            return exc

    return list(await asyncio.gather(*(one(s) for s in servers)))
