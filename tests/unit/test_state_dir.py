"""natkit's state directory: one that cannot be written is a StateError naming it and what to
do, raised before anything is done (issue 14: ``HOME=/nonexistent``, a service user)."""

from __future__ import annotations

from pathlib import Path

import pytest

from natkit import state
from natkit.errors import EXIT_LOCAL, StateError


def test_a_directory_is_made_and_returned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATKIT_STATE_DIR", str(tmp_path / "a" / "b"))
    assert state.writable_state_dir() == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()


def test_one_under_a_file_is_a_state_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("NATKIT_STATE_DIR", str(tmp_path / "file" / "natkit"))
    with pytest.raises(StateError) as info:
        state.writable_state_dir()
    assert str(tmp_path / "file" / "natkit") in str(info.value)
    assert "NATKIT_STATE_DIR" in str(info.value)
    assert info.value.exit_code == EXIT_LOCAL
    with pytest.raises(StateError), state.locked():  # and so is every use of the records
        pass


def test_saving_records_where_it_cannot_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError, match="NATKIT_STATE_DIR"):
        state.save_records(tmp_path / "file" / "mappings.json", [])
