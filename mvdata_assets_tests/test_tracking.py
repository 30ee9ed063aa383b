"""Download runs logged to W&B: written offline by the real SDK, read back with the project's own .wandb reader."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import duckdb
import pytest
import yaml
from dagster import (
    AssetSelection,
    DagsterInstance,
    Definitions,
    ReexecutionOptions,
    define_asset_job,
    execute_job,
    in_process_executor,
    materialize,
    reconstructable,
)

from mvdata_assets.cli import main
from mvdata_assets.datasets import assets as dataset_assets_module
from mvdata_assets.datasets.assets import dataset_assets
from mvdata_assets.datasets.catalog import load_catalog
from mvdata_assets.resources import DownloadTrackingResource, project_resources
from mvdata_assets.runs.offline import sync_offline
from mvdata_assets.settings import load_settings
from mvdata_assets.tracking import PROJECT, RunCounter, unreachable_reason
from mvdata_assets_tests.datasets.conftest import closed_port
from mvdata_assets_tests.datasets.downloading import catalog_assets
from mvdata_assets_tests.datasets.fileserver import FileServer

FILES = {"coco/a.json": b'{"images": []}' * 50, "coco/b.json": b"[1, 2, 3]", "vqa/q.json": b'{"questions": []}'}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Three datasets: complete (2 files), partial (one file gone from its host), manual."""
    with FileServer() as server:

        def entry(name: str) -> dict:
            data = FILES[name]
            return {"url": server.add(name, data), "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

        catalog = {
            "datasets": {
                "tiny_coco": {"description": "complete", "access": "public",
                              "files": [entry("coco/a.json"), entry("coco/b.json")]},
                "tiny_vqa": {"description": "partial", "access": "public",
                             "files": [entry("vqa/q.json"), {"url": f"{server.url}/vqa/gone.json", "size": 5}]},
                "tiny_flickr": {"description": "manual", "access": "manual", "instructions": "fill in the form"},
            }
        }  # fmt: skip
        (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(catalog))
        monkeypatch.setenv("MVDATA_CATALOG", str(tmp_path / "catalog.yaml"))
        monkeypatch.setenv("MVDATA_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_SILENT", "true")
        monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
        yield tmp_path / "home"


def _materialize(home: Path, tracking: DownloadTrackingResource, instance: DagsterInstance | None = None):
    instance = instance or DagsterInstance.ephemeral()
    result = materialize(
        catalog_assets(),
        resources={**project_resources(load_settings()), "tracking": tracking},
        instance=instance,
    )
    assert result.success
    metadata = {
        e.event_specific_data.materialization.asset_key.path[-1]: {
            k: v.value for k, v in e.event_specific_data.materialization.metadata.items()
        }
        for e in result.get_asset_materialization_events()
    }
    warnings = [e.user_message for e in instance.all_logs(result.run_id) if e.level >= 30 and e.user_message]
    return result, metadata, warnings


def _read_back(folder: Path) -> duckdb.DuckDBPyConnection:
    """Every run under `folder`, or the one run folder `folder` is, read by the project's own reader."""
    if folder.name.startswith("offline-run-"):
        alone = folder.parent / f"alone-{folder.name}"
        alone.mkdir()
        (alone / folder.name).symlink_to(folder)
        folder = alone
    conn = duckdb.connect()
    report = sync_offline(conn, [folder])
    assert not report.problems, report.problems
    return conn


def test_download_run_is_one_wandb_run_with_true_counts(home: Path) -> None:
    result, metadata, warnings = _materialize(home, DownloadTrackingResource(enabled=True, home=str(home)))
    assert not [w for w in warnings if "W&B" in w]
    datasets = ("tiny_coco", "tiny_vqa", "tiny_flickr")
    for name in datasets:
        assert metadata[name]["wandb_run_number"] == 1
        assert metadata[name]["wandb_run_name"] == "microvlme-datasets-1log"
    run_dir = Path(metadata["tiny_coco"]["wandb_offline_dir"])
    assert run_dir.parent == home / "tracking" / "wandb" and list(run_dir.glob("run-*.wandb"))
    assert RunCounter(home / "tracking").current() == 1

    conn = _read_back(home / "tracking")
    runs = conn.sql("SELECT project, display_name, tags, job_type, state, source FROM wandb.runs").fetchall()
    assert runs == [(PROJECT, "microvlme-datasets-1log", ["dataset_download", "run_1"], "dataset_download",
                     "finished", "offline")]  # fmt: skip
    config = {
        k: json.loads(j) if j else v
        for k, v, j in conn.sql("SELECT key, value, value_json FROM wandb.config").fetchall()
    }
    assert config["run_number"] == 1
    assert config["data_root"] == str(home / "datasets")
    assert sorted(config["datasets"]) == sorted(datasets)
    assert config["dagster_run_id"] == result.run_id
    assert datetime.fromisoformat(config["timestamp"]).utcoffset().total_seconds() == 0

    history: dict[int, dict] = {}
    for step, key, value, value_json in conn.sql("SELECT step, key, value, value_json FROM wandb.history").fetchall():
        history.setdefault(step, {})[key] = json.loads(value_json) if value_json else value
    # one step per dataset as it finishes, then the summary
    assert [history[s]["progress/datasets_processed"] for s in range(3)] == [1, 2, 3]
    assert [round(history[s]["progress/percentage"], 3) for s in range(3)] == [33.333, 66.667, 100.0]
    assert all(history[s]["progress/total_datasets"] == 3 for s in range(3))
    logged = {k: v for step in history.values() for k, v in step.items()}
    expected = {  # name: downloaded, failed, skipped, total, success rate
        "tiny_coco": (2, 0, 0, 2, 1.0),
        "tiny_vqa": (1, 1, 0, 2, 0.5),
        "tiny_flickr": (0, 0, 0, 0, 0.0),
    }
    for name, (downloaded, failed, skipped, total, rate) in expected.items():
        got = [logged[f"dataset/{name}/{m}"] for m in ("downloaded", "failed", "skipped", "total", "success_rate")]
        assert got == [downloaded, failed, skipped, total, rate], name
        assert logged[f"dataset/{name}/seconds"] >= 0
    assert logged["dataset/tiny_coco/bytes"] == len(FILES["coco/a.json"]) + len(FILES["coco/b.json"])
    summary = history[3]
    assert {k: summary[f"summary/{k}"] for k in (
        "total_files_downloaded", "total_files_failed", "total_files_skipped", "total_files_attempted",
        "fully_downloaded_datasets", "partially_downloaded_datasets", "failed_datasets", "skipped_special_access",
    )} == {  # fmt: skip
        "total_files_downloaded": 3, "total_files_failed": 1, "total_files_skipped": 0, "total_files_attempted": 4,
        "fully_downloaded_datasets": 1, "partially_downloaded_datasets": 1, "failed_datasets": 0,
        "skipped_special_access": 1,
    }  # fmt: skip
    assert summary["summary/overall_success_rate"] == 0.75
    assert summary["summary/duration_minutes"] == pytest.approx(summary["summary/duration_seconds"] / 60)
    datetime.fromisoformat(summary["summary/timestamp"])

    # the dataset_summary table: the old report's columns, one row per dataset, as the warehouse has them
    assert summary["dataset_summary._type"] == "table-file"
    table = json.loads((run_dir / "files" / summary["dataset_summary.path"]).read_text())
    assert table["columns"] == ["Dataset", "Status", "Downloaded", "Failed", "Skipped", "Total", "Success Rate",
                                "Est. Size"]  # fmt: skip
    rows = {row[0]: row[1:7] for row in table["data"]}
    assert rows == {
        "tiny_coco": ["complete", 2, 0, 0, 2, "100.0%"],
        "tiny_vqa": ["partial", 1, 1, 0, 2, "50.0%"],
        "tiny_flickr": ["manual", 0, 0, 0, 0, "0.0%"],
    }

    # the next download run gets the next number and its own W&B run
    _, metadata, _ = _materialize(home, DownloadTrackingResource(enabled=True, home=str(home)))
    assert metadata["tiny_coco"]["wandb_run_name"] == "microvlme-datasets-2log"
    assert Path(metadata["tiny_coco"]["wandb_offline_dir"]) != run_dir
    assert RunCounter(home / "tracking").current() == 2


def test_tracking_off_makes_no_run_and_leaves_the_counter_alone(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, metadata, _ = _materialize(home, DownloadTrackingResource(enabled=False, home=str(home)))
    assert metadata["tiny_coco"]["wandb_tracking"] == "off"
    assert not (home / "tracking").exists()
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the SDK's own switch turns tracking off too
    _, metadata, warnings = _materialize(home, DownloadTrackingResource(enabled=True, home=str(home)))
    assert metadata["tiny_coco"]["wandb_tracking"].startswith("skipped")
    assert "W&B tracking is off: WANDB_MODE=disabled" in warnings
    assert RunCounter(home / "tracking").current() == 0
    assert not (home / "tracking" / "wandb").exists()


def test_unreachable_wandb_warns_once_and_the_downloads_go_on(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = f"http://127.0.0.1:{closed_port()}"
    key = "k" * 40
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", closed)
    monkeypatch.setenv("WANDB_API_KEY", key)
    _, metadata, warnings = _materialize(home, DownloadTrackingResource(enabled=True, home=str(home)))
    assert metadata["tiny_coco"]["status"] == "complete"
    assert metadata["tiny_vqa"]["downloaded"] == 1
    tracking_warnings = [w for w in warnings if "W&B" in w]
    assert len(tracking_warnings) == 1  # one for the download run, naming the cause; the others stay quiet
    assert all(f"W&B server {closed} is unreachable" in w for w in tracking_warnings)
    assert not any(key in w for w in warnings)
    assert RunCounter(home / "tracking").current() == 0


_CHILD = """
import sys
from pathlib import Path
from mvdata_assets.datasets.store import Summary
from mvdata_assets.tracking import DownloadTracker
home, key, name, selected = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4].split(",")
tracker = DownloadTracker(home, selected, home / "datasets", warn=lambda m: sys.exit("warned: " + m),
                          dagster_run_id=key)
tracked = tracker.record(Summary(name, "complete", 1, 0, 0, 1, None, 10, 0.1), 10)
print(tracked.number, tracked.offline_dir)
"""


def _children(home: Path, jobs: list[tuple[str, str, str]]) -> list[tuple[int, Path]]:
    """Download runs (or steps of one) in processes of their own, as Dagster's run and step workers are."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}  # not this process's W&B service
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(home), key, name, selected], stdout=subprocess.PIPE, text=True, env=env
        )  # fmt: skip
        for key, name, selected in jobs
    ]
    outputs = [child.communicate()[0].split() for child in children]
    assert all(child.returncode == 0 for child in children)
    return [(int(number), Path(folder)) for number, folder in outputs]


def test_concurrent_download_runs_get_distinct_numbers(home: Path) -> None:
    tracked = _children(home, [(f"dagster-run-{i}", "tiny_coco", "tiny_coco") for i in range(3)])
    assert sorted(number for number, _ in tracked) == [1, 2, 3]
    assert len({folder for _, folder in tracked}) == 3
    assert RunCounter(home / "tracking").current() == 3
    conn = _read_back(home / "tracking")
    names = conn.sql("SELECT display_name FROM wandb.runs ORDER BY display_name").fetchall()
    assert names == [(f"microvlme-datasets-{i}log",) for i in (1, 2, 3)]


def test_steps_in_separate_processes_share_one_download_run(home: Path) -> None:
    """A multi-process executor runs each dataset in its own process: one number, one W&B run id, one summary."""
    ((first_number, first_dir),) = _children(home, [("one-dagster-run", "tiny_coco", "tiny_coco,tiny_vqa")])
    ((second_number, second_dir),) = _children(home, [("one-dagster-run", "tiny_vqa", "tiny_coco,tiny_vqa")])
    assert first_number == second_number == 1
    # the same W&B run id: the SDK names each folder's file run-<id>.wandb (the folder's own name gets "-1" added when
    # the second process starts within the same second as the first)
    run_files = [[path.name for path in folder.glob("run-*.wandb")] for folder in (first_dir, second_dir)]
    assert first_dir != second_dir and run_files[0] == run_files[1] and len(run_files[0]) == 1
    first = _read_back(first_dir)
    assert first.sql("SELECT max(value) FROM wandb.history WHERE key = 'progress/datasets_processed'").fetchone() == (
        1,
    )
    second = _read_back(second_dir)
    keys = {k for (k,) in second.sql("SELECT DISTINCT key FROM wandb.history").fetchall()}
    assert "summary/total_files_attempted" in keys and "dataset/tiny_vqa/downloaded" in keys
    assert second.sql("SELECT value FROM wandb.history WHERE key = 'summary/total_files_attempted'").fetchone() == (2,)
    # read together, as `wandb sync` uploads them: one run, the second segment's steps after the first's
    both = _read_back(home / "tracking")
    assert both.sql("SELECT count(*), max(history_rows) FROM wandb.runs").fetchone()[0] == 1
    processed = both.sql("""SELECT step, value FROM wandb.history WHERE key = 'progress/datasets_processed'
                            ORDER BY step""").fetchall()
    assert processed == [(0, 1.0), (1, 2.0)]
    assert both.sql("SELECT count(*) FROM (SELECT step, key FROM wandb.history GROUP BY ALL HAVING count(*) > 1)"
                    ).fetchone() == (0,)  # fmt: skip
    logged = {k for (k,) in both.sql("SELECT DISTINCT key FROM wandb.history").fetchall()}
    assert {"dataset/tiny_coco/downloaded", "dataset/tiny_vqa/downloaded", "summary/total_files_attempted"} <= logged


def test_a_terminal_download_is_a_download_run_too(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MVDATA_WANDB_TRACKING", "on")
    assert main(["download", "tiny_coco", "tiny_flickr"]) == 0
    assert "W&B: microvlme-datasets-1log: " in capsys.readouterr().out
    conn = _read_back(home / "tracking")
    config = dict(conn.sql("SELECT key, coalesce(value_json, value::VARCHAR) FROM wandb.config").fetchall())
    assert json.loads(config["datasets"]) == ["tiny_coco", "tiny_flickr"] and config["dagster_run_id"] == "null"
    logged = dict(conn.sql("SELECT key, value FROM wandb.history WHERE key LIKE 'summary/%files%'").fetchall())
    assert logged["summary/total_files_downloaded"] == 2 and logged["summary/total_files_attempted"] == 2
    monkeypatch.setenv("MVDATA_WANDB_TRACKING", "off")
    assert main(["download", "tiny_coco"]) == 0
    assert "W&B" not in capsys.readouterr().out and RunCounter(home / "tracking").current() == 1


def test_a_dataset_step_that_raises_is_logged_as_failed(home: Path, tmp_path: Path) -> None:
    """Refused for want of disk space: the step fails, the W&B log still counts the dataset, as failed."""
    catalog = yaml.safe_load((tmp_path / "catalog.yaml").read_text())
    catalog["datasets"]["huge"] = {"description": "more than any disk", "access": "public",
                                   "files": [{"url": "http://127.0.0.1:9/huge.bin", "size": 10**18}]}  # fmt: skip
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    instance = DagsterInstance.ephemeral()
    result = materialize(
        catalog_assets(),
        resources={
            **project_resources(load_settings()),
            "tracking": DownloadTrackingResource(enabled=True, home=str(home)),
        },
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    assert "GiB missing" in str(result.get_step_failure_events()[0].step_failure_data.error)
    conn = _read_back(home / "tracking")
    rows = conn.sql("SELECT key, value FROM wandb.history WHERE key LIKE 'dataset/huge/%' OR key LIKE 'summary/%'")
    logged = dict(rows.fetchall())
    assert logged["dataset/huge/failed"] == 1 and logged["dataset/huge/downloaded"] == 0
    assert logged["summary/failed_datasets"] == 1 and logged["summary/fully_downloaded_datasets"] == 1
    assert logged["summary/total_files_attempted"] == 5


def reexecuted_job():  # for `reconstructable`: the catalog's dataset assets as one job, from the settings now
    settings = load_settings()
    defs = Definitions(assets=dataset_assets(load_catalog(settings.catalog), 0),
                       jobs=[define_asset_job("datasets", selection=AssetSelection.groups("datasets"))],
                       resources=project_resources(settings), executor=in_process_executor)  # fmt: skip
    return defs.resolve_job_def("datasets")


def test_a_run_reexecuted_from_failure_logs_its_summary(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The re-execution runs only the failed dataset's step, under its own W&B run: that run's last dataset is it."""
    failing = {"tiny_vqa"}
    real = dataset_assets_module.download_dataset

    def flaky(dataset, *args, **kwargs):
        if dataset.name in failing:
            raise RuntimeError("the warehouse was busy")
        return real(dataset, *args, **kwargs)

    monkeypatch.setattr(dataset_assets_module, "download_dataset", flaky)
    monkeypatch.setenv("MVDATA_WANDB_TRACKING", "on")  # the job's resources come from the settings
    with DagsterInstance.ephemeral() as instance:
        first = execute_job(reconstructable(reexecuted_job), instance, raise_on_error=False)
        assert not first.success
        failing.clear()
        again = execute_job(reconstructable(reexecuted_job), instance, raise_on_error=False,
                            reexecution_options=ReexecutionOptions.from_failure(first.run_id, instance))  # fmt: skip
        assert again.success
        steps = instance.get_run_by_id(again.run_id).step_keys_to_execute
        assert "datasets__tiny_vqa" in steps and "datasets__tiny_coco" not in steps  # the failed dataset, downstream
    conn = _read_back(home / "tracking")
    logged = dict(
        conn.sql("""SELECT r.display_name, count(*) FILTER (WHERE h.key LIKE 'summary/%')
                              FROM wandb.runs r JOIN wandb.history h USING (entity, project, run_id)
                              GROUP BY ALL""").fetchall()
    )
    assert logged["microvlme-datasets-2log"] > 0  # the re-execution's one dataset, then its summary
    progress = conn.sql("""SELECT h.value FROM wandb.history h JOIN wandb.runs r USING (entity, project, run_id)
                           WHERE r.display_name = 'microvlme-datasets-2log' AND h.key = 'progress/total_datasets'
                        """).fetchall()
    assert progress == [(1.0,)]


def test_behind_a_proxy_the_proxy_is_what_must_be_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster that reaches W&B only through a proxy: the server itself is never tried (nor reached: loopback
    only here)."""
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        assert unreachable_reason("https://api.wandb.ai") is None
    gone = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HTTPS_PROXY", gone)
    reason = unreachable_reason("https://api.wandb.ai", timeout_s=1.0)
    assert reason is not None and reason.startswith(
        f"W&B server https://api.wandb.ai is unreachable through the proxy {gone} ("
    )
