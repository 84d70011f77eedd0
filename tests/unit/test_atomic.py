"""natkit.atomic.write_atomic: whole files only, and concurrent writers do not trip each other."""

from __future__ import annotations

import threading
from pathlib import Path

from natkit.atomic import write_atomic


def test_concurrent_writers_each_replace_the_file_whole(tmp_path: Path) -> None:
    # With one fixed temporary name (the code before), one writer renamed the other's
    # temporary file away and the other's rename raised FileNotFoundError.
    path = tmp_path / "known_relays.json"
    errors: list[BaseException] = []

    def writer(tag: str) -> None:
        try:
            for i in range(300):
                write_atomic(path, f"{tag}{i:04d}" * 50)
        except BaseException as exc:  # collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    text = path.read_text()
    assert len(text) == 250 and text == text[:5] * 50  # one writer's whole content
    assert [p.name for p in tmp_path.iterdir()] == ["known_relays.json"]  # no leftovers
