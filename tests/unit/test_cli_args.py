"""Arguments refused before any traffic, as one usage error (exit 2), an ``error`` line
under --json, never a DNS lookup of a typo nor a ValueError reported as such."""

from __future__ import annotations

import pytest

from natkit.errors import EXIT_USAGE
from tests.unit.cli_run import failed_json, natkit


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("map", "add", "8080", "--gateway", "nonsense..host"), "'nonsense..host' is not an IP"),
        (("map", "list", "--gateway", "999.1.1.1"), "'999.1.1.1' is not an IP address"),
        (("map", "delete", "8080", "--gateway", ""), "'' is not an IP address"),
        (("check", "--gateway", "router.lan"), "'router.lan' is not an IP address"),
        (("check", "--stun", "bad:host:name:x"), "bad STUN server 'bad:host:name:x'"),
        (("check", "--relay", "127.0.0.1:1"), "--relay needs --token"),
        # Access control: checked before the relay is contacted (127.0.0.1:1 never answers).
        (("expose", "80", "--allow", "10.0.0.0/8"), "enforced by a relay: give --relay"),
        (
            ("expose", "80", "--relay", "127.0.0.1:1", "--token", "t", "--allow", "10.0.0.1/8"),
            "did you mean 10.0.0.0/8",
        ),
        (
            ("expose", "80", "--relay", "127.0.0.1:1", "--token", "t", "--deny", "2001:db8::/129"),
            "'2001:db8::/129' is not an IPv4 or IPv6 network",
        ),
        (
            ("expose", "80", "--relay", "127.0.0.1:1", "--token", "t", "--basic-auth", "u:p"),
            "basic auth needs an HTTP tunnel (--http)",
        ),
        (
            (
                "expose",
                "80",
                "--relay",
                "127.0.0.1:1",
                "--token",
                "t",
                "--http",
                "--basic-auth",
                "nocolon",
            ),
            "basic auth must be USER:PASS",
        ),
        (
            ("expose", "80", "--relay", "127.0.0.1:1", "--token", "t", "--rate-limit", "5/day"),
            "is not N/s, N/min or N/h",
        ),
        (
            (
                "expose",
                "80",
                "--relay",
                "127.0.0.1:1",
                "--token",
                "t",
                "--via",
                "upnp",
                "--allow",
                "10.0.0.0/8",
            ),
            "use --via relay",
        ),
    ],
)
def test_refused_before_any_traffic(args: tuple[str, ...], said: str) -> None:
    for extra in ((), ("--json",)):
        proc = natkit(*args, *extra, NATKIT_TOKEN="")
        assert proc.returncode == EXIT_USAGE and said in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and "Usage: natkit " in proc.stderr
        if extra:
            assert said in failed_json(proc, EXIT_USAGE)["message"]
        else:
            assert not proc.stdout
