"""The demo's inputs: the same bytes every time, so that a second `mvdata demo` finds its files verified."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mvdata_assets import demo
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


def test_a_writer_that_fails_stops_the_others_and_leaves_no_partial_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partial set of runs would be taken for the demo's own by the next `mvdata demo`, which writes none then."""
    monkeypatch.setattr(demo, "DEMO_RUNS", {"no-such-run": (1e-3, "clip", 10, None), **demo.DEMO_RUNS})
    with pytest.raises(RuntimeError, match="writing demo run no-such-run failed with exit code 1"):
        demo.write_demo_runs(tmp_path / "runs")  # its writer knows no such run: it exits at once
    assert not (tmp_path / "runs" / "wandb").exists()
    assert not _demo_writers()  # none left behind: killed, and waited for


def _demo_writers() -> list[int]:
    """This process's children that write demo runs (`python -m mvdata_assets.demo NAME FOLDER`)."""
    writers = []
    for pid, (ppid, _, _) in demo.proc_table().items():
        try:
            if ppid == os.getpid() and b"mvdata_assets.demo" in Path(f"/proc/{pid}/cmdline").read_bytes():
                writers.append(pid)
        except OSError:  # it ended meanwhile
            continue
    return writers
