"""ICE (RFC 8445) with one peer: aioice's connectivity checks, natkit's gathering and liveness.

:class:`IceAgent` wraps an :class:`aioice.Connection` and fills what aioice 0.13 lacks:

- **Gathering** is natkit's (the aioice hook ``get_component_candidates`` is overridden):
  host candidates, then at once server-reflexive (STUN), relayed (TURN) and *port-mapped*
  ones, all under one deadline (2 s by default). Whatever is found by then is used; a STUN,
  TURN or router failure is reported in :attr:`IceAgent.gather_report`, never raised. The
  port-mapped candidate is the router's mapping (PCP, NAT-PMP or UPnP, through
  :class:`~natkit.portmap.manager.KeptMapping`) of the host socket's UDP port; it is kept
  alive while the agent lives and deleted by :meth:`IceAgent.close`. A TURN allocation that
  meets 438 Stale Nonce is retried once (aioice retries 438 only once it knows the realm,
  i.e. on refresh, channel bind and permission, not on a first Allocate that fails so).
- **Choice**: aioice nominates the first pair that works, so a TURN pair could win over a
  working direct one. The controlling agent holds checks of pairs with a relayed candidate
  for ``relay_grace`` seconds (1 s), as Pion's agent does. The selected pair is exposed and
  classified direct / port-mapped / turn (:func:`~natkit.p2p.candidates.classify_path`),
  with our address as the peer sees it, asked by one Binding request on the pair.
- **Liveness**: consent freshness (RFC 7675) as aioice does it, one check every 4-6 s on the
  selected pair from each side; these checks are also the keepalives that hold NAT and
  firewall state (Linux forgets a UDP flow after 30 s). :attr:`IceAgent.dead` resolves when
  consent expires (no answer for ``consent_lifetime``, 30 s), the selected pair's socket or
  TURN allocation is lost, or the agent is closed; the session layer then switches paths.
  An ICE restart is a new agent (:meth:`IceAgent.restarted`): new credentials, new sockets.
- **Untrusted input**: non-STUN datagrams are accepted only from the peer's known addresses
  (aioice takes them from anyone), and at most 4 MiB of them wait for :meth:`recv`.

The gathering is in :mod:`natkit.p2p.ice_gather`, the aioice extension in
:mod:`natkit.p2p.ice_conn`, and what crosses the signalling channel (and the path
classification) in :mod:`natkit.p2p.candidates`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from types import TracebackType

from aioice import Connection, stun
from aioice.ice import CandidatePair

from natkit.p2p.candidates import (
    Addr,
    IceCandidate,
    IceDescription,
    PathKind,
    SelectedPair,
    classify_path,
    describe,
    reachable_remote,
)
from natkit.p2p.errors import P2PError
from natkit.p2p.ice_conn import DownReason, IceConnection, mapped_address
from natkit.p2p.ice_gather import Gatherer
from natkit.p2p.ice_options import (
    CONSENT_INTERVAL,
    CONSENT_LIFETIME,
    GATHER_TIMEOUT,
    RELAY_GRACE,
    IceOptions,
    TurnServer,
)
from natkit.portmap.mapping import PortMapping

__all__ = ["DownReason", "IceAgent", "IceOptions", "PathDown", "TurnServer"]

log = logging.getLogger("natkit.p2p.ice")

CONNECT_TIMEOUT = 10.0
SEEN_AS_TIMEOUT = 2.0
CLOSE_TIMEOUT = 3.0  # deleting a TURN allocation on a dead server would take aioice 63 s


@dataclasses.dataclass(frozen=True)
class PathDown:
    """Why :attr:`IceAgent.dead` resolved."""

    reason: DownReason
    detail: str


# ---- the agent --------------------------------------------------------------------------------


class IceAgent:
    """ICE with one peer: :meth:`gather`, send the description, :meth:`connect` with the
    peer's, then :meth:`send`/:meth:`recv` (or hand :attr:`connection` to a path), watch
    :attr:`dead`, and :meth:`close` (also as ``async with``). The caller decides the role
    (``controlling``): exactly one of the two peers controls."""

    def __init__(
        self,
        *,
        controlling: bool,
        stun_server: Addr | None = None,
        turn: TurnServer | None = None,
        port_mapping: bool = True,
        gateway_ip: str | None = None,
        gather_timeout: float = GATHER_TIMEOUT,
        relay_grace: float = RELAY_GRACE,
        consent_interval: float = CONSENT_INTERVAL,
        consent_lifetime: float = CONSENT_LIFETIME,
        use_ipv6: bool = True,
        host_addresses: tuple[str, ...] | None = None,
    ) -> None:
        self.options = IceOptions(
            stun_server=stun_server,
            turn=turn,
            port_mapping=port_mapping,
            gateway_ip=gateway_ip,
            gather_timeout=gather_timeout,
            relay_grace=relay_grace,
            consent_interval=consent_interval,
            consent_lifetime=consent_lifetime,
            use_ipv6=use_ipv6,
            host_addresses=host_addresses,
        )
        self._gatherer = Gatherer(self.options)
        self._conn = IceConnection(
            controlling=controlling,
            options=self.options,
            gather=self._gatherer.run,
            on_down=self._path_down,
        )
        self._local: IceDescription | None = None
        self._remote: IceDescription | None = None
        self._selected: SelectedPair | None = None
        self._dead: asyncio.Future[PathDown] | None = None
        self._connect_called = False
        self._closed = False

    @classmethod
    def from_options(cls, options: IceOptions, *, controlling: bool) -> IceAgent:
        return cls(
            controlling=controlling,
            **{f.name: getattr(options, f.name) for f in dataclasses.fields(options)},
        )

    def restarted(self, *, controlling: bool | None = None) -> IceAgent:
        """A new agent with the same options (an ICE restart: new credentials and sockets,
        e.g. to get back to a direct path); this one keeps working until it is closed."""
        role = self.controlling if controlling is None else controlling
        return IceAgent.from_options(self.options, controlling=role)

    # -- what it knows

    @property
    def connection(self) -> Connection:
        """The aioice connection (connected after :meth:`connect`)."""
        return self._conn

    @property
    def controlling(self) -> bool:
        return bool(self._conn.ice_controlling)  # a role conflict (RFC 8445 7.3.1.1) may flip it

    @property
    def local_description(self) -> IceDescription | None:
        return self._local

    @property
    def remote_description(self) -> IceDescription | None:
        return self._remote

    @property
    def gather_report(self) -> dict[str, str]:
        """Per source (host, stun, turn, port mapping): what it gave, or why nothing."""
        return dict(self._gatherer.report)

    @property
    def port_mappings(self) -> list[PortMapping]:
        """The router mappings this agent keeps (at most one)."""
        return [k.mapping for k in self._gatherer.kept if k.mapping is not None]

    @property
    def selected(self) -> SelectedPair | None:
        return self._selected

    @property
    def path(self) -> PathKind | None:
        return self._selected.path if self._selected else None

    @property
    def dead(self) -> asyncio.Future[PathDown]:
        """Resolves (never raises) when the path is gone: consent expired, the selected
        pair's socket or TURN allocation lost, or the agent closed."""
        if self._dead is None:
            self._dead = asyncio.get_running_loop().create_future()
        return self._dead

    @property
    def alive(self) -> bool:
        return self._selected is not None and not (self._dead is not None and self._dead.done())

    @property
    def consent_age(self) -> float | None:
        """Seconds since the peer last answered a check on the selected pair."""
        if self._selected is None:
            return None
        return time.monotonic() - self._conn.consent_at

    @property
    def dropped(self) -> int:
        """Datagrams dropped: from unknown addresses, malformed, or with nobody reading."""
        return self._conn.dropped

    # -- doing

    async def gather(self) -> IceDescription:
        """Gather local candidates (once; within ``gather_timeout``) and describe them."""
        if self._local is None:
            if self._closed:
                raise P2PError("this ICE agent is closed")
            await self._conn.gather_candidates()
            mapped = self._gatherer.port_mapped
            self._local = IceDescription(
                ufrag=self._conn.local_username,
                pwd=self._conn.local_password,
                candidates=tuple(
                    IceCandidate.from_aioice(c, port_mapped=any(c is m for m in mapped))
                    for c in self._conn.local_candidates
                ),
            )
            log.info("ICE gathered: %s", describe(self._local.candidates))
        return self._local

    async def connect(
        self, remote: IceDescription, *, timeout: float = CONNECT_TIMEOUT
    ) -> SelectedPair:
        """Check candidate pairs with the peer until one is nominated; classify it.

        Raises :class:`P2PError` if no pair works within ``timeout`` (the agent is then
        closed). Call once: an ICE restart is a new agent (:meth:`restarted`).
        """
        if self._connect_called or self._closed:
            raise P2PError("connect() can be called once per ICE agent: use restarted()")
        self._connect_called = True
        local = await self.gather()
        self._remote = remote
        conn = self._conn
        conn.remote_username, conn.remote_password = remote.ufrag, remote.pwd
        candidates, dropped = reachable_remote(remote.candidates, local.candidates)
        if dropped:
            log.warning("ignoring the peer's candidates that cannot be its: %s", "; ".join(dropped))
        for candidate in candidates:
            await conn.add_remote_candidate(candidate.to_aioice())
        await conn.add_remote_candidate(None)  # all were signalled at once: end-of-candidates
        conn.relay_grace_until = asyncio.get_running_loop().time() + self.options.relay_grace
        try:
            await asyncio.wait_for(conn.connect(), timeout)
        except (asyncio.TimeoutError, ConnectionError) as exc:
            message = self._failure(
                local, remote, timeout, timed_out=not isinstance(exc, ConnectionError)
            )
            await self.close()
            raise P2PError(message) from None
        pair = conn.selected_pair()
        assert pair is not None  # connect() returns only once a pair is nominated
        seen_as = await self._seen_as(pair)
        ours = IceCandidate.from_aioice(pair.local_candidate)
        announced = remote.find(pair.remote_addr)
        theirs = IceCandidate.from_aioice(
            pair.remote_candidate, port_mapped=announced is not None and announced.port_mapped
        )
        path = classify_path(ours, theirs, seen_as, local, remote)
        self._selected = SelectedPair(ours, theirs, seen_as, path)
        log.info("ICE connected, %s path: %s", path, self._selected.to_dict())
        return self._selected

    async def send(self, data: bytes) -> None:
        try:
            await self._conn.send(data)
        except ConnectionError as exc:
            raise P2PError(f"cannot send to the peer: {exc}") from None

    async def recv(self) -> bytes:
        try:
            return await self._conn.recv()
        except ConnectionError as exc:
            raise P2PError(f"cannot receive from the peer: {exc}") from None

    async def close(self) -> None:
        """Stop ICE (the TURN allocation is deleted) and remove the router's mapping."""
        if self._closed:
            return
        self._closed = True
        self._path_down("closed", "closed by this side")
        try:
            await asyncio.wait_for(asyncio.shield(self._conn.close()), CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            log.info("ICE close: the TURN server did not answer; its allocation will expire")
            self._conn.wake_receivers()
        await self._gatherer.release()

    async def __aenter__(self) -> IceAgent:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- internals

    def _path_down(self, reason: DownReason, detail: str) -> None:
        if not self.dead.done():
            self.dead.set_result(PathDown(reason, detail))
            if reason != "closed":
                log.warning("ICE path down (%s): %s", reason, detail)

    async def _seen_as(self, pair: CandidatePair) -> Addr | None:
        """Our address as the peer sees it: the XOR-MAPPED-ADDRESS of a check on the pair
        (aioice keeps those of its own checks to itself)."""
        password = self._conn.remote_password
        assert password is not None
        request = self._conn.build_request(pair, nominate=False)
        try:
            response, _ = await asyncio.wait_for(
                pair.protocol.request(
                    request, pair.remote_addr, integrity_key=password.encode("utf8")
                ),
                SEEN_AS_TIMEOUT,
            )
        except (stun.TransactionError, asyncio.TimeoutError):
            return None
        return mapped_address(response)

    def _failure(
        self, local: IceDescription, remote: IceDescription, timeout: float, *, timed_out: bool
    ) -> str:
        when = f" within {timeout:g} s" if timed_out else ""
        text = (
            f"ICE could not reach the peer: no candidate pair worked{when}. "
            f"Ours: {describe(local.candidates)}. The peer's: {describe(remote.candidates)}."
        )
        if not any(c.type == "relay" for c in (*local.candidates, *remote.candidates)):
            text += (
                " Neither side has a relayed candidate: give a TURN server (turn=...) so that"
                " peers behind symmetric NATs or firewalls can still connect."
            )
        failed = [
            f"{k}: {v}" for k, v in self._gatherer.report.items() if k in self._gatherer.failed
        ]
        if failed:
            text += " Gathering: " + "; ".join(failed) + "."
        return text
