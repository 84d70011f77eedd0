"""RFC 5780 NAT behaviour discovery over UDP: mapping, filtering, hairpinning, port keeping.

Order and sockets follow RFC 5780 4 (and what fools classic classifiers on Linux NATs):

1. Test I — a Binding request to every server at once from the *main* socket. The first
   server (in the user's order) whose answer has OTHER-ADDRESS becomes the primary.
2. Then, all at once, each with its own retransmission:
   - mapping tests II (alternate IP, primary port) and III (alternate IP and port) from the
     main socket, which already has its mapping;
   - filtering tests II (CHANGE-REQUEST IP and port) and III (port only), each from a
     *fresh* socket, so that no earlier request has opened the NAT's filter for the answer;
   - hairpinning: a fresh socket sends a Binding request to the main socket's mapped address
     and the main socket watches for it.

Without an RFC 5780 server (no OTHER-ADDRESS), mapping is measured across the servers'
test I answers when two or more answer, and filtering stays unknown: it is never guessed.
A server that answers CHANGE-REQUEST with an error (420) or from the wrong address leaves
filtering unknown too. Every wait is bounded by ``timeout`` per phase, so a report takes at
most about two timeouts; with answering servers it takes one round trip plus, when the NAT
filters, one timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import socket
import time
from collections.abc import Sequence
from typing import Any

from natkit.errors import NatkitError
from natkit.stun import behaviour as bh
from natkit.stun.address import (
    ServerLike,
    family_of,
    format_addr,
    may_probe,
    parse_server,
    resolve_all,
)
from natkit.stun.client import BindingResult, StunUdp, attempt
from natkit.stun.codec import Addr, binding_request, encode
from natkit.stun.errors import StunTimeoutError, StunTransportError
from natkit.stun.retransmit import RTO, retransmit_schedule, rto_from_rtt

DEFAULT_TIMEOUT = 1.5  # per phase: test I, then everything else at once
# Phase 2's budget with a clean RTT sample from test I: this many round trips, at least
# the floor (seconds). The retransmission schedule inside it covers lost packets.
PHASE2_RTTS = 10
PHASE2_FLOOR = 0.3


@dataclasses.dataclass(frozen=True)
class ServerAnswer:
    """Test I at one server: the mapped address it saw, or why there is none."""

    server: str
    mapped: str | None = None
    other_address: str | None = None
    rtt_ms: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class NatBehaviour:
    """What the NAT in front of this host does, in RFC 4787/5780 terms; ``None`` = unknown
    (``notes`` say why)."""

    servers: tuple[str, ...]  # as named by the user, normalized to HOST:PORT
    local: str | None  # the main socket's address (source IP of the route if bound to any)
    mapped: str | None  # the public address the first answering server saw (test I)
    behind_nat: bool | None  # mapped != local
    primary: str | None  # the RFC 5780 server used for tests II/III and filtering
    other_address: str | None  # its OTHER-ADDRESS
    mapping: bh.Behaviour | None
    filtering: bh.Behaviour | None
    port_preserving: bool | None
    hairpinning: bool | None
    answers: tuple[ServerAnswer, ...]  # test I, one per server
    notes: tuple[str, ...] = ()
    foreign_packets: int = 0  # datagrams ignored: not STUN, or answering nothing we asked
    elapsed: float = 0.0

    @property
    def rfc5780(self) -> bool:
        return self.primary is not None

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["servers"] = list(self.servers)
        out["answers"] = [a.to_json() for a in self.answers]
        out["notes"] = list(self.notes)
        out["rfc5780"] = self.rfc5780
        out["elapsed"] = round(self.elapsed, 3)
        return out


def _answer(name: str, outcome: BindingResult | NatkitError) -> ServerAnswer:
    if isinstance(outcome, NatkitError):
        return ServerAnswer(name, error=str(outcome))
    r = outcome.response
    if not r.ok:
        return ServerAnswer(name, error=f"STUN error {r.error_code} {r.error_reason}".strip())
    return ServerAnswer(
        name,
        mapped=format_addr(r.mapped) if r.mapped else None,
        other_address=format_addr(r.other_address) if r.other_address else None,
        rtt_ms=round(outcome.rtt * 1000, 3),
    )


def _route_source(peer: Addr, family: int) -> str | None:
    """The source IP the kernel would use towards ``peer`` (connecting UDP sends nothing)."""
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect(peer)
        except OSError:
            return None
        return str(s.getsockname()[0])


def _usable_other_address(run: _Run, result: BindingResult) -> bool:
    """RFC 5780 needs an alternate address that differs in IP *and* port (and that we may
    send to); otherwise tests II/III would only repeat test I."""
    other = result.response.other_address
    if other is None:
        return False
    if may_probe(other, result.server, run.family) and bh.changed_as_asked(
        result.server, other, change_ip=True, change_port=True
    ):
        return True
    run.notes.append(
        f"{format_addr(result.server)} names OTHER-ADDRESS {format_addr(other)}, which is not "
        "another IP and port: not used for RFC 5780 tests"
    )
    return False


class _Run:
    """State of one discovery: its sockets (all closed at the end) and notes."""

    def __init__(self, local_ip: str | None, family: int, timeout: float) -> None:
        self.local_ip = local_ip
        self.family = family
        self.timeout = timeout
        self.notes: list[str] = []
        self.sockets: list[StunUdp] = []

    async def socket(self, port: int = 0) -> StunUdp:
        sock = await StunUdp.open(self.local_ip, port, family=self.family)
        self.sockets.append(sock)
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()

    async def mapping(
        self, main: StunUdp, primary: BindingResult, other: Addr, schedule: list[float]
    ) -> bh.Behaviour | None:
        """RFC 5780 4.3 tests II and III, both at once."""
        x1 = primary.mapped
        assert x1 is not None
        name = format_addr(primary.server)
        r2, r3 = await asyncio.gather(
            attempt(main.binding((other[0], primary.server[1]), schedule)),
            attempt(main.binding(other, schedule)),
        )
        mapped: list[Addr | None] = []
        failures: list[str] = []
        for test, r in (("II", r2), ("III", r3)):
            if isinstance(r, NatkitError) or r.mapped is None:
                why = r if isinstance(r, NatkitError) else f"error {r.response.error_code}"
                failures.append(f"mapping test {test} via {name} failed: {why}")
                mapped.append(None)
            else:
                mapped.append(r.mapped)
        result = bh.classify_mapping(x1, mapped[0], mapped[1])
        if result is None:  # a failed test III does not matter when test II decided
            self.notes.extend(failures)
        return result

    async def filtering_test(
        self, primary: Addr, schedule: list[float], *, change_ip: bool
    ) -> bool | None:
        """One RFC 5780 4.4 test from a fresh socket: did the changed answer get in?"""
        what = "IP and port" if change_ip else "port"
        name = format_addr(primary)
        try:
            sock = await self.socket()
            r = await sock.binding(primary, schedule, change_ip=change_ip, change_port=True)
        except StunTimeoutError:
            return False  # filtered (or lost every time: the retransmissions cover loss)
        except NatkitError as exc:
            self.notes.append(f"filtering test (change {what}) could not run: {exc}")
            return None
        if not r.response.ok:
            self.notes.append(
                f"{name} answered CHANGE-REQUEST ({what}) with STUN error "
                f"{r.response.error_code} {r.response.error_reason}: filtering unknown"
            )
            return None
        if not bh.changed_as_asked(primary, r.source, change_ip=change_ip, change_port=True):
            self.notes.append(
                f"{name} answered CHANGE-REQUEST ({what}) from {format_addr(r.source)}, "
                "not from its alternate address: it ignores the request; filtering unknown"
            )
            return None
        return True

    async def hairpin(
        self, main: StunUdp, mapped: Addr, server: Addr, schedule: list[float]
    ) -> bool | None:
        """RFC 5780 4.5: does a packet to our own mapped address come back to us?"""
        if not may_probe(mapped, server, main.family):
            self.notes.append(f"hairpinning not tested: mapped address {format_addr(mapped)}")
            return None
        try:
            sock = await self.socket()
        except NatkitError as exc:
            self.notes.append(f"hairpinning not tested: {exc}")
            return None
        request = binding_request()
        data = encode(request, fingerprint=True)
        arrived = main.expect_request(request.transaction_id)
        try:
            for wait in schedule:
                sock.send(data, mapped)
                await asyncio.wait((arrived,), timeout=wait)
                if arrived.done():
                    return True
            return False
        finally:
            main.forget_request(request.transaction_id)
            arrived.cancel()


async def discover_behaviour(
    servers: Sequence[ServerLike],
    *,
    local_ip: str | None = None,
    local_port: int = 0,
    rto: float = RTO,
    timeout: float = DEFAULT_TIMEOUT,
) -> NatBehaviour:
    """Classify the NAT between this host and the STUN ``servers`` (named by the user).

    ``local_ip``/``local_port`` bind the main socket (fresh sockets use ``local_ip`` and any
    port). ``rto`` is the initial retransmission timeout of test I (RFC 8489: 0.5 s); later
    tests use an RTO from test I's round trip. ``timeout`` bounds each of the two phases.
    Network outcomes never raise: they are ``None`` fields and ``notes``.
    """
    if not servers:
        raise ValueError("name at least one STUN server (--stun HOST:PORT)")
    started = time.monotonic()
    specs = [parse_server(s) for s in servers]  # a bad name fails before anything is sent
    names = tuple(format_addr(s) for s in specs)
    family = family_of(local_ip) if local_ip else 0
    addrs = await resolve_all(specs, family=family, timeout=timeout)
    if not family:
        first = next((a for a in addrs if not isinstance(a, NatkitError)), None)
        family = family_of(first[0]) if first else socket.AF_INET
    run = _Run(local_ip, family, timeout)
    try:
        main = await run.socket(local_port)
        schedule = retransmit_schedule(rto, timeout=timeout)

        async def test1(addr: Addr | NatkitError) -> BindingResult | NatkitError:
            if isinstance(addr, NatkitError):
                return addr
            if family_of(addr[0]) != family:
                return StunTransportError(f"{format_addr(addr)} is of another address family")
            return await attempt(main.binding(addr, schedule))

        outcomes = await asyncio.gather(*(test1(a) for a in addrs))
        result = await _phase2(run, main, names, list(outcomes), rto)
    finally:
        run.close()
    foreign = sum(s.foreign for s in run.sockets)
    return dataclasses.replace(result, foreign_packets=foreign, elapsed=time.monotonic() - started)


async def _phase2(
    run: _Run,
    main: StunUdp,
    names: tuple[str, ...],
    outcomes: list[BindingResult | NatkitError],
    rto: float,
) -> NatBehaviour:
    answers = tuple(_answer(n, o) for n, o in zip(names, outcomes, strict=True))
    ok = [o for o in outcomes if isinstance(o, BindingResult) and o.mapped is not None]
    primary = next((o for o in ok if _usable_other_address(run, o)), None)
    first = primary or (ok[0] if ok else None)
    local = main.local_address
    if ipaddress.ip_address(local[0]).is_unspecified and first is not None:
        local = (_route_source(first.server, run.family) or local[0], local[1])
    report = NatBehaviour(
        servers=names,
        local=format_addr(local),
        mapped=None,
        behind_nat=None,
        primary=None,
        other_address=None,
        mapping=None,
        filtering=None,
        port_preserving=None,
        hairpinning=None,
        answers=answers,
    )
    if first is None:
        run.notes.append("no STUN server answered: nothing can be said about the NAT")
        return dataclasses.replace(report, notes=tuple(run.notes))
    x1 = first.mapped
    assert x1 is not None
    # RFC 8489 6.2.1: reuse what test I taught about the round trip (Karn: clean samples).
    rto2 = rto_from_rtt(first.rtt) if first.transmissions == 1 else rto
    # A filtered answer never comes, so phase 2 lasts as long as its budget: size it by
    # the measured round trip (with a floor for jitter), never beyond ``timeout``.
    budget = run.timeout
    if first.transmissions == 1:
        budget = min(budget, max(PHASE2_FLOOR, PHASE2_RTTS * first.rtt))
    schedule = retransmit_schedule(rto2, timeout=budget)

    async def no_result() -> None:
        return None

    if primary is not None:
        other = primary.response.other_address
        assert other is not None
        mapping_task = run.mapping(main, primary, other, schedule)
        filter_ip = run.filtering_test(primary.server, schedule, change_ip=True)
        filter_port = run.filtering_test(primary.server, schedule, change_ip=False)
    else:
        mapping_task = no_result()
        filter_ip = filter_port = no_result()
        run.notes.append(
            "no server offers RFC 5780 (OTHER-ADDRESS): filtering unknown"
            + ("" if len(ok) > 1 else "; mapping needs a second server (--stun again)")
        )
    mapping, f_ip, f_port, hairpin = await asyncio.gather(
        mapping_task, filter_ip, filter_port, run.hairpin(main, x1, first.server, schedule)
    )
    if primary is None and len(ok) > 1:
        mapping = bh.classify_mapping_across([(o.server, o.mapped) for o in ok if o.mapped])
        if mapping is None:
            run.notes.append(
                "mapped addresses differ between servers in a way that does not tell the "
                "mapping behaviour; a server with RFC 5780 can"
            )
    return dataclasses.replace(
        report,
        mapped=format_addr(x1),
        behind_nat=bh.behind_nat(local, x1),
        primary=format_addr(primary.server) if primary else None,
        other_address=(
            format_addr(primary.response.other_address)
            if primary and primary.response.other_address
            else None
        ),
        mapping=mapping,
        filtering=bh.classify_filtering(f_ip, f_port),
        port_preserving=bh.port_preserving(main.local_address, x1),
        hairpinning=hairpin,
        notes=tuple(run.notes),
    )


def discover_behaviour_sync(
    servers: Sequence[ServerLike],
    *,
    local_ip: str | None = None,
    local_port: int = 0,
    rto: float = RTO,
    timeout: float = DEFAULT_TIMEOUT,
) -> NatBehaviour:
    """Blocking :func:`discover_behaviour`, for scripts (not from a running event loop)."""
    return asyncio.run(
        discover_behaviour(
            servers, local_ip=local_ip, local_port=local_port, rto=rto, timeout=timeout
        )
    )
