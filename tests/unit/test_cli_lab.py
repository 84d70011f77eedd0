"""``natkit lab`` failures under --json, rootless (nothing is built): one ``error`` line
with the documented exit code, never plain text alone."""

from __future__ import annotations

from natkit.errors import EXIT_LOCAL, EXIT_USAGE
from tests.unit.cli_run import failed_json, natkit


def test_a_bad_portmap_is_a_usage_error_line() -> None:
    proc = natkit("lab", "up", "--name", "nkt-never", "--portmap", "carrier-pigeon", "--json")
    error = failed_json(proc, EXIT_USAGE)
    assert "carrier-pigeon" in error["message"] and "carrier-pigeon" in proc.stderr


def test_second_router_options_without_second_lan_are_a_usage_error_line() -> None:
    proc = natkit("lab", "up", "--name", "nkt-never", "--nat2", "random", "--json")
    assert "--second-lan" in failed_json(proc, EXIT_USAGE)["message"]


def test_status_of_an_absent_lab_is_a_lab_error_line() -> None:
    proc = natkit("lab", "status", "--name", "nkt-absent-lab", "--json")
    error = failed_json(proc, EXIT_LOCAL)
    assert error["error"] == "LabError" and "nkt-absent-lab" in error["message"]
