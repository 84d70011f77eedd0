"""Fixtures: the network guard (always on) and the NAT lab (real namespaces, real miniupnpd)."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

GUARD_DIR = Path(__file__).parent / "netguard"
sys.path.insert(0, str(GUARD_DIR))
import natkit_netguard  # noqa: E402

# Children (natkit CLI runs, lab servers) get the guard too, and report to the same log.
_fd, _guard_log_path = tempfile.mkstemp(prefix="natkit-netguard-", suffix=".log")
os.close(_fd)
os.environ["NATKIT_NETGUARD_LOG"] = _guard_log_path
os.environ["NATKIT_NETGUARD_HOST_NETNS"] = str(os.stat("/proc/self/ns/net").st_ino)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(GUARD_DIR), os.environ.get("PYTHONPATH", "")) if p
)
natkit_netguard.LOG = _guard_log_path
natkit_netguard.install()

from natkit.errors import LabError  # noqa: E402
from natkit.lab import Lab, LabConfig, netns  # noqa: E402
from natkit.lab.config import PORTMAP_PROTOCOLS, PortmapProtocol, parse_nat  # noqa: E402

T = TypeVar("T")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Lab names: change the prefix to run two test sessions side by side without collisions.
LAB_PREFIX = os.environ.get("NATKIT_TEST_LAB", "nkt")


@pytest.fixture(autouse=True)
def network_guard(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Fail any test during which a socket reached beyond loopback and the lab. A test
    marked ``trips_network_guard`` must trip it instead; it gets the guard's lines."""
    log = Path(natkit_netguard.LOG)
    start = log.stat().st_size
    tripped: list[str] = []
    yield tripped
    with open(log) as f:
        f.seek(start)
        new = f.read().strip()
    tripped.extend(new.splitlines())
    if request.node.get_closest_marker("trips_network_guard"):
        if not new:
            pytest.fail("the network guard was expected to trip, and did not")
    elif new and not os.environ.get("NATKIT_NETGUARD_EXPECT"):
        pytest.fail(f"network guard tripped:\n{new}")


def _build(cfg: LabConfig) -> Lab:
    try:
        return Lab.create(cfg, replace=True)
    except LabError as exc:
        # In CI a missing lab capability is a failure, never a silent skip.
        if IN_CI or os.geteuid() == 0:
            pytest.fail(f"cannot build the NAT lab: {exc}")
        pytest.skip(f"NAT lab unavailable (needs root): {exc}")


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The default lab: UPnP + NAT-PMP + PCP, port-keeping NAT, coturn. Shared; don't break it."""
    the_lab = _build(LabConfig(name=LAB_PREFIX))
    yield the_lab
    the_lab.down()


@pytest.fixture
def make_lab() -> Iterator[Callable[..., Lab]]:
    """Build a private lab with other settings (named PREFIX-name); removed after the test.

    ``second_lan`` adds lan2 behind rtr2, whose behaviour and port mapping are ``nat2`` and
    ``portmap2`` (default: eim, all three protocols)."""
    made: list[Lab] = []

    def make(
        name: str,
        portmap: frozenset[PortmapProtocol] | None = None,
        nat: str = "eim",
        *,
        coturn: bool = True,
        upstream_nat: bool = False,
        second_lan: bool = False,
        nat2: str = "eim",
        portmap2: frozenset[PortmapProtocol] | None = None,
    ) -> Lab:
        cfg = LabConfig(
            name=f"{LAB_PREFIX}-{name}",
            portmap=frozenset(PORTMAP_PROTOCOLS) if portmap is None else portmap,
            nat=parse_nat(nat),
            coturn=coturn,
            upstream_nat=upstream_nat,
            second_lan=second_lan,
            nat2=parse_nat(nat2),
            portmap2=frozenset(PORTMAP_PROTOCOLS) if portmap2 is None else portmap2,
        )
        made.append(_build(cfg))
        return made[-1]

    yield make
    for the_lab in made:
        the_lab.down()


def run_in_node(the_lab: Lab, node: str, coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async function on a lab node (a thread inside that node's namespace)."""
    return netns.run_in(the_lab.netns(node), coro_fn)


def call_in_node(the_lab: Lab, node: str, fn: Callable[[], T]) -> T:
    return netns.call_in(the_lab.netns(node), fn)


@pytest.fixture
def in_node() -> Callable[..., Any]:
    return run_in_node
