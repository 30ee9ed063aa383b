"""The warehouse IO manager: a user's assets take the project's tables and datasets as inputs, and are stored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pytest
from dagster import AssetIn, AssetKey, AssetSpec, DagsterInstance, asset, materialize

from mvdata_assets.demo import DEMO_RUNS
from mvdata_assets.warehouse import DatasetManifest, WarehouseIOManager, WarehouseResource, WarehouseTable
from mvdata_assets_tests import dagster_cli
from mvdata_assets_tests.demo_truth import runs_per_dataset


def resources(tmp_path: Path) -> dict:
    warehouse = WarehouseResource(database=str(tmp_path / "warehouse.duckdb"))
    io_manager = WarehouseIOManager(warehouse=warehouse, exports_dir=str(tmp_path / "exports"),
                                    data_root=str(tmp_path / "datasets"))  # fmt: skip
    return {"warehouse": warehouse, "io_manager": io_manager}


RUNS = AssetSpec(["wandb", "runs"], metadata={"dagster/table_name": "wandb.runs"})
COCO = AssetSpec(["datasets", "coco"])


def failure(result) -> str:
    """The failed step's error with its causes: the user's error is the cause of Dagster's."""
    error = next(e for e in result.all_events if e.is_failure).event_specific_data.error
    messages = []
    while error is not None:
        messages.append(error.message)
        error = error.cause
    return "\n".join(messages)


@pytest.fixture
def warehouse(tmp_path: Path) -> Path:
    path = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(path)) as conn:
        conn.execute("CREATE SCHEMA wandb")
        conn.execute(
            "CREATE TABLE wandb.runs AS SELECT * FROM (VALUES ('r1', 'finished'), ('r2', 'running')) t(run_id, state)"
        )
    return path


def test_a_dataset_asked_for_as_a_table_and_a_table_written_into_the_engines_schema_fail_clearly(
    tmp_path: Path, warehouse: Path
) -> None:
    @asset(ins={"coco": AssetIn(key=COCO.key)})
    def wrong(coco: pd.DataFrame) -> None: ...

    result = materialize([COCO, wrong], resources=resources(tmp_path), raise_on_error=False)
    error = failure(result)
    assert "datasets/coco is a dataset: take it as a DatasetManifest" in error

    @asset(key_prefix="wandb")
    def runs_copy() -> pd.DataFrame:
        return pd.DataFrame({"a": [1]})

    result = materialize([runs_copy], resources=resources(tmp_path), raise_on_error=False)
    error = failure(result)
    assert "the schema 'wandb' is the project's own" in error

    @asset(key_prefix="analysis")
    def not_a_table() -> dict:
        return {"a": 1}

    result = materialize([not_a_table], resources=resources(tmp_path), raise_on_error=False)
    error = failure(result)
    assert "returned a dict; the warehouse stores a pandas DataFrame, a pyarrow Table or a DuckDB relation" in error
    with duckdb.connect(str(warehouse), read_only=True) as conn:  # nothing stored was lost or touched
        assert conn.execute("SELECT count(*) FROM wandb.runs").fetchone() == (2,)


def test_every_kind_of_input_and_output(tmp_path: Path, warehouse: Path) -> None:
    @asset(key_prefix="analysis", ins={"runs": AssetIn(key=RUNS.key)})
    def as_arrow(runs: pa.Table) -> pa.Table:
        return runs.filter(pa.compute.equal(runs["state"], "running"))

    @asset(key_prefix="analysis", ins={"runs": AssetIn(key=RUNS.key, metadata={"columns": ["state"]})})
    def only_states(runs) -> pd.DataFrame:  # unannotated: Arrow
        assert isinstance(runs, pa.Table) and runs.column_names == ["state"]
        return runs.to_pandas()

    @asset(key_prefix="analysis", ins={"runs": AssetIn(key=RUNS.key)})
    def from_relation(runs: WarehouseTable):
        return duckdb.sql("SELECT 42 AS answer")  # a relation of the user's own connection, stored streamed

    @asset(key_prefix="analysis", ins={"coco": AssetIn(key=COCO.key)})
    def manifest(coco: DatasetManifest) -> pd.DataFrame:
        return pd.DataFrame({"name": [coco.name], "status": [coco.status], "files": [len(coco.files)]})

    @asset(key_prefix="analysis", ins={"picked": AssetIn(key=AssetKey(["analysis", "as_arrow"]))})
    def downstream_of_mine(picked: pd.DataFrame) -> pd.DataFrame:
        return picked.assign(seen=True)

    instance = DagsterInstance.ephemeral()
    result = materialize([RUNS, COCO, as_arrow, only_states, from_relation, manifest, downstream_of_mine],
                         resources=resources(tmp_path), instance=instance)  # fmt: skip
    assert result.success
    with duckdb.connect(str(warehouse), read_only=True) as conn:
        assert conn.execute("SELECT * FROM analysis.as_arrow").fetchall() == [("r2", "running")]
        assert sorted(conn.execute("SELECT * FROM analysis.only_states").fetchall()) == [("finished",), ("running",)]
        assert conn.execute("SELECT * FROM analysis.from_relation").fetchall() == [(42,)]
        assert conn.execute("SELECT * FROM analysis.manifest").fetchall() == [("coco", "missing", 0)]
        assert conn.execute("SELECT * FROM analysis.downstream_of_mine").fetchall() == [("r2", "running", True)]
    metadata = instance.get_latest_materialization_event(AssetKey(["analysis", "as_arrow"])).asset_materialization
    assert metadata.metadata["dagster/table_name"].value == "analysis.as_arrow"
    assert metadata.metadata["dagster/row_count"].value == 1
    assert [c.name for c in metadata.metadata["dagster/column_schema"].schema.columns] == ["run_id", "state"]


