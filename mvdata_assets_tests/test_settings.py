"""Settings from the environment: defaults, values given, and a clear error naming a bad variable."""

from __future__ import annotations

import re

import pytest

from mvdata_assets.settings import load_settings

COUNTS = [
    "MVDATA_DOWNLOAD_CONCURRENCY",
    "MVDATA_IMAGE_CONCURRENCY",
    "MVDATA_IMAGE_HOST_CONNECTIONS",
    "MVDATA_EXTRACT_MAX_RATIO",
    "MVDATA_WANDB_API_CONCURRENCY",
]


@pytest.mark.parametrize("name", COUNTS)
@pytest.mark.parametrize("raw", ["0", "two", "1.5", "-2", "99999999999"])
def test_a_count_that_is_not_a_whole_number_in_range_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str
) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError, match=f"^{name} must be a whole number from 1 to 4096, got '{raw}'$"):
        load_settings()


DURATIONS = [
    "MVDATA_IMAGE_TIMEOUT_S",
    "MVDATA_WAREHOUSE_LOCK_TIMEOUT_S",
    "MVDATA_WANDB_API_TIMEOUT_S",
    "MVDATA_WANDB_RUNNING_WINDOW_S",
]


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


# settings with a rule of their own: the sensor interval is whole seconds (Dagster's minimum_interval_seconds: 0.5
# would become 0, a sensor ticking without pause), the freshness policy is in hours up to a year
OWN_RULES = [
    *(
        ("MVDATA_WANDB_SENSOR_INTERVAL_S", raw, "a whole number from 1 to 604800")
        for raw in ["0.5", "0", "soon", "604801"]
    ),
    *(
        ("MVDATA_WANDB_FRESHNESS_H", raw, "a number of hours above 0 and at most 8760")
        for raw in ["0", "8761", "a day"]
    ),
]


@pytest.mark.parametrize(("name", "raw", "rule"), OWN_RULES)
def test_a_setting_with_a_rule_of_its_own_says_it(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str, rule: str
) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError, match=re.escape(f"{name} must be {rule}, got '{raw}'")):
        load_settings()


@pytest.mark.parametrize("name", ["MVDATA_WANDB_TRACKING", "MVDATA_WANDB_SENSOR"])
def test_a_switch_that_is_not_on_or_off_is_refused(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "maybe")
    with pytest.raises(ValueError, match=f"^{name} must be on or off, got 'maybe'$"):
        load_settings()


def test_image_parts_are_off_at_0_and_on_from_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVDATA_IMAGE_PART_SHARDS", "0")
    assert load_settings().image_part_shards == 0
    monkeypatch.setenv("MVDATA_IMAGE_PART_SHARDS", "4")
    assert load_settings().image_part_shards == 4
    monkeypatch.setenv("MVDATA_IMAGE_PART_SHARDS", "-1")
    with pytest.raises(ValueError, match="^MVDATA_IMAGE_PART_SHARDS must be a whole number from 0 to 4096, got '-1'$"):
        load_settings()


def test_a_sensor_interval_of_whole_seconds_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVDATA_WANDB_SENSOR_INTERVAL_S", "5")
    assert load_settings().sensor_interval_s == 5


@pytest.mark.parametrize("entry", ["vqa-sweep", "mvlm/", "/vqa-sweep", "mvlm/vqa/sweep"])
def test_a_wandb_project_that_is_not_entity_slash_project_is_refused(
    monkeypatch: pytest.MonkeyPatch, entry: str
) -> None:
    monkeypatch.setenv("MVDATA_WANDB_PROJECTS", f"mvlm/pretrain,{entry}")
    with pytest.raises(ValueError, match=f"^MVDATA_WANDB_PROJECTS: {re.escape(repr(entry))} is not entity/project$"):
        load_settings()


def test_wandb_projects_are_taken_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVDATA_WANDB_PROJECTS", "mvlm/pretrain, mvlm/vqa-sweep")
    assert load_settings().wandb_projects == ("mvlm/pretrain", "mvlm/vqa-sweep")
