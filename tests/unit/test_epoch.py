"""EpochTracker: noticing a gateway reboot from its epoch (RFC 6886 3.6, RFC 6887 8.5)."""

from __future__ import annotations

import pytest

from natkit.portmap.epoch import EpochTracker


def tracker(epoch: int = 1000, now: float = 500.0) -> EpochTracker:
    t = EpochTracker()
    assert t.update(epoch, now) is False
    return t


def test_first_update_is_never_a_reboot() -> None:
    t = EpochTracker()
    assert (t.server_epoch, t.client_time) == (None, None)
    assert t.update(0, 0.0) is False
    assert (t.server_epoch, t.client_time) == (0, 0.0)


@pytest.mark.parametrize("epoch", [0, 1, 5, 10**6, 0xFFFFFFFF])
def test_first_update_any_value(epoch: int) -> None:
    assert EpochTracker().update(epoch, 12345.6) is False


def test_normal_progress() -> None:
    t = tracker(1000, 500.0)
    for step in range(1, 50):
        assert t.update(1000 + 60 * step, 500.0 + 60 * step) is False
    assert (t.server_epoch, t.client_time) == (1000 + 60 * 49, 500.0 + 60 * 49)


def test_repeated_reply_same_instant() -> None:
    t = tracker()
    assert t.update(1000, 500.0) is False
    assert t.update(1000, 500.0) is False


@pytest.mark.parametrize("new_epoch", [998, 500, 3, 0])
def test_backwards_by_more_than_one_second(new_epoch: int) -> None:
    t = tracker(1000, 500.0)
    assert t.update(new_epoch, 500.5) is True


def test_backwards_by_one_second_is_reordering() -> None:
    # RFC 6887 8.5: going back by up to one second is tolerated (packet reordering).
    t = tracker(1000, 500.0)
    assert t.update(999, 500.1) is False


def test_reboot_then_restart_from_zero() -> None:
    t = tracker(86400, 0.0)
    assert t.update(86460, 60.0) is False
    assert t.update(5, 120.0) is True  # rebooted: epoch restarted
    assert (t.server_epoch, t.client_time) == (5, 120.0)  # the new epoch is the baseline
    assert t.update(65, 180.0) is False


def test_server_epoch_stalls_while_client_time_runs() -> None:
    # Rebooted about when we last asked: its epoch barely moved while 100 s went by here.
    t = tracker(1000, 0.0)
    assert t.update(1005, 100.0) is True


def test_server_epoch_runs_much_faster_than_client() -> None:
    t = tracker(1000, 0.0)
    assert t.update(1200, 10.0) is True


@pytest.mark.parametrize(
    ("server_delta", "client_delta"),
    [
        (2, 0.5),
        (0, 1.5),
        (1, 0.0),
        (61, 60.0),
        (58, 60.0),
        (3600, 3590.0),
        (3590, 3600.0),
        (3, 1.0),  # whole-second epoch vs fractional client clock
    ],
)
def test_small_jitter_is_not_a_reboot(server_delta: int, client_delta: float) -> None:
    t = tracker(1000, 200.0)
    assert t.update(1000 + server_delta, 200.0 + client_delta) is False


def test_threshold_server_slow() -> None:
    # client_delta = 32: reboot iff server_delta + 2 < 32 - 32/16 = 30
    assert tracker(1000, 0.0).update(1000 + 28, 32.0) is False
    assert tracker(1000, 0.0).update(1000 + 27, 32.0) is True


def test_threshold_server_fast() -> None:
    # server_delta = 32: reboot iff client_delta + 2 < 32 - 32/16 = 30
    assert tracker(1000, 0.0).update(1000 + 32, 28.0) is False
    assert tracker(1000, 0.0).update(1000 + 32, 27.9) is True


def test_state_updated_after_every_reply() -> None:
    t = tracker(1000, 0.0)
    t.update(1010, 10.0)
    assert (t.server_epoch, t.client_time) == (1010, 10.0)
    t.update(2, 11.0)
    assert (t.server_epoch, t.client_time) == (2, 11.0)
