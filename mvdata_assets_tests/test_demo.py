"""The demo's inputs: the same bytes every time, so that a second `mvdata demo` finds its files verified."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mvdata_assets.demo import write_demo_files


def test_the_demo_files_are_the_same_bytes_an_hour_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base_url = "http://127.0.0.1:47817"
    first = write_demo_files(tmp_path / "a", base_url)
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 3600)  # what archives stamp with the current time moves on
    again = write_demo_files(tmp_path / "b", base_url)
    assert {name: data == again[name] for name, data in first.items()} == dict.fromkeys(first, True)
    assert {name: (tmp_path / "b" / name).read_bytes() == data for name, data in again.items()} == dict.fromkeys(
        first, True
    )
