"""The whole graph under the in-process and the multiprocess executor: the same warehouse, the same download log."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

from mvdata_assets.datasets.catalog import load_catalog
from mvdata_assets.demo import (
    DEMO_LIST_IMAGES,
    serve_directory,
    write_demo_catalog,
    write_demo_files,
    write_demo_runs,
)
from mvdata_assets.tracking import PROJECT
from mvdata_assets_tests import dagster_cli
from mvdata_assets_tests.demo_truth import runs_per_dataset

# what a download run logs that does not depend on timing: its per-dataset counts and its summary's counts
LOGGED_COUNTS = r"""(key SIMILAR TO 'dataset/[^/]+/(downloaded|failed|skipped|total|success_rate|bytes)' OR
                     key SIMILAR TO 'summary/(total_files_.*|overall_success_rate|.*_datasets|skipped_special_access)'
                    )"""


def _materialize_everything(module: str, home: Path, env: dict[str, str]) -> None:
    (home / "dagster").mkdir(parents=True)
    (home / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**env, "MVDATA_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}
    done = dagster_cli.materialize(module, "*", env, timeout_s=900)
    assert done.returncode == 0, done.stderr[-4000:]


def _contents(home: Path) -> dict[str, list]:
    """The warehouse as a user reads it: what differs only by a path prefix or a random id is left out."""
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        logged = conn.execute(f"""SELECT key, value FROM wandb.history JOIN wandb.runs USING (entity, project, run_id)
                                  WHERE project = '{PROJECT}' AND {LOGGED_COUNTS} ORDER BY key""").fetchall()
        return {
            # a shard's tar records when it was written: its checksum differs from run to run, its images do not
            "files": conn.execute(
                """SELECT dataset, replace(path, ?, ''), bytes, status,
                          CASE WHEN path LIKE '%/shards/%' THEN 'a shard' ELSE sha256 END
                   FROM datasets.files ORDER BY ALL""",
                [str(home)],
            ).fetchall(),
            "summary": conn.execute("""SELECT dataset, status, downloaded, failed, skipped, total
                                       FROM datasets.download_summary ORDER BY ALL""").fetchall(),
            "shards": conn.execute(
                "SELECT dataset, shard, images, in_place, failed FROM datasets.shards ORDER BY ALL"
            ).fetchall(),
            "runs": conn.execute("SELECT project, display_name, state FROM wandb.runs ORDER BY ALL").fetchall(),
            "training": conn.execute(f"""SELECT run_id, step, key, value FROM wandb.history h
                                         JOIN wandb.runs r USING (entity, project, run_id)
                                         WHERE r.project <> '{PROJECT}' ORDER BY ALL""").fetchall(),
            "logged": logged,
            "run_datasets": conn.execute("SELECT * EXCLUDE (entity) FROM wandb.run_datasets ORDER BY ALL").fetchall(),
        }


def test_the_multiprocess_executor_gives_the_same_warehouse_and_download_log(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_demo_runs(runs)
    www = tmp_path / "www"
    www.mkdir()
    with serve_directory(www) as base_url:
        files = write_demo_files(www, base_url)
        catalog = write_demo_catalog(tmp_path / "catalog.yaml", base_url, files)
        env = {**os.environ, "MVDATA_CATALOG": str(catalog), "MVDATA_WANDB_OFFLINE_DIRS": str(runs),
               "MVDATA_WANDB_TRACKING": "on", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
               # the demo's killed run stays 'running' however slow the machine: both warehouses agree on it
               "MVDATA_WANDB_RUNNING_WINDOW_S": "86400"}  # fmt: skip
        _materialize_everything("mvdata_assets.definitions", tmp_path / "in_process", env)
        _materialize_everything("mvdata_assets_tests.multiprocess_project", tmp_path / "multiprocess", env)
    # each dataset step of the multiprocess run resumed the download run's W&B run in a process, so a folder, of its
    # own: the offline reader joined them
    folders = list((tmp_path / "multiprocess" / "tracking" / "wandb").glob("offline-run-*"))
    assert len(folders) == len(load_catalog(catalog)), folders
    single, multi = _contents(tmp_path / "in_process"), _contents(tmp_path / "multiprocess")
    assert (
        single["logged"] and dict(single["logged"])["summary/total_files_downloaded"] == len(files) + DEMO_LIST_IMAGES
    )
    assert [(p, n) for p, n, _ in single["runs"]].count((PROJECT, "microvlme-datasets-1log")) == 1
    assert len(single["run_datasets"]) == sum(n for _, n in runs_per_dataset()) and len(single["files"]) >= len(files)
    for part in single:
        assert multi[part] == single[part], part
