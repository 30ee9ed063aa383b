"""The Dagster layer end to end: asset keys, materialisation metadata, checks, exports, the CLI."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from dagster import AssetKey, DagsterInstance, Definitions, evaluate_automation_conditions, materialize

from mvdata_assets.datasets.catalog import load_catalog
from mvdata_assets.db import WarehouseBusy, warehouse_lock
from mvdata_assets.definitions import defs
from mvdata_assets.demo import DEMO_RUNS, write_demo_runs
from mvdata_assets.resources import project_resources
from mvdata_assets.runs.assets import wandb_assets, wandb_checks
from mvdata_assets.settings import load_settings
from mvdata_assets_tests import dagster_cli

EXPECTED_KEYS = sorted(
    [
        "wandb/runs",
        "wandb/history",
        "wandb/config",
        "wandb/summary",
        "wandb/metadata",
        "wandb/system_metrics",
        "wandb/exports/runs_metadata",
        "wandb/exports/runs_metadata_config",
        "wandb/exports/runs_metadata_summary",
        "wandb/exports/runs_metadata_metadata",
        "wandb/exports/runs_metadata_system_metrics",
        "wandb/exports/runs_metadata_system_attrs",
        "wandb/exports/runs_metadata_sweep_info",
        "wandb/exports/runs_history",
        "wandb/leaderboard",
        "wandb/run_datasets",
    ]
)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's runs, written by the real wandb SDK (offline), one of them killed mid-training."""
    out = tmp_path_factory.mktemp("demo-runs")
    assert write_demo_runs(out) == list(DEMO_RUNS)
    return out


