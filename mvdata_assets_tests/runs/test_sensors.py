"""The offline-runs sensor: one request per new or changed run file, a skip with a reason otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import DagsterInstance, SensorResult, SkipReason, build_sensor_context

from mvdata_assets.definitions import defs
from mvdata_assets.resources import WandbResource
from mvdata_assets.runs.sensors import wandb_offline_runs
from mvdata_assets.settings import load_settings
from mvdata_assets_tests.runs.conftest import LEGACY_FIXTURE, copy_tree_writable

RUN_DIR = "offline-run-20210216_154407-g9dvvkua"


@pytest.fixture
def runs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "runs"
    folder.mkdir()
    monkeypatch.setenv("MVDATA_WANDB_OFFLINE_DIRS", str(folder))
    return folder


def _tick(instance: DagsterInstance, cursor: str | None) -> SensorResult | SkipReason:
    resources = {"wandb": WandbResource.from_settings(load_settings())}
    return wandb_offline_runs(build_sensor_context(instance=instance, cursor=cursor, resources=resources))


def test_new_run_then_nothing_then_growth(runs_dir: Path) -> None:
    instance = DagsterInstance.ephemeral()
    empty = _tick(instance, None)
    assert isinstance(empty, SkipReason) and "0 run files" in empty.skip_message

    run = copy_tree_writable(
        LEGACY_FIXTURE / "offline-run-20210216_154407-g9dvvkua", runs_dir / "offline-run-a-g9dvvkua"
    )
    first = _tick(instance, None)
    assert isinstance(first, SensorResult)
    [request] = first.run_requests
    assert request.tags["mvdata/new_run_files"] == "1"
    assert request.asset_selection is None  # the sensor's own target applies: the W&B group
    targets = wandb_offline_runs.asset_selection.resolve(defs.resolve_asset_graph())
    assert {k.to_user_string() for k in targets} >= {"wandb/runs", "wandb/history", "wandb/exports/runs_history"}
    assert not any(k.to_user_string().startswith("datasets/") for k in targets)

    same = _tick(instance, first.cursor)
    assert isinstance(same, SkipReason) and "none new or changed" in same.skip_message

    wandb_file = next(run.glob("run-*.wandb"))
    wandb_file.chmod(0o644)
    with wandb_file.open("ab") as f:  # a run still training: its file grows
        f.write(b"\0" * 100)
    grown = _tick(instance, first.cursor)
    assert isinstance(grown, SensorResult)
    [again] = grown.run_requests
    assert again.tags["mvdata/changed_run_files"] == "1"
    assert again.run_key != request.run_key  # a new change launches again ...
    assert _tick(instance, first.cursor).run_requests[0].run_key == again.run_key  # ... and the same change once


def test_dagster_sensor_preview_from_the_cli(runs_dir: Path, tmp_path: Path) -> None:
    copy_tree_writable(LEGACY_FIXTURE / RUN_DIR, runs_dir / "offline-run-a-g9dvvkua")
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dh"), "MVDATA_HOME": str(tmp_path / "home")}
    (tmp_path / "dh").mkdir()
    dagster = shutil.which("dagster", path=str(Path(sys.executable).parent))
    command = [dagster, "sensor", "preview", "-m", "mvdata_assets.definitions", "wandb_offline_runs"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Sensor returning run requests for 1 run(s)" in done.stdout, done.stdout[-2000:]
    assert "1 new and 0 changed run files" in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("settings", "offline", "api"),
    [
        ({"MVDATA_WANDB_OFFLINE_DIRS": "/runs"}, "RUNNING", "STOPPED"),
        ({"MVDATA_WANDB_PROJECTS": "team/vlm"}, "STOPPED", "RUNNING"),
        ({"MVDATA_WANDB_OFFLINE_DIRS": "/runs", "MVDATA_WANDB_PROJECTS": "team/vlm"}, "RUNNING", "RUNNING"),
        ({"MVDATA_WANDB_OFFLINE_DIRS": "/runs", "MVDATA_WANDB_SENSOR": "off"}, "STOPPED", "STOPPED"),
        ({}, "STOPPED", "STOPPED"),
    ],
)
def test_each_sensor_starts_running_only_when_its_own_source_is_set(settings: dict, offline: str, api: str) -> None:
    code = (
        "import mvdata_assets.definitions as d; "
        "print(*(d.defs.get_sensor_def(n).default_status.value for n in ('wandb_offline_runs', 'wandb_api_runs')))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MVDATA_")} | settings
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [offline, api]