def test_a_relation_over_ten_million_rows_keeps_memory_flat(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import json, resource, duckdb
        from dagster import AssetIn, AssetSpec, asset, materialize
        from mvdata_assets.warehouse import WarehouseIOManager, WarehouseResource, WarehouseTable
        path = {str(tmp_path / "big.duckdb")!r}
        with duckdb.connect(path) as conn:
            conn.execute("CREATE SCHEMA wandb")
            conn.execute('''CREATE TABLE wandb.history AS SELECT i // 1000 AS run_id, i AS step, 'train/loss' AS key,
                            random() AS value FROM range(10000000) t(i)''')
        warehouse = WarehouseResource(database=path)
        spec = AssetSpec(["wandb", "history"], metadata={{"dagster/table_name": "wandb.history"}})

        @asset(key_prefix="analysis", ins={{"history": AssetIn(key=spec.key)}})
        def per_run(history: WarehouseTable):
            with history.relation() as rel:
                return rel.aggregate("run_id, min(value) AS best").to_arrow_table()

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        io = WarehouseIOManager(warehouse=warehouse, exports_dir="", data_root="")
        assert materialize([spec, per_run], resources={{"io_manager": io}}).success
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with duckdb.connect(path, read_only=True) as conn:
            rows = conn.execute("SELECT count(*) FROM analysis.per_run").fetchone()[0]
        print(json.dumps({{"grown_mb": (after - before) / 1024, "rows": rows}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["rows"] == 10_000
    assert measured["grown_mb"] < 150, measured  # 10 M rows as Arrow would be ~300 MB


def test_a_users_module_builds_on_the_demo_with_the_dagster_cli(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "MVDATA_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}
    dagster_cli.run_demo(env)
    env.update(MVDATA_CATALOG=str(home / "demo" / "catalog.yaml"),
               MVDATA_WANDB_OFFLINE_DIRS=str(home / "demo" / "wandb-runs"),
               WANDB_MODE="offline", WANDB_SILENT="true")  # fmt: skip

    def materialize_cli(module: str, selection: str) -> str:
        done = dagster_cli.materialize(module, selection, env)
        assert done.returncode == 0, done.stderr[-4000:]
        return done.stderr

    assert "RUN_SUCCESS" in materialize_cli("mvdata_assets_tests.user_project", "group:analysis")
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        per_state = conn.execute("SELECT state, runs FROM analysis.runs_per_state ORDER BY state").fetchall()
        assert (
            per_state == conn.execute("SELECT state, count(*) FROM wandb.runs GROUP BY state ORDER BY state").fetchall()
        )
        best = conn.execute("SELECT run_id, best_loss FROM analysis.best_loss ORDER BY run_id").fetchall()
        assert (
            best
            == conn.execute("""SELECT run_id, min(value) FROM wandb.history WHERE key = 'train/loss'
                                       AND isfinite(value) GROUP BY run_id ORDER BY run_id""").fetchall()
        )
        assert len(best) == len(DEMO_RUNS)  # the demo's training runs (its download log has no loss)
        keys = dict(conn.execute("SELECT key, run_id_count_distinct FROM analysis.config_keys").fetchall())
        assert keys == dict(
            conn.execute("SELECT key, count(DISTINCT run_id) FROM wandb.config GROUP BY key").fetchall()
        )
        coco = conn.execute("SELECT path, sha256, status FROM analysis.coco_files").fetchall()
        files = conn.execute("SELECT path, sha256 FROM datasets.files WHERE dataset = 'demo_coco'").fetchall()
        assert [(p, s) for p, s, _ in coco] == files and all(s for _, s in files)
        assert {status for *_, status in coco} == {"complete"}
        used = conn.execute("SELECT dataset, count(*) FROM wandb.run_datasets GROUP BY ALL ORDER BY ALL").fetchall()
        assert used == runs_per_dataset()

    instance = DagsterInstance.from_config(str(home / "dagster"))

    def versions() -> dict[str, str]:
        return {
            key: instance.get_latest_materialization_event(AssetKey.from_user_string(key)).tags["dagster/data_version"]
            for key in ("datasets/demo_coco", "wandb/history")
        }

    before = versions()
    # the leaderboard's upstream, whatever the selection: the W&B tables are one step that can be subset
    assert "RUN_SUCCESS" in materialize_cli("mvdata_assets.definitions", "+wandb/leaderboard")
    assert "RUN_SUCCESS" in materialize_cli("mvdata_assets.definitions", "datasets/demo_coco")
    assert versions() == before  # re-runs that changed nothing: the same data versions, nothing downstream stale
    consumed = instance.get_latest_materialization_event(AssetKey(["analysis", "coco_files"])).tags
    assert consumed["dagster/input_data_version/datasets/demo_coco"] == before["datasets/demo_coco"]