@pytest.fixture
def home(tmp_path: Path, demo_runs: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MVDATA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MVDATA_WANDB_OFFLINE_DIRS", str(demo_runs))
    # the killed demo run stays 'running' however slow the machine: no state flips between two materialisations
    monkeypatch.setenv("MVDATA_WANDB_RUNNING_WINDOW_S", "86400")
    return tmp_path / "home"


def _materialize(home: Path, instance: DagsterInstance, run_config: dict | None = None):
    result = materialize(
        [*wandb_assets, *wandb_checks],
        resources=project_resources(load_settings()),
        instance=instance,
        run_config=run_config,
    )
    assert result.success
    materializations = {
        m.asset_key.to_user_string(): m.metadata for m in result.asset_materializations_for_node("wandb_tables")
    }
    return result, materializations


def test_asset_keys_snapshot() -> None:
    keys = sorted(key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys())
    assert [k for k in keys if k.startswith("wandb/")] == EXPECTED_KEYS
    catalog = load_catalog()  # the bundled one: MVDATA_CATALOG is not set in the tests' environment
    assert [k for k in keys if k.startswith("datasets/")] == sorted(
        [f"datasets/{name}" for name in catalog] + ["datasets/download_summary"]
    )
    assert len(keys) == len(EXPECTED_KEYS) + len(catalog) + 1
    checks = {(k.asset_key.to_user_string(), k.name) for k in defs.resolve_asset_graph().asset_check_keys}
    assert {c for c in checks if c[0].startswith("wandb/")} == {
        ("wandb/history", "history_has_no_duplicates"),
        ("wandb/history", "history_runs_exist"),
    }
    assert ("datasets/coco", "no_failed_files") in checks and ("datasets/coco", "checksums_recorded") in checks
    Definitions.validate_loadable(defs)


def test_every_asset_has_what_a_dagster_user_looks_for() -> None:
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        name = key.to_user_string()
        assert node.owners == ["team:microvlm-e"] and node.code_version, name
        assert node.tags["mvdata/source"] == key.path[0] and any(t.startswith("dagster/kind/") for t in node.tags), name
        assert node.metadata["dagster/code_references"].code_references, name
        if key.path[-1] in ("runs", "history", "leaderboard", "run_datasets", "download_summary"):
            assert node.metadata["dagster/table_name"] == f"{key.path[0]}.{key.path[-1]}", name
    assert graph.get(AssetKey(["wandb", "runs"])).freshness_policy.fail_window.to_timedelta().total_seconds() == 86400
    checks = {key.name: graph.get_check_spec(key) for key in graph.asset_check_keys if key.asset_key.path[0] == "wandb"}
    assert checks["history_has_no_duplicates"].blocking  # duplicated values never flow on to the exports
    assert r"caption\<TAB\>url" in graph.get(AssetKey(["datasets", "cc3m"])).description  # not an HTML tag


def test_assets_link_to_their_code_in_git_when_the_repository_is_named() -> None:
    code = (
        "import mvdata_assets.definitions as d; from dagster import AssetKey; "
        "print(d.defs.resolve_asset_graph().get(AssetKey(['wandb', 'runs'])).metadata['dagster/code_references'])"
    )
    env = {**os.environ, "MVDATA_GIT_URL": "https://github.com/microvlm/mvdata", "MVDATA_GIT_BRANCH": "dev"}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "https://github.com/microvlm/mvdata/tree/dev/mvdata_assets/runs/assets.py" in done.stdout


def test_exports_are_downstream_of_the_tables() -> None:
    graph = defs.resolve_asset_graph()
    parents = graph.get(AssetKey(["wandb", "run_datasets"])).parent_keys  # the two halves joined
    assert {AssetKey(["datasets", "coco"]), AssetKey(["wandb", "config"])} <= parents
    parents = graph.get(AssetKey(["wandb", "exports", "runs_history"])).parent_keys
    assert AssetKey(["wandb", "history"]) in parents
    parents = graph.get(AssetKey(["wandb", "exports", "runs_metadata_config"])).parent_keys
    assert AssetKey(["wandb", "config"]) in parents


def test_materialize_fills_tables_and_reports_what_it_did(home: Path) -> None:
    instance = DagsterInstance.ephemeral()
    result, first = _materialize(home, instance)
    history = first["wandb/history"]
    assert history["runs_new"].value == len(DEMO_RUNS)
    assert history["runs_unchanged"].value == 0
    assert history["bytes_read"].value > 0
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        stored = conn.execute("SELECT count(*) FROM wandb.history").fetchone()[0]
        states = dict(conn.execute("SELECT display_name, state FROM wandb.runs").fetchall())
        last_steps = dict(conn.execute("SELECT display_name, last_step FROM wandb.runs").fetchall())
    assert history["rows_written"].value == stored == history["dagster/row_count"].value
    for table in ("runs", "config", "summary", "metadata", "system_metrics"):  # a fresh warehouse: all it holds is new
        written = first[f"wandb/{table}"]
        assert written["rows_written"].value == written["dagster/row_count"].value > 0, table
    assert {n for n, s in states.items() if s == "finished"} == {n for n, v in DEMO_RUNS.items() if v[3] is None}
    assert states["clip-lr6e-4-killed"] == "running"  # no exit record, and its file changed within the window
    assert last_steps["siglip-lr3e-4"] == DEMO_RUNS["siglip-lr3e-4"][2] - 1
    assert 0 < last_steps["clip-lr6e-4-killed"] <= DEMO_RUNS["clip-lr6e-4-killed"][3]
    schema = history["dagster/column_schema"].schema
    assert [c.name for c in schema.columns][:4] == ["entity", "project", "run_id", "step"]
    assert "train/loss" in history["preview"].value or "eval/" in history["preview"].value
    assert history["main_metrics"].value.startswith("![main metrics of the latest runs](data:image/png;base64,")
    board = result.asset_materializations_for_node("wandb__leaderboard")[0].metadata
    assert board["dagster/row_count"].value == len(DEMO_RUNS)
    assert board["metrics"].value["eval/vqav2_acc"] == "higher is better"
    assert board["metrics"].value["train/loss"] == "lower is better"
    assert set(board["config_keys"].value) >= {"optim.lr", "model.vision_encoder"}  # what differs between runs
    assert "siglip-lr3e-4" in board["newest runs"].value
    checks = result.get_asset_check_evaluations()
    assert {c.check_name: c.passed for c in checks} == {"history_has_no_duplicates": True, "history_runs_exist": True}
    assert {c.metadata["counts"].value for c in checks} == {"counted in this run"}

    again, second = _materialize(home, instance)
    assert second["wandb/history"]["runs_unchanged"].value == len(DEMO_RUNS)
    assert {second[f"wandb/{t}"]["rows_written"].value for t in ("runs", "history", "config", "system_metrics")} == {0}
    assert second["wandb/history"]["dagster/row_count"].value == stored
    checks = again.get_asset_check_evaluations()  # nothing synced: the counts stand, no history is read
    assert {c.check_name: c.passed for c in checks} == {"history_has_no_duplicates": True, "history_runs_exist": True}
    assert all(c.metadata["counts"].value.startswith("kept: the history has not changed") for c in checks)

    forced, refreshed = _materialize(home, instance, {"ops": {"wandb_tables": {"config": {"force_refresh": True}}}})
    assert refreshed["wandb/history"]["runs_updated"].value == len(DEMO_RUNS)
    assert refreshed["wandb/history"]["dagster/row_count"].value == stored
    assert {c.metadata["counts"].value for c in forced.get_asset_check_evaluations()} == {"counted in this run"}
    assert {m["wandb/history"]["runs_marked_crashed"].value for m in (first, second, refreshed)} == {
        0
    }  # all within the window

    # a run whose window its file has been quiet for is marked crashed: said in the metadata and the log
    quiet = {"resources": {"wandb": {"config": {"running_window_s": 0.001}}}}
    crashed, marked = _materialize(home, instance, quiet)
    assert (
        marked["wandb/history"]["runs_marked_crashed"].value == 1 == marked["wandb/runs"]["runs_marked_crashed"].value
    )
    logged = [e.user_message for e in instance.all_logs(crashed.run_id) if "marked crashed" in e.user_message]
    assert len(logged) == 1 and logged[0].endswith("; marked crashed, quiet past the running window: 1"), logged
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        killed = conn.execute("SELECT state FROM wandb.runs WHERE display_name = 'clip-lr6e-4-killed'").fetchone()
    assert killed == ("crashed",)


def test_downstream_follows_the_tables_by_itself(home: Path) -> None:
    """The automation sensor's evaluation: exports and leaderboard are requested after a sync, then not again."""
    instance = DagsterInstance.ephemeral()
    resources = project_resources(load_settings())
    wandb_defs = Definitions(assets=wandb_assets, resources=resources)
    start = evaluate_automation_conditions(defs=wandb_defs, instance=instance)  # the sensor's first tick
    assert start.total_requested == 0
    tables = [a for a in wandb_assets if a.node_def.name == "wandb_tables"]
    assert materialize(tables, resources=resources, instance=instance).success  # e.g. launched by the runs sensor
    after_sync = evaluate_automation_conditions(defs=wandb_defs, instance=instance, cursor=start.cursor)
    requested = {k for k in EXPECTED_KEYS if after_sync.get_num_requested(AssetKey.from_user_string(k))}
    assert requested == {k for k in EXPECTED_KEYS if k.startswith(("wandb/exports/", "wandb/leaderboard"))}
    _materialize(home, instance)  # everything, once
    again = evaluate_automation_conditions(defs=wandb_defs, instance=instance, cursor=after_sync.cursor)
    assert again.total_requested == 0
    automation = defs.get_sensor_def("mvdata_automation")
    assert automation.default_status.value == "RUNNING"


def test_history_export_holds_every_stored_value(home: Path) -> None:
    _materialize(home, DagsterInstance.ephemeral())
    wide = pq.read_table(home / "exports" / "runs_history.parquet").to_pylist()
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        long = conn.execute("SELECT run_id, step, key, value FROM wandb.history").fetchall()
        steps = conn.execute("SELECT count(DISTINCT (run_id, step)) FROM wandb.history").fetchone()[0]
    assert len(wide) == steps
    by_step = {(row["_run_id"], row["_step"]): row for row in wide}
    for run_id, step, key, value in long:
        exported = by_step[(run_id, step)][key]
        assert exported == value or (math.isnan(exported) and math.isnan(value)), (run_id, step, key)


def test_metadata_exports_are_typed_one_row_per_run(home: Path) -> None:
    _materialize(home, DagsterInstance.ephemeral())
    config = pq.read_table(home / "exports" / "runs_metadata_config.parquet")
    assert config.num_rows == len(DEMO_RUNS)
    assert str(config.schema.field("optim.lr").type) == "double"
    assert str(config.schema.field("model.vision_encoder").type) == "string"
    lrs = sorted(config["optim.lr"].to_pylist())
    assert lrs == sorted(v[0] for v in DEMO_RUNS.values())
    for name in ("summary", "metadata", "system_metrics", "system_attrs", "sweep_info"):
        table = pq.read_table(home / "exports" / f"runs_metadata_{name}.parquet")
        assert table.num_rows == len(DEMO_RUNS), name
        assert table.column_names[:3] == ["_entity", "_project", "_run_id"]


def test_unchanged_warehouse_keeps_exports(home: Path) -> None:
    instance = DagsterInstance.ephemeral()
    _materialize(home, instance)
    path = home / "exports" / "runs_history.parquet"
    before = path.stat().st_mtime_ns
    result, _ = _materialize(home, instance)
    rewritten = {
        m.asset_key.to_user_string(): m.metadata["rewritten"].value
        for m in result.asset_materializations_for_node("wandb_exports")
        if m.asset_key.path[-1] == "runs_history"
    }
    assert rewritten == {"wandb/exports/runs_history": False}
    assert path.stat().st_mtime_ns == before


def test_a_second_writer_waits_then_gives_up_with_the_reason(tmp_path: Path) -> None:
    database = tmp_path / "warehouse.duckdb"
    busy = pytest.raises(WarehouseBusy, match="warehouse.duckdb is being written by another process")
    with warehouse_lock(database), busy, warehouse_lock(database, timeout_s=0.3):
        pass
    with warehouse_lock(database, timeout_s=0.3) as waited:
        assert waited < 0.3


def test_dagster_cli_materializes_the_group(tmp_path: Path, demo_runs: Path) -> None:
    env = {
        **os.environ,
        "MVDATA_HOME": str(tmp_path / "home"),
        "DAGSTER_HOME": str(tmp_path / "dagster"),
        "MVDATA_WANDB_OFFLINE_DIRS": str(demo_runs),
    }
    (tmp_path / "dagster").mkdir()
    done = dagster_cli.materialize("mvdata_assets.definitions", "group:wandb", env, timeout_s=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "RUN_SUCCESS" in done.stderr
    with duckdb.connect(str(tmp_path / "home" / "warehouse.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM wandb.runs").fetchone()[0] == len(DEMO_RUNS)
    assert len(list((tmp_path / "home" / "exports").glob("*.parquet"))) == 8


def test_settings_are_resources_a_run_overrides(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The launchpad shows each setting as a resource field; a run's config overrides it within the same bounds."""
    monkeypatch.setenv("MVDATA_LEADERBOARD_METRICS", "*loss*")
    resources = project_resources(load_settings())
    assert resources["wandb"].leaderboard_metrics == ["*loss*"]
    fields = defs.get_repository_def().get_top_level_resources()["datasets"].config_schema.as_field().config_type.fields
    assert "MVDATA_IMAGE_TIMEOUT_S" in fields["image_timeout_s"].description
    instance = DagsterInstance.ephemeral()
    assert materialize([*wandb_assets], resources=resources, instance=instance, selection=["wandb/runs"]).success
    board = [a for a in wandb_assets if AssetKey(["wandb", "leaderboard"]) in a.keys]

    def metrics(run_config: dict) -> dict:
        result = materialize(board, resources=resources, instance=instance, run_config=run_config)
        [event] = result.get_asset_materialization_events()
        return event.materialization.metadata["metrics"].value

    assert metrics({}) and all("loss" in m for m in metrics({}))
    accuracy = metrics({"resources": {"wandb": {"config": {"leaderboard_metrics": ["*acc*"]}}}})
    assert accuracy and all("acc" in m for m in accuracy)
    refused = materialize(board, resources=resources, instance=instance, raise_on_error=False,
                          run_config={"resources": {"wandb": {"config": {"api_timeout_s": -1.0}}}})  # fmt: skip
    assert not refused.success
    error = str(refused.get_run_failure_event().event_specific_data.error)
    assert "api_timeout_s" in error and "greater than 0" in error


def test_tables_declare_their_columns_before_anything_is_stored(home: Path) -> None:
    graph = defs.resolve_asset_graph()
    declared = {
        key: graph.get(AssetKey.from_user_string(key)).metadata.get("dagster/column_schema")
        for key in [*(k for k in EXPECTED_KEYS if "/exports/" not in k and k != "wandb/leaderboard")]
    }
    assert all(declared.values()), [k for k, v in declared.items() if not v]
    _, stored = _materialize(home, DagsterInstance.ephemeral())
    for key, metadata in stored.items():  # the columns each sync reports are the ones declared
        assert metadata["dagster/column_schema"].value == declared[key], key
