"""The routing table on macOS and Windows, from recorded outputs (see
``routes_samples/README.md`` for what each sample is modelled on), and the reader that
picks the platform and runs its command within bounds. Runs on Linux: ``sys.platform``
is set to the platform under test, the command runner answers with the recorded output,
and opening anything under /proc fails the test."""

from __future__ import annotations

import builtins
import ipaddress
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natkit.errors import DiscoveryError
from natkit.net import routes
from natkit.net.routes_darwin import parse_bsd_destination, parse_netstat, parse_route_get
from natkit.net.routes_windows import parse_ipconfig, parse_route_print

SAMPLES = Path(__file__).parent / "routes_samples"


def sample(name: str) -> str:
    return (SAMPLES / name).read_bytes().decode("utf-8", "replace")


def net(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


# ---- macOS ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "flags", "expected"),
    [
        ("default", "UGScg", "0.0.0.0/0"),
        ("192.168.1", "UCS", "192.168.1.0/24"),
        ("127", "UCS", "127.0.0.0/8"),
        ("169.254", "UCS", "169.254.0.0/16"),
        ("10.8.0/24", "UGSc", "10.8.0.0/24"),
        ("172.16.42/24", "UC", "172.16.42.0/24"),  # class B: a /24 is named
        ("172.16.42", "UC", "172.16.42.0/24"),  # (never printed so; the octets say /24)
        ("224.0.0/4", "UmCS", "224.0.0.0/4"),
        ("192.168.1.37/32", "UCS", "192.168.1.37/32"),
        ("192.168.1.1", "UHLWIir", "192.168.1.1/32"),
    ],
)
def test_bsd_destinations(text: str, flags: str, expected: str) -> None:
    assert parse_bsd_destination(text, flags) == net(expected)


@pytest.mark.parametrize("text", ["fe80::%utun0", "link#4", "1.2.3.4.5", "10/x", "300.1"])
def test_bsd_destinations_that_are_not_ipv4_networks(text: str) -> None:
    assert parse_bsd_destination(text, "U") is None


def test_macos_netstat_prefers_the_unscoped_default_and_finds_the_lan() -> None:
    table = parse_netstat(sample("darwin_netstat_rn_14.txt"))
    assert routes.default_gateway(table) == "192.168.1.1"
    defaults = [r for r in table if r.destination.prefixlen == 0]
    assert [(str(r.gateway), r.iface) for r in defaults] == [
        ("10.8.0.1", "utun4"),  # listed first, but interface-scoped (I): not the one in use
        ("192.168.1.1", "en0"),
    ]
    # Host routes for our own address and the ARP entries are not the LAN.
    assert routes.lan_network("192.168.1.37", table) == net("192.168.1.0/24")
    assert routes.lan_network("169.254.3.4", table) == net("169.254.0.0/16")
    # The IPv6 table that follows is not read.
    assert all(isinstance(r.destination, ipaddress.IPv4Network) for r in table)
    assert not [r for r in table if r.iface == "utun0"]


def test_macos_1013_netstat_with_refs_and_use_columns() -> None:
    table = parse_netstat(sample("darwin_netstat_rn_1013.txt"))
    assert routes.default_gateway(table) == "10.0.1.1"
    assert routes.lan_network("10.0.1.23", table) == net("10.0.1.0/24")
    assert next(r for r in table if r.iface == "vmnet8").destination == net("172.16.42.0/24")


def test_macos_route_get_default() -> None:
    (route,) = parse_route_get(sample("darwin_route_get_default.txt"))
    assert (str(route.gateway), route.iface, route.destination) == (
        "192.168.1.1",
        "en0",
        net("0.0.0.0/0"),
    )
    # No default route: route(8) prints only an error (on stderr), or a non-address gateway.
    assert parse_route_get("") == []
    assert parse_route_get("destination: default\n    gateway: utun3\n") == []
    assert (
        parse_route_get("   route to: 10.0.0.1\ndestination: 10.0.0.0\ngateway: 10.0.0.1\n") == []
    )


# ---- Windows -------------------------------------------------------------------------------


def test_windows_route_print_english() -> None:
    table = parse_route_print(sample("windows_route_print_en.txt"))
    # The LAN router, not the VPN's on-link default nor its /1 halves, is the gateway.
    assert routes.default_gateway(table) == "192.168.1.1"
    assert routes.lan_network("192.168.1.37", table) == net("192.168.1.0/24")
    assert routes.lan_network("10.8.0.6", table) == net("10.8.0.4/30")
    half = next(r for r in table if r.destination == net("128.0.0.0/1"))
    assert (str(half.gateway), half.iface, half.metric) == ("10.8.0.5", "10.8.0.6", 35)
    # The persistent routes are configuration, not the active table.
    assert not [r for r in table if r.destination == net("10.20.0.0/16")]
    assert len(table) == 16


