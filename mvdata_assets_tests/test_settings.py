"""Settings from the environment: defaults, values given, and a clear error naming a bad variable."""

from __future__ import annotations

import pytest

from mvdata_assets.settings import load_settings

COUNTS = ["MVDATA_DOWNLOAD_CONCURRENCY", "MVDATA_IMAGE_CONCURRENCY", "MVDATA_IMAGE_HOST_CONNECTIONS"]


@pytest.mark.parametrize("name", COUNTS)
@pytest.mark.parametrize("raw", ["0", "two", "1.5", "-2", "99999999999"])
def test_a_count_that_is_not_a_whole_number_in_range_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str
) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError, match=f"^{name} must be a whole number from 1 to 4096, got '{raw}'$"):
        load_settings()


DURATIONS = ["MVDATA_IMAGE_TIMEOUT_S", "MVDATA_WAREHOUSE_LOCK_TIMEOUT_S", "MVDATA_WANDB_API_TIMEOUT_S"]


@pytest.mark.parametrize("name", DURATIONS)
@pytest.mark.parametrize("raw", ["ten", "0", "-5", "nan", "inf", "1e9"])
def test_a_duration_that_is_not_a_positive_finite_number_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str
) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(
        ValueError, match=f"^{name} must be a number of seconds above 0 and at most 604800, got '{raw}'$"
    ):
        load_settings()


def test_durations_in_range_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVDATA_WANDB_API_TIMEOUT_S", "2.5")
    monkeypatch.setenv("MVDATA_WANDB_FRESHNESS_H", "48")
    settings = load_settings()
    assert (settings.api_timeout_s, settings.wandb_freshness_h) == (2.5, 48.0)
