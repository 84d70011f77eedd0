"""The lab's ``system_uptime`` switch: what miniupnpd is told, and that a lab's state keeps it."""

from __future__ import annotations

import pytest

from natkit.lab.config import LabConfig, miniupnpd_conf


@pytest.mark.parametrize(("on", "line"), [(True, "system_uptime=yes"), (False, "system_uptime=no")])
def test_miniupnpd_is_told_where_its_epoch_starts(on: bool, line: str) -> None:
    conf = miniupnpd_conf(LabConfig(name="t", system_uptime=on)).splitlines()
    assert [x for x in conf if x.startswith("system_uptime=")] == [line]


def test_system_uptime_survives_the_state_file() -> None:
    cfg = LabConfig(name="t", system_uptime=True)
    assert LabConfig.from_json(cfg.to_json()).system_uptime is True
    old_state = {k: v for k, v in cfg.to_json().items() if k != "system_uptime"}
    assert LabConfig.from_json(old_state).system_uptime is False  # labs made before it
