"""Settings from the environment: defaults, values given, and a clear error naming a bad variable."""

from __future__ import annotations

import os

import pytest

from mvdata_assets.settings import load_settings


def test_worker_processes_default_to_the_cores_up_to_four(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MVDATA_DOWNLOAD_PROCESSES", raising=False)
    assert load_settings().download_processes == min(4, os.cpu_count() or 1)
    monkeypatch.setenv("MVDATA_DOWNLOAD_PROCESSES", " 3 ")
    assert load_settings().download_processes == 3


COUNTS = ["MVDATA_DOWNLOAD_PROCESSES", "MVDATA_DOWNLOAD_CONCURRENCY", "MVDATA_IMAGE_CONCURRENCY"]


@pytest.mark.parametrize("name", COUNTS)
@pytest.mark.parametrize("raw", ["0", "two", "1.5", "-2"])
def test_a_count_that_is_not_a_whole_number_of_at_least_one_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str
) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError, match=f"^{name} must be a whole number of at least 1, got '{raw}'$"):
        load_settings()


def test_a_duration_that_is_not_a_number_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVDATA_IMAGE_TIMEOUT_S", "ten")
    with pytest.raises(ValueError, match="^MVDATA_IMAGE_TIMEOUT_S must be a number of seconds, got 'ten'$"):
        load_settings()