def test_windows_route_print_german_code_page_850() -> None:
    raw = (SAMPLES / "windows_route_print_de.txt").read_bytes()
    assert "Ständige".encode("cp850") in raw  # the sample is in the console's code page
    table = parse_route_print(raw.decode("utf-8", "replace"))
    assert routes.default_gateway(table) == "192.168.178.1"
    assert routes.lan_network("192.168.178.42", table) == net("192.168.178.0/24")
    on_link = [r for r in table if r.gateway is None]
    assert len(on_link) == len(table) - 1 == 10


@pytest.mark.parametrize("name", ["windows_ipconfig_en.txt", "windows_ipconfig_de.txt"])
def test_windows_ipconfig(name: str) -> None:
    table = parse_ipconfig(sample(name))
    assert routes.default_gateway(table) == "192.168.178.1"
    assert routes.lan_network("192.168.178.42", table) == net("192.168.178.0/24")
    if name.endswith("_en.txt"):  # the WSL switch: a network, no gateway
        assert routes.lan_network("172.29.96.1", table) == net("172.29.96.0/20")
        assert len([r for r in table if r.gateway is not None]) == 1


@pytest.mark.parametrize(
    "line",
    [
        "  0.0.0.0  0.0.0.0  192.168.1.1  192.168.1.37",  # no metric
        "  0.0.0.0  255.0.255.0  On-link  192.168.1.37  25",  # not a netmask
        "  0.0.0.0  0.0.0.0  192.168.1.1  Default",  # persistent route
        "  1    331 ::1/128                  On-link",  # the IPv6 table
        " 14...3c 7c 3f 1a 2b 4d ......Realtek PCIe GbE Family Controller",
    ],
)
def test_windows_route_print_skips_other_shapes(line: str) -> None:
    assert parse_route_print(line) == []


# ---- the reader ----------------------------------------------------------------------------


@pytest.fixture
def no_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any open() of a /proc path fails the test: these platforms have none."""
    real_open = builtins.open

    def guarded(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file).startswith("/proc"):
            pytest.fail(f"{file} was opened on a platform that has no /proc")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)


def fake_commands(
    monkeypatch: pytest.MonkeyPatch, answers: dict[str, str | DiscoveryError]
) -> list[list[str]]:
    """Answer each command (by its program's base name) with a recorded output."""
    ran: list[list[str]] = []

    def run(argv: list[str], timeout: float = routes.COMMAND_TIMEOUT) -> str:
        ran.append(argv)
        answer = answers[Path(argv[0].replace("\\", "/")).name]
        if isinstance(answer, DiscoveryError):
            raise answer
        return answer

    monkeypatch.setattr(routes, "run_command", run)
    return ran


@pytest.mark.usefixtures("no_proc")
def test_macos_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    ran = fake_commands(monkeypatch, {"netstat": sample("darwin_netstat_rn_14.txt")})
    assert routes.default_gateway() == "192.168.1.1"
    assert routes.lan_network("192.168.1.37") == net("192.168.1.0/24")
    assert ran[0][0] in ("/usr/sbin/netstat", "/usr/bin/netstat")  # macOS, FreeBSD
    assert ran[0][1:] == ["-rn", "-f", "inet"]


@pytest.mark.usefixtures("no_proc")
def test_macos_reader_asks_route_get_when_netstat_shows_no_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    no_default = "\n".join(
        line
        for line in sample("darwin_netstat_rn_14.txt").splitlines()
        if not line.startswith("default")
    )
    ran = fake_commands(
        monkeypatch,
        {"netstat": no_default, "route": sample("darwin_route_get_default.txt")},
    )
    assert routes.default_gateway() == "192.168.1.1"
    assert ran[1] == ["/sbin/route", "-n", "get", "default"]
    # route(8) exits 1 when there is no default: the netstat table still gives the LAN.
    fake_commands(
        monkeypatch,
        {"netstat": no_default, "route": DiscoveryError("route exited with status 1")},
    )
    table = routes.read_routes()
    assert routes.lan_network("192.168.1.37", table) == net("192.168.1.0/24")
    with pytest.raises(DiscoveryError, match=r"no IPv4 default gateway.*--gateway IP"):
        routes.default_gateway(table)


@pytest.mark.usefixtures("no_proc")
def test_macos_reader_without_netstat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    no_netstat = DiscoveryError("cannot run /usr/sbin/netstat to read the routing table")
    fake_commands(
        monkeypatch, {"netstat": no_netstat, "route": sample("darwin_route_get_default.txt")}
    )
    assert routes.default_gateway() == "192.168.1.1"
    fake_commands(monkeypatch, {"netstat": no_netstat, "route": DiscoveryError("route: status 1")})
    with pytest.raises(DiscoveryError, match=r"\(cannot run /usr/sbin/netstat"):
        routes.default_gateway()


@pytest.mark.usefixtures("no_proc")
def test_windows_reader_falls_back_on_ipconfig(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("SYSTEMROOT", r"C:\Windows")
    ran = fake_commands(monkeypatch, {"route.exe": sample("windows_route_print_en.txt")})
    assert routes.default_gateway() == "192.168.1.1"
    assert ran[0][0].startswith("C:\\Windows") and ran[0][0].endswith("route.exe")
    assert ran[0][1:] == ["print", "-4"]
    fake_commands(
        monkeypatch,
        {
            "route.exe": DiscoveryError("cannot run route.exe"),
            "ipconfig.exe": sample("windows_ipconfig_de.txt"),
        },
    )
    assert routes.default_gateway() == "192.168.178.1"


@pytest.mark.usefixtures("no_proc")
@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_a_table_that_cannot_be_read_is_named_in_the_error(
    monkeypatch: pytest.MonkeyPatch, platform: str
) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    failure = DiscoveryError("cannot run the command to read the routing table: [Errno 2]")
    fake_commands(
        monkeypatch,
        {n: failure for n in ("netstat", "route", "route.exe", "ipconfig.exe")},
    )
    assert routes.read_routes() == []
    with pytest.raises(DiscoveryError, match=r"no IPv4 default gateway \(cannot run .*--gateway"):
        routes.default_gateway()
    # Without a table, the LAN is guessed as the address's /24.
    assert routes.lan_network("10.1.2.3") == net("10.1.2.0/24")


def test_linux_reader_reads_proc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t014DA8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    )
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(routes, "ROUTE_FILES", ("/nonexistent/route", str(table)))
    assert routes.default_gateway() == "192.168.77.1"
    monkeypatch.setattr(routes, "ROUTE_FILES", ("/nonexistent/route",))
    with pytest.raises(DiscoveryError, match="cannot read the routing table"):
        routes.default_gateway()


# ---- running a command within bounds (real processes, no network) -----------------------


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_run_command_returns_the_output() -> None:
    assert routes.run_command(_python("print('default 192.168.1.1 UGScg en0')")).split() == [
        "default",
        "192.168.1.1",
        "UGScg",
        "en0",
    ]


@pytest.mark.parametrize(
    ("make_argv", "message"),
    [
        (lambda: _python("import sys; sys.stdout.write('x' * (2 << 20))"), "more than"),
        (lambda: _python("import time; time.sleep(60)"), "ran longer than"),
        (lambda: _python("raise SystemExit(3)"), "exited with status 3"),
        (lambda: ["/nonexistent/netstat", "-rn"], "cannot run /nonexistent/netstat"),
    ],
)
def test_run_command_bounds_and_failures(make_argv: Callable[[], list[str]], message: str) -> None:
    with pytest.raises(DiscoveryError, match=message):
        routes.run_command(make_argv(), timeout=0.5)


# ---- no text makes a parser fail -----------------------------------------------------------

_TOKENS = sorted(
    {
        token
        for name in (
            "darwin_netstat_rn_14.txt",
            "darwin_route_get_default.txt",
            "windows_route_print_en.txt",
            "windows_ipconfig_en.txt",
        )
        for token in sample(name).split()
    }
    | {"0.0.0.0", "255.255.255.255", "/33", "999.1.1.1", "::", ":", " : ", "link#4", "UGHI"}
)


@given(
    st.one_of(
        st.text(),
        st.lists(
            st.lists(st.sampled_from(_TOKENS), max_size=8).map(lambda t: "  ".join(t)),
            max_size=30,
        ).map("\n".join),
    )
)
def test_the_parsers_take_any_text(text: str) -> None:
    for parse in (parse_netstat, parse_route_get, parse_route_print, parse_ipconfig):
        for route in parse(text):
            assert isinstance(route.destination, ipaddress.IPv4Network)
            assert route.gateway is None or isinstance(route.gateway, ipaddress.IPv4Address)
